"""What the Triton kernels assume of their arguments, checked on the host before any launch.

fusedemb.validation normalises what users pass in; these checks guard the registered operators
(torch.ops.fusedemb.*), which anyone can call directly, as the C++ kernels' TORCH_CHECKs do.
They read devices, shapes, strides and dtypes only, never values (out-of-range values are
clamped inside the kernels), so they cost no device work and are fine on torch.compile's fake
tensors. That the tensors are dense (not sparse, nested) is checked before any call gets here,
by fusedemb.validation or by the operators' bodies; only the tables' check, shared with
validation (check_tables), repeats it.

All tensors of a call must be on one device (a kernel dereferences every pointer on the device
it runs on; the launchers make that device current, fusedemb.kernels.common.on_device_of), a GPU
unless the kernels are interpreted. The
kernels flatten the ids and the gradient as contiguous [N] and [N, D] arrays, step along a
row with unit stride, and hold token indices and sorted table rows in int32: N and the row counts
must stay below INT32_LIMIT, 2^31 less a margin for the index arithmetic that runs up to a block
past the last token or row (a tile's end, a chunk's end; masked off, but it must not wrap
around into range). (One index runs further and may wrap: the backward's sweep loads the batch
entry after its group's last, a whole sequence past it, under a mask that does not read that
index: load_batch_tile.) Offsets into the tables are 64-bit. The grids put their column blocks in
their y dimension, which CUDA caps at 65535 blocks: D is bounded by MAX_DIM. Ids are clamped into their table, so
a table must have a row to clamp to, and default positions [offset, offset + T) must lie in the
position table (the fast backward walks its rows only: a token past it would lose its gradient).
"""

from __future__ import annotations

import torch

from fusedemb.kernels.common import INTERPRETED
from fusedemb.kernels.sorted_scatter import COMBINE_BLOCK_DIM
from fusedemb.validation import (
    TRITON_DEVICES,
    check_embedding_rows,
    check_kernel_index_dtype,
    check_positions_fit,
    check_same_device,
    check_sequence_dim,
    check_tables,
    check_tables_have_rows,
    unit_stride_along_dim,
)

INT32_LIMIT = 2**31 - 2**16  # above any block of tokens or rows a kernel works on
MAX_DIM = 65535 * COMBINE_BLOCK_DIM  # 65535 of the narrowest column blocks (the sorted path's combine)


def check_device(device: torch.device) -> None:
    """Compiled kernels launch on a GPU: CPU tensors only under the interpreter (without it a
    launch fails deep inside Triton, which finds no GPU driver)."""
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"backend 'triton' cannot run on cpu tensors here: {TRITON_DEVICES}")


def check_dim(name: str, rows: torch.Tensor) -> None:
    if rows.shape[-1] > MAX_DIM:
        raise ValueError(f"{name} has an embedding dim of {rows.shape[-1]}; the Triton kernels take at most {MAX_DIM} "
                         f"(CUDA grids have at most 65535 blocks along y, {COMBINE_BLOCK_DIM} columns each)")  # fmt: skip


def check_index(name: str, index: torch.Tensor) -> None:
    check_kernel_index_dtype(name, index)
    check_sequence_dim(name, index)
    if not index.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if index.numel() >= INT32_LIMIT:
        raise ValueError(f"{name} has {index.numel()} elements; the Triton kernels index tokens in int32 "
                         f"(< {INT32_LIMIT})")  # fmt: skip


def check_rows(ids, position_ids, position_offset: int, token_table: tuple[str, int], position_table: tuple[str, int]):
    """The tables' row counts, each given as (name, rows), against the kernels' int32 rows, the
    ids to clamp into them and the default positions."""
    for name, num_rows in (token_table, position_table):
        if num_rows < 0:
            raise ValueError(f"{name} cannot have {num_rows} rows")
        if num_rows >= INT32_LIMIT:
            raise ValueError(f"{name} has {num_rows} rows; the Triton kernels hold table rows in int32 "
                             f"(< {INT32_LIMIT})")  # fmt: skip
    check_tables_have_rows(ids.numel(), dict((token_table, position_table)))
    if position_ids is None:
        check_positions_fit(ids.shape[-1], position_offset, position_table[1])


def check_position_ids(position_ids, ids) -> None:
    if position_ids is not None:
        check_index("position_ids", position_ids)
        if position_ids.shape != ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must have the shape of ids {tuple(ids.shape)}")


def check_forward_inputs(ids, tok_weight, pos_weight, position_ids, position_offset) -> None:
    check_same_device(("tok_weight", tok_weight.device), ids=ids, pos_weight=pos_weight, position_ids=position_ids)
    check_device(tok_weight.device)
    check_index("ids", ids)
    check_tables(tok_weight, pos_weight)
    check_dim("tok_weight", tok_weight)
    for name, table in (("tok_weight", tok_weight), ("pos_weight", pos_weight)):
        if not unit_stride_along_dim(table):
            raise ValueError(f"{name} must have unit stride along dim, got strides {table.stride()}")
    check_position_ids(position_ids, ids)
    check_rows(ids, position_ids, position_offset, ("tok_weight", tok_weight.shape[0]), ("pos_weight", pos_weight.shape[0]))


def check_backward_inputs(
    grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx
) -> None:
    check_same_device(("grad_out", grad_out.device), ids=ids, position_ids=position_ids)
    check_device(grad_out.device)
    check_index("ids", ids)
    if grad_out.shape[:-1] != ids.shape or not grad_out.is_contiguous():
        raise ValueError(f"grad_out must be contiguous with shape ids.shape + (dim,) = {tuple(ids.shape)} + (dim,), "
                         f"got {tuple(grad_out.shape)}")  # fmt: skip
    check_embedding_rows("grad_out", grad_out)
    check_dim("grad_out", grad_out)
    check_position_ids(position_ids, ids)
    check_rows(
        ids, position_ids, position_offset, ("the token table", num_embeddings), ("the position table", context_length)
    )
    if not -1 <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be -1 (none) or in [0, {num_embeddings}), got {padding_idx}")
