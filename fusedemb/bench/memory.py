"""Peak extra memory: the most a pass holds allocated at once above what it started with.

This is the temporaries and outputs a pass allocates (eager's gathered token rows before its
add, the dense gradients of the backward), not the weights, which every implementation shares.

On CUDA the caching allocator counts exactly. On the CPU there is no allocator counter, so the
allocations are read from torch.profiler's memory events: each op's net allocation in the order
the ops ran, summed into a running total whose maximum is the peak. That resolves memory to
whole ops (a buffer allocated and freed inside one C++ kernel is not seen), which is the scale of
the differences that matter here: whole (N, D) and (V, D) tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Run ``fn`` once and return its peak memory above the starting point, in bytes."""
    if device == "cuda":
        return _cuda_peak_extra_bytes(fn)
    return _cpu_peak_extra_bytes(fn)


def _cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self_cpu_memory_usage is what an op allocated (+) or freed (-) itself, children excluded;
    # frees outside any op appear as "[memory]" events. In start order they replay the heap.
    events = sorted(prof.events(), key=lambda event: event.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Mute file descriptor 2 for the block.

    Some torch builds' profiler back end (kineto) prints a line to the process's stderr from C++
    each time a profile starts and stops, which would break up the progress bar and the table.
    Python exceptions are unaffected: they propagate after the descriptor is restored.
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
