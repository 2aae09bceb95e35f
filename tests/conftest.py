"""Shared test setup: which backends run here, and how results are compared.

On a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. It must
be switched on before triton compiles anything, i.e. before fusedemb is imported, hence here.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedemb

TABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)

# Normalised max error allowed for gradients against the float64 reference:
# max |actual - expected| / max(1, max |expected|). One rounding to the dtype plus float32
# accumulation error over at most a few thousand terms.
GRAD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _backend_configs():
    """(backend, device, deterministic) triples that can run here; 'deterministic' only matters
    for Triton, whose token gradient has a fast (atomic) and a deterministic (sorted) mode."""
    configs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in fusedemb.available_backends(device):
            if backend == "reference":
                continue
            modes = (False, True) if backend == "triton" else (True,)
            configs.extend((backend, device, mode) for mode in modes)
    return configs


BACKEND_CONFIGS = _backend_configs()


def config_id(config) -> str:
    backend, device, deterministic = config
    mode = "" if backend != "triton" else ("-det" if deterministic else "-fast")
    return f"{backend}-{device}{mode}"


@pytest.fixture(params=BACKEND_CONFIGS, ids=[config_id(c) for c in BACKEND_CONFIGS])
def backend_config(request):
    return request.param


def interpreted(device: str, backend: str) -> bool:
    return backend == "triton" and device == "cpu"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare a gradient with its float64 reference."""
    assert actual.dtype == dtype, f"gradient has dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape
    expected = expected.double().cpu()
    error = (actual.double().cpu() - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert error / scale <= GRAD_TOLERANCE[dtype], f"gradient error {error:.3e} (scale {scale:.3e}) for {dtype}"
