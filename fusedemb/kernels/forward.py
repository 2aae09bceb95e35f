"""Triton forward: gather token rows, add position rows, write the output, in one pass.

Bytes moved (the performance model): N ids, N gathered token rows, the position rows (T distinct
ones, reused across the batch and so mostly served from L2) and N output rows:
about 2 * N * D * element_size. Eager PyTorch moves about 4 * N * D * element_size: the token
gather writes an (N, D) intermediate that the add reads back (the position intermediate is only
(T, D)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedemb.kernels.common import (
    Tile,
    accumulates_in_float64,
    cdiv,
    clamp_rows,
    column_block,
    launch,
    on_device_of,
    resolve_negation,
    rows_per_tile,
    to_accumulator,
)
from fusedemb.kernels.preconditions import check_forward_inputs


@triton.jit
def fused_embedding_forward_kernel(
    ids_ptr,  # [N] int32/int64 token ids, the flattened (..., T) batch
    position_ids_ptr,  # [N] explicit positions; read only when HAS_POSITION_IDS
    tok_ptr,  # [V, D] token table, rows tok_row_stride apart, unit column stride
    pos_ptr,  # [P, D] position table, rows pos_row_stride apart
    out_ptr,  # [N, D] output, contiguous
    num_tokens,  # N
    seq_len,  # T: token n sits at position n % T + position_offset (without HAS_POSITION_IDS)
    position_offset,  # the first sequence position's row of the position table
    dim,  # D
    num_embeddings,  # V, for clamping only
    context_length,  # P, for clamping only
    tok_row_stride,  # elements between consecutive rows of tok
    pos_row_stride,  # elements between consecutive rows of pos
    HAS_POSITION_IDS: tl.constexpr,  # positions from position_ids_ptr instead of n % T + offset
    ACC_FP64: tl.constexpr,  # add in float64 (float64 tables) instead of float32
    BLOCK_TOKENS: tl.constexpr,  # tokens (output rows) per program
    BLOCK_DIM: tl.constexpr,  # columns per program, a power of two
):
    # Program (i, j) writes the tile out[i*BLOCK_TOKENS : +BLOCK_TOKENS, j*BLOCK_DIM : +BLOCK_DIM].
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (cols < dim)[None, :]

    ids = tl.load(ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    if HAS_POSITION_IDS:
        positions = tl.load(position_ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    else:
        positions = (tokens % seq_len + position_offset).to(tl.int64)
    # Clamping keeps every access inside the tables, as bad ids do reach this kernel (clamp_rows
    # says why). Rows are int64 before they are multiplied by a row stride: V and N fit in
    # int32, but V * D and N * D may pass 2^31.
    ids = clamp_rows(ids, num_embeddings)
    positions = clamp_rows(positions, context_length)

    tok = tl.load(tok_ptr + ids[:, None] * tok_row_stride + cols[None, :], mask=mask)
    pos = tl.load(pos_ptr + positions[:, None] * pos_row_stride + cols[None, :], mask=mask)
    out = to_accumulator(tok, ACC_FP64) + to_accumulator(pos, ACC_FP64)  # one rounding, as eager's add
    tl.store(out_ptr + tokens[:, None].to(tl.int64) * dim + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def forward_tile(dim: int) -> Tile:
    """TILE_ELEMENTS per program, in column blocks of at most MAX_BLOCK_DIM, over Triton's
    default of 4 warps: at GPT-2's D of 768, 16 tokens by 256 columns, 32 elements (8 vectors of
    16 bytes in float32, 4 in 16 bits) of each of the token rows, the position rows and the
    output per thread. The same element count for every dtype: in 16 bits a program moves half
    the bytes of float32. Set with the first version of the kernel, not tuned per dtype (see
    benchmarks/tile_sweep.py)."""
    columns = column_block(dim)
    return Tile(rows_per_tile(columns), columns, 4)


def triton_forward(
    ids: torch.Tensor,
    tok_weight: torch.Tensor,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
) -> torch.Tensor:
    ids, tok_weight, pos_weight, position_ids = resolve_negation(ids, tok_weight, pos_weight, position_ids)
    check_forward_inputs(ids, tok_weight, pos_weight, position_ids, position_offset)
    dim = tok_weight.shape[1]
    out = tok_weight.new_empty((*ids.shape, dim))
    num_tokens = ids.numel()
    if num_tokens == 0:
        return out
    tile = forward_tile(dim)
    grid = (cdiv(num_tokens, tile.rows), cdiv(dim, tile.columns))
    with on_device_of(ids):
        launch(
            fused_embedding_forward_kernel,
            grid,
            ids,
            ids if position_ids is None else position_ids,  # without position_ids ids stands in, never read
            tok_weight,
            pos_weight,
            out,
            num_tokens,
            ids.shape[-1],
            position_offset,
            dim,
            tok_weight.shape[0],
            pos_weight.shape[0],
            tok_weight.stride(0),
            pos_weight.stride(0),
            HAS_POSITION_IDS=position_ids is not None,
            ACC_FP64=accumulates_in_float64(tok_weight.dtype),
            BLOCK_TOKENS=tile.rows,
            BLOCK_DIM=tile.columns,
            num_warps=tile.warps,
        )
    return out
