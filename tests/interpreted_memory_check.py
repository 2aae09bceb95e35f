"""A bounds check of every memory access the Triton kernels make in Triton's interpreter.

On a GPU an out-of-bounds access is caught by compute-sanitizer, or crashes; in the interpreter
(CPU tensors, as CI runs the kernels) it reads or writes the host's memory around a buffer,
which usually goes unnoticed: a load whose value is then masked away by the arithmetic (a
mutant that read sorted_rows[-1] changed no result) passes every test that compares results.
So while the check is installed, each load, store and atomic of an interpreted kernel checks
that every address its mask lets through, with its element's size, lies inside the storage of
one of the launch's tensor arguments, and raises MemoryAccessError naming the kernel if not
(which the interpreter passes on as the cause of its InterpreterError).

Storages, not the views passed: a kernel given a slice may read the rest of its storage (the
C++ or the caller's layout decides what is meaningful); what must never happen is an access
outside every buffer the launch was given. PyTorch's CPU allocator aligns each buffer to 64
bytes behind the C library's own bookkeeping, so two storages are never contiguous and a read
just before or after one lands outside all of them.

It patches the interpreter's internals (triton.runtime.interpreter's GridExecutor and
InterpreterBuilder), which are not a public API: `checked_memory_accesses` raises if they are
not there, and a test plants out-of-bounds accesses to show that the check still fires.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch


class MemoryAccessError(RuntimeError):
    """An interpreted kernel touched memory outside every tensor argument of its launch."""


# The storages ([start, end) byte addresses) of the tensor arguments of the launch in progress,
# and the kernel's name. The interpreter runs one launch at a time, its programs in turn.
_launch: dict[str, object] = {"ranges": None, "kernel": None}


def _storage_ranges(values) -> list[tuple[int, int]]:
    ranges = []
    for value in values:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.nbytes():
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        elif isinstance(value, (tuple, list)):
            ranges.extend(_storage_ranges(value))
    return ranges


def _check(what: str, pointers, mask, element_bytes: int) -> None:
    """`what` ("a load"...): raise unless every address of `pointers` (a TensorHandle's uint64 array) where `mask` is
    set, with element_bytes after it, lies inside one storage of the current launch."""
    ranges = _launch["ranges"]
    if ranges is None:  # a kernel launched some other way than through GridExecutor
        return
    addresses = np.asarray(pointers.data, dtype=np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    addresses = addresses.reshape(-1)
    if addresses.size == 0:
        return
    inside = np.zeros(addresses.shape, dtype=bool)
    for start, end in ranges:
        inside |= (addresses >= start) & (addresses + element_bytes <= end)
    if not inside.all():
        bad = int(addresses[~inside][0])
        nearest = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=None)
        where = f"; the nearest argument storage is [{nearest[0]:#x}, {nearest[1]:#x})" if nearest else ""
        raise MemoryAccessError(
            f"{_launch['kernel']}: {what} of {element_bytes} bytes at {bad:#x} lies outside every tensor argument "
            f"of the launch ({int((~inside).sum())} of {addresses.size} addresses){where}"
        )


def _element_bytes(pointers) -> int:
    return max(1, pointers.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def checked_memory_accesses():
    """While inside, every access of an interpreted kernel is checked. Raises AttributeError
    where this Triton's interpreter lacks the patched methods."""
    from triton.runtime import interpreter

    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    originals = {
        (executor, "__call__"): executor.__call__,
        (builder, "create_masked_load"): builder.create_masked_load,
        (builder, "create_masked_store"): builder.create_masked_store,
        (builder, "create_atomic_rmw"): builder.create_atomic_rmw,
        (builder, "create_atomic_cas"): builder.create_atomic_cas,
    }

    @functools.wraps(originals[executor, "__call__"])
    def launch(self, *args, **kwargs):
        saved = dict(_launch)
        _launch.update(ranges=_storage_ranges([*args, *kwargs.values()]), kernel=getattr(self.fn, "__name__", "kernel"))
        try:
            return originals[executor, "__call__"](self, *args, **kwargs)
        finally:
            _launch.update(saved)

    # The leading arguments, the same from Triton 3.6 to 3.9; the cache arguments after them
    # changed (3.6's cache_modifier and eviction_policy are 3.9's cache_policy), so they pass through.
    def masked_load(self, ptrs, mask, *rest):
        _check("a load", ptrs, mask, _element_bytes(ptrs))
        return originals[builder, "create_masked_load"](self, ptrs, mask, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        _check("a store", ptrs, mask, _element_bytes(ptrs))
        return originals[builder, "create_masked_store"](self, ptrs, value, mask, *rest)

    def atomic_rmw(self, rmw_op, ptr, val, mask, *rest):
        _check("an atomic", ptr, mask, _element_bytes(ptr))
        return originals[builder, "create_atomic_rmw"](self, rmw_op, ptr, val, mask, *rest)

    def atomic_cas(self, ptr, *rest):
        _check("an atomic compare-and-swap", ptr, None, _element_bytes(ptr))
        return originals[builder, "create_atomic_cas"](self, ptr, *rest)

    replacements = {
        (executor, "__call__"): launch,
        (builder, "create_masked_load"): masked_load,
        (builder, "create_masked_store"): masked_store,
        (builder, "create_atomic_rmw"): atomic_rmw,
        (builder, "create_atomic_cas"): atomic_cas,
    }
    for (owner, name), replacement in replacements.items():
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
