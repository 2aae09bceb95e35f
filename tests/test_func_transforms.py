"""torch.func transforms through fused_embedding, against the same transforms of the reference."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import fused_embedding_for, make_tables
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedemb
from fusedemb.func_transforms import _loop
from fusedemb.ops import fused_embedding_op
from fusedemb.reference import fused_embedding_reference

VOCAB, CONTEXT, DIM = 10, 7, 5


@pytest.fixture
def case(backend_config):
    """fused (this backend) and reference embeddings with the same settings, and their inputs."""
    _, device, _ = backend_config
    torch.manual_seed(20)
    tok, pos = (table.detach() for table in make_tables(VOCAB, CONTEXT, DIM, torch.float32, device))
    ids = torch.randint(0, VOCAB, (2, 5), device=device)
    ids[0, :2] = 3  # the padding row, twice
    reference = functools.partial(fused_embedding_reference, padding_idx=3)
    return fused_embedding_for(backend_config, padding_idx=3), reference, ids, tok, pos


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


def test_vmap_over_ids_and_positions(case):
    """Shared tables: one call with the batch folded into the ids."""
    fused, reference, ids, tok, pos = case
    batched_ids = torch.randint(0, VOCAB, (3, *ids.shape), device=ids.device)
    positions = torch.randint(0, CONTEXT, (3, *ids.shape), device=ids.device)
    assert_same(torch.func.vmap(lambda ids: fused(ids, tok, pos))(batched_ids),
                torch.func.vmap(lambda ids: reference(ids, tok, pos))(batched_ids))  # fmt: skip
    in_dims = (None, 0)  # shared ids, a batch of position_ids
    assert_same(torch.func.vmap(lambda ids, p: fused(ids, tok, pos, position_ids=p), in_dims)(ids, positions),
                torch.func.vmap(lambda ids, p: reference(ids, tok, pos, position_ids=p), in_dims)(ids, positions))  # fmt: skip


@pytest.mark.parametrize("padding_idx", [3, None])
@pytest.mark.parametrize("argnums", [(0, 1), 1], ids=["both-tables", "frozen-token-table"])
def test_per_sample_gradients(case, padding_idx, argnums):
    """vmap of grad, as differential privacy takes them: one gradient of each table per sequence,
    scattered by one backward call into tables stacked a batch high."""
    fused, reference, ids, tok, pos = case
    positions = torch.randint(0, CONTEXT, ids.shape, device=ids.device)

    def per_sample(embed, *positions, **kwargs):
        def sequence_loss(tok, pos, ids, *positions):
            position_kwargs = {"position_ids": positions[0][None]} if positions else kwargs
            return loss(embed, ids[None], padding_idx=padding_idx, **position_kwargs)(tok, pos)

        in_dims = (None, None, 0) + (0,) * len(positions)
        return torch.func.vmap(torch.func.grad(sequence_loss, argnums), in_dims)(tok, pos, ids, *positions)

    grads = per_sample(fused)
    assert_same(grads, per_sample(reference))
    assert_same(per_sample(fused, positions), per_sample(reference, positions))
    assert_same(per_sample(fused, position_offset=2), per_sample(reference, position_offset=2))
    assert (grads[0] if argnums == (0, 1) else grads).shape[:2] == (ids.shape[0], VOCAB if argnums == (0, 1) else CONTEXT)


def ensemble_transforms(embed, ids, tables, in_dims, **kwargs):
    """A batch of models' outputs, their summed loss's gradients (grad of vmap) and each model's
    gradients (vmap of grad)."""
    model_loss = loss(embed, ids, **kwargs)
    outputs = torch.func.vmap(lambda tok, pos: embed(ids, tok, pos, **kwargs), in_dims)(*tables)
    summed = torch.func.grad(lambda tok, pos: torch.func.vmap(model_loss, in_dims)(tok, pos).sum(), (0, 1))(*tables)
    return outputs, summed, torch.func.vmap(torch.func.grad(model_loss, (0, 1)), in_dims)(*tables)


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_vmap_over_tables_and_its_gradients(case, padding_idx, monkeypatch):
    """Ensembles (torch.func.stack_module_state): a batch of tables, each direction one call on
    tables stacked a batch high, never a loop over the batch. Token tables batched along dim 0,
    position tables along dim 1, and either alone."""
    fused, reference, ids, tok, pos = case
    monkeypatch.setattr(fusedemb.func_transforms, "_loop", lambda *args: pytest.fail("looped over the batch"))
    toks = torch.randn(3, *tok.shape, device=tok.device)
    poss = torch.randn(pos.shape[0], 3, pos.shape[1], device=pos.device)
    positions = torch.randint(0, CONTEXT, ids.shape, device=ids.device)
    for in_dims, tables in (((0, 1), (toks, poss)), ((0, None), (toks, pos)), ((None, 1), (tok, poss))):
        for kwargs in ({"position_offset": 2}, {"position_ids": positions}):
            assert_same(ensemble_transforms(fused, ids, tables, in_dims, padding_idx=padding_idx, **kwargs),
                        ensemble_transforms(reference, ids, tables, in_dims, padding_idx=padding_idx, **kwargs))  # fmt: skip


def test_batched_ids_and_tables_with_a_padding_row(case):
    """Each model of an ensemble on its own ids, with a padding row: against a loop over the
    entries, not the reference's vmap, since PyTorch's own batching rule of F.embedding there
    (torch 2.13) gives every entry's padding row but the first's a gradient."""
    fused, reference, ids, tok, pos = case
    batched_ids = torch.randint(0, VOCAB, (3, *ids.shape), device=ids.device)
    batched_ids[:, 0, 0] = 3  # every entry reads its padding row
    toks = torch.randn(3, *tok.shape, device=tok.device)

    def ensemble_loss(toks, pos):
        return torch.func.vmap(lambda ids, tok: loss(fused, ids)(tok, pos))(batched_ids, toks).sum()

    looped = [torch.func.grad(loss(reference, ids), (0, 1))(tok, pos) for ids, tok in zip(batched_ids, toks)]
    tok_grads, pos_grad = torch.func.grad(ensemble_loss, (0, 1))(toks, pos)
    assert_same((tok_grads, pos_grad), (torch.stack([g[0] for g in looped]), sum(g[1] for g in looped)))
    assert not tok_grads[:, 3].any()
    assert_same(torch.func.vmap(lambda ids, tok: fused(ids, tok, pos))(batched_ids, toks),
                torch.stack([reference(ids, tok, pos) for ids, tok in zip(batched_ids, toks)]))  # fmt: skip


# Loose enough for the loss's own 16-bit arithmetic (tanh, square, its gradient) and tight
# enough for a row read or added at the wrong place, which is off by O(1).
STACKED_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("vocab, seq_len, dim", [(1, 4, 3), (6, 1, 5), (6, 3, 1)], ids=["V1", "T1", "D1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_stacked_tables_in_other_dtypes_and_odd_sizes(backend_config, dtype, vocab, seq_len, dim):
    """The stacked path (a batch of tables as one table B x V rows high, entry b's ids offset by
    b x V, each entry's padding row zeroed) in every other dtype and at V = 1, T = 1 and D = 1,
    against the reference's ensemble on the same tables in float64."""
    _, device, _ = backend_config
    fused = fused_embedding_for(backend_config)
    torch.manual_seed(21)
    toks = torch.randn(3, vocab, dim, device=device, dtype=dtype)
    poss = torch.randn(3, seq_len + 2, dim, device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (2, seq_len), device=device)
    for kwargs in ({"position_offset": 1, "padding_idx": vocab - 1}, {"position_ids": torch.randint(0, seq_len + 2, ids.shape, device=device)}):
        actual = ensemble_transforms(fused, ids, (toks, poss), (0, 0), **kwargs)
        expected = ensemble_transforms(fused_embedding_reference, ids, (toks.double(), poss.double()), (0, 0), **kwargs)
        for actual_part, expected_part in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
            assert actual_part.dtype == dtype
            tolerance = STACKED_TOLERANCE[dtype]
            torch.testing.assert_close(actual_part.double(), expected_part, rtol=tolerance, atol=tolerance)


def test_gradcheck_through_vmap_of_stacked_tables(backend_config):
    """float64 gradcheck and gradgradcheck of an ensemble's outputs, through the stacked path
    (without a padding_idx, whose row is read but gets no gradient: no gradcheck can pass it)."""
    _, device, _ = backend_config
    fused = fused_embedding_for(backend_config)
    torch.manual_seed(22)
    toks = torch.randn(2, 4, 2, device=device, dtype=torch.float64, requires_grad=True)
    poss = torch.randn(2, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 3, 1]], device=device)

    def ensemble(toks, poss):
        return torch.func.vmap(lambda tok, pos: fused(ids, tok, pos))(toks, poss)

    # (fast mode: random projections of the Jacobian, a few calls instead of one per element,
    # which the interpreter makes slow)
    assert torch.autograd.gradcheck(ensemble, (toks, poss), fast_mode=True)
    assert torch.autograd.gradgradcheck(ensemble, (toks, poss), fast_mode=True)


