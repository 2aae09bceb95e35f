"""What the Triton kernels share: how they are launched, their tiling, their accumulator type.

Launching goes through `torch.library.wrap_triton` so that torch.compile sees the kernels
inside our `triton_op`s. Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, used by CI)
`@triton.jit` yields an InterpretedFunction that some torch releases refuse to wrap: it is
called directly, and fusedemb.ops keeps such calls out of traced graphs.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

# Elements of one (rows x columns) tile a program moves per pass: 16 KiB of float32. Enough
# independent 16-byte loads per thread to cover memory latency, few enough to stay in registers.
TILE_ELEMENTS = 4096
# Widest column block: 256 columns split D = 768 (gpt2) and 4096 exactly into whole blocks.
MAX_BLOCK_DIM = 256


# Grid arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions in recent Triton releases, and calling them from Python costs microseconds each,
# which adds up on the host side of every launch.
def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def column_block(dim: int) -> int:
    """The power of two at or above dim, at most MAX_BLOCK_DIM."""
    return min(1 << max(dim - 1, 0).bit_length(), MAX_BLOCK_DIM)


def rows_per_tile(block_dim: int) -> int:
    return max(1, TILE_ELEMENTS // block_dim)


class Tile(NamedTuple):
    """A launch's tiling: each program covers `rows` x `columns` elements (rows of the kernel's
    own kind: tokens, table rows, positions) with `warps` warps. The kernels that are tuned by
    tile have one function each that picks it (forward_tile, sweep_tile), so that a launcher and
    benchmarks/tile_sweep.py, which times its neighbours, agree on it."""

    rows: int
    columns: int
    warps: int


def accumulates_in_float64(table_dtype: torch.dtype) -> bool:
    """float32 arithmetic for 32- and 16-bit tables (as PyTorch's own kernels), float64 for float64."""
    return table_dtype == torch.float64


@triton.jit
def to_accumulator(x, ACC_FP64: tl.constexpr):
    if ACC_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


def resolve_negation(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors with PyTorch's lazy negation applied (None stays None). A negative view
    (torch._neg_view, or the imaginary part of a conjugated complex tensor) holds the negatives
    of its values, with a bit saying so; PyTorch's kernels honour the bit, which the dispatcher
    resolves before a custom operator's kernel runs, but a Triton kernel called directly reads
    the memory as it is. (is_neg first: resolve_neg goes through the dispatcher, a few times
    the host time, even for a tensor without the bit.)"""
    for tensor in tensors:
        if tensor is not None and tensor.is_neg():
            return tuple(None if tensor is None else tensor.resolve_neg() for tensor in tensors)
    return tensors


def on_device_of(tensor: torch.Tensor):
    """A context in which `tensor`'s GPU is the current device. Triton launches a kernel on the
    current device and its current stream, whatever device the pointers it is given live on: a
    call with cuda:1 tensors while cuda:0 is current would run on cuda:0 and read cuda:1's memory
    from there. PyTorch's own operators switch devices the same way (a device guard). CPU
    tensors (the interpreter) need nothing, and nor do fake tensors: a traced call launches
    nothing (Inductor guards the devices of the kernels it emits), and tracing for a GPU may run
    on a host without one, where switching devices would raise."""
    # `type(...) is torch.Tensor` first: is_fake costs microseconds, and real tensors are plain.
    if not tensor.is_cuda or (type(tensor) is not torch.Tensor and is_fake(tensor)):
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device.index)


# Triton's interpreter runs a launch on process-wide state: one grid index and grid size for all
# threads (triton.runtime.interpreter.interpreter_builder), and triton.language's functions
# swapped for interpreted ones for the launch, put back after it. Two threads launching at once
# (each with its own tensors) read each other's program ids: InterpreterErrors ("z >=
# grid_dim[2]", "Did you forget to add @triton.jit ?"), gradients silently wrong, and
# triton.language left patched (triton 3.9). So interpreted launches take turns; compiled
# kernels keep no such state and launch without the lock.
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, grid, *args, **kwargs) -> None:
    if isinstance(kernel, JITFunction):
        wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **kwargs)


@triton.jit
def clamp_rows(rows, num_rows):
    """Clamp row indices into [0, num_rows): the kernels see bad ids when the host's range check
    is off, and also when it is on, since the forward is queued before its answer (validation.py)."""
    return tl.minimum(tl.maximum(rows, 0), num_rows - 1)


# True under Triton's interpreter: TRITON_INTERPRET=1 when these kernels were defined (Triton
# reads it as each @triton.jit function is made), i.e. before fusedemb was imported.
INTERPRETED = not isinstance(clamp_rows, JITFunction)
