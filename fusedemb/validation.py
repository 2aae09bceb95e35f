"""Input checking and normalisation shared by every backend.

Every check raises a Python exception that names the problem, so that bad input never reaches
a kernel that could misuse it: out-of-range ids would otherwise read out of bounds (CPU) or
trip a device-side assert that kills the process (eager's embedding on CUDA). Out-of-range
index values are the one exception: the C++ kernels check those themselves, before reading
any, and raise an IndexError of the same form (naming the first bad value in token order, and
its token).

The range checks of ids and position_ids need the values: on CUDA that is one small reduction,
a copy of its result to the host and a wait for it, per call (RangeCheck). The Triton kernels
clamp every index into its table, so the Triton path queues its forward before it waits: the
GPU starts the forward as soon as the answer has left for the host, rather than idling until
the host has woken up and queued it, and a bad id still raises from the same call, its output
never returned. The reference waits first. Either way the call waits for all the work queued
before it. The C++ CPU kernels check every index themselves before they read one, with the same
IndexError, so fused_embedding starts no range check for them (but under torch.func transforms,
whose stacked tables no kernel can check: see below).

`set_bounds_check(False)` (or FUSEDEMB_BOUNDS_CHECK=0 in the environment when fusedemb is
imported: it is read once, below) switches the range checks off for maximum speed; the
kernels still never touch memory outside the tables
(the Triton kernels clamp their loads and the C++ kernels check), but then an out-of-range
id on CUDA is clamped, silently: its output is the row of the nearest valid id (0 or V - 1),
and its gradient is added into that row. The reference backend (eager's F.embedding, which
trips a device-side assert on a bad id) is checked even then.

A graph (torch.compile, torch.export, torch.jit.trace, make_fx) cannot hold this Python-level
check, which waits for tensor values: it records an operator that checks instead
(fusedemb.ops.range_checked), so a compiled or exported model raises the same IndexError each
time it runs (TorchScript and Inductor's C++ wrappers as a RuntimeError), unless the switch was
off when the graph was made (the reference backend and torch.func transforms are checked
regardless; Inductor keeps the operator out of the CUDA graphs of mode="reduce-overhead").
While a CUDA graph of the user's own is being captured nothing is checked (a capture cannot
synchronise), and a replay runs no Python at all: the Triton kernels clamp bad ids in such a
graph's inputs (the reference asserts on the device). The C++ CPU kernels always check.
Tensors without values (the meta device, FakeTensorMode's fake tensors, and those under a
wrapper, as AOTAutograd's functional tensors) have nothing to check.
"""

from __future__ import annotations

import numbers
import operator
import os
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

SUPPORTED_TABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SUPPORTED_ID_DTYPES = (torch.int32, torch.int64)
# Where backend "triton" can run, said wherever a call asks it to run elsewhere.
TRITON_DEVICES = "Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before fusedemb is imported"

_bounds_check = os.environ.get("FUSEDEMB_BOUNDS_CHECK", "1") not in ("0", "false", "False")


