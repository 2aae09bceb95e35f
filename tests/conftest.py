"""Shared test setup: which backends run here, and how results are compared.

On a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. It must
be switched on before triton compiles anything, i.e. before fusedemb is imported, hence here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from interpreted_memory_check import checked_memory_accesses
from shared_data import REPO_ROOT

import fusedemb
from fusedemb.accuracy import scatter_add_error
from fusedemb.reference import default_positions, fused_embedding_reference, scatter_add_rows


def _tag_compile_caches_with_the_sources() -> None:
    """Inductor's on-disk caches key a graph by its operators' names, not by the Python rules
    registered with them (docs/usage.md, torch.compile), so after a change to fusedemb a test could
    run a graph compiled before it and pass on the old code. Their keys get a digest of fusedemb's
    sources (after any tag already set), here and in the test's subprocesses; unchanged sources
    keep their cached graphs."""
    digest = hashlib.sha256()
    sources = [*(REPO_ROOT / "fusedemb").rglob("*.py"), *(REPO_ROOT / "csrc").rglob("*")]
    for path in sorted(path for path in sources if path.is_file()):
        digest.update(path.read_bytes())
    tag, ours = torch.compiler.config.cache_key_tag, f"fusedemb-{digest.hexdigest()[:16]}"
    if not tag.endswith(ours):  # (pytest-xdist's workers inherit the controller's)
        torch.compiler.config.cache_key_tag = os.environ["TORCH_COMPILE_CACHE_KEY_TAG"] = tag + ours


_tag_compile_caches_with_the_sources()


def run_python(*args: str, timeout: int = 300, **env: str | None) -> subprocess.CompletedProcess:
    """The Python running the tests, with args, in a fresh process that imports this checkout's
    fusedemb as a plain user would: without TRITON_INTERPRET (set for this process above), with
    env's variables set (None: unset); its output captured as text."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environment.get("PYTHONPATH", "")])
    environment.update(env)
    environment = {name: value for name, value in environment.items() if value is not None}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, timeout=timeout,
                          check=False)  # fmt: skip


TABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)

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
# Where the tests that need one device run the kernels: the GPU if there is one, else the CPU
# (the Triton kernels interpreted).
ANY_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_CONFIGS = [config for config in BACKEND_CONFIGS if config[0] == "triton"]
requires_triton = pytest.mark.skipif(not TRITON_CONFIGS, reason="Triton backend unavailable")
# The C++ kernels need the extension built; the GPU machines' sessions run the tests without it.
requires_cpp = pytest.mark.skipif(not fusedemb.CPP_EXTENSION_AVAILABLE, reason="C++ extension not built")


@pytest.fixture(scope="session", autouse=True)
def interpreted_memory_accesses_checked():
    """Every interpreted Triton kernel's accesses checked against its launch's buffers
    (interpreted_memory_check), for the whole run, where the kernels run in the interpreter."""
    from fusedemb.ops import INTERPRETED

    if not INTERPRETED:
        yield
        return
    with checked_memory_accesses():
        yield


def config_id(config) -> str:
    backend, device, deterministic = config
    mode = "" if backend != "triton" else ("-det" if deterministic else "-fast")
    return f"{backend}-{device}{mode}"


@pytest.fixture(params=BACKEND_CONFIGS, ids=[config_id(c) for c in BACKEND_CONFIGS])
def backend_config(request):
    return request.param


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied and its counters cleared: graphs made by other tests (or by other
    parameters of this one, whose functions share code) neither count nor stand in."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def interpreted(device: str, backend: str) -> bool:
    return backend == "triton" and device == "cpu"