@pytest.mark.parametrize("check_on", [True, False], ids=["check-on", "check-off"])
def test_bad_ids_are_caught_under_vmap(case, check_on, monkeypatch):
    """The range check reads the values under vmap's wrapper: every batch entry's. With a batch
    of tables it runs even when switched off, and for the C++ kernels too: in the stacked table
    an id past its own table is a row of the next entry's, which no kernel could tell."""
    fused, _, ids, tok, pos = case
    monkeypatch.setattr(fusedemb.validation, "_bounds_check", check_on)
    batched_ids = torch.randint(0, VOCAB, (3, *ids.shape), device=ids.device)
    batched_ids[2, 1, 4] = VOCAB  # the last entry's: past the stacked table too
    toks = torch.randn(3, *tok.shape, device=tok.device)
    positions = torch.randint(0, CONTEXT, (3, *ids.shape), device=ids.device)
    positions[1, 0, 0] = -1  # the middle entry's: in the stacked table, a row of the first
    poss = torch.randn(3, *pos.shape, device=pos.device)
    if check_on:  # shared tables: the kernels' own check or clamp is per table
        with pytest.raises(IndexError, match=f"ids contains {VOCAB}, outside \\[0, {VOCAB}\\)"):
            torch.func.vmap(lambda ids: fused(ids, tok, pos))(batched_ids)
    with pytest.raises(IndexError, match=f"ids contains {VOCAB}, outside \\[0, {VOCAB}\\)"):
        torch.func.vmap(lambda ids, tok: fused(ids, tok, pos))(batched_ids, toks)
    with pytest.raises(IndexError, match=f"position_ids contains -1, outside \\[0, {CONTEXT}\\)"):
        torch.func.vmap(lambda p, pos: fused(ids, tok, pos, position_ids=p), (0, 0))(positions, poss)


