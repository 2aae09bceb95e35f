"""The plain-PyTorch definition of the fused embedding: the ground truth for tests and benchmarks.

    out[..., t, :] = tok_weight[ids[..., t], :] + pos_weight[pos[..., t], :]
    pos[..., t]    = position_ids[..., t]   if position_ids is given (broadcast to ids' shape)
                   = t + position_offset     otherwise

This is what a GPT model computes with two ``nn.Embedding`` modules and an add, written for
every case at once: default positions are expanded to ids' shape, like explicit ones, so both
gathers materialise (N, D) intermediates that the add reads back. (A GPT model gathers its
(T, D) position rows once and broadcasts them in the add: the benchmarks' ``eager`` does that,
fusedemb.bench.implementations.eager_embedding.) Its values are the same either way: each
element is one addition of a token row's and a position row's element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_positions(ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
    """Positions ``t + position_offset`` for ids of shape ``(..., T)``, broadcast to ids' shape."""
    seq_len = ids.shape[-1]
    positions = torch.arange(position_offset, position_offset + seq_len, device=ids.device)
    return positions.expand(ids.shape)


def fused_embedding_reference(
    ids: torch.Tensor,
    tok_weight: torch.Tensor,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    position_offset: int = 0,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """Token embedding plus absolute position embedding, written as two ``F.embedding`` and an add."""
    positions = default_positions(ids, position_offset) if position_ids is None else position_ids.expand(ids.shape)
    return F.embedding(ids, tok_weight, padding_idx=padding_idx) + F.embedding(positions, pos_weight)


def fused_embedding_backward_reference(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    num_embeddings: int,
    context_length: int,
    position_ids: torch.Tensor | None = None,
    position_offset: int = 0,
    padding_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of both tables, written as the scatter-adds they are.

    Accumulated in float32 (float64 for float64 gradients), then cast back to grad_out's dtype.

    grad_tok = zeros(V, D).index_add_(0, ids, grad_out)   (the padding_idx row stays zero)
    grad_pos = zeros(P, D).index_add_(0, pos, grad_out)
    """
    if position_ids is None:
        position_ids = default_positions(ids, position_offset)
    rows = grad_out.to(torch.promote_types(grad_out.dtype, torch.float32))
    grad_tok = scatter_add_rows(rows, ids, num_embeddings, skip_row=padding_idx)
    grad_pos = scatter_add_rows(rows, position_ids.expand(ids.shape), context_length)
    return grad_tok.to(grad_out.dtype), grad_pos.to(grad_out.dtype)


def scatter_add_rows(
    grad_out: torch.Tensor, index: torch.Tensor, num_rows: int, skip_row: int | None = None
) -> torch.Tensor:
    """The gradient of one table looked up at index: zeros(num_rows, D).index_add_(0, index,
    grad_out rows), summed in grad_out's dtype, with row skip_row (a padding_idx) left zero."""
    dim = grad_out.shape[-1]
    grad = grad_out.new_zeros(num_rows, dim).index_add_(0, index.reshape(-1), grad_out.reshape(-1, dim))
    if skip_row is not None:
        grad[skip_row] = 0
    return grad
