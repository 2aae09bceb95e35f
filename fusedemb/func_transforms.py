"""torch.func support: grad, vmap, jvp, hessian, per-sample gradients (vmap of grad).

torch.func transforms take an autograd.Function only in the form whose forward has no ctx and
saves through a separate setup_context, and they need a vmap rule for kernels that have no
batching rule of their own. That form's apply costs several times the host time of the form
FusedEmbeddingFunction uses (58-68 us against 10-11 us on this project's VM: it inspects the
forward's signature on every call), so fused_embedding takes these Functions only while a
transform is active.

Both directions are linear, so every derivative is one of the two kernels again:

    forward    out = F(tok, pos)              (the gather and add: forward_kernels)
    backward   (grad_tok, grad_pos) = B(g)    (the scatter-adds: backward_kernels)

    d out      = F(d tok, d pos)              forward mode of F: F on the tangents
    d g        = F(g_tok, g_pos)              reverse mode of B: F on the incoming gradients
    d (B(g))   = B(d g)                       forward mode of B: B on the tangent

Under vmap each direction is still one call of its kernels, for the whole batch. A batch of ids
(or positions) against one pair of tables folds the batch into the ids' leading dims. A batch of
tables [B, V, D] is one table B*V rows high, entry b's rows starting at b*V, so entry b's ids
read it at ids + b*V (positions likewise at + b*P). A batch of output gradients (per-sample
gradients, jacrev) scatters into such a stacked gradient table, which is [B, V, D] once
reshaped. The kernels know one padding row; a stacked table has one per entry, b*V + padding_idx,
and both backwards zero them all in place: the batched backward's vmap rule, and the forward's
own backward, which a transform below the vmap (grad or jvp of vmap, a vmap of the vmap) or
autograd may take of a stacked call (its rows_per_entry argument says how the table is
stacked). Only sizes whose stacked rows or tokens would pass the kernels' int32 limit run one
entry at a time. The range check always runs under transforms (fusedemb.functional): in a
stacked table an id past its own table is a row of the next entry's.

torch.compile of a vmapped call records the registered forward operator instead of these
Functions, so the operator has the same vmap rule (_batched_operator); its autograd zeroes one
padding row, so there a batch of token tables with a padding row runs one entry at a time, and
its callers may not have checked the ids, so it checks those of stacked tables itself.
"""

from __future__ import annotations

import torch

from fusedemb.kernels.preconditions import INT32_LIMIT
from fusedemb.ops import (
    autograd_batched,
    checked_indices,
    eager_backward,
    eager_forward,
    forward_on_tangents,
    fused_embedding_op,
    gather_table_gradients,
    save_backward_context,
    save_for_tangents,
    save_forward_context,
    table_gradients,
)
from fusedemb.reference import default_positions
from fusedemb.validation import check_positions_fit, check_sequence_dim, check_tables


def _batch_first(index: torch.Tensor, dim: int | None, batch_size: int) -> torch.Tensor:
    """index with the vmap batch as its leading dim (a shared index repeated, as a view)."""
    return index.movedim(dim, 0) if dim is not None else index.expand(batch_size, *index.shape)


def _positions(ids: torch.Tensor, position_ids: torch.Tensor | None, position_offset: int) -> torch.Tensor:
    """Every token's position, in ids' dtype; ids and position_ids lead with the batch."""
    return position_ids if position_ids is not None else default_positions(ids, position_offset).to(ids.dtype)


def _stacked_rows(index: torch.Tensor, rows: int) -> torch.Tensor:
    """index [B, ...] of tables [B, rows, D] as an index into the table [B * rows, D]: + b * rows."""
    starts = torch.arange(index.shape[0], device=index.device, dtype=index.dtype) * rows
    return index + starts.view(-1, *(1,) * (index.dim() - 1))


