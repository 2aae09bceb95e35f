"""torch.func transforms through fused_embedding, against the same transforms of the reference."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import make_tables

import fusedemb
from fusedemb.reference import fused_embedding_reference

VOCAB, CONTEXT, DIM = 10, 7, 5


@pytest.fixture
def case(backend_config):
    """fused (this backend) and reference embeddings with the same settings, and their inputs."""
    backend, device, deterministic = backend_config
    torch.manual_seed(20)
    tok, pos = (table.detach() for table in make_tables(VOCAB, CONTEXT, DIM, torch.float32, device))
    ids = torch.randint(0, VOCAB, (2, 5), device=device)
    ids[0, :2] = 3  # the padding row, twice

    def fused(ids, tok, pos, **kwargs):
        return fusedemb.fused_embedding(
            ids, tok, pos, padding_idx=3, backend=backend, deterministic=deterministic, **kwargs
        )

    def reference(ids, tok, pos, **kwargs):
        return fused_embedding_reference(ids, tok, pos, padding_idx=3, **kwargs)

    return fused, reference, ids, tok, pos


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def loss(embed, ids, **kwargs):
    """Not linear in the output, so that second derivatives are not zero."""
    return lambda tok, pos: (embed(ids, tok, pos, **kwargs).tanh() ** 2).sum()


def test_grad_and_hessian(case):
    fused, reference, ids, tok, pos = case
    for kwargs in ({"position_offset": 2}, {"position_ids": torch.randint(0, CONTEXT, ids.shape, device=ids.device)}):
        assert_same(torch.func.grad(loss(fused, ids, **kwargs), (0, 1))(tok, pos),
                    torch.func.grad(loss(reference, ids, **kwargs), (0, 1))(tok, pos))  # fmt: skip
    hessian = torch.func.hessian(lambda tok: loss(fused, ids)(tok, pos))(tok)
    assert_same(hessian, torch.func.hessian(lambda tok: loss(reference, ids)(tok, pos))(tok))


def test_jvp_jacfwd_and_jacrev(case):
    fused, reference, ids, tok, pos = case
    tangent = torch.randn_like(tok)
    assert_same(torch.func.jvp(lambda tok: fused(ids, tok, pos), (tok,), (tangent,)),
                torch.func.jvp(lambda tok: reference(ids, tok, pos), (tok,), (tangent,)))  # fmt: skip
    for jacobian in (torch.func.jacfwd, torch.func.jacrev):
        assert_same(jacobian(lambda pos: fused(ids, tok, pos))(pos), jacobian(lambda pos: reference(ids, tok, pos))(pos))


def test_vmap_over_ids_positions_and_tables(case):
    """Shared tables: one call with the batch folded into the ids; a batch of tables: a loop."""
    fused, reference, ids, tok, pos = case
    batched_ids = torch.randint(0, VOCAB, (3, *ids.shape), device=ids.device)
    positions = torch.randint(0, CONTEXT, (3, *ids.shape), device=ids.device)
    assert_same(torch.func.vmap(lambda ids: fused(ids, tok, pos))(batched_ids),
                torch.func.vmap(lambda ids: reference(ids, tok, pos))(batched_ids))  # fmt: skip
    in_dims = (None, 0)  # shared ids, a batch of position_ids
    assert_same(torch.func.vmap(lambda ids, p: fused(ids, tok, pos, position_ids=p), in_dims)(ids, positions),
                torch.func.vmap(lambda ids, p: reference(ids, tok, pos, position_ids=p), in_dims)(ids, positions))  # fmt: skip
    toks, poss = torch.randn(3, *tok.shape, device=tok.device), torch.randn(3, *pos.shape, device=pos.device)
    assert_same(torch.func.vmap(lambda t, p: fused(ids, t, p))(toks, poss),
                torch.func.vmap(lambda t, p: reference(ids, t, p))(toks, poss))  # fmt: skip


def test_per_sample_gradients(case):
    """vmap of grad, as differential privacy takes them: one gradient of each table per sequence."""
    fused, reference, ids, tok, pos = case

    def per_sample(embed):
        return torch.func.vmap(torch.func.grad(lambda tok, pos, ids: loss(embed, ids[None])(tok, pos), (0, 1)),
                               in_dims=(None, None, 0))(tok, pos, ids)  # fmt: skip

    grads = per_sample(fused)
    assert grads[0].shape == (ids.shape[0], VOCAB, DIM)
    assert_same(grads, per_sample(reference))


def test_bad_ids_are_caught_under_vmap(case):
    """The range check reads the values under vmap's wrapper: every batch entry's."""
    fused, _, ids, tok, pos = case
    batched_ids = torch.randint(0, VOCAB, (3, *ids.shape), device=ids.device)
    batched_ids[2, 1, 4] = VOCAB
    with pytest.raises(IndexError, match=f"ids contains {VOCAB}"):
        torch.func.vmap(lambda ids: fused(ids, tok, pos))(batched_ids)


def test_vmap_along_other_dims(case):
    fused, reference, ids, tok, pos = case
    batched_ids = torch.randint(0, VOCAB, (ids.shape[0], 3, ids.shape[1]), device=ids.device)  # batch along dim 1
    toks = torch.randn(tok.shape[0], 2, tok.shape[1], device=tok.device)  # tables batched along dim 1
    assert_same(torch.func.vmap(lambda ids: fused(ids, tok, pos), in_dims=1)(batched_ids),
                torch.func.vmap(lambda ids: reference(ids, tok, pos), in_dims=1)(batched_ids))  # fmt: skip
    assert_same(torch.func.vmap(lambda t: fused(ids, t, pos), in_dims=1)(toks),
                torch.func.vmap(lambda t: reference(ids, t, pos), in_dims=1)(toks))  # fmt: skip


def test_linearize(case):
    """linearize traces the jvp with make_fx, which sees only what goes through the dispatcher:
    the kernels must not be launched behind its back."""
    fused, reference, ids, tok, pos = case
    tangent = torch.randn_like(tok)
    _, fused_jvp = torch.func.linearize(lambda tok: fused(ids, tok, pos), tok)
    _, reference_jvp = torch.func.linearize(lambda tok: reference(ids, tok, pos), tok)
    assert_same(fused_jvp(tangent), reference_jvp(tangent))


def test_forward_over_reverse_in_eager_autograd(case):
    """A dual table's tangent carried through autograd.grad (a Hessian-vector product without
    torch.func), with and without create_graph: never dropped."""
    fused, reference, ids, tok, pos = case
    direction = torch.randn_like(tok)

    def tangent_of_gradient(embed, create_graph):
        table = tok.clone().requires_grad_()
        with forward_ad.dual_level():
            loss = (embed(ids, forward_ad.make_dual(table, direction), pos).sin()).sum()
            (gradient,) = torch.autograd.grad(loss, table, create_graph=create_graph)
            return forward_ad.unpack_dual(gradient).tangent

    for create_graph in (False, True):
        assert_same(tangent_of_gradient(fused, create_graph), tangent_of_gradient(reference, create_graph))


def test_autograd_batched_gradients_and_vectorized_jacobians(case):
    """autograd's own batching (is_grads_batched, vectorize=True) hands the kernels batched
    tensors only the dispatcher can loop over."""
    fused, reference, ids, tok, pos = case
    tok, pos = tok.clone().requires_grad_(), pos.clone().requires_grad_()
    out, expected = fused(ids, tok, pos), reference(ids, tok, pos)
    vectors = torch.randn(4, *out.shape, device=out.device)
    assert_same(torch.autograd.grad(out, (tok, pos), vectors, is_grads_batched=True),
                torch.autograd.grad(expected, (tok, pos), vectors, is_grads_batched=True))  # fmt: skip
    def jacobian(embed, strategy):
        return torch.autograd.functional.jacobian(
            lambda tok: embed(ids, tok, pos.detach()), tok.detach(), vectorize=True, strategy=strategy
        )

    for strategy in ("reverse-mode", "forward-mode"):
        assert_same(jacobian(fused, strategy), jacobian(reference, strategy))
