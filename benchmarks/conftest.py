"""Fixtures of the pytest-benchmark suite.

Two modes, real numbers (the first two lines: a run, or one compared with a saved run) and quick:

    pytest benchmarks/ --benchmark-json=base.json        real numbers (GB/s in each extra_info)
    pytest benchmarks/ --benchmark-compare=0001 ...      compare with a saved run (--benchmark-autosave)
    pytest benchmarks/ --benchmark-disable -q            quick: every benchmark runs once, untimed,
                                                         on a tiny problem; CI runs this so the
                                                         suite cannot rot between real runs

Both modes pass every implementation through the correctness gate first.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fusedemb.bench.configs import PRESETS, ModelConfig
from fusedemb.bench.timing import CacheFlush

TINY = PRESETS["tiny"]


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture
def quick(request) -> bool:
    """True under --benchmark-disable: run once on tiny sizes, only to prove the code works."""
    return bool(request.config.getoption("benchmark_disable"))


@pytest.fixture
def model_config(quick) -> ModelConfig:
    return TINY if quick else PRESETS["gpt2-124M"]


@pytest.fixture
def batch(quick, device) -> int:
    """2 when quick; else 16k tokens on a GPU (the middle of GPT-2 training batches), 4k on a CPU."""
    if quick:
        return 2
    return 16 if device == "cuda" else 4


@pytest.fixture(scope="session")
def cache_flushes():
    """One flush buffer per device for the whole session, allocated on first use."""
    return functools.cache(CacheFlush)
