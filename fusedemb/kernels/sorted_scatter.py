"""Deterministic scatter-add of gradient rows into a table: a counting sort, then segment sums.

    grad_table[r, :] = sum of grad_rows[n, :] over the tokens n with index[n] == r

computed with no floating-point atomics, so the result is bitwise identical run to run. Library
sorts cost as much as a whole atomic backward at GPT sizes (DESIGN.md), so the sort is our own
and works on the N small-integer keys only; the gradient rows themselves are read exactly once.

1. `chunk_rank_kernel`: tokens are split into chunks of CHUNK. Within its chunk each token gets
   its stable rank among the tokens of the same row (pairwise comparisons, CHUNK^2/2 integer
   compares per chunk, no atomics), and the first of them publishes the row's count in the
   chunk into counts[row, chunk].
2. An inclusive prefix sum over counts, flattened row-major, gives ends[row, chunk]; the
   tokens of `row` that sit in `chunk` occupy [ends - counts, ends) of the sorted order. This is
   the classic stable counting sort; rows are contiguous and keep token order inside.
3. `scatter_sorted_kernel`: token n goes to position ends[r, c] - counts[r, c] + rank[n], with
   r = index[n] and c = chunk(n).
4. `segment_sums_kernel`: the sorted order is cut into tiles of TILE positions. Each tile gathers
   its gradient rows, sums every run of equal rows (differences of prefix sums), writes the rows
   that begin and end inside the tile straight to the table. A row that crosses a tile edge
   leaves a partial sum per tile instead (at most two per tile: the run at its head, the run at
   its tail), so one hot row (one id over the whole batch) is summed by many programs at once.
5. `combine_partials_kernel`: each crossing row is finished by the program of its first tile,
   adding its partials in tile order (a fixed order, hence deterministic).
6. `zero_rows_kernel`: rows with no token, and skip_row (padding_idx), are written as zeros.
   Every row of the table is written exactly once, by exactly one of steps 4-6: no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedemb.kernels.common import accumulates_in_float64, cdiv, clamp_rows, column_block, launch, to_accumulator

CHUNK = 1024  # tokens per counting-sort chunk; counts has num_rows * ceil(N / CHUNK) entries
RANK_BLOCK = 64  # tokens compared at once in chunk_rank_kernel: a 64 x 64 comparison tile
SCATTER_BLOCK = 1024  # tokens per program in scatter_sorted_kernel
TILE = 32  # sorted positions per program in segment_sums_kernel
SEGMENT_BLOCK_DIM = 128  # columns per program there: a 32 x 128 float64 tile stays in registers
PARTIALS_BLOCK = 64  # partial sums loaded at once when a crossing row is combined
COMBINE_BLOCK_DIM = 64  # columns per program there: a hot row is combined by D / 64 programs
ZERO_ROWS = 16  # table rows per program in zero_rows_kernel


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
    for other_start in range(chunk_start, chunk_end, BLOCK):
        others = other_start + tl.arange(0, BLOCK)
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
    tile_start = tile * TILE
    k = tile_start + tl.arange(0, TILE)
    k_mask = k < num_tokens
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = cols < dim

    rows = tl.load(sorted_rows_ptr + k, mask=k_mask, other=-1)
    next_rows = tl.load(sorted_rows_ptr + k + 1, mask=k + 1 < num_tokens, other=-1)
    row_start, _ = row_extent(ends_ptr, counts_ptr, tl.maximum(rows, 0), num_chunks)
    tokens = tl.load(sorted_tokens_ptr + k, mask=k_mask, other=0).to(tl.int64)
    grad = tl.load(grad_ptr + tokens[:, None] * dim + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0)

    # Sum of each run of equal rows = difference of two inclusive prefix sums of the tile:
    #   run_sum(k) = prefix[k] - prefix[first(k) - 1],   first(k) = where k's run begins.
    # In float64 the prefix sums of at most TILE float32 values are exact but in extreme
    # dynamic ranges, so the difference is the float32-accumulated sum to within rounding (and a
    # run of one token gets its gradient row back exactly). Plain cumsum/gather, not a custom
    # segmented scan: those run fast on GPUs and in Triton's interpreter alike.
    # (16-bit rows go through float32: exact, and Triton's interpreter cannot cast bfloat16 directly.)
    prefix = tl.cumsum(to_accumulator(grad, ACC_FP64).to(tl.float64), axis=0)
    first = tl.maximum(row_start - tile_start, 0)
    before_run = tl.gather(prefix, tl.broadcast_to(tl.maximum(first - 1, 0)[:, None], (TILE, BLOCK_DIM)), axis=0)
    run_sums = prefix - tl.where((first > 0)[:, None], before_run, 0.0)

    # A run ends at the row's last token, or at the tile's last position.
    row_ends = rows != next_rows
    run_ends = k_mask & (row_ends | (k == tile_start + TILE - 1))
    complete = run_ends & row_ends & (row_start >= tile_start)
    out_mask = (complete & (rows != skip_row))[:, None] & col_mask[None, :]
    table_offsets = tl.maximum(rows, 0).to(tl.int64)[:, None] * dim + cols[None, :]
    # Rounded as float32 accumulation would be, then to the table's dtype (one step at a time:
    # Triton's interpreter cannot cast float64 to bfloat16 directly).
    tl.store(table_ptr + table_offsets, to_accumulator(run_sums, ACC_FP64).to(table_ptr.dtype.element_ty), mask=out_mask)

    # At most one run per tile is a partial head and one a partial tail: pick each out with a
    # masked sum (adding zeros is exact) and store it only if it exists.
    partial = run_ends & ~complete
    is_head = rows == tl.load(sorted_rows_ptr + tile_start)
    partial_offsets = tile.to(tl.int64) * dim + cols
    head = partial & is_head
    if tl.sum(head.to(tl.int32)) > 0:
        tl.store(head_ptr + partial_offsets, tl.sum(tl.where(head[:, None], run_sums, 0.0), axis=0), mask=col_mask)
    tail = partial & ~is_head
    if tl.sum(tail.to(tl.int32)) > 0:
        tl.store(tail_ptr + partial_offsets, tl.sum(tl.where(tail[:, None], run_sums, 0.0), axis=0), mask=col_mask)


@triton.jit
def combine_partials_kernel(
    sorted_rows_ptr,  # [N]
    ends_ptr,  # [R, num_chunks]
    counts_ptr,  # [R, num_chunks]
    head_ptr,  # [num_tiles, D]
    tail_ptr,  # [num_tiles, D]
    table_ptr,  # [R, D] out: rows that cross a tile edge
    num_tokens,
    dim,
    num_chunks,
    skip_row,
    ACC_FP64: tl.constexpr,
    TILE: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = cols < dim
    tile_start = tile * TILE
    row = tl.load(sorted_rows_ptr + tl.minimum(tile_start + TILE, num_tokens) - 1)
    start, end = row_extent(ends_ptr, counts_ptr, row, num_chunks)
    # The row of this tile's last position is finished here if it continues past the tile and
    # began in it; every crossing row has exactly one such first tile.
    if (end > tile_start + TILE) & (start // TILE == tile) & (row != skip_row):
        # The first partial is the head of this tile if the row begins exactly at its start.
        if start == tile_start:
            acc = tl.load(head_ptr + tile.to(tl.int64) * dim + cols, mask=col_mask, other=0)
        else:
            acc = tl.load(tail_ptr + tile.to(tl.int64) * dim + cols, mask=col_mask, other=0)
        last_tile = (end - 1) // TILE
        for first in range(tile + 1, last_tile + 1, PARTIALS_BLOCK):
            tiles = first + tl.arange(0, PARTIALS_BLOCK)
            mask = (tiles <= last_tile)[:, None] & col_mask[None, :]
            partials = tl.load(head_ptr + tiles.to(tl.int64)[:, None] * dim + cols[None, :], mask=mask, other=0)
            acc += tl.sum(partials, axis=0)
        tl.store(table_ptr + row.to(tl.int64) * dim + cols, to_accumulator(acc, ACC_FP64).to(table_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def zero_rows_kernel(
    ends_ptr,  # [R, num_chunks]
    counts_ptr,  # [R, num_chunks]
    table_ptr,  # [R, D] out: rows with no token, and skip_row
    num_rows,
    dim,
    num_chunks,
    skip_row,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    start, end = row_extent(ends_ptr, counts_ptr, tl.minimum(rows, num_rows - 1), num_chunks)
    empty = row_mask & ((start == end) | (rows == skip_row))
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=table_ptr.dtype.element_ty)
    mask = empty[:, None] & (cols < dim)[None, :]
    tl.store(table_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], zeros, mask=mask)


def sorted_scatter_add(
    grad_rows: torch.Tensor, index: torch.Tensor, num_rows: int, skip_row: int, table_dtype: torch.dtype
) -> torch.Tensor:
    """grad_table = zeros(num_rows, D).index_add_(0, index, grad_rows), deterministically.

    grad_rows: [N, D] contiguous; index: [N] int32/int64; skip_row: a row left at zero, or -1.
    Runs inside a tile are summed through float64 prefix sums, partial sums of rows that cross
    tiles are kept and added in float64, and each row is rounded to table_dtype once.
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
    num_tiles = cdiv(num_tokens, TILE)
    head = torch.empty((num_tiles, dim), dtype=torch.float64, device=device)
    tail = torch.empty_like(head)
    launch(
        segment_sums_kernel,
        (num_tiles, cdiv(dim, SEGMENT_BLOCK_DIM)),
        grad_rows, sorted_tokens, sorted_rows, ends, counts, table, head, tail, num_tokens, dim, num_chunks, skip_row,
        ACC_FP64=acc_fp64, TILE=TILE, BLOCK_DIM=SEGMENT_BLOCK_DIM,
    )  # fmt: skip
    launch(
        combine_partials_kernel,
        (num_tiles, cdiv(dim, COMBINE_BLOCK_DIM)),
        sorted_rows, ends, counts, head, tail, table, num_tokens, dim, num_chunks, skip_row,
        ACC_FP64=acc_fp64, TILE=TILE, PARTIALS_BLOCK=PARTIALS_BLOCK, BLOCK_DIM=COMBINE_BLOCK_DIM,
    )  # fmt: skip
    block_dim = column_block(dim)
    launch(
        zero_rows_kernel,
        (cdiv(num_rows, ZERO_ROWS), cdiv(dim, block_dim)),
        ends, counts, table, num_rows, dim, num_chunks, skip_row,
        BLOCK_ROWS=ZERO_ROWS, BLOCK_DIM=block_dim,
    )  # fmt: skip
    return table