def set_bounds_check(enabled: bool) -> None:
    """Turn the value range checks of ids and position_ids on (the default) or off. The C++
    kernels (CPU tensors) check every index whatever this says, and the reference backend and
    calls under torch.func transforms are checked anyway. A bool only: bool("False") is True."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_bounds_check takes True or False, got {enabled!r}")
    global _bounds_check
    _bounds_check = enabled


def bounds_check_enabled() -> bool:
    return _bounds_check


class RangeCheck:
    """The value checks of index tensors of one dtype, given as (name, index, num_rows, table):
    started when made, answered by `wait`, which raises IndexError for the first index tensor
    (ids, then position_ids) with a value outside its table, naming its smallest value if that
    is negative, else its largest (the bounds are all it reads back).

    All bounds come back in one device-to-host copy, however many tensors are checked. On CUDA
    the copy goes to pinned memory without blocking and `wait` blocks on an event recorded after
    it, so work queued between the two (a forward whose kernels clamp their indices) follows the
    copy on the GPU without waiting for the host; `.tolist()` of the bounds would instead drain
    the stream before that work is even queued."""

    def __init__(self, checks: list[tuple[str, torch.Tensor, int, str]]) -> None:
        # (The index tensors of a call share a device and a kind: the first one answers for all.)
        has_values = bool(checks) and _has_values(checks[0][1])
        self._checks = [check for check in checks if check[1].numel() > 0] if has_values else []
        self._ready = None
        if not self._checks:
            return
        # [min, max] of each index tensor, in one stack (one kernel, however many tensors)
        bounds = torch.stack([bound for _, index, _, _ in self._checks for bound in torch.aminmax(index)])
        self._bounds = bounds.to("cpu", non_blocking=True)  # the same tensor if on the CPU already
        if bounds.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(bounds.device))

    def wait(self) -> None:
        """Block until the bounds are on the host and raise if one is outside its table; the
        answer is read once, and later calls return at once."""
        if self._ready is not None:
            self._ready.synchronize()
        checks, self._checks, self._ready = self._checks, [], None
        if not checks:
            return
        bounds = self._bounds.tolist()
        for (name, _, num_rows, table), lo, hi in zip(checks, bounds[0::2], bounds[1::2]):
            if lo < 0 or hi >= num_rows:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{name} contains {bad}, outside [0, {num_rows}) of {table} ({num_rows} rows)")


class EmbeddingInputs(NamedTuple):
    """Inputs in the form the operators take: contiguous int32 or int64 ids; position_ids of
    their shape and dtype (broadcast ones expanded), or None; tables with unit stride along dim;
    position_offset 0 where no default position is read (explicit positions, or T = 0); and
    padding_idx as a non-negative row or -1 for none. (A NamedTuple: made on every call, it costs
    less host time than a dataclass.)"""

    ids: torch.Tensor
    tok_weight: torch.Tensor
    pos_weight: torch.Tensor
    position_ids: torch.Tensor | None
    position_offset: int
    padding_idx: int

    def start_range_check(self) -> RangeCheck:
        """The value checks of ids and position_ids, started; the caller decides whether to
        check (the switch) and when to wait for the answer (see RangeCheck). It checks nothing
        while a CUDA graph is being captured and for tensors without values (module
        docstring). Eager calls only: graphs check by an operator instead
        (fusedemb.ops.range_checked)."""
        ids, position_ids = self.ids, self.position_ids
        if torch._C._are_functorch_transforms_active():
            ids = _values_of(ids)
            position_ids = None if position_ids is None else _values_of(position_ids)
        return RangeCheck(index_range_checks(ids, self.tok_weight.shape[0], position_ids, self.pos_weight.shape[0]))


def index_range_checks(
    ids: torch.Tensor, num_embeddings: int, position_ids: torch.Tensor | None, context_length: int
) -> list[tuple[str, torch.Tensor, int, str]]:
    """What RangeCheck checks of one call: ids against the token table and position_ids, when
    given, against the position table (default positions are checked by shape alone)."""
    checks = [("ids", ids, num_embeddings, "the token table")]
    if position_ids is not None:
        checks.append(("position_ids", position_ids, context_length, "the position table"))
    return checks


def _has_values(index: torch.Tensor) -> bool:
    """Whether there are values to check now: not on the meta device or fake (shapes only: a
    FakeTensor, or one under a wrapper such as AOTAutograd's functional tensors, all subclasses,
    which is_fake tells; plain tensors skip it), and not while a CUDA graph is being captured (a
    capture cannot wait for the GPU)."""
    if index.is_meta or (not is_plain_tensor(index) and is_fake(index)):
        return False
    return not (index.is_cuda and torch.cuda.is_current_stream_capturing())


def _values_of(index: torch.Tensor) -> torch.Tensor:
    """The tensor under torch.func's wrappers (a vmapped one with its batch dim): the range check
    reads values, which a wrapper does not expose."""
    while torch._C._functorch.is_functorch_wrapped_tensor(index):
        index = torch._C._functorch.get_unwrapped(index)
    return index


def unit_stride_along_dim(table: torch.Tensor) -> bool:
    """Whether the kernels can read table's rows as they are: unit stride along dim (row strides
    are passed through). A dim of size 1, or a table of no rows, qualifies whatever its strides,
    which PyTorch leaves arbitrary there (.contiguous() would not change them)."""
    return table.shape[1] == 1 or table.shape[0] == 0 or table.stride(1) == 1


def kernel_layouts(ids, tok_weight, pos_weight, position_ids):
    """The inputs in layouts the kernels read, each as it is when it has one already: contiguous
    index tensors (the expanded view of broadcast position_ids included: one position per
    token), tables with unit stride along dim (row strides are passed through). A table that is
    not 2-D is left for the kernels' checks to name."""
    return (
        ids.contiguous(),
        with_unit_stride_along_dim(tok_weight),
        with_unit_stride_along_dim(pos_weight),
        None if position_ids is None else position_ids.contiguous(),
    )


def with_unit_stride_along_dim(table: torch.Tensor) -> torch.Tensor:
    # (is_contiguous first: it is a flag, where stride(1) costs about a microsecond)
    if table.is_contiguous() or table.dim() != 2 or unit_stride_along_dim(table):
        return table
    return table.contiguous()


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int:
    """nn.Embedding's rule: negative values count from the end; -1 is returned for none."""
    if padding_idx is None:
        return -1
    padding_idx = as_int(padding_idx, "padding_idx")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def check_tables_have_rows(num_tokens: int, tables: dict[str, int]) -> None:
    """Ids are looked up (or clamped) into each table: with any token, each needs a row."""
    for name, num_rows in tables.items():
        if num_tokens > 0 and num_rows == 0:
            raise IndexError(f"{name} has no rows, so nothing can be looked up in it")


