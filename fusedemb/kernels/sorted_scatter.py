"""Deterministic scatter-add of gradient rows into a table: a counting sort, then segment sums.

    grad_table[r, :] = sum of grad_rows[n, :] over the tokens n with index[n] == r

computed with no floating-point atomics, so the result is bitwise identical run to run. Library
sorts cost as much as a whole atomic backward at GPT sizes (DESIGN.md), so the sort is our own
and works on the N small-integer keys only; the gradient rows themselves are read exactly once.

1. `chunk_rank_kernel`: tokens are split into chunks of CHUNK. Within its chunk each token gets
   its stable rank among the tokens of the same row (pairwise comparisons, CHUNK^2 integer
   compares per chunk, no atomics), and the first of them publishes the row's count in the
   chunk into counts[row, chunk].
2. An inclusive prefix sum over counts, flattened row-major, gives ends[row, chunk]; the
   tokens of `row` that sit in `chunk` occupy [ends - counts, ends) of the sorted order. This is
   the classic stable counting sort; rows are contiguous and keep token order inside.
3. `scatter_sorted_kernel`: token n goes to position ends[r, c] - counts[r, c] + rank[n], with
   r = index[n] and c = chunk(n).
4. `segment_sums_kernel`: the sorted order is cut into tiles of TILE positions. Each tile
   gathers its gradient rows at once and sums every run of equal rows with a segmented scan (a
   fixed tree of additions inside each run, never across runs), and writes the rows that begin
   and end inside the tile straight to the table. A row that crosses a tile edge leaves a
   partial sum per tile instead (at most two per tile: the run at its head, the run at its
   tail), so one hot row (one id over the whole batch) is summed by many programs at once.
5. `finish_rows_kernel`: every table row not written in step 4 is written here: rows with no
   token, and skip_row (padding_idx), as zeros; each crossing row as the sum of its partials in
   tile order (a fixed order, hence deterministic). Every row of the table is written exactly
   once, by step 4 or step 5: no memset, and no bytes beyond the V x D the result must hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedemb.kernels.common import accumulates_in_float64, cdiv, clamp_rows, column_block, launch, to_accumulator

# Tokens per counting-sort chunk. Each token is compared with all CHUNK tokens of its chunk, and
# counts has num_rows * ceil(N / CHUNK) entries to zero and prefix-sum: 256 balances the two at
# GPT-2 sizes (6.4M entries, 26 MB, for 32k tokens; 4x fewer compares than 1024 chunks).
CHUNK = 256
RANK_BLOCK = 64  # tokens compared at once in chunk_rank_kernel: a 64 x 64 comparison tile
SCATTER_BLOCK = 1024  # tokens per program in scatter_sorted_kernel
TILE = 32  # sorted positions per program in segment_sums_kernel
PARTIALS_BLOCK = 32  # partial sums loaded at once when a crossing row is combined
COMBINE_BLOCK_DIM = 64  # columns of them loaded at once (PARTIALS_BLOCK x 64 float64 in registers)
FINISH_ROWS = 16  # table rows per program in finish_rows_kernel


# segment_sums_kernel holds a TILE x SEGMENT_BLOCK_DIM tile (16 KB of float32) and its scan in
# registers: 16 values per thread with 8 warps, about 75 registers, so that three programs fit
# on an SM and 48 KB of gathered rows are in flight there.
SEGMENT_BLOCK_DIM = 128
SEGMENT_WARPS = 8


@triton.jit
def row_extent(ends_ptr, counts_ptr, rows, num_chunks):
    """[start, end) of each row's tokens in the sorted order."""
    first = rows.to(tl.int64) * num_chunks
    start = tl.load(ends_ptr + first) - tl.load(counts_ptr + first)
    end = tl.load(ends_ptr + first + num_chunks - 1)
    return start, end


