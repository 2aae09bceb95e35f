"""Triton backward: the gradients of the token table and of the position table.

    grad_tok = zeros(V, D).index_add_(0, ids, grad_out)    (row padding_idx stays zero)
    grad_pos = zeros(P, D).index_add_(0, pos, grad_out)

Bytes moved: read the ids (N * id_size) and grad_out (N * D * elt), write the dense token
gradient (V * D * elt, zeros included) and the position gradient (P * D * elt).

The token gradient has two modes:
- fast: `sweep_batch_kernel` adds each gradient row into a float32 table (float64 for float64
  tables) with atomics, in the same read of grad_out that sums the position gradient. The
  order of the additions, and so the last bits of the result, vary from run to run. The
  atomics cost more than their bytes: every row a token touches is read back from memory (the
  zeroing wrote it out) and written again.
  For 16-bit tables the float32 accumulator is only zeroed, and only read back, where a token
  lands: zeroing and rounding the whole V x D float32 table would move 10 bytes per element
  instead of the 2 of the 16-bit result.
- deterministic: a counting sort plus segment sums (sorted_scatter.py): no floating-point
  atomics, bitwise reproducible. The sort runs on a side stream, alongside the table's zeroing
  and the position sums (streams.py). The fast mode takes it too for 16-bit tables
  with many tokens (`fast_mode_sorts`), where it is the faster of the two.
The position gradient never needs atomics: with default positions it is a sum over the batch
(`sweep_batch_kernel`), with explicit position_ids it is the deterministic scatter.
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
from fusedemb.kernels.preconditions import check_backward_inputs
from fusedemb.kernels.sorted_scatter import sort_by_row, sorted_scatter_add, sum_sorted_rows
from fusedemb.kernels.streams import side_stream


@triton.jit
def add_tile_to_table(acc_ptr, grad, table_rows, present, cols, col_mask, dim, num_rows, skip_row, pending, pending_row):
    """acc[table_rows] += grad for the present tokens of one [tokens, BLOCK_DIM] tile, with
    atomics. Atomics on one address serialise, so a tile whose tokens all share one table row
    (one id over the batch, a run of padding) is summed in registers instead, into `pending`,
    which is kept there while the next tiles share that row too and added to `pending_row`
    (-1: none yet) only when the row changes. Returns the new (pending, pending_row).

    Summing each program's most common id out of every tile instead (to help Zipf ids too) was
    measured slower on an H200: the per-tile masked reduction crosses warps, and the kernel took
    138 us instead of 85 us at gpt2-124M B32 float32 with uniform ids.

    Each thread's four contiguous float32 columns go out as one 16-byte atomic: compiled for
    sm_90a (Triton 3.6 and 3.9, D divisible by 16), the kernel's SASS has REDG.E.ADD.F32x4 (and
    F32x2 in flush_pending), not one instruction per float, so hand-written vector atomics
    would gain nothing here."""
    # The smallest and the largest row of the present tokens are equal only if they all share
    # one row. (A tile with no present token has min num_rows > max -1: it takes the atomic
    # branch, whose mask is then all false.)
    lowest = tl.min(tl.where(present, table_rows, num_rows))  # num_rows: above any row
    if lowest == tl.max(tl.where(present, table_rows, -1)):
        tile_sum = tl.sum(grad, axis=0)
        if lowest == pending_row:
            pending += tile_sum
        else:
            flush_pending(acc_ptr, pending, pending_row, cols, col_mask, dim, skip_row)
            pending = tile_sum
            pending_row = lowest
    else:
        add_mask = (present & (table_rows != skip_row))[:, None] & col_mask[None, :]
        # Relaxed: the adds only accumulate, and nothing reads the accumulator before the kernel
        # ends, so they need no ordering; the default, acq_rel, would order each one against the
        # program's other loads and stores.
        tl.atomic_add(acc_ptr + table_rows[:, None] * dim + cols[None, :], grad, mask=add_mask, sem="relaxed")
    return pending, pending_row


@triton.jit
def flush_pending(acc_ptr, pending, pending_row, cols, col_mask, dim, skip_row):
    if (pending_row >= 0) & (pending_row != skip_row):
        tl.atomic_add(acc_ptr + pending_row * dim + cols, pending, mask=col_mask, sem="relaxed")  # see add_tile_to_table


@triton.jit
def load_batch_tile(grad_ptr, index_ptr, b, end_batch, t, in_sequence, seq_len, cols, col_mask, dim, num_rows,
                    ADD_TO_TABLE: tl.constexpr):  # fmt: skip
    """Batch entry b's gradient tile grad[b, t, cols], its table rows (if ADD_TO_TABLE) and which
    of its rows are present: none past the group's last entry, whose loads are all masked off.
    (So `present` must not depend on `tokens`: for the entry past the last, b * seq_len + t is
    formed in int32 and may wrap where N nears INT32_LIMIT.)"""
    present = in_sequence & (tl.zeros_like(t) + b < end_batch)  # (a vector: the interpreter rejects scalar masks here)
    tokens = (b * seq_len + t).to(tl.int64)
    grad = tl.load(grad_ptr + tokens[:, None] * dim + cols[None, :], mask=present[:, None] & col_mask[None, :], other=0)
    if ADD_TO_TABLE:
        table_rows = clamp_rows(tl.load(index_ptr + tokens, mask=present, other=0).to(tl.int64), num_rows)
    else:
        table_rows = tokens  # unused
    return grad, table_rows, present


@triton.jit
def sweep_batch_kernel(
    grad_ptr,  # [B, T, D] gradient rows, contiguous
    index_ptr,  # [B * T] destination table row of each gradient row (read if ADD_TO_TABLE)
    acc_ptr,  # [R, D] float32/float64 accumulator, zero wherever a token adds (if ADD_TO_TABLE)
    sums_ptr,  # [G, S, D] out (if SUM_OVER_BATCH): see below
    batch,  # B
    seq_len,  # T
    position_offset,  # sums row of sequence position 0: the caller's offset when S = P, else 0
    num_sums,  # S: rows of each sums slice (P, the position-table rows, or T)
    dim,  # D
    num_rows,  # R: table rows (ids are clamped into [0, R))
    skip_row,  # a table row that receives nothing (padding_idx), or -1
    batches_per_group,  # program (i, j, g) walks batch entries [g * batches_per_group, +batches_per_group)
    ADD_TO_TABLE: tl.constexpr,
    SUM_OVER_BATCH: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """One pass over grad_out that serves both tables; the grid is (S / BLOCK_ROWS, D / BLOCK_DIM, G).

    Program (i, j, g) owns sums rows s = i * BLOCK_ROWS + [0, BLOCK_ROWS), sequence positions
    t = s - position_offset, columns j * BLOCK_DIM + [0, BLOCK_DIM), and walks its group of the
    batch, reading each gradient tile grad[b, t, cols] once, to
    - ADD_TO_TABLE: add it into acc[index[b, t]] with float atomics (the fast token gradient);
    - SUM_OVER_BATCH: sum it over the group in batch order (deterministic, no atomics):
      sums[g, s] = sum over b in the group of grad[b, s - position_offset], zero for s outside
      [position_offset, position_offset + T). With G = 1 and S = P this is the position gradient.
    Bytes: the gradient is read once for both (N * D * elt), the sums written once (G * S * D
    elements: of the table's dtype when G = 1; of the accumulator's when G > 1, for the second,
    smaller sweep over the groups that sweep_batch then launches).
    """
    sum_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    group = tl.program_id(2)
    col_mask = cols < dim
    t = sum_rows - position_offset
    in_sequence = (t >= 0) & (t < seq_len) & (sum_rows < num_sums)
    acc_type = acc_ptr.dtype.element_ty
    sums = to_accumulator(tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=tl.float32), ACC_FP64)
    # See add_tile_to_table: the row summed in registers, and its sum so far.
    pending = tl.zeros([BLOCK_DIM], dtype=acc_type)
    pending_row = tl.cast(-1, tl.int64)
    first_batch = group * batches_per_group
    end_batch = tl.minimum(first_batch + batches_per_group, batch)
    # Rows outside the sequence (position rows before position_offset or past it + T) only get
    # their zeros stored: a program with none inside skips the walk over its batch entries.
    end_batch = tl.where(tl.max(in_sequence.to(tl.int32), axis=0) > 0, end_batch, first_batch)
    # Software pipelining: the next batch entry's tile is loaded before this one's is added, so
    # that the program has a load in flight while its atomics go out (a step that loaded two
    # tiles and then added them left it with nothing in flight while it added). Measured on an
    # H200 it gains up to 3% alone and more with 4 warps (see sweep_tile), and costs the
    # position sums alone up to 4%. Two entries ahead would keep more in flight, but ptxas then
    # spills the bfloat16 kernel at 64 registers.
    grad, table_rows, present = load_batch_tile(
        grad_ptr, index_ptr, first_batch, end_batch, t, in_sequence, seq_len, cols, col_mask, dim, num_rows, ADD_TO_TABLE
    )
    for b in range(first_batch, end_batch):
        next_grad, next_rows, next_present = load_batch_tile(
            grad_ptr, index_ptr, b + 1, end_batch, t, in_sequence, seq_len, cols, col_mask, dim, num_rows, ADD_TO_TABLE
        )
        if SUM_OVER_BATCH:
            sums += to_accumulator(grad, ACC_FP64)  # in batch order
        if ADD_TO_TABLE:
            pending, pending_row = add_tile_to_table(
                acc_ptr, grad.to(acc_type), table_rows, present, cols, col_mask, dim, num_rows, skip_row, pending,
                pending_row,
            )  # fmt: skip
        grad, table_rows, present = next_grad, next_rows, next_present
    if ADD_TO_TABLE:
        flush_pending(acc_ptr, pending, pending_row, cols, col_mask, dim, skip_row)
    if SUM_OVER_BATCH:
        offsets = (group * num_sums + sum_rows).to(tl.int64)[:, None] * dim + cols[None, :]
        store_mask = (sum_rows < num_sums)[:, None] & col_mask[None, :]
        tl.store(sums_ptr + offsets, sums.to(sums_ptr.dtype.element_ty), mask=store_mask)


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
    # before sweep_batch_kernel starts (same stream).
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    rows = clamp_rows(tl.load(index_ptr + tokens, mask=tokens < num_tokens, other=0).to(tl.int64), num_rows)
    keep = (tokens < num_tokens) & (rows != skip_row)
    zeros = tl.zeros([BLOCK_TOKENS, BLOCK_DIM], dtype=acc_ptr.dtype.element_ty)
    tl.store(acc_ptr + rows[:, None] * dim + cols[None, :], zeros, mask=keep[:, None] & (cols < dim)[None, :])
    if tl.program_id(1) == 0:  # the flag is per row: one of the token tile's column blocks sets it
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


# sweep_batch_kernel splits the batch into groups only when the positions alone give fewer
# programs than this: enough to keep every SM of an H100/H200 (132) busy several times over.
SWEEP_PROGRAMS = 512


def sweep_tile(dim: int, add_to_table: bool, grad_dtype: torch.dtype) -> Tile:
    """sweep_batch_kernel's tile. Each program walks a group of the batch, so tiles are kept small
    (a quarter of the usual rows) for enough programs: T * D / 1024 of them.

    Warps: a [4, 256] float32 tile over 8 warps is one 16-byte vector per thread (8 bytes of a
    16-bit tile). Adding float32 gradients into the table, 4 warps (two vectors per thread; on
    sm_90 95 registers with Triton 3.6, the GPU machines', so 5 programs per SM, and 80 with
    Triton 3.9, 6 per SM; the 8-warp build takes 64 registers, 4 programs per SM) were faster on
    an H200 (Triton 3.6), backward alone, with the one-entry-ahead load: at gpt2-124M B32, 169 ->
    141 us with Zipf(1.1) ids, 176 -> 87 us with one id everywhere, 124 -> 122 us with uniform
    ids; large-vocab B16 Zipf 1226 -> 1095 us. With bfloat16 gradients (94-95 registers) 4 warps
    were slower (gpt2-124M B8, one id everywhere: 72 -> 106 us), and the position sums alone do
    not need them."""
    columns = column_block(dim)
    warps = 4 if add_to_table and grad_dtype == torch.float32 else 8
    return Tile(max(1, rows_per_tile(columns) // 4), columns, warps)


def sweep_batch(
    grad_rows: torch.Tensor,
    seq_len: int,
    *,
    table_dtype: torch.dtype,
    index: torch.Tensor | None = None,
    table_acc: torch.Tensor | None = None,
    skip_row: int = -1,
    position_offset: int = 0,
    context_length: int | None = None,
    max_groups: int | None = None,
) -> torch.Tensor | None:
    """One read of grad_rows ([B * T, D]) that adds it into table_acc at index (if given) and
    returns grad_pos = zeros(context_length, D).index_add_(0, default positions, grad_rows) in
    table_dtype (if context_length is given)."""
    num_tokens, dim = grad_rows.shape
    sum_positions = context_length is not None
    if num_tokens == 0:
        return grad_rows.new_zeros((context_length, dim), dtype=table_dtype) if sum_positions else None
    batch = num_tokens // seq_len
    add_to_table = table_acc is not None
    tile = sweep_tile(dim, add_to_table, grad_rows.dtype)
    programs = cdiv(seq_len, tile.rows) * cdiv(dim, tile.columns)
    groups = min(batch, max_groups or cdiv(SWEEP_PROGRAMS, programs))
    batches_per_group = cdiv(batch, groups)
    groups = cdiv(batch, batches_per_group)
    # One group writes the position gradient itself: its program rows are the P position rows,
    # zeros outside [position_offset, + T). Several groups (or only adding) work on the T sequence
    # positions; their partial sums, in the accumulator's precision, are then added in group order
    # and placed at position_offset by a second sweep, over the groups.
    direct = sum_positions and groups == 1
    num_sums, offset = (context_length, position_offset) if direct else (seq_len, 0)
    acc_fp64 = accumulates_in_float64(table_dtype)
    sums = None
    if sum_positions:
        partial_dtype = torch.float64 if acc_fp64 else torch.float32
        sums = grad_rows.new_empty((groups, num_sums, dim), dtype=table_dtype if direct else partial_dtype)
    unused = grad_rows  # stands in for the pointers of the disabled half
    launch(
        sweep_batch_kernel, (cdiv(num_sums, tile.rows), cdiv(dim, tile.columns), groups),
        grad_rows, index if add_to_table else unused, table_acc if add_to_table else unused,
        sums if sum_positions else unused, batch, seq_len, offset, num_sums, dim,
        table_acc.shape[0] if add_to_table else 1, skip_row, batches_per_group,
        ADD_TO_TABLE=add_to_table, SUM_OVER_BATCH=sum_positions, ACC_FP64=acc_fp64,
        BLOCK_ROWS=tile.rows, BLOCK_DIM=tile.columns, num_warps=tile.warps,
    )  # fmt: skip
    if not sum_positions:
        return None
    if direct:
        return sums.view(num_sums, dim)
    return sweep_batch(
        sums.view(groups * seq_len, dim), seq_len, position_offset=position_offset, context_length=context_length,
        table_dtype=table_dtype, max_groups=1,
    )  # fmt: skip


def atomic_scatter_add(
    grad_rows: torch.Tensor,
    index: torch.Tensor,
    seq_len: int,
    num_rows: int,
    skip_row: int,
    table_dtype: torch.dtype,
    position_offset: int,
    context_length: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grad_table = zeros(num_rows, D).index_add_(0, index, grad_rows) with float atomics (fast
    mode; row skip_row left zero), and, when context_length is given, the position gradient from the same read of
    grad_rows (sweep_batch)."""
    num_tokens, dim = grad_rows.shape
    device = grad_rows.device
    block_dim = column_block(dim)
    tile_rows = rows_per_tile(block_dim)  # tokens, or table rows, per tile of the 16-bit tables' zeroing and rounding
    if table_dtype in (torch.float32, torch.float64):
        # The table is its own accumulator, zeroed whole before the atomics. Zeroing only the
        # rows tokens add into first, and the others from extra programs of the sweep while it
        # adds, was measured slower on an H100 (forward+backward, float32; a first form, which
        # also failed 3 CUDA tests): +2-5% at gpt2-124M with uniform, Zipf and text ids, +8-10%
        # at gpt2-1.5B, +26-42% with one id everywhere. A guess, not profiled: those programs'
        # masked stores zero slower than the fill kernel, and with one id the sweep is too
        # short to hide them.
        table = acc = torch.zeros((num_rows, dim), dtype=table_dtype, device=device)
    else:
        acc = torch.empty((num_rows, dim), dtype=torch.float32, device=device)
        touched = torch.zeros(num_rows, dtype=torch.int8, device=device)
        table = torch.empty((num_rows, dim), dtype=table_dtype, device=device)
        if num_tokens > 0:
            launch(
                zero_touched_rows_kernel, (cdiv(num_tokens, tile_rows), cdiv(dim, block_dim)),
                index, acc, touched, num_tokens, dim, num_rows, skip_row, BLOCK_TOKENS=tile_rows,
                BLOCK_DIM=block_dim,
            )  # fmt: skip
    grad_pos = sweep_batch(
        grad_rows, seq_len, index=index, table_acc=acc, skip_row=skip_row, position_offset=position_offset,
        context_length=context_length, table_dtype=table_dtype,
    )  # fmt: skip
    if acc is not table:
        launch(
            round_touched_rows_kernel, (cdiv(num_rows, tile_rows), cdiv(dim, block_dim)),
            acc, touched, table, num_rows, dim, BLOCK_ROWS=tile_rows, BLOCK_DIM=block_dim,
        )  # fmt: skip
    return table, grad_pos