def test_padding_rows_of_stacked_tables_under_nested_transforms(case):
    """Stacked token tables with a padding row, where something below the vmap differentiates
    the stacked call or pushes tangents through it (a vmap of the vmap under autograd, reverse
    over forward, the gradient of a tangent): every entry's padding row stays without gradient."""
    fused, reference, ids, tok, pos = case
    tables = torch.randn(2, 2, *tok.shape, device=tok.device)
    directions = torch.randn(2, *tok.shape, device=tok.device)

    def transforms(embed):
        nested = tables.clone().requires_grad_()
        torch.func.vmap(torch.func.vmap(lambda t: embed(ids, t, pos)))(nested).tanh().sum().backward()
        ensemble_loss = lambda t: torch.func.vmap(lambda t: embed(ids, t, pos))(t).tanh().pow(2).sum()  # noqa: E731
        reverse_over_forward = torch.func.grad(lambda t: torch.func.jvp(ensemble_loss, (t,), (directions,))[1])
        outputs_tangent = lambda d: torch.func.jvp(lambda t: torch.func.vmap(lambda t: embed(ids, t, pos))(t), (tables[0],), (d,))[1]  # noqa: E731
        tangent_gradient = torch.func.grad(lambda d: outputs_tangent(d).tanh().sum())(directions)
        return nested.grad, reverse_over_forward(tables[0]), tangent_gradient

    assert_same(transforms(fused), transforms(reference))