def check_positions_fit(seq_len: int, position_offset: int, context_length: int) -> None:
    """Default positions [position_offset, position_offset + seq_len) must be rows of the table
    (none when seq_len is 0, as the pair's pos_emb(arange(offset, offset + 0)) reads none)."""
    if seq_len > 0 and (position_offset < 0 or position_offset + seq_len > context_length):
        # Under torch.compile with a dynamic sequence length these are symbolic, and Dynamo
        # cannot format a symbolic int into a string: as ints, the message reaches the user.
        position_offset, seq_len = int(position_offset), int(seq_len)
        raise IndexError(
            f"positions [{position_offset}, {position_offset + seq_len}) (position_offset {position_offset} + "
            f"sequence length {seq_len}) do not fit the position table of {context_length} rows"
        )


def check_same_device(anchor: tuple[str, torch.device], **tensors: torch.Tensor | None) -> None:
    """Every tensor (None: absent) on the anchor's device, given as (name, device): a kernel runs
    on one device, and a pointer into another device's memory would be dereferenced there."""
    anchor_name, device = anchor
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {anchor_name} on {device}")


def _check_index_tensor(name: str, index: torch.Tensor, device: torch.device) -> None:
    check_dense_tensor(name, index)
    if index.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int32/int64 kernels; narrower ints are widened), got {index.dtype}")
    check_same_device(("the tables", device), **{name: index})


# Integer dtypes with arithmetic (not bool, the quantized ones, nor the sub-byte and bits dtypes);
# the usual ones first, as `in` compares in order.
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64)


_STRIDED = torch.strided  # (a module global is read faster than torch's attribute)


def check_dense_tensor(name: str, tensor: torch.Tensor) -> None:
    """A tensor with strides: the kernels address elements by them (not sparse, mkldnn, nested)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout is not _STRIDED or tensor.is_nested:
        kind = "a nested tensor" if tensor.is_nested else f"layout {tensor.layout}"
        raise ValueError(f"{name} must be a dense (strided) tensor, got {kind}")


def as_int(value, name: str) -> int | torch.SymInt:
    """An int argument: ints (symbolic ones under torch.compile) as they are, other integers
    (numpy's) as ints; bools, floats, arrays and tensors refused. (Under torch.compile pass
    Python ints: Dynamo traces a numpy integer as an array, which is refused.) A tensor is not
    read here: on a GPU that would wait for it, unseen; the message says how to do it openly
    (a KV cache's length kept as a tensor, say)."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return operator.index(value)
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int, got Tensor: pass int() of it (which waits for a GPU tensor's value)")
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_kernel_index_dtype(name: str, index: torch.Tensor) -> None:
    """An index tensor as the operators take it: int32 or int64 (fused_embedding widens others)."""
    if index.dtype not in SUPPORTED_ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")


def check_embedding_rows(name: str, rows: torch.Tensor) -> None:
    """A table, or a gradient of table rows: a supported float dtype, an embedding dim of at least 1."""
    if rows.dtype not in SUPPORTED_TABLE_DTYPES:
        raise TypeError(f"{name} has dtype {rows.dtype}; supported: {', '.join(map(str, SUPPORTED_TABLE_DTYPES))}")
    if rows.shape[-1] == 0:
        raise ValueError(f"{name} must have an embedding dim of at least 1, got 0")


def check_tables(tok_weight: torch.Tensor, pos_weight: torch.Tensor) -> None:
    """Two tables whose rows the kernels can add: each 2-D of a supported float dtype with an
    embedding dim of at least 1, both of one dtype and one dim."""
    for name, table in (("tok_weight", tok_weight), ("pos_weight", pos_weight)):
        check_dense_tensor(name, table)
        if table.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(table.shape)}")
        check_embedding_rows(name, table)
    if tok_weight.dtype != pos_weight.dtype:
        raise TypeError(f"tok_weight ({tok_weight.dtype}) and pos_weight ({pos_weight.dtype}) must have the same dtype")
    if tok_weight.shape[1] != pos_weight.shape[1]:
        raise ValueError(
            f"tok_weight and pos_weight must have the same embedding dim, got {tok_weight.shape[1]} and {pos_weight.shape[1]}"
        )


_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter  # (module globals: Dynamo guards them without a lambda)


def is_plain_tensor(tensor: torch.Tensor) -> bool:
    """A torch.Tensor or nn.Parameter itself, not a subclass (told by type: the cheapest test of
    a call's host time, before any that a subclass needs)."""
    return type(tensor) is _TENSOR or type(tensor) is _PARAMETER


def _check_not_dtensors(**tables: torch.Tensor) -> None:
    """The kernels take whole tables. A DTensor table (tensor parallelism, or fully_shard on
    FusedEmbedding's tok_emb or pos_emb, whose unsharding hooks never run because FusedEmbedding
    reads their weights without calling them) would otherwise fail deep in the dispatcher."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    for name, table in tables.items():
        if isinstance(table, DTensor):
            raise TypeError(
                f"{name} is a DTensor (placements {table.placements}); fusedemb's kernels take whole tables: shard "
                "the FusedEmbedding as a whole (fully_shard on it or on a parent module), not its tok_emb or pos_emb"
            )


def check_sequence_dim(name: str, index: torch.Tensor) -> None:
    """The last dim of an index tensor is the sequence's: a 0-d tensor has none."""
    if index.dim() == 0:
        raise ValueError(f"{name} must have shape (..., T) with at least one dimension, got a 0-d tensor")


# Integer dtypes whose every value fits in int32, so that int32 kernels take them as they are.
_FITS_INT32 = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32)


