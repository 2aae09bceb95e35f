"""The interpreter's bounds check (interpreted_memory_check) fires on planted out-of-bounds
accesses, and lets masked-off ones pass: it patches Triton internals that a new release may
rename, and the parity suite's silence means something only if it still fires."""

from __future__ import annotations

import contextlib

import pytest
import torch
from interpreted_memory_check import MemoryAccessError

from fusedemb.ops import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="checks Triton's interpreter (TRITON_INTERPRET=1, no CUDA)")

if INTERPRETED:
    import triton
    import triton.language as tl

    @triton.jit
    def copy_shifted_kernel(src_ptr, dst_ptr, n, shift, USE_ATOMIC: tl.constexpr, BLOCK: tl.constexpr):
        """dst[i] = src[i + shift] (or atomically added into dst[i + shift]) for i < n: a shift
        off the end reads or writes outside the buffers."""
        i = tl.arange(0, BLOCK)
        keep = i < n
        if USE_ATOMIC:
            tl.atomic_add(dst_ptr + i + shift, tl.load(src_ptr + i, mask=keep), mask=keep)
        else:
            tl.store(dst_ptr + i, tl.load(src_ptr + i + shift, mask=keep), mask=keep)

    @triton.jit
    def store_shifted_kernel(dst_ptr, n, shift, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst_ptr + i + shift, i.to(tl.float32), mask=i < n)


@contextlib.contextmanager
def raises_memory_access_error(message: str):
    """The interpreter wraps a kernel's exception in its InterpreterError, the original as its cause."""
    with pytest.raises(Exception) as caught:  # (the cause is checked below)
        yield
    assert isinstance(caught.value.__cause__, MemoryAccessError), repr(caught.value)
    assert message in str(caught.value.__cause__)


def test_accesses_inside_the_buffers_pass():
    src, dst = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    copy_shifted_kernel[(1,)](src, dst, 8, 0, USE_ATOMIC=False, BLOCK=16)  # lanes 8-15 masked off
    assert torch.equal(dst, src)
    view = torch.zeros(16)[4:8]  # a view may touch the rest of its storage
    copy_shifted_kernel[(1,)](torch.arange(16, dtype=torch.float32)[4:8], view, 4, 4, USE_ATOMIC=False, BLOCK=4)
    assert torch.equal(view, torch.arange(8, 12, dtype=torch.float32))


@pytest.mark.parametrize("shift", [-1, 1], ids=["before", "after"])
def test_a_load_outside_every_buffer_raises(shift):
    src, dst = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    with raises_memory_access_error("copy_shifted_kernel: a load of 4 bytes"):
        copy_shifted_kernel[(1,)](src, dst, 8, shift, USE_ATOMIC=False, BLOCK=8)


def test_a_store_or_atomic_past_the_end_raises():
    with raises_memory_access_error("store_shifted_kernel: a store of 4 bytes"):
        store_shifted_kernel[(1,)](torch.zeros(8), 8, 1, BLOCK=8)
    with raises_memory_access_error("copy_shifted_kernel: an atomic of 4 bytes"):
        copy_shifted_kernel[(1,)](torch.ones(8), torch.zeros(8), 8, 8, USE_ATOMIC=True, BLOCK=8)