def test_vmap_under_fake_tensor_mode(backend_config):
    """Shapes only (tracing, export): the range check finds fake values under vmap's wrapper too."""
    backend, device, _ = backend_config
    with FakeTensorMode():
        tok, pos = torch.randn(VOCAB, DIM, device=device), torch.randn(CONTEXT, DIM, device=device)
        batched_ids = torch.zeros(3, 2, 4, dtype=torch.long, device=device)
        out = torch.func.vmap(lambda ids: fusedemb.fused_embedding(ids, tok, pos, backend=backend))(batched_ids)
        assert out.shape == (3, 2, 4, DIM)


def kernel_calls(fn, *args) -> int:
    """Calls of fusedemb's kernels (its operators but the range check, which transforms always
    run, and Triton kernels) in the forward and backward graphs that torch.compile (AOTAutograd,
    before Inductor) makes of fn(*args) and its backward, run on a gradient of ones."""
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    compiled(*args).sum().backward()
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    kernels = [target for target in targets if "fusedemb" in target or "triton_kernel_wrapper" in target]
    return sum("range_checked" not in target for target in kernels)


def test_compiled_vmap_calls_the_kernels_once_for_the_whole_batch(backend_config, fresh_dynamo):
    """torch.compile of a vmapped call records the forward operator, whose vmap rule folds the
    batch as the torch.func Functions do, so its graphs hold as many kernel calls for 5 entries as
    for 3 (without the rule PyTorch's fallback runs the operator once per entry, with a warning):
    shared tables with a batch of ids or of position_ids, and a batch of tables. A batch of token
    tables with a padding row runs entry by entry (the operator's backward zeroes one padding
    row). Outputs, and gradients taken outside the vmap, against eager calls entry by entry."""
    _, device, _ = backend_config
    fused = fused_embedding_for(backend_config)
    torch.manual_seed(23)
    tok, pos = make_tables(VOCAB, CONTEXT, DIM, torch.float32, device)
    toks, poss = (torch.randn(5, *table.shape, device=device, requires_grad=True) for table in (tok, pos))
    ids, positions = (torch.randint(0, rows, (5, 2, 4), device=device) for rows in (VOCAB, CONTEXT))
    ids[:, 0, 0] = 3

    def shared_tables(padding_idx):
        return lambda ids, positions: fused(ids, tok, pos, position_ids=positions, padding_idx=padding_idx)

    def own_tables(padding_idx):
        return lambda ids, tok, pos: fused(ids, tok, pos, position_offset=1, padding_idx=padding_idx)

    cases = [  # (entry's function, its arguments, vmap's in_dims, the tables, runs entry by entry)
        (shared_tables(3), (ids, positions[0]), (0, None), (tok, pos), False),
        (shared_tables(None), (ids[0], positions), (None, 0), (tok, pos), False),
        (own_tables(None), (ids[0], toks, poss), (None, 0, 0), (toks, poss), False),
        (own_tables(3), (ids, toks, pos), (0, 0, None), (toks, pos), True),
    ]
    for entry_fn, args, in_dims, tables, looped in cases:
        batched_fn = torch.func.vmap(entry_fn, in_dims)
        first_three = [arg if dim is None else arg[:3] for arg, dim in zip(args, in_dims)]
        calls = [kernel_calls(batched_fn, *batch) for batch in (first_three, args)]
        assert calls[0] > 0 and (calls[0] < calls[1] if looped else calls[0] == calls[1])
        batched = torch.compile(batched_fn, fullgraph=True)(*args)
        expected = torch.stack([entry_fn(*(arg if dim is None else arg[k] for arg, dim in zip(args, in_dims))) for k in range(5)])
        assert_same(batched, expected)
        grad = torch.randn_like(expected)
        assert_same(torch.autograd.grad(batched, tables, grad), torch.autograd.grad(expected, tables, grad))