def assert_output_equal(out: torch.Tensor, expected: torch.Tensor, device: str, backend: str) -> None:
    """The forward is one rounding of tok + pos, as eager's: equal bit for bit."""
    if interpreted(device, backend) and out.dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 -> bfloat16 toward zero (compiled kernels round to
        # nearest even), so there the sum may be one bfloat16 ulp (2^-7 relative) off. (It also
        # flushes subnormals to zero and turns an overflow into the largest bfloat16, not inf: the
        # tests' tables of randn values meet neither.)
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def zipf_ids(shape, vocab, exponent, device):
    """Ids of rank k (id k - 1) drawn with probability proportional to k^-exponent."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    flat = torch.multinomial(weights, int(torch.tensor(shape).prod()), replacement=True)
    return flat.reshape(shape).to(device)


# Normalised max error allowed for gradients, max |actual - expected| / max(1, max |expected|):
# one rounding to the dtype plus float32 accumulation over at most a few thousand terms. Checked
# besides the per-element bound, which is loose for rows of thousands of tokens.
GRAD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def assert_grad_close(actual, grad_out, index, dtype, skip_row=None) -> None:
    """Check a table gradient against the exact scatter-add of grad_out at index: element by
    element within the float32-accumulation bound of fusedemb.accuracy (rows no token touches
    exactly zero), and as a whole within GRAD_TOLERANCE (hot rows)."""
    assert actual.dtype == dtype, f"gradient has dtype {actual.dtype}, expected {dtype}"
    error = scatter_add_error(actual, grad_out, index, skip_row)
    assert error <= 1, f"{dtype} gradient off by {error:.3g} times the error bound of float32 accumulation"
    expected = scatter_add_rows(grad_out.double(), index, actual.shape[0], skip_row)  # the reference, in float64
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    worst = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert worst / scale <= GRAD_TOLERANCE[dtype], f"gradient error {worst:.3e} (scale {scale:.3e}) for {dtype}"


def token_order_sums(index: torch.Tensor, grad_out: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The gradient of a table looked up at index, as a sequential loop adds it: each row the
    float32 sum of its tokens' gradient rows, left to right in token order (one rounding per
    addition), rounded once to grad_out's dtype."""
    dim = grad_out.shape[-1]
    sums = torch.zeros(num_rows, dim, dtype=torch.float32, device=grad_out.device)
    for row, grad_row in zip(index.flatten().tolist(), grad_out.reshape(-1, dim).float()):
        sums[row] += grad_row
    return sums.to(grad_out.dtype)


@contextlib.contextmanager
def num_threads(threads: int):
    """torch's CPU thread count set for the block, and put back after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) for the block (which fusedemb's default
    backward mode follows), and the previous setting, warn_only included, put back after it."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


class RowSort(NamedTuple):
    num_rows: int  # the size of the table the sort is for
    stream: object  # the side stream it ran on (a torch.cuda.Stream), or None: the current one


@pytest.fixture
def row_sorts(monkeypatch):
    """The Triton backward's sorts of ids by row (sorted_scatter.sort_by_row), call by call: the
    token table's, called from backward.py, and the position table's, through sorted_scatter_add."""
    from fusedemb.kernels import backward, sorted_scatter

    calls = []
    real = sorted_scatter.sort_by_row

    def spy(index, num_rows, stream=None):
        calls.append(RowSort(num_rows, stream))
        return real(index, num_rows, stream)

    monkeypatch.setattr(backward, "sort_by_row", spy)
    monkeypatch.setattr(sorted_scatter, "sort_by_row", spy)
    return calls


def make_tables(num_embeddings, context_length, dim, dtype, device):
    tok = torch.randn(num_embeddings, dim, dtype=dtype, device=device, requires_grad=True)
    pos = torch.randn(context_length, dim, dtype=dtype, device=device, requires_grad=True)
    return tok, pos


def fused_embedding_for(config, **options):
    """fusedemb.fused_embedding with config's backend and backward mode bound, and options (any
    other keywords, which a call may still override)."""
    backend, _, deterministic = config
    return functools.partial(fusedemb.fused_embedding, backend=backend, deterministic=deterministic, **options)


def check_against_reference(
    config, ids, tok, pos, *, position_ids=None, position_offset=0, padding_idx=None, grad_out=None
):
    fused = fused_embedding_for(config)
    out = fused(ids, tok, pos, position_ids=position_ids, position_offset=position_offset, padding_idx=padding_idx)
    with torch.no_grad():
        expected = fused_embedding_reference(ids, tok, pos, position_ids, position_offset, padding_idx)
    assert out.shape == (*ids.shape, tok.shape[1])
    assert out.dtype == tok.dtype
    assert_output_equal(out, expected, config[1], config[0])

    if grad_out is None:
        grad_out = torch.randn_like(out)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok, pos), grad_out)
    skip_row = None if padding_idx is None else padding_idx % tok.shape[0]
    positions = default_positions(ids, position_offset) if position_ids is None else position_ids.expand(ids.shape)
    assert_grad_close(grad_tok, grad_out, ids, tok.dtype, skip_row)
    assert_grad_close(grad_pos, grad_out, positions, pos.dtype)
    return out, grad_tok, grad_pos
