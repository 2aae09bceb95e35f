"""Triton backward: the gradients of the token table and of the position table.

    grad_tok = zeros(V, D).index_add_(0, ids, grad_out)    (row padding_idx stays zero)
    grad_pos = zeros(P, D).index_add_(0, pos, grad_out)

Bytes moved: read grad_out once per table (N * D * elt), write the dense token gradient
(V * D * elt, zeros included) and the position gradient (P * D * elt).

The token gradient has two modes:
- fast: `scatter_add_rows_kernel` adds each gradient row into a float32 table with atomics.
  Fastest on uniform ids; the order of the additions, and so the last bits of the result, vary
  from run to run; rows hit by many tokens serialise on their atomics. For 16-bit tables the
  float32 accumulator is only zeroed, and only read back, where a token lands: zeroing and
  rounding the whole V x D float32 table would move 10 bytes per element instead of the 2 of
  the 16-bit result.
- deterministic: `sorted_scatter_add` (sorted_scatter.py), a counting sort plus segment sums:
  no floating-point atomics, bitwise reproducible.
The position gradient never needs atomics: with default positions it is a reduction over the
batch (`position_grad_kernel`), with explicit position_ids it is the deterministic scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedemb.kernels.common import (
    accumulates_in_float64,
    cdiv,
    clamp_rows,
    column_block,
    launch,
    rows_per_tile,
    to_accumulator,
)
from fusedemb.kernels.sorted_scatter import sorted_scatter_add


@triton.jit
def scatter_add_rows_kernel(
    grad_ptr,  # [N, D] gradient rows
    index_ptr,  # [N] destination row of each gradient row
    acc_ptr,  # [R, D] float32/float64 accumulator, zero wherever a token of this launch adds
    num_tokens,
    dim,
    num_rows,
    skip_row,  # a row that receives nothing (padding_idx), or -1
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    token_mask = tokens < num_tokens
    col_mask = cols < dim
    rows = clamp_rows(tl.load(index_ptr + tokens, mask=token_mask, other=0).to(tl.int64), num_rows)
    grad_mask = token_mask[:, None] & col_mask[None, :]
    grad = tl.load(grad_ptr + tokens[:, None].to(tl.int64) * dim + cols[None, :], mask=grad_mask, other=0.0)
    grad = grad.to(acc_ptr.dtype.element_ty)
    # Atomics on one address serialise: a tile whose tokens all share one row (one id over the
    # batch, a run of padding) sums in registers first and adds once per column.
    lowest = tl.min(tl.where(token_mask, rows, num_rows))
    if lowest == tl.max(tl.where(token_mask, rows, -1)):
        if lowest != skip_row:
            tl.atomic_add(acc_ptr + lowest * dim + cols, tl.sum(grad, axis=0), mask=col_mask, sem="relaxed")
    else:
        add_mask = (token_mask & (rows != skip_row))[:, None] & col_mask[None, :]
        tl.atomic_add(acc_ptr + rows[:, None] * dim + cols[None, :], grad, mask=add_mask, sem="relaxed")


@triton.jit
def zero_touched_rows_kernel(
    index_ptr,  # [N] destination row of each gradient row
    acc_ptr,  # [R, D] float32 accumulator, uninitialised
    touched_ptr,  # [R] int8, zero-initialised: set to 1 for every row some token adds into
    num_tokens,
    dim,
    num_rows,
    skip_row,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # Repeated ids zero the same row more than once: the same value, and all of it finishes
    # before scatter_add_rows_kernel starts (same stream).
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    rows = clamp_rows(tl.load(index_ptr + tokens, mask=tokens < num_tokens, other=0).to(tl.int64), num_rows)
    keep = (tokens < num_tokens) & (rows != skip_row)
    zeros = tl.zeros([BLOCK_TOKENS, BLOCK_DIM], dtype=acc_ptr.dtype.element_ty)
    tl.store(acc_ptr + rows[:, None] * dim + cols[None, :], zeros, mask=keep[:, None] & (cols < dim)[None, :])
    if tl.program_id(1) == 0:
        tl.store(touched_ptr + rows, tl.full([BLOCK_TOKENS], 1, dtype=tl.int8), mask=keep)


@triton.jit
def round_touched_rows_kernel(
    acc_ptr,  # [R, D] float32 accumulator, valid where touched
    touched_ptr,  # [R] int8
    table_ptr,  # [R, D] out: the 16-bit gradient, zero where not touched
    num_rows,
    dim,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    row_mask = rows < num_rows
    col_mask = cols < dim
    touched = tl.load(touched_ptr + rows, mask=row_mask, other=0) != 0
    offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    acc = tl.load(acc_ptr + offsets, mask=touched[:, None] & col_mask[None, :], other=0.0)
    tl.store(table_ptr + offsets, acc.to(table_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def position_grad_kernel(
    grad_ptr,  # [B, T, D] gradient rows, contiguous
    out_ptr,  # [P, D] out: grad_pos[p] = sum over b of grad[b, p - position_offset]
    batch,  # B = N / T
    seq_len,  # T
    position_offset,
    context_length,  # P
    dim,
    ACC_FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = cols < dim
    t = rows - position_offset
    in_sequence = (t >= 0) & (t < seq_len) & (rows < context_length)
    load_mask = in_sequence[:, None] & col_mask[None, :]
    acc = to_accumulator(tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=tl.float32), ACC_FP64)
    # Summed in batch order: deterministic. Rows outside [offset, offset + T) stay zero.
    for b in range(batch):
        offsets = (b * seq_len + t).to(tl.int64)[:, None] * dim + cols[None, :]
        acc += to_accumulator(tl.load(grad_ptr + offsets, mask=load_mask, other=0), ACC_FP64)
    store_mask = (rows < context_length)[:, None] & col_mask[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=store_mask)


def atomic_scatter_add(
    grad_rows: torch.Tensor, index: torch.Tensor, num_rows: int, skip_row: int, table_dtype: torch.dtype
) -> torch.Tensor:
    """grad_table = zeros(num_rows, D).index_add_(0, index, grad_rows) with float atomics (fast mode)."""
    num_tokens, dim = grad_rows.shape
    device = grad_rows.device
    block_dim = column_block(dim)
    block_tokens = rows_per_tile(block_dim)
    token_grid = (cdiv(num_tokens, block_tokens), cdiv(dim, block_dim))
    if table_dtype in (torch.float32, torch.float64):
        # The table is its own accumulator.
        table = torch.zeros((num_rows, dim), dtype=table_dtype, device=device)
        if num_tokens > 0:
            launch(
                scatter_add_rows_kernel, token_grid, grad_rows, index, table, num_tokens, dim, num_rows, skip_row,
                BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim,
            )  # fmt: skip
        return table
    acc = torch.empty((num_rows, dim), dtype=torch.float32, device=device)
    touched = torch.zeros(num_rows, dtype=torch.int8, device=device)
    table = torch.empty((num_rows, dim), dtype=table_dtype, device=device)
    if num_tokens > 0:
        launch(
            zero_touched_rows_kernel, token_grid, index, acc, touched, num_tokens, dim, num_rows, skip_row,
            BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim,
        )  # fmt: skip
        launch(
            scatter_add_rows_kernel, token_grid, grad_rows, index, acc, num_tokens, dim, num_rows, skip_row,
            BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim,
        )  # fmt: skip
    launch(
        round_touched_rows_kernel, (cdiv(num_rows, block_tokens), cdiv(dim, block_dim)),
        acc, touched, table, num_rows, dim, BLOCK_ROWS=block_tokens, BLOCK_DIM=block_dim,
    )  # fmt: skip
    return table


def default_position_grad(grad_rows: torch.Tensor, seq_len: int, position_offset: int, context_length: int) -> torch.Tensor:
    num_tokens, dim = grad_rows.shape
    grad_pos = grad_rows.new_empty((context_length, dim))
    block_dim = column_block(dim)
    # Each program loops over the whole batch, so tiles are kept small (a quarter of the usual)
    # for enough programs to keep every SM busy: P * D / 1024 of them.
    block_rows = max(1, rows_per_tile(block_dim) // 4)
    grid = (cdiv(context_length, block_rows), cdiv(dim, block_dim))
    launch(
        position_grad_kernel, grid, grad_rows, grad_pos, num_tokens // seq_len if seq_len else 0, seq_len, position_offset,
        context_length, dim, ACC_FP64=accumulates_in_float64(grad_rows.dtype), BLOCK_ROWS=block_rows,
        BLOCK_DIM=block_dim,
    )  # fmt: skip
    return grad_pos


def triton_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
    num_embeddings: int,
    context_length: int,
    padding_idx: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dim = grad_out.shape[-1]
    grad_rows = grad_out.reshape(-1, dim)
    flat_ids = ids.reshape(-1)
    scatter_add = sorted_scatter_add if deterministic else atomic_scatter_add
    grad_tok = scatter_add(grad_rows, flat_ids, num_embeddings, padding_idx, grad_out.dtype)
    if position_ids is not None:
        grad_pos = sorted_scatter_add(grad_rows, position_ids.reshape(-1), context_length, -1, grad_out.dtype)
    else:
        grad_pos = default_position_grad(grad_rows, ids.shape[-1], position_offset, context_length)
    return grad_tok, grad_pos