# The fast mode sorts as well for 16-bit tables with at least this many tokens and gradient
# elements: there the atomics' float32 accumulator (zeroed, read back and rounded for every
# touched row) and their collisions on hot rows cost more than the sort. Measured on an H200,
# backward alone: at gpt2-124M B32 bfloat16 the two tie with uniform ids and sorting is 1.2-1.4x
# faster with Zipf(1.1) ids; at gpt2-1.5B B16 it is 1.1-1.2x faster. Below the thresholds the
# atomics won with uniform ids (gpt2-124M B16: 90 against 105 us; large-vocab B4: 469 against
# 509 us), though not with Zipf ids at gpt2-124M B16 (127 against 113 us). (The gpt2-1.5B and
# below-threshold sorted figures are of the segment sums' earlier 8-row tile for 16-bit tables;
# the 16-row tile is faster.)
FAST_SORTS_MIN_TOKENS = 16384
FAST_SORTS_MIN_ELEMENTS = 1 << 24


def fast_mode_sorts(num_tokens: int, dim: int, table_dtype: torch.dtype) -> bool:
    """Whether the fast mode computes the token gradient by sorting (see the thresholds)."""
    return (
        table_dtype.itemsize == 2
        and num_tokens >= FAST_SORTS_MIN_TOKENS
        and num_tokens * dim >= FAST_SORTS_MIN_ELEMENTS
    )


