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

Under vmap the kernels see one batch entry at a time unless the tables are shared: a batch of
ids (or positions) against one pair of tables is one call with the batch folded into the ids'
leading dims; anything else (a batch of tables, per-sample gradients) is a loop over the batch.
"""

from __future__ import annotations

import torch

from fusedemb.ops import (
    _setup_context,
    _table_gradients,
    eager_backward,
    eager_forward,
    forward_on_tangents,
    gather_table_gradients,
    save_backward_context,
    save_for_tangents,
)


def _entry(value, dim: int | None, index: int):
    """Batch entry `index` of a vmapped argument (one without a vmap dim is shared), contiguous
    as the kernels take index tensors and gradients."""
    return value if dim is None or value is None else value.select(dim, index).contiguous()


def _stacked(outputs: list) -> tuple[torch.Tensor, ...] | torch.Tensor:
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs))
    return torch.stack(outputs)


def _loop(apply, info, in_dims, args):
    """apply on each batch entry in turn, the results stacked along a new dim 0."""
    outputs = [apply(*(_entry(arg, dim, index) for arg, dim in zip(args, in_dims))) for index in range(info.batch_size)]
    out_dims = (0, 0) if isinstance(outputs[0], tuple) else 0
    return _stacked(outputs), out_dims


class TransformableFusedEmbedding(torch.autograd.Function):
    """fused_embedding's forward for torch.func (arguments as FusedEmbeddingFunction's)."""

    @staticmethod
    def forward(ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic):
        return eager_forward(ids, tok_weight, pos_weight, position_ids, position_offset, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ids, tok_weight, _, position_ids, *_ = inputs
        save_for_tangents(ctx, ids, tok_weight, position_ids)

    @staticmethod
    def backward(ctx, grad_out):
        return _table_gradients(ctx, grad_out, apply_backward)

    @staticmethod
    def jvp(ctx, ids_tangent, tok_tangent, pos_tangent, *_):
        return forward_on_tangents(ctx, tok_tangent, pos_tangent, TransformableFusedEmbedding.apply)

    @staticmethod
    def vmap(info, in_dims, ids, tok_weight, pos_weight, position_ids, *rest):
        ids_dim, tok_dim, pos_dim, position_ids_dim = in_dims[:4]
        if tok_dim is not None or pos_dim is not None:
            return _loop(TransformableFusedEmbedding.apply, info, in_dims, (ids, tok_weight, pos_weight, position_ids, *rest))

        def batch_first(index, dim):  # positions depend on the last dim only: the batch can lead
            return index.movedim(dim, 0) if dim is not None else index.expand(info.batch_size, *index.shape)

        ids = batch_first(ids, ids_dim).contiguous()
        if position_ids is not None:
            position_ids = batch_first(position_ids, position_ids_dim).contiguous()
        return TransformableFusedEmbedding.apply(ids, tok_weight, pos_weight, position_ids, *rest), 0


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
        grad_grad_out = gather_table_gradients(ctx, grad_of_grad_tok, grad_of_grad_pos, TransformableFusedEmbedding.apply)
        return (grad_grad_out,) + (None,) * 10

    @staticmethod
    def jvp(ctx, grad_out_tangent, *_):
        ids, position_ids = ctx.saved_tensors
        return TransformableFusedEmbeddingBackward.apply(
            grad_out_tangent.contiguous(), ids, position_ids, ctx.position_offset, ctx.num_embeddings,
            ctx.context_length, ctx.padding_idx, ctx.backend, ctx.deterministic, *ctx.needs,
        )  # fmt: skip

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop(TransformableFusedEmbeddingBackward.apply, info, in_dims, args)


def apply_backward(*args, tok_needs_grad: bool, pos_needs_grad: bool):
    """TransformableFusedEmbeddingBackward.apply in the calling convention of _table_gradients
    (apply takes no keyword arguments); also FusedEmbeddingFunction's backward under
    forward-mode AD, for its jvp."""
    return TransformableFusedEmbeddingBackward.apply(*args, tok_needs_grad, pos_needs_grad)