def test_the_operators_vmap_rule_checks_what_the_batch_hides_and_takes_an_empty_batch(backend_config):
    """The registered operator under vmap, called directly (as an exported graph calls it): with a
    batch of tables an id past its own table is a row of the next entry's in the stacked table,
    and so is a default position past its table, so the rule checks them itself; 0-d ids and
    tables that are not 2-D, which the operator refuses, are refused in a batch too (folded in or
    stacked, they would pass as a sequence, or as rows); and an empty batch of token tables with a padding row gives an empty output, as a
    loop over no entries would."""
    backend, device, deterministic = backend_config
    torch.manual_seed(24)
    toks, poss = torch.randn(3, VOCAB, DIM, device=device), torch.randn(3, CONTEXT, DIM, device=device)
    ids = torch.randint(0, VOCAB, (2, 4), device=device)
    positions = torch.randint(0, CONTEXT, (2, 4), device=device)

    def operator(ids, tok, pos, position_ids=None, padding_idx=-1, position_offset=0):
        return fused_embedding_op(ids, tok, pos, position_ids, position_offset, padding_idx, backend, deterministic)

    out = torch.func.vmap(operator, (None, 0, 0, None))(ids, toks, poss, positions)
    assert_same(out, torch.stack([fused_embedding_reference(ids, *tables, position_ids=positions) for tables in zip(toks, poss)]))
    with pytest.raises(IndexError, match=rf"ids contains {VOCAB}, outside \[0, {VOCAB}\)"):
        torch.func.vmap(operator, (None, 0, None))(ids.clone().fill_(VOCAB), toks, poss[0])
    with pytest.raises(IndexError, match=rf"position_ids contains {CONTEXT}, outside \[0, {CONTEXT}\)"):
        torch.func.vmap(operator, (None, None, 0, None))(ids, toks[0], poss, positions.clone().fill_(CONTEXT))
    offset = CONTEXT - ids.shape[-1] + 1  # the last token's position is CONTEXT
    with pytest.raises(IndexError, match=rf"positions \[{offset}, {CONTEXT + 1}\) .* do not fit the position table"):
        torch.func.vmap(lambda pos: operator(ids, toks[0], pos, position_offset=offset))(poss)
    with pytest.raises(ValueError, match="ids must have shape"):
        torch.func.vmap(lambda ids: operator(ids, toks[0], poss[0]))(ids[:, 0])
    with pytest.raises(ValueError, match=rf"tok_weight must be 2-D \(rows, dim\), got shape \({VOCAB}, {DIM}, 1\)"):
        torch.func.vmap(lambda tok: operator(ids, tok, poss[0]))(toks[..., None])
    empty = torch.func.vmap(lambda tok: operator(ids, tok, poss[0], padding_idx=3))(toks[:0])
    assert empty.shape == (0, *ids.shape, DIM)


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
    def jacobians(embed, strategy):  # in each table, the other one held
        jacobian, tok_, pos_ = torch.autograd.functional.jacobian, tok.detach(), pos.detach()
        return (jacobian(lambda tok: embed(ids, tok, pos_), tok_, vectorize=True, strategy=strategy),
                jacobian(lambda pos: embed(ids, tok_, pos), pos_, vectorize=True, strategy=strategy))  # fmt: skip

    for strategy in ("reverse-mode", "forward-mode"):
        assert_same(jacobians(fused, strategy), jacobians(reference, strategy))