def _index_dtype(*indices: torch.Tensor) -> torch.dtype:
    """The one dtype the kernels take the index tensors in: int32 if every value of each fits,
    else int64. Widen, never narrow (narrowing would wrap an out-of-range id into range); and
    PyTorch cannot promote uint16-uint64 with other dtypes, so no promote_types."""
    return torch.int32 if all(index.dtype in _FITS_INT32 for index in indices) else torch.int64


def _broadcast_position_ids(position_ids: torch.Tensor, ids_shape: torch.Size) -> torch.Tensor:
    """position_ids broadcast to ids' shape, as the pair's add broadcasts pos_emb(position_ids):
    Hugging Face models pass one row, (1, T), for the whole batch. The expanded view is made
    contiguous later, since the kernels read one position per token. (The shapes are compared
    here rather than by expand's own error, which torch.compile would replace with its own.)"""
    shape = position_ids.shape
    fits = len(shape) <= len(ids_shape) and all(
        size == 1 or size == ids_size for size, ids_size in zip(reversed(shape), reversed(ids_shape))
    )
    if not fits:
        raise ValueError(f"position_ids of shape {tuple(shape)} do not broadcast to the shape of ids {tuple(ids_shape)}")
    return position_ids if shape == ids_shape else position_ids.expand(ids_shape)


def prepare_inputs(
    ids: torch.Tensor,
    tok_weight: torch.Tensor,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
    padding_idx: int | None,
) -> EmbeddingInputs:
    """Every check of fused_embedding's arguments but the index values (RangeCheck), and their
    normalisation into EmbeddingInputs."""
    check_tables(tok_weight, pos_weight)
    if not (is_plain_tensor(tok_weight) and is_plain_tensor(pos_weight)):
        _check_not_dtensors(tok_weight=tok_weight, pos_weight=pos_weight)
    check_same_device(("tok_weight", tok_weight.device), pos_weight=pos_weight)
    _check_index_tensor("ids", ids, tok_weight.device)
    check_sequence_dim("ids", ids)
    position_offset = as_int(position_offset, "position_offset")

    num_embeddings, context_length = tok_weight.shape[0], pos_weight.shape[0]
    check_tables_have_rows(ids.numel(), {"tok_weight": num_embeddings, "pos_weight": context_length})
    if position_ids is not None:
        _check_index_tensor("position_ids", position_ids, tok_weight.device)
        position_ids = _broadcast_position_ids(position_ids, ids.shape)
        index_dtype = _index_dtype(ids, position_ids)
        ids, position_ids = ids.to(index_dtype), position_ids.to(index_dtype)
        position_offset = 0  # unused with explicit positions: the operators always get 0 (and never an overflow)
    else:
        if ids.dtype not in SUPPORTED_ID_DTYPES:  # (a dtype test costs less host time than .to)
            ids = ids.to(_index_dtype(ids))
        seq_len = ids.shape[-1]
        check_positions_fit(seq_len, position_offset, context_length)
        if not seq_len:
            position_offset = 0  # no position is read, so any offset fits, even one the operators' int64 cannot hold
    ids, tok_weight, pos_weight, position_ids = kernel_layouts(ids, tok_weight, pos_weight, position_ids)
    return EmbeddingInputs(
        ids=ids,
        tok_weight=tok_weight,
        pos_weight=pos_weight,
        position_ids=position_ids,
        position_offset=position_offset,
        padding_idx=normalize_padding_idx(padding_idx, num_embeddings),
    )