@triton.jit
def chunk_rank_kernel(
    index_ptr,  # [N] destination row of each token
    rank_ptr,  # [N] out: rank of the token among the earlier tokens of its row in its chunk
    counts_ptr,  # [R, num_chunks] out (zero-initialised): tokens of each row in each chunk
    num_tokens,
    num_rows,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    chunk_start = chunk * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, num_tokens)
    mine = chunk_start + tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    my_mask = mine < chunk_end
    my_rows = clamp_rows(tl.load(index_ptr + mine, mask=my_mask, other=0), num_rows)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    # Unrolled over the whole chunk (CHUNK / BLOCK steps), so that all of its loads are in flight
    # at once: a loop that waited for each block's ids in turn spent most of its time waiting.
    for block in tl.static_range(CHUNK // BLOCK):
        others = chunk_start + block * BLOCK + tl.arange(0, BLOCK)
        other_mask = others < chunk_end
        other_rows = clamp_rows(tl.load(index_ptr + others, mask=other_mask, other=0), num_rows)
        same = (my_rows[:, None] == other_rows[None, :]) & other_mask[None, :]
        total += tl.sum(same.to(tl.int32), axis=1)
        rank += tl.sum((same & (others[None, :] < mine[:, None])).to(tl.int32), axis=1)
    tl.store(rank_ptr + mine, rank, mask=my_mask)
    tl.store(counts_ptr + my_rows.to(tl.int64) * num_chunks + chunk, total, mask=my_mask & (rank == 0))


@triton.jit
def scatter_sorted_kernel(
    index_ptr,  # [N]
    rank_ptr,  # [N] from chunk_rank_kernel
    ends_ptr,  # [R, num_chunks] inclusive prefix sum of counts
    counts_ptr,  # [R, num_chunks]
    sorted_tokens_ptr,  # [N] out: token indices, grouped by row, in token order inside a row
    sorted_rows_ptr,  # [N] out: the row of each sorted position
    num_tokens,
    num_rows,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = tokens < num_tokens
    rows = clamp_rows(tl.load(index_ptr + tokens, mask=mask, other=0), num_rows)
    rank = tl.load(rank_ptr + tokens, mask=mask, other=0)
    cell = rows.to(tl.int64) * num_chunks + tokens // CHUNK
    dest = tl.load(ends_ptr + cell, mask=mask, other=0) - tl.load(counts_ptr + cell, mask=mask, other=0) + rank
    tl.store(sorted_tokens_ptr + dest, tokens, mask=mask)
    tl.store(sorted_rows_ptr + dest, rows.to(tl.int32), mask=mask)


@triton.jit
def add_within_runs(left_sum, left_starts, right_sum, right_starts):
    """The combine of a segmented sum: a right operand that holds a run's start discards what
    lies to its left, so no sum ever crosses from one run into the next."""
    return tl.where(right_starts != 0, right_sum, left_sum + right_sum), left_starts | right_starts


@triton.jit
def segment_sums_kernel(
    grad_ptr,  # [N, D] gradient rows
    sorted_tokens_ptr,  # [N]
    sorted_rows_ptr,  # [N]
    ends_ptr,  # [R, num_chunks]
    counts_ptr,  # [R, num_chunks]
    table_ptr,  # [R, D] out: rows that begin and end inside one tile
    head_ptr,  # [num_tiles, D] float64 out: per tile, the partial sum of the run at its head
    tail_ptr,  # [num_tiles, D] float64 out: per tile, the partial sum of the run at its tail
    num_tokens,
    dim,
    num_chunks,
    skip_row,
    ACC_FP64: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    tile = tl.program_id(0)
    positions = tile * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = cols < dim
    valid = positions < num_tokens
    rows = tl.load(sorted_rows_ptr + positions, mask=valid, other=-1)
    previous_rows = tl.load(sorted_rows_ptr + positions - 1, mask=valid & (positions > 0), other=-1)
    next_rows = tl.load(sorted_rows_ptr + positions + 1, mask=positions + 1 < num_tokens, other=-1)
    tokens = tl.load(sorted_tokens_ptr + positions, mask=valid, other=0).to(tl.int64)
    # The tile's gradient rows in one gather, all loads in flight at once.
    grad = tl.load(grad_ptr + tokens[:, None] * dim + cols[None, :], mask=valid[:, None] & col_mask[None, :], other=0)
    grad = to_accumulator(grad, ACC_FP64)

    # A run of equal rows starts where the row changes, or at the tile's first position; the
    # segmented inclusive sum then holds, at the last position of each run, the run's sum: a
    # fixed order of additions (a tree over the tile), so bitwise the same every run, and never
    # a difference of prefix sums, which would cancel a small row sorted beside a huge one.
    # (16-bit rows are summed in float32; Triton's interpreter cannot cast bfloat16 to float64.)
    starts = (rows != previous_rows) | (positions == tile * TILE)
    starts_2d = tl.broadcast_to(starts.to(tl.int32)[:, None], (TILE, BLOCK_DIM))
    sums, _ = tl.associative_scan((grad, starts_2d), 0, add_within_runs)

    # A run ends at its row's last token, or at the tile's last position.
    run_ends = valid & ((rows != next_rows) | (positions == tile * TILE + TILE - 1))
    row_starts, _ = row_extent(ends_ptr, counts_ptr, tl.maximum(rows, 0), num_chunks)
    whole_row = run_ends & (rows != next_rows) & (row_starts >= tile * TILE)  # the row lies in this tile
    head_row = tl.load(sorted_rows_ptr + tile * TILE)
    is_head = run_ends & ~whole_row & (rows == head_row)  # continues from the previous tile
    is_tail = run_ends & ~whole_row & (rows != head_row)  # begins here, continues into the next
    out_cols = col_mask[None, :]
    table_offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    table_mask = (whole_row & (rows != skip_row))[:, None] & out_cols
    tl.store(table_ptr + table_offsets, sums.to(table_ptr.dtype.element_ty), mask=table_mask)
    # At most one position of each kind: every position writes the tile's one partial row.
    partial_offsets = tile.to(tl.int64) * dim + tl.zeros([TILE], dtype=tl.int64)[:, None] + cols[None, :]
    tl.store(head_ptr + partial_offsets, sums.to(tl.float64), mask=is_head[:, None] & out_cols)
    tl.store(tail_ptr + partial_offsets, sums.to(tl.float64), mask=is_tail[:, None] & out_cols)


@triton.jit
def finish_rows_kernel(
    ends_ptr,  # [R, num_chunks]
    counts_ptr,  # [R, num_chunks]
    head_ptr,  # [num_tiles, D] from segment_sums_kernel
    tail_ptr,  # [num_tiles, D] from segment_sums_kernel
    table_ptr,  # [R, D] out: rows with no token, skip_row, and rows that cross a tile edge
    num_rows,
    dim,
    num_chunks,
    skip_row,
    ACC_FP64: tl.constexpr,
    TILE: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    COMBINE_BLOCK_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    first_row = tl.program_id(0) * BLOCK_ROWS
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    start, end = row_extent(ends_ptr, counts_ptr, tl.minimum(rows, num_rows - 1), num_chunks)
    # Rows with no token, and skip_row (padding_idx), are zeros.
    empty = row_mask & ((start == end) | (rows == skip_row))
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=table_ptr.dtype.element_ty)
    mask = empty[:, None] & (cols < dim)[None, :]
    tl.store(table_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], zeros, mask=mask)
    # A row whose tokens cross a tile edge is the sum of its partials, added in tile order (a
    # fixed order, hence deterministic): the tail of its first tile (the head, if it begins
    # exactly at that tile's start), then the head of every later tile it reaches.
    crossing = row_mask & ~empty & (start // TILE != (end - 1) // TILE)
    if tl.max(crossing.to(tl.int32)) != 0:  # rare: at most two rows per tile of TILE tokens
        for i in range(BLOCK_ROWS):
            row = first_row + i
            row_start, row_end = row_extent(ends_ptr, counts_ptr, tl.minimum(row, num_rows - 1), num_chunks)
            first_tile = row_start // TILE
            last_tile = (row_end - 1) // TILE
            if (row < num_rows) & (row != skip_row) & (row_end > row_start) & (first_tile != last_tile):
                for c in range(BLOCK_DIM // COMBINE_BLOCK_DIM):
                    sub_cols = tl.program_id(1) * BLOCK_DIM + c * COMBINE_BLOCK_DIM + tl.arange(0, COMBINE_BLOCK_DIM)
                    sub_mask = sub_cols < dim
                    first_offsets = first_tile.to(tl.int64) * dim + sub_cols
                    head = tl.load(head_ptr + first_offsets, mask=sub_mask, other=0)
                    tail = tl.load(tail_ptr + first_offsets, mask=sub_mask, other=0)
                    acc = tl.where(row_start == first_tile * TILE, head, tail)
                    for first in range(first_tile + 1, last_tile + 1, PARTIALS_BLOCK):
                        tiles = first + tl.arange(0, PARTIALS_BLOCK)
                        partial_mask = (tiles <= last_tile)[:, None] & sub_mask[None, :]
                        offsets = tiles.to(tl.int64)[:, None] * dim + sub_cols[None, :]
                        acc += tl.sum(tl.load(head_ptr + offsets, mask=partial_mask, other=0), axis=0)
                    out = to_accumulator(acc, ACC_FP64).to(table_ptr.dtype.element_ty)
                    tl.store(table_ptr + row.to(tl.int64) * dim + sub_cols, out, mask=sub_mask)


def sorted_scatter_add(
    grad_rows: torch.Tensor, index: torch.Tensor, num_rows: int, skip_row: int, table_dtype: torch.dtype
) -> torch.Tensor:
    """grad_table = zeros(num_rows, D).index_add_(0, index, grad_rows), deterministically.

    grad_rows: [N, D] contiguous; index: [N] int32/int64; skip_row: a row left at zero, or -1.
    Runs inside a tile are summed in token order in float32 (float64 for float64 tables); partial
    sums of rows that cross tiles are kept and added in float64; each row is rounded to
    table_dtype once.
    """
    num_tokens, dim = grad_rows.shape
    device = grad_rows.device
    if num_tokens == 0:
        return torch.zeros((num_rows, dim), dtype=table_dtype, device=device)
    num_chunks = cdiv(num_tokens, CHUNK)
    counts = torch.zeros((num_rows, num_chunks), dtype=torch.int32, device=device)
    rank = torch.empty(num_tokens, dtype=torch.int32, device=device)
    rank_grid = (num_chunks, cdiv(min(num_tokens, CHUNK), RANK_BLOCK))
    launch(chunk_rank_kernel, rank_grid, index, rank, counts, num_tokens, num_rows, num_chunks, CHUNK=CHUNK, BLOCK=RANK_BLOCK)
    ends = torch.cumsum(counts.view(-1), 0, dtype=torch.int32).view(num_rows, num_chunks)

    sorted_tokens = torch.empty(num_tokens, dtype=torch.int32, device=device)
    sorted_rows = torch.empty(num_tokens, dtype=torch.int32, device=device)
    launch(
        scatter_sorted_kernel,
        (cdiv(num_tokens, SCATTER_BLOCK),),
        index, rank, ends, counts, sorted_tokens, sorted_rows, num_tokens, num_rows, num_chunks,
        CHUNK=CHUNK, BLOCK=SCATTER_BLOCK,
    )  # fmt: skip

    table = torch.empty((num_rows, dim), dtype=table_dtype, device=device)
    acc_fp64 = accumulates_in_float64(table_dtype)
    block_dim = column_block(dim)
    num_tiles = cdiv(num_tokens, TILE)
    head = torch.empty((num_tiles, dim), dtype=torch.float64, device=device)
    tail = torch.empty_like(head)
    segment_block_dim = min(block_dim, SEGMENT_BLOCK_DIM)
    launch(
        segment_sums_kernel,
        (num_tiles, cdiv(dim, segment_block_dim)),
        grad_rows, sorted_tokens, sorted_rows, ends, counts, table, head, tail, num_tokens, dim, num_chunks, skip_row,
        ACC_FP64=acc_fp64, TILE=TILE, BLOCK_DIM=segment_block_dim, num_warps=SEGMENT_WARPS,
    )  # fmt: skip
    launch(
        finish_rows_kernel,
        (cdiv(num_rows, FINISH_ROWS), cdiv(dim, block_dim)),
        ends, counts, head, tail, table, num_rows, dim, num_chunks, skip_row,
        ACC_FP64=acc_fp64, TILE=TILE, PARTIALS_BLOCK=PARTIALS_BLOCK, COMBINE_BLOCK_DIM=min(COMBINE_BLOCK_DIM, block_dim),
        BLOCK_ROWS=FINISH_ROWS, BLOCK_DIM=block_dim,
    )  # fmt: skip
    return table