def test_vjp_of_a_gradient_with_a_transposed_cotangent(case):
    """torch.func hands the backward's own derivative its cotangent in whatever layout it has
    (here transposed: unit stride along the rows, not along dim); the forward kernels that
    compute it need unit stride along dim."""
    fused, reference, ids, tok, pos = case
    grad_out = torch.randn(*ids.shape, DIM, device=ids.device)
    cotangent = torch.randn(DIM, VOCAB, device=ids.device).t()

    def vjp_of_gradient(embed):
        gradient = lambda grad_out: torch.func.vjp(lambda tok: embed(ids, tok, pos), tok)[1](grad_out)[0]  # noqa: E731
        return torch.func.vjp(gradient, grad_out)[1](cotangent)[0]

    assert_same(vjp_of_gradient(fused), vjp_of_gradient(reference))


def test_autograd_batching_through_torch_func(case):
    """autograd's batched tensors reaching torch.func's Functions, as tables: batched gradients
    of a torch.func gradient, and forward-mode vectorized jacobians of a vmap."""
    fused, reference, ids, tok, pos = case
    tables = torch.randn(3, *tok.shape, device=tok.device)

    def batched_second_derivatives(embed):
        table = tok.clone().requires_grad_()
        gradient = torch.func.grad(lambda t: (embed(ids, t, pos).tanh() ** 2).sum())(table)
        vectors = torch.randn(4, *tok.shape, device=tok.device, generator=torch.Generator(tok.device).manual_seed(0))
        return torch.autograd.grad(gradient, table, vectors, is_grads_batched=True)

    def ensemble_jacobians(embed):  # of two tokens, one of them padding: a jacobian row per output element
        ensemble = lambda t: torch.func.vmap(lambda t: embed(ids[:1, 1:3], t, pos))(t)  # noqa: E731
        jacobian = torch.autograd.functional.jacobian
        return tuple(jacobian(ensemble, tables, vectorize=True, strategy=s) for s in ("forward-mode", "reverse-mode"))

    assert_same(batched_second_derivatives(fused), batched_second_derivatives(reference))
    assert_same(ensemble_jacobians(fused), ensemble_jacobians(reference))


def test_vmap_over_an_empty_batch(case):
    """Per-sample gradients of no samples: [0, V, D] and [0, P, D] (the reference fails here)."""
    fused, _, ids, tok, pos = case
    no_sequences = torch.zeros(0, *ids.shape, dtype=ids.dtype, device=ids.device)
    grads = torch.func.vmap(torch.func.grad(lambda t, p, ids: fused(ids, t, p).sum(), (0, 1)), (None, None, 0))(
        tok, pos, no_sequences
    )
    assert [tuple(g.shape) for g in grads] == [(0, VOCAB, DIM), (0, CONTEXT, DIM)]
    no_tables = torch.zeros(0, *tok.shape, device=tok.device)  # an ensemble of no models, padding_idx 3
    ensemble_loss = lambda t: torch.func.vmap(lambda t: fused(ids, t, pos))(t).sum()  # noqa: E731
    assert torch.func.grad(ensemble_loss)(no_tables).shape == (0, VOCAB, DIM)


def test_vmap_beyond_the_int32_limit_runs_one_entry_at_a_time(case, monkeypatch):
    """Stacked tables or tokens past the kernels' int32 limit: a loop over the batch, tested with
    the limit lowered below a batch of stacked token tables (but above the tokens)."""
    fused, reference, ids, tok, pos = case
    monkeypatch.setattr(fusedemb.func_transforms, "INT32_LIMIT", 2 * VOCAB)
    loops = []
    monkeypatch.setattr(fusedemb.func_transforms, "_loop", lambda *args: loops.append(1) or _loop(*args))
    toks = torch.randn(3, *tok.shape, device=tok.device)
    assert_same(ensemble_transforms(fused, ids, (toks, pos), (0, None), padding_idx=None),
                ensemble_transforms(reference, ids, (toks, pos), (0, None), padding_idx=None))  # fmt: skip
    assert loops