def triton_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
    num_embeddings: int,
    context_length: int,
    padding_idx: int,
    deterministic: bool,
    *,
    tok_needs_grad: bool = True,
    pos_needs_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_tok [V, D], grad_pos [P, D]); a table that needs no gradient (frozen) gets an empty
    [0, D] tensor instead, and none of the work."""
    grad_out, ids, position_ids = resolve_negation(grad_out, ids, position_ids)
    check_backward_inputs(grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx)
    dim = grad_out.shape[-1]
    grad_rows = grad_out.reshape(-1, dim)
    flat_ids = ids.reshape(-1)
    seq_len = ids.shape[-1]
    grad_tok = grad_pos = None  # left so for a table that needs no gradient
    # Default positions: the position gradient is a sum over the batch (sweep_batch), which the
    # fast mode's atomics share a read of grad_out with. Explicit position_ids are scattered.
    sum_positions = pos_needs_grad and position_ids is None
    atomics = tok_needs_grad and not (deterministic or fast_mode_sorts(grad_rows.shape[0], dim, grad_out.dtype))
    with on_device_of(grad_out):
        if atomics:
            grad_tok, grad_pos = atomic_scatter_add(
                grad_rows, flat_ids, seq_len, num_embeddings, padding_idx, grad_out.dtype, position_offset,
                context_length if sum_positions else None,
            )  # fmt: skip
        else:
            # The sort runs on a side stream of high priority while this stream zeroes the table
            # and sums the positions, work it does not depend on (streams.py).
            with side_stream(grad_rows, enabled=tok_needs_grad) as sort_stream:
                if tok_needs_grad:
                    order = sort_by_row(flat_ids, num_embeddings, sort_stream)
                    grad_tok = torch.zeros((num_embeddings, dim), dtype=grad_out.dtype, device=grad_out.device)
                if sum_positions:
                    grad_pos = sweep_batch(
                        grad_rows, seq_len, position_offset=position_offset, context_length=context_length,
                        table_dtype=grad_out.dtype,
                    )  # fmt: skip
            if tok_needs_grad:
                sum_sorted_rows(grad_rows, order, grad_tok, padding_idx)
        if pos_needs_grad and position_ids is not None:
            grad_pos = sorted_scatter_add(grad_rows, position_ids.reshape(-1), context_length, -1, grad_out.dtype)
    # A frozen table's [0, D] placeholder is made only when needed: two empty tensors on every
    # call took 3.6 us of host time (this project's CPU VM).
    return tuple(grad if grad is not None else grad_rows.new_empty((0, dim)) for grad in (grad_tok, grad_pos))