def _entry(tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The first entry of a batch (batch along `dim`; a shared tensor is every entry's)."""
    return tensor if dim is None else tensor.select(dim, 0)


def _rows(table: torch.Tensor, dim: int | None) -> int:
    """The row count of a table or of each table of a batch (batch along `dim`)."""
    return table.shape[0] if dim is None else table.movedim(dim, 0).shape[1]


def _stacked_table(table: torch.Tensor, dim: int) -> torch.Tensor:
    """A batch of tables (batch along `dim`) as one table [B * rows, D]: a view when it can be."""
    table = table.movedim(dim, 0)
    return table.reshape(-1, table.shape[-1])


def _within_int32(num_tokens: int, *stacked_rows: int) -> bool:
    """Whether a whole batch's tokens and stacked table rows stay within the kernels' int32."""
    return max((num_tokens, *stacked_rows)) < INT32_LIMIT


def _zero_padding_rows(grad_tok: torch.Tensor, rows_per_entry: int, padding_idx: int) -> None:
    """Zero every entry's padding row (b * rows_per_entry + padding_idx) of a stacked token-table
    gradient, in place through a view: a copy would cost as much as the gradient, and unflatten
    has no batching rule for autograd's batched tensors. Autograd records the write, so a
    derivative of this gradient sees those rows as constant, as it should."""
    grad_tok.view(-1, rows_per_entry, grad_tok.shape[-1])[:, padding_idx] = 0


def _loop(apply, info, in_dims, args):
    """apply on each batch entry in turn (contiguous, as the kernels take index tensors and
    gradients; an argument without a vmap dim is shared), the results stacked along a new dim 0.
    The entries come from one unbind, whose backward stacks their gradients once: a select per
    entry would add B full-size gradients, mostly zeros, back into the batch."""
    entries = [None if dim is None or arg is None else arg.unbind(dim) for arg, dim in zip(args, in_dims)]
    outputs = [
        apply(*(arg if parts is None else parts[index].contiguous() for arg, parts in zip(args, entries)))
        for index in range(info.batch_size)
    ]
    if isinstance(outputs[0], tuple):  # the backward's (grad_tok, grad_pos)
        return tuple(torch.stack(parts) for parts in zip(*outputs)), (0, 0)
    return torch.stack(outputs), 0


def _batched_forward(apply, info, in_dims, args, *, operator: bool = False):
    """The forward's vmap rule: `apply` (a forward taking FusedEmbeddingFunction's arguments, then
    any more settings) once for the whole batch, the batch folded into the ids or the tables
    stacked (module docstring); on each entry in turn where the stacked rows or tokens would pass
    the int32 limit. `operator`: apply is the registered operator, whose backward zeroes one
    padding row, so a batch of token tables with one runs entry by entry too; and whose callers
    need not have checked the inputs (it is called directly, or from an exported graph), so what
    the batch hides from the kernels is checked here: the shapes of each entry, and the ids of
    stacked tables (range_checked), in which an id past its own table is a row of the next
    entry's, which neither the C++ kernels' check nor the Triton kernels' clamp can tell."""
    ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, *settings = args
    ids_dim, tok_dim, pos_dim, position_ids_dim = in_dims[:4]
    batch_size, num_embeddings, context_length = info.batch_size, _rows(tok_weight, tok_dim), _rows(pos_weight, pos_dim)
    batch_ids = _batch_first(ids, ids_dim, batch_size)
    if operator:
        # What the kernels would refuse of one entry but cannot tell in the whole batch (callers
        # of fused_embedding's Functions have had each entry checked by fusedemb.validation):
        # 0-d ids (the batch would pass as their sequence), tables that are not 2-D (stacked, a
        # table's last dim would pass as its rows) and default positions past their table (in a
        # stacked position table they would read the next entry's rows).
        if batch_size > 0:
            check_sequence_dim("ids", batch_ids[0])
            check_tables(_entry(tok_weight, tok_dim), _entry(pos_weight, pos_dim))
        if pos_dim is not None and position_ids is None:
            check_positions_fit(batch_ids.shape[-1], position_offset, context_length)
    stacked_rows = [batch_size * rows for rows, dim in ((num_embeddings, tok_dim), (context_length, pos_dim)) if dim is not None]
    padded_tables = tok_dim is not None and padding_idx >= 0 and batch_size > 0
    if not _within_int32(batch_ids.numel(), *stacked_rows) or (operator and padded_tables):
        return _loop(apply, info, in_dims, args)
    ids = batch_ids
    if position_ids is not None:
        position_ids = _batch_first(position_ids, position_ids_dim, batch_size)
    if operator and stacked_rows:
        ids, position_ids = checked_indices(ids, num_embeddings, position_ids, context_length)
    if tok_dim is not None:
        ids, tok_weight = _stacked_rows(ids, num_embeddings), _stacked_table(tok_weight, tok_dim)
        if batch_size == 0:  # no tables, so no padding row in them
            padding_idx = -1
    if pos_dim is not None:
        positions = _positions(ids, position_ids, position_offset)
        position_ids, pos_weight = _stacked_rows(positions, context_length), _stacked_table(pos_weight, pos_dim)
        position_offset = 0
    if position_ids is not None:
        position_ids = position_ids.contiguous()
    return apply(ids.contiguous(), tok_weight, pos_weight, position_ids, position_offset, padding_idx, *settings), 0


class TransformableFusedEmbedding(torch.autograd.Function):
    """fused_embedding's forward for torch.func: FusedEmbeddingFunction's arguments, then
    rows_per_entry, the rows of each table in the token table (all of them but under vmap,
    which stacks a batch of tables into one): each entry has a padding row, at padding_idx of
    its rows, and the backward zeroes them all, where the kernels know the first only."""

    @staticmethod
    def forward(ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic,
                rows_per_entry):  # fmt: skip
        if autograd_batched(tok_weight) or autograd_batched(pos_weight):  # gradients or tangents as tables
            return fused_embedding_op(ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend,
                                      deterministic)  # fmt: skip
        return eager_forward(
            ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_forward_context(ctx, inputs[:8], output)
        ids, tok_weight, _, position_ids, *_ = inputs
        save_for_tangents(ctx, ids, tok_weight, position_ids)
        ctx.rows_per_entry = inputs[8]

    @staticmethod
    def backward(ctx, grad_out):
        grads = table_gradients(ctx, grad_out, apply_backward)
        grad_tok = grads[1]
        if grad_tok is not None and ctx.padding_idx >= 0 and ctx.rows_per_entry < ctx.num_embeddings:
            _zero_padding_rows(grad_tok, ctx.rows_per_entry, ctx.padding_idx)  # the kernels did the first
        return (*grads, None)

    @staticmethod
    def jvp(ctx, ids_tangent, tok_tangent, pos_tangent, *_):
        def forward(*args):  # on the tangents, whose padding rows pass on as in nn.Embedding
            return TransformableFusedEmbedding.apply(*args, ctx.rows_per_entry)

        return forward_on_tangents(ctx, tok_tangent, pos_tangent, forward)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _batched_forward(TransformableFusedEmbedding.apply, info, in_dims, args)


class TransformableFusedEmbeddingBackward(torch.autograd.Function):
    """The backward kernels for torch.func, differentiable in both modes (see the module
    docstring). Arguments: the backward operator's, with tok_needs_grad and pos_needs_grad last."""

    @staticmethod
    def forward(grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, backend,
                deterministic, tok_needs_grad, pos_needs_grad):  # fmt: skip
        return eager_backward(
            grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, backend,
            deterministic, tok_needs_grad=tok_needs_grad, pos_needs_grad=pos_needs_grad,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_backward_context(ctx, inputs)
        ctx.save_for_forward(inputs[1], inputs[2])  # ids, position_ids
        ctx.needs = inputs[9:]
        ctx.set_materialize_grads(False)  # a missing gradient stays None: no V x D zeros

    @staticmethod
    def backward(ctx, grad_of_grad_tok, grad_of_grad_pos):
        grad_grad_out = gather_table_gradients(ctx, grad_of_grad_tok, grad_of_grad_pos, apply_forward)
        return (grad_grad_out,) + (None,) * 10

    @staticmethod
    def jvp(ctx, grad_out_tangent, *_):
        ids, position_ids = ctx.saved_tensors
        return TransformableFusedEmbeddingBackward.apply(
            grad_out_tangent.contiguous(), ids, position_ids, ctx.position_offset, ctx.num_embeddings,
            ctx.context_length, ctx.padding_idx, ctx.backend, ctx.deterministic, *ctx.needs,
        )  # fmt: skip

    @staticmethod
    def vmap(info, in_dims, grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx,
             backend, deterministic, tok_needs_grad, pos_needs_grad):  # fmt: skip
        """Each batch entry's gradients, scattered into tables stacked B high (module docstring)."""
        batch_size = info.batch_size
        batch_ids = _batch_first(ids, in_dims[1], batch_size)
        settings = (backend, deterministic, tok_needs_grad, pos_needs_grad)
        if not _within_int32(batch_ids.numel(), batch_size * num_embeddings, batch_size * context_length):
            args = (grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, *settings)
            return _loop(TransformableFusedEmbeddingBackward.apply, info, in_dims, args)
        grad_out, ids = _batch_first(grad_out, in_dims[0], batch_size).contiguous(), batch_ids
        if position_ids is not None:
            position_ids = _batch_first(position_ids, in_dims[2], batch_size)
        positions = _positions(ids, position_ids, position_offset)
        grad_tok, grad_pos = TransformableFusedEmbeddingBackward.apply(
            grad_out, _stacked_rows(ids, num_embeddings).contiguous(), _stacked_rows(positions, context_length).contiguous(),
            0, batch_size * num_embeddings, batch_size * context_length, -1, *settings,
        )  # fmt: skip
        if padding_idx >= 0 and tok_needs_grad:
            _zero_padding_rows(grad_tok, num_embeddings, padding_idx)
        dim = grad_out.shape[-1]  # a table that needs no gradient has a [0, D] one per entry
        grad_tok = grad_tok.view(batch_size, num_embeddings if tok_needs_grad else 0, dim)
        grad_pos = grad_pos.view(batch_size, context_length if pos_needs_grad else 0, dim)
        return (grad_tok, grad_pos), (0, 0)


def apply_forward(ids, tok_weight, *args):
    """TransformableFusedEmbedding.apply on one token table (or one stacked table whose own
    padding rows are already taken care of): in the calling convention of the other forwards."""
    return TransformableFusedEmbedding.apply(ids, tok_weight, *args, tok_weight.shape[0])


def apply_backward(*args, tok_needs_grad: bool, pos_needs_grad: bool):
    """TransformableFusedEmbeddingBackward.apply in the calling convention of table_gradients
    (apply takes no keyword arguments); also FusedEmbeddingFunction's backward under
    forward-mode AD, for its jvp."""
    return TransformableFusedEmbeddingBackward.apply(*args, tok_needs_grad, pos_needs_grad)


def _batched_operator(info, in_dims, *args):
    """The registered forward operator's vmap rule: torch.compile of a vmapped call records the
    operator, which would otherwise run once per entry (PyTorch's fallback, with a warning)."""
    return _batched_forward(fused_embedding_op, info, in_dims, args, operator=True)


fused_embedding_op.register_vmap(_batched_operator)
