"""The C++ extension's own concerns: its 16-bit row loops round exactly as eager PyTorch does
(csrc/row_ops.*, which has a vectorised float16 path); it is built with OpenMP where setup.py
asks for it; without the compiled extension, fusedemb still imports, with one clear warning,
then the reference."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_cpp, run_python

# Runs in a fresh interpreter where importing fusedemb._C fails, as on a machine without the build.
SCRIPT = """
import importlib.abc, sys, warnings

class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fusedemb._C":
            raise ImportError("simulated: extension not built")

sys.meta_path.insert(0, NoExtension())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, fusedemb
messages = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
assert len(messages) == 1, messages
assert "pip install --no-build-isolation -e ." in messages[0]
assert not fusedemb.CPP_EXTENSION_AVAILABLE
assert "cpp" not in fusedemb.available_backends("cpu")
from fusedemb.functional import resolve_backend
assert resolve_backend(None, torch.device("cpu")) == "reference"
ids = torch.tensor([[1, 2, 3]])
tok, pos = torch.randn(5, 4), torch.randn(3, 4)
assert torch.equal(fusedemb.fused_embedding(ids, tok, pos), tok[ids] + pos)
print("ok")
"""


def test_import_without_extension_warns_once_and_falls_back_to_reference():
    result = run_python("-c", SCRIPT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# What `#pragma omp parallel` compiles to: a call into GCC's libgomp or LLVM's libomp.
OPENMP_ENTRY_POINTS = (b"GOMP_parallel", b"__kmpc_fork_call")


@requires_cpp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP entry points checked are Linux builds' (setup.py builds serial on macOS)")
def test_the_extension_is_compiled_with_openmp():
    """at::parallel_for is inline in the extension's own code, and serial unless the extension
    itself is compiled with OpenMP (-fopenmp: PyTorch's own build having it is not enough). A
    build without it still passes every other test, on one thread: the compiled library must
    call into an OpenMP runtime."""
    library = Path(importlib.util.find_spec("fusedemb._C").origin).read_bytes()
    assert any(entry in library for entry in OPENMP_ENTRY_POINTS), "fusedemb._C was built without OpenMP"


def random_bit_patterns(count: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Values of a 16-bit float dtype from random bits: every exponent, subnormals, both zeros,
    infinities and NaNs. Sums of two of them often fall exactly halfway between neighbours of
    the dtype (ties), or past its largest value."""
    return torch.randint(-(2**15), 2**15, (count,), dtype=torch.int16, generator=generator).view(dtype)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit, except that a NaN may be any NaN (NaN bits differ between PyTorch's
    own scalar and vectorised conversions)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_rows_round_to_nearest_even_as_eager_does(dtype):
    """Bit for bit: out = round(float32(tok) + float32(pos)) and each gradient row the rounded
    float32 sum of its two gradient rows (two terms: the order of addition cannot matter). D =
    43 covers the 8-wide vectorised loop and its scalar tail."""
    generator = torch.Generator().manual_seed(23)
    batch, seq_len, dim = 2, 32, 43
    tok = random_bit_patterns(seq_len * dim, dtype, generator).view(seq_len, dim)
    pos = random_bit_patterns(seq_len * dim, dtype, generator).view(seq_len, dim)
    ids = torch.randperm(batch * seq_len, generator=generator).view(batch, seq_len) % seq_len  # each id twice
    out = torch.ops.fusedemb.cpu_forward(ids, tok, pos, None, 0)
    assert_same_bits(out, (tok[ids].float() + pos.float()).to(dtype))

    grad_out = random_bit_patterns(batch * seq_len * dim, dtype, generator).view(batch, seq_len, dim)
    grad_tok, grad_pos = torch.ops.fusedemb.cpu_backward(grad_out, ids, None, 0, seq_len, seq_len, -1)
    rows = grad_out.float().view(-1, dim)
    assert_same_bits(grad_tok, torch.zeros(seq_len, dim).index_add_(0, ids.view(-1), rows).to(dtype))
    assert_same_bits(grad_pos, (grad_out[0].float() + grad_out[1].float()).to(dtype))
