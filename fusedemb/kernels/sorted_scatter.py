"""Deterministic scatter-add of gradient rows into a table: a counting sort, then segment sums.

    grad_table[r, :] = sum of grad_rows[n, :] over the tokens n with index[n] == r

computed with no floating-point atomics, so the result is bitwise identical run to run. Library
sorts cost as much as a whole atomic backward at GPT sizes (on an H200 at gpt2-124M, torch.sort of
8k-32k ids 51 us in int32 to 84 us in int64, an atomic backward 88 us), so the sort is our own
and works on the N small-integer keys only; the gradient rows themselves are read exactly once.

Steps 1-3 order the tokens by row (`sort_by_row`); past COUNTING_SORT_MAX_CELLS, where the
counting sort's per-chunk counts would grow too large, torch.sort does that instead.

1. `chunk_rank_kernel`: tokens are split into chunks of CHUNK. Within its chunk each token gets
   its stable rank among the tokens of the same row (pairwise comparisons, CHUNK^2 integer
   compares per chunk, no atomics), and the first of them publishes the row's count in the
   chunk into counts[row, chunk].
2. An inclusive prefix sum over counts, flattened row-major, gives ends[row, chunk]; the
   tokens of `row` that sit in `chunk` occupy [ends - counts, ends) of the sorted order. This is
   the classic stable counting sort; rows are contiguous and keep token order inside.
3. `scatter_sorted_kernel`: token n goes to position ends[r, c] - counts[r, c] + rank[n], with
   r = index[n] and c = chunk(n).
4. The table is zeroed (a memset), for the rows no token adds into and for skip_row. Steps
   1-3 need nothing from it: the backward runs them on a side stream meanwhile (streams.py).
5. `segment_sums_kernel`: the sorted order is cut into tiles of TILE positions. Each tile
   gathers its gradient rows at once, sums every run of equal rows (in token order at GPT
   widths, in a fixed tree order in narrow tables: see the kernel), and writes the rows that
   begin and end inside the tile straight to the table. A row that crosses a tile edge leaves
   a partial sum per tile instead (at most two per tile: the run at its head, the run at its
   tail), so one hot row (one id over the whole batch) is summed by many programs.
6. `sum_head_blocks_kernel`: the heads of every block of PARTIALS_BLOCK tiles that one row
   covers are summed into a block sum, so that a hot row's partials are added by many programs
   at once rather than all by one.
7. `combine_partials_kernel`: each crossing row is finished by the program of its first tile,
   adding its partials and the block sums of the blocks it covers in an order fixed by the
   sorted ids alone (loads of up to PARTIALS_BLOCK rows, each summed by a reduction tree of
   fixed shape), never by scheduling: hence deterministic.

Bytes: the gradient is read once (N * D * elt); the table is written whole by the memset and
its touched rows again (V * D * elt plus at most N * D * elt). Two more buffers of the sort and
the sums add to that:
- the counting sort's counts and ends, V * ceil(N / CHUNK) int32 cells each: counts is zeroed
  and written, the prefix sum reads it and writes ends (at gpt2-124M B32, about 3 x 26 MB next
  to the 154 MB float32 table and the 101 MB gradient). This part runs on the side stream, in
  the shadow of the memset;
- the float64 head and tail partials of the tiles, up to 2 * ceil(N / TILE) * D * 8 bytes
  written and read again, where runs cross tile edges (hot rows).
Writing only the untouched rows with a kernel of our own instead of the memset moved fewer
bytes but took longer on an H200 (at gpt2-124M B8 float32, 108 us against 95 us for the whole
backward; at large-vocab B8, 941 us against 760 us).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusedemb.kernels.common import accumulates_in_float64, cdiv, clamp_rows, column_block, launch, to_accumulator

# Tokens per counting-sort chunk. Each token is compared with all CHUNK tokens of its chunk, and
# counts has num_rows * ceil(N / CHUNK) entries to zero and prefix-sum: 256 balances the two at
# GPT-2 sizes (6.4M entries, 26 MB, for 32k tokens). Measured on an H200 at gpt2-124M B32:
# ranks 61 us -> 16 us, zeroing and prefix sum 10 us -> 24 us, against 1024-token chunks.
CHUNK = 256
# counts and its prefix sum grow as V * N / CHUNK cells of 4 bytes: 263 MB each at V = 128256
# and 128k tokens, 2.1 GB at 1M tokens. Past this many cells (128 MB for both) torch.sort orders
# the ids instead, in memory and time that grow as N. Each alone, on an H100
# (benchmarks/sort_crossover.py): the counting sort took 28-60 us up to 8.2M cells, 116-119 us
# at 12.9M-16.4M and 217 us at 25.7M; torch.sort 74-95 us from 8k to 262k ids. Alone they cross
# at about 9-10M cells. The threshold sits above that because in the backward the counting sort
# runs on a side stream in the shadow of the table's zeroing (47 us for gpt2-124M's float32
# table, longer for larger tables), while torch.sort runs on the current stream, in series with
# it; where the two cross inside the whole backward is not measured. Every size of the benchmark
# sweep stays below it (large-vocab B8 has 8.2M cells), so its figures are of the counting sort.
COUNTING_SORT_MAX_CELLS = 1 << 24
# Tokens ranked per program of chunk_rank_kernel, and compared at once: a 64 x 64 tile of
# comparisons (4096 pairs, 32 per thread of the default 4 warps). The kernel walks its chunk in
# steps of RANK_BLOCK, so RANK_BLOCK must divide CHUNK: otherwise a chunk's last tokens are
# never compared with, and the ranks and counts come out wrong.
# Set with the first version of these kernels, not tuned on its own (nor SCATTER_BLOCK and
# COMBINE_BLOCK_DIM).
RANK_BLOCK = 64
assert CHUNK % RANK_BLOCK == 0
# Tokens per program of scatter_sorted_kernel, which moves a few indices (4 or 8 bytes) per token.
SCATTER_BLOCK = 1024
# Sorted positions per program in segment_sums_kernel, gathered at once: 16 bytes of each of
# them per thread. Measured on an H200 at gpt2-124M B8 and B32: in float32 16 was as fast as
# or faster than 8 and 32, in bfloat16 faster than 4 and 8.
TILE = 16
# Tiles each combine_partials_kernel program looks at. Most tiles have no crossing row to
# finish, so one program per tile mostly loaded a row and its extent to find nothing: on an H200
# at gpt2-124M B32 float32, 22.3 us with one tile per program, 8.1 us with 8.
COMBINE_TILES = 8
# Partial sums loaded at once when a crossing row is combined, and tiles per block sum: a row
# over N tiles takes about N / PARTIALS_BLOCK**2 + 3 loads of PARTIALS_BLOCK rows to finish.
# Measured on an H200 at gpt2-124M B32 with one id everywhere (backward alone), block sums
# against one program adding all 2048 heads in turn: 275 -> 173 us float32, 236 -> 140 us
# bfloat16; with uniform or Zipf ids within +-2% (+4% at B8 Zipf: the extra launch).
PARTIALS_BLOCK = 64
# Columns per program of the block sums and the combine (float64 partials): a hot row is
# combined by D / 64 programs, 12 at gpt2-124M's D of 768.
COMBINE_BLOCK_DIM = 64


def segment_warps(block_dim: int, element_size: int) -> int:
    """Warps for segment_sums_kernel: just enough to cover a row slice with 16 bytes per thread,
    so that the warps split the columns and never the tile's rows. (A column block, D rounded up
    to a power of two, narrower than one warp's 32 x 16 bytes, so D <= 64 in float32, <= 128 in
    16 bits, <= 32 in float64, leaves the lanes of the single warp to split the tile's rows: the
    scan's comment in segment_sums_kernel says what that does to the order of the additions.)"""
    return max(1, block_dim * element_size // (16 * 32))


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
    return tl.where(right_starts, right_sum, left_sum + right_sum), left_starts | right_starts


@triton.jit
def segment_sums_kernel(
    grad_ptr,  # [N, D] gradient rows
    sorted_tokens_ptr,  # [N]
    sorted_rows_ptr,  # [N]
    table_ptr,  # [R, D] out: rows that begin and end inside one tile
    head_ptr,  # [num_tiles, D] float64 out: per tile, the partial sum of the run at its head
    tail_ptr,  # [num_tiles, D] float64 out: per tile, the partial sum of the run at its tail
    num_tokens,
    dim,
    skip_row,
    ACC_FP64: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    tile = tl.program_id(0)
    tile_start = tile * TILE
    positions = tile_start + tl.arange(0, TILE)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = cols < dim
    valid = positions < num_tokens
    rows = tl.load(sorted_rows_ptr + positions, mask=valid, other=-1)
    previous_rows = tl.load(sorted_rows_ptr + positions - 1, mask=valid & (positions > 0), other=-1)
    next_rows = tl.load(sorted_rows_ptr + positions + 1, mask=positions + 1 < num_tokens, other=-1)
    tokens = tl.load(sorted_tokens_ptr + positions, mask=valid, other=0).to(tl.int64)
    # The tile's gradient rows in one gather: every load is in flight at once. (Walking the
    # positions one by one instead left each step waiting for its token, then its row.)
    grad = tl.load(grad_ptr + tokens[:, None] * dim + cols[None, :], mask=valid[:, None] & col_mask[None, :], other=0)

    # A run of equal rows starts where the row changes, or at the tile's first position; the
    # segmented inclusive sum holds, at the last position of each run, the run's sum, in float32
    # (float64 for float64 tables; 16-bit rows go through float32, as Triton's interpreter
    # cannot cast bfloat16 to float64); a run of one token comes back exactly. Where the column
    # block takes all of the program's threads (BLOCK_DIM x element size >= 32 x 16 bytes: D > 64
    # in float32, > 128 in 16 bits, > 32 in float64; GPT sizes), the warps split the columns only
    # (segment_warps), each thread holds whole columns of the tile, and the scan adds its rows one
    # after the other, in token order, as a sequential loop would. In narrower tables lanes split
    # a column's rows and the scan adds in a fixed tree order instead: as deterministic, if not
    # the same bits as the loop. The loop starts from +0.0, as eager's zeroed table does, and so
    # does the scan: adding +0.0 leaves every term as it is but -0.0, which becomes +0.0, so a run
    # of -0.0 terms sums to +0.0 here too (IEEE: -0 + +0 = +0, so without a no-signed-zeros
    # flag a compiler may not drop the add).
    starts = (rows != previous_rows) | (positions == tile_start)
    starts_2d = tl.broadcast_to(starts[:, None], (TILE, BLOCK_DIM))
    sums, _ = tl.associative_scan((to_accumulator(grad, ACC_FP64) + 0.0, starts_2d), 0, add_within_runs)

    # A run ends at its row's last token, or at the tile's last position. The head run (the
    # tile's first row) began in an earlier tile if that tile's last row is the same.
    run_ends = valid & ((rows != next_rows) | (positions == tile_start + TILE - 1))
    # (The sorted row just before the tile is loaded in every lane: Triton's interpreter rejects
    # masks that combine a scalar condition with a vector one.)
    head_row = tl.load(sorted_rows_ptr + tile_start)
    previous_position = tile_start - 1 + tl.zeros_like(positions)
    before_tile = tl.load(sorted_rows_ptr + previous_position, mask=previous_position >= 0, other=-1)
    head_began_here = before_tile != head_row
    in_head_run = rows == head_row
    whole_row = run_ends & (rows != next_rows) & (head_began_here | ~in_head_run)  # the row lies in this tile
    # The tile's first row, not whole here: it began in an earlier tile, or it begins at this
    # tile's start and continues into the next.
    is_head = run_ends & ~whole_row & in_head_run
    is_tail = run_ends & ~whole_row & ~in_head_run  # begins here, continues into the next
    out_cols = col_mask[None, :]
    table_offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    table_mask = (whole_row & (rows != skip_row))[:, None] & out_cols
    tl.store(table_ptr + table_offsets, sums.to(table_ptr.dtype.element_ty), mask=table_mask)
    # At most one position of each kind: its row of sums is picked out within each thread.
    partial_offsets = tile.to(tl.int64) * dim + cols
    head_cols = is_head[:, None] & out_cols
    tail_cols = is_tail[:, None] & out_cols
    head_sum = tl.sum(tl.where(head_cols, sums, 0), axis=0)
    tail_sum = tl.sum(tl.where(tail_cols, sums, 0), axis=0)
    tl.store(head_ptr + partial_offsets, head_sum.to(tl.float64), mask=tl.sum(head_cols.to(tl.int32), axis=0) > 0)
    tl.store(tail_ptr + partial_offsets, tail_sum.to(tl.float64), mask=tl.sum(tail_cols.to(tl.int32), axis=0) > 0)


@triton.jit
def sum_head_blocks_kernel(
    sorted_rows_ptr,  # [N]
    head_ptr,  # [num_tiles, D]
    block_sums_ptr,  # [num_tiles / PARTIALS_BLOCK, D] out: written for blocks inside one row
    dim,
    TILE: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """Program (k, j), one per whole block of PARTIALS_BLOCK tiles k * PARTIALS_BLOCK + [0,
    PARTIALS_BLOCK) (the grid holds no partial block): if their heads are all partials of one row
    (sorted rows are nondecreasing, so the rows at the first and last tile starts are equal),
    block_sums[k] = the sum of those heads, columns j * BLOCK_DIM + [0, BLOCK_DIM). Other blocks
    are left unwritten: combine_partials_kernel reads the block sums of blocks inside a row only.
    With uniform ids a program loads two sorted rows and exits."""
    block = tl.program_id(0)
    first = block * PARTIALS_BLOCK
    last = first + PARTIALS_BLOCK - 1
    if tl.load(sorted_rows_ptr + first * TILE) == tl.load(sorted_rows_ptr + last * TILE):
        cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
        col_mask = cols < dim
        tiles = (first + tl.arange(0, PARTIALS_BLOCK)).to(tl.int64)
        heads = tl.load(head_ptr + tiles[:, None] * dim + cols[None, :], mask=col_mask[None, :], other=0)
        tl.store(block_sums_ptr + block.to(tl.int64) * dim + cols, tl.sum(heads, axis=0), mask=col_mask)


@triton.jit
def sum_partials(partials_ptr, first, end, cols, col_mask, dim, PARTIALS_BLOCK: tl.constexpr):
    """The sum of rows [first, end) of partials ([*, D] float64), at most PARTIALS_BLOCK of them."""
    rows = first + tl.arange(0, PARTIALS_BLOCK)
    mask = (rows < end)[:, None] & col_mask[None, :]
    return tl.sum(tl.load(partials_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], mask=mask, other=0), axis=0)


@triton.jit
def finish_long_row(
    head_ptr, tail_ptr, block_sums_ptr, table_ptr, tile, tile_start, row, start, last_tile, cols, col_mask, dim,
    ACC_FP64: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
):  # fmt: skip
    """table[row] = its first partial (this tile's head if the row begins exactly at the tile's
    start, else its tail) + the heads of tiles tile + 1 .. last_tile, in a fixed order: the
    heads up to the first block edge, the block sums of the whole blocks (sum_head_blocks_kernel), then
    the heads after the last block edge, each load of up to PARTIALS_BLOCK rows summed by a
    reduction tree of fixed shape. The float64 sum reaches a 16-bit table through float32
    (Triton's interpreter cannot cast float64 to bfloat16): a second rounding, of at most half a
    float32 ulp, before the one to 16 bits."""
    if start == tile_start:
        acc = tl.load(head_ptr + tile.to(tl.int64) * dim + cols, mask=col_mask, other=0)
    else:
        acc = tl.load(tail_ptr + tile.to(tl.int64) * dim + cols, mask=col_mask, other=0)
    first_block = tl.cdiv(tile + 1, PARTIALS_BLOCK)  # blocks [first_block, end_block) lie in the row
    end_block = (last_tile + 1) // PARTIALS_BLOCK
    acc += sum_partials(head_ptr, tile + 1, tl.minimum(first_block * PARTIALS_BLOCK, last_tile + 1), cols, col_mask,
                        dim, PARTIALS_BLOCK)  # fmt: skip
    for block in range(first_block, end_block, PARTIALS_BLOCK):
        acc += sum_partials(block_sums_ptr, block, end_block, cols, col_mask, dim, PARTIALS_BLOCK)
    acc += sum_partials(head_ptr, tl.maximum(end_block, first_block) * PARTIALS_BLOCK, last_tile + 1, cols, col_mask,
                        dim, PARTIALS_BLOCK)  # fmt: skip
    tl.store(table_ptr + row.to(tl.int64) * dim + cols, to_accumulator(acc, ACC_FP64).to(table_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def lane_value(values, picked):
    """values[k] as a scalar, for the one lane k where picked is set: Triton tensors cannot be
    indexed, so the other lanes are zeroed and summed away."""
    return tl.sum(tl.where(picked, values, 0))


@triton.jit
def combine_partials_kernel(
    sorted_rows_ptr,  # [N]
    ends_ptr,  # [R, num_chunks]
    counts_ptr,  # [R, num_chunks]
    head_ptr,  # [num_tiles, D]
    tail_ptr,  # [num_tiles, D]
    block_sums_ptr,  # [num_tiles / PARTIALS_BLOCK, D] (sum_head_blocks_kernel)
    table_ptr,  # [R, D] out: rows that cross a tile edge
    num_tokens,
    num_tiles,
    dim,
    num_chunks,
    skip_row,
    ACC_FP64: tl.constexpr,
    TILE: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """Program (i, j) visits tiles i * TILES_PER_PROGRAM + [0, TILES_PER_PROGRAM), columns
    j * BLOCK_DIM + [0, BLOCK_DIM). The row of a tile's last position is finished by that tile
    if it continues past the tile and began in it: every crossing row has exactly one such first
    tile. Most tiles finish no row; looking at several tiles per program, with all of their
    loads in flight at once, spares a launch wave of programs that would each wait on two
    dependent loads only to exit."""
    lanes = tl.arange(0, TILES_PER_PROGRAM)
    tiles = tl.program_id(0) * TILES_PER_PROGRAM + lanes
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    col_mask = cols < dim
    tile_starts = tiles * TILE
    tile_valid = tiles < num_tiles
    rows = tl.load(sorted_rows_ptr + tl.minimum(tile_starts + TILE, num_tokens) - 1, mask=tile_valid, other=0)
    start, end = row_extent(ends_ptr, counts_ptr, rows, num_chunks)
    last_tiles = (end - 1) // TILE
    finishes = tile_valid & (last_tiles > tiles) & (start // TILE == tiles) & (rows != skip_row)
    # A row that ends in the next tile (with uniform ids, nearly every crossing row) is its
    # first partial plus the next tile's head: all such rows of the program at once.
    two_tiles = finishes & (last_tiles == tiles + 1)
    from_head = (start == tile_starts)[:, None]
    offsets = tiles.to(tl.int64)[:, None] * dim + cols[None, :]
    mask = two_tiles[:, None] & col_mask[None, :]
    first = tl.where(
        from_head,
        tl.load(head_ptr + offsets, mask=mask & from_head, other=0),
        tl.load(tail_ptr + offsets, mask=mask & ~from_head, other=0),
    )
    second = tl.load(head_ptr + offsets + dim, mask=mask, other=0)
    sums = to_accumulator(first + second, ACC_FP64).to(table_ptr.dtype.element_ty)  # via float32: see finish_long_row
    tl.store(table_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], sums, mask=mask)
    # Longer rows (hot ids) one at a time, each over all of its partials.
    longer = finishes & (last_tiles > tiles + 1)
    for k in range(TILES_PER_PROGRAM):
        picked = lanes == k
        if tl.sum((picked & longer).to(tl.int32)) > 0:
            finish_long_row(
                head_ptr, tail_ptr, block_sums_ptr, table_ptr, lane_value(tiles, picked),
                lane_value(tile_starts, picked), lane_value(rows, picked), lane_value(start, picked),
                lane_value(last_tiles, picked), cols, col_mask, dim, ACC_FP64=ACC_FP64, PARTIALS_BLOCK=PARTIALS_BLOCK,
            )  # fmt: skip


class RowOrder(NamedTuple):
    """The tokens in stable order of their rows (steps 1-3 above), and where each row's run is."""

    counts: torch.Tensor  # [num_rows, num_chunks] int32: tokens of each row in each chunk
    ends: torch.Tensor  # [num_rows, num_chunks] int32: inclusive prefix sum of counts, row-major
    sorted_tokens: torch.Tensor  # [N] int32: the token at each sorted position
    sorted_rows: torch.Tensor  # [N] int32: its row
    # [N] int32: each token's rank among its row's tokens in its chunk (the counting sort's
    # scratch; empty from torch.sort). Kept with the order so that it lives as long as the order:
    # until after the join when a side stream computed it (see counting_sort_by_row).
    rank: torch.Tensor


def counting_sort_by_row(index: torch.Tensor, num_rows: int, stream: torch.cuda.Stream | None = None) -> RowOrder:
    """Steps 1-3 of the module docstring; with `stream`, launched on it (see sort_by_row)."""
    num_tokens = index.shape[0]
    device = index.device
    num_chunks = cdiv(num_tokens, CHUNK)
    counts = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=device)
    ends = torch.empty_like(counts)
    sorted_tokens = torch.empty(num_tokens, dtype=torch.int32, device=device)
    sorted_rows = torch.empty_like(sorted_tokens)
    rank = torch.empty_like(sorted_tokens)
    if stream is not None:
        # The fork, after the allocations (their deterministic-mode fills must land first); all
        # buffers, rank included, are returned so that none is freed before the join (streams.py).
        stream.wait_stream(torch.cuda.current_stream(device))
    # (torch.cuda.stream(None) does nothing, but its set-up looks the current device up first:
    # about 15 us of the 65-80 that a deterministic backward's host side took on this project's
    # CPU VM, its Triton launches stubbed out, at B 1, T 8, D 64.)
    with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
        counts.zero_()
        if num_tokens > 0:
            rank_grid = (num_chunks, cdiv(min(num_tokens, CHUNK), RANK_BLOCK))
            launch(
                chunk_rank_kernel, rank_grid, index, rank, counts, num_tokens, num_rows, num_chunks,
                CHUNK=CHUNK, BLOCK=RANK_BLOCK,
            )  # fmt: skip
            torch.cumsum(counts.view(-1), 0, dtype=torch.int32, out=ends.view(-1))
            launch(
                scatter_sorted_kernel,
                (cdiv(num_tokens, SCATTER_BLOCK),),
                index, rank, ends, counts, sorted_tokens, sorted_rows, num_tokens, num_rows, num_chunks,
                CHUNK=CHUNK, BLOCK=SCATTER_BLOCK,
            )  # fmt: skip
    return RowOrder(counts, ends, sorted_tokens, sorted_rows, rank)


def library_sort_by_row(index: torch.Tensor, num_rows: int) -> RowOrder:
    """The same order from torch.sort (stable, so token order is kept inside a row), with one
    chunk: each row's run [ends - counts, ends) comes from a binary search of the sorted rows.
    Memory and time grow as N (plus V for the search), not as V * N."""
    rows = index.clamp(0, num_rows - 1).to(torch.int32)  # as clamp_rows in the kernels
    sorted_rows, sorted_tokens = torch.sort(rows, stable=True)
    all_rows = torch.arange(num_rows, dtype=torch.int32, device=index.device)
    ends = torch.searchsorted(sorted_rows, all_rows, right=True, out_int32=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return RowOrder(
        counts.view(num_rows, 1), ends.view(num_rows, 1), sorted_tokens.to(torch.int32), sorted_rows,
        index.new_empty(0, dtype=torch.int32),
    )


def sort_by_row(index: torch.Tensor, num_rows: int, stream: torch.cuda.Stream | None = None) -> RowOrder:
    """index ([N] int32/int64) in stable order of rows: by the counting sort, unless its
    counts (and their prefix sum) would exceed COUNTING_SORT_MAX_CELLS, where torch.sort does.

    With `stream`, the counting sort's launches run on it, after all the work queued so far on
    the current stream (the fork is in counting_sort_by_row), and the current stream must wait
    for it before it reads the result (streams.side_stream's join). torch.sort's way stays on
    the current stream: it allocates as it goes, which the side stream's rules leave out."""
    if num_rows * cdiv(index.shape[0], CHUNK) > COUNTING_SORT_MAX_CELLS:
        return library_sort_by_row(index, num_rows)
    return counting_sort_by_row(index, num_rows, stream)


def sum_sorted_rows(grad_rows: torch.Tensor, order: RowOrder, table: torch.Tensor, skip_row: int) -> torch.Tensor:
    """Steps 5-7 of the module docstring: table[r] = the sum of grad_rows over the tokens of row r.

    table: [num_rows, D], zeroed (step 4, the caller's), written in place and returned.
    """
    num_tokens, dim = grad_rows.shape
    if num_tokens == 0:
        return table
    num_chunks = order.counts.shape[1]
    acc_fp64 = accumulates_in_float64(table.dtype)
    block_dim = column_block(dim)
    num_tiles = cdiv(num_tokens, TILE)
    # The partials, [num_tiles, D] row-major, are allocated flat: the kernels index them by
    # tile * dim. (Traced with dynamic shapes, as in torch.compile on CUDA, a [num_tiles, D]
    # tensor's contiguity is decided apart for num_tiles == 1, a guard that compiled graphs
    # of 16 tokens or fewer separately.)
    head = grad_rows.new_empty(num_tiles * dim, dtype=torch.float64)
    tail = torch.empty_like(head)
    launch(
        segment_sums_kernel,
        (num_tiles, cdiv(dim, block_dim)),
        grad_rows, order.sorted_tokens, order.sorted_rows, table, head, tail, num_tokens, dim, skip_row,
        ACC_FP64=acc_fp64, TILE=TILE, BLOCK_DIM=block_dim,
        num_warps=segment_warps(block_dim, grad_rows.element_size()),
    )  # fmt: skip
    num_blocks = num_tiles // PARTIALS_BLOCK
    block_sums = head  # stands in, unread, where no row can cover a whole block
    if num_blocks > 0:
        block_sums = head.new_empty(num_blocks * dim)  # [num_blocks, D], flat as head
        launch(
            sum_head_blocks_kernel, (num_blocks, cdiv(dim, COMBINE_BLOCK_DIM)),
            order.sorted_rows, head, block_sums, dim,
            TILE=TILE, PARTIALS_BLOCK=PARTIALS_BLOCK, BLOCK_DIM=COMBINE_BLOCK_DIM,
        )  # fmt: skip
    launch(
        combine_partials_kernel,
        (cdiv(num_tiles, COMBINE_TILES), cdiv(dim, COMBINE_BLOCK_DIM)),
        order.sorted_rows, order.ends, order.counts, head, tail, block_sums, table, num_tokens, num_tiles, dim,
        num_chunks, skip_row,
        ACC_FP64=acc_fp64, TILE=TILE, TILES_PER_PROGRAM=COMBINE_TILES, PARTIALS_BLOCK=PARTIALS_BLOCK,
        BLOCK_DIM=COMBINE_BLOCK_DIM,
    )  # fmt: skip
    return table


def sorted_scatter_add(
    grad_rows: torch.Tensor, index: torch.Tensor, num_rows: int, skip_row: int, table_dtype: torch.dtype
) -> torch.Tensor:
    """grad_table = zeros(num_rows, D).index_add_(0, index, grad_rows), deterministically.

    grad_rows: [N, D] contiguous; index: [N] int32/int64; skip_row: a row left at zero, or -1.
    Runs inside a tile are summed in float32 (float64 for float64 tables): in token order at
    GPT sizes, in a fixed tree order in narrow tables (see segment_sums_kernel). Partial sums of
    rows that cross tiles are kept in float64 and added in a fixed order. A row inside one tile
    is rounded to table_dtype once; a crossing row of a 16-bit table twice (float64 -> float32
    -> 16 bits, see finish_long_row). The order depends on the ids only: bitwise reproducible.
    """
    order = sort_by_row(index, num_rows)
    table = torch.zeros((num_rows, grad_rows.shape[1]), dtype=table_dtype, device=grad_rows.device)
    return sum_sorted_rows(grad_rows, order, table, skip_row)
