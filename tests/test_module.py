"""FusedEmbedding as a drop-in for a GPT's tok_emb / pos_emb pair."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TABLE_DTYPES, requires_cpp
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedemb


class EmbeddingPair(nn.Module):
    """How GPT implementations usually write the first layer."""

    def __init__(self, vocab, dim, context, padding_idx=None):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.pos_emb = nn.Embedding(context, dim)

    def forward(self, ids):
        return self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[-1], device=ids.device))


@pytest.mark.parametrize("padding_idx", [None, 0, -2])
def test_seeded_init_matches_two_embeddings(padding_idx):
    torch.manual_seed(123)
    pair = EmbeddingPair(40, 12, 16, padding_idx)
    after_pair = torch.rand(3)
    torch.manual_seed(123)
    fused = fusedemb.FusedEmbedding(40, 12, 16, padding_idx=padding_idx)
    after_fused = torch.rand(3)
    torch.testing.assert_close(fused.tok_emb.weight, pair.tok_emb.weight, rtol=0, atol=0)
    torch.testing.assert_close(fused.pos_emb.weight, pair.pos_emb.weight, rtol=0, atol=0)
    assert torch.equal(after_fused, after_pair), "the random stream must be consumed the same way"


def test_state_dict_keys_and_loading_a_pair_checkpoint():
    pair = EmbeddingPair(30, 8, 10)
    fused = fusedemb.FusedEmbedding(30, 8, 10)
    assert set(fused.state_dict()) == {"tok_emb.weight", "pos_emb.weight"}
    fused.load_state_dict(pair.state_dict(), strict=True)  # the keys line up: no mapping needed
    ids = torch.randint(0, 30, (3, 10))
    torch.testing.assert_close(fused(ids), pair(ids), rtol=0, atol=0)


def test_forward_and_backward_match_the_pair():
    torch.manual_seed(0)
    pair = EmbeddingPair(30, 8, 10, padding_idx=1)
    fused = fusedemb.FusedEmbedding.from_embeddings(
        nn.Embedding.from_pretrained(pair.tok_emb.weight.detach().clone(), freeze=False, padding_idx=1),
        nn.Embedding.from_pretrained(pair.pos_emb.weight.detach().clone(), freeze=False),
    )
    ids = torch.randint(0, 30, (4, 10))
    ids[0, :2] = 1
    grad_out = torch.randn(4, 10, 8)
    fused_out, pair_out = fused(ids), pair(ids)
    torch.testing.assert_close(fused_out, pair_out, rtol=0, atol=0)
    fused_out.backward(grad_out)
    pair_out.backward(grad_out)
    torch.testing.assert_close(fused.tok_emb.weight.grad, pair.tok_emb.weight.grad)
    torch.testing.assert_close(fused.pos_emb.weight.grad, pair.pos_emb.weight.grad)


def test_autocast_leaves_the_embedding_in_the_tables_dtype_as_for_the_pair(backend_config):
    """Mixed-precision training (torch.autocast) casts neither nn.Embedding nor the add, so the
    pair's output keeps the tables' dtype: so must the drop-in's, with the same values and
    gradients, while the layer after it still runs in the autocast dtype."""
    backend, device, deterministic = backend_config
    torch.manual_seed(0)
    pair = EmbeddingPair(30, 8, 10).to(device)
    fused = fusedemb.FusedEmbedding(30, 8, 10, backend=backend, deterministic=deterministic).to(device)
    fused.load_state_dict(pair.state_dict())
    head = nn.Linear(8, 3).to(device)
    ids = torch.randint(0, 30, (4, 10), device=device)
    results = []
    for model in (fused, pair):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(ids)
            logits = head(out)
        grads = torch.autograd.grad(logits.float().square().sum(), [model.tok_emb.weight, model.pos_emb.weight])
        results.append((out, logits, *grads))
    assert results[0][0].dtype == torch.float32 and results[0][1].dtype == torch.bfloat16
    for from_fused, from_pair in zip(*results):
        torch.testing.assert_close(from_fused, from_pair)


def test_from_embeddings_shares_parameters_and_weight_tying():
    def tied_model(embedding_factory):
        torch.manual_seed(5)
        tok_emb, pos_emb = nn.Embedding(20, 6), nn.Embedding(5, 6)
        head = nn.Linear(6, 20, bias=False)
        head.weight = tok_emb.weight  # the output head shares the token table
        return tok_emb, head, embedding_factory(tok_emb, pos_emb)

    tok_emb, head, fused = tied_model(fusedemb.FusedEmbedding.from_embeddings)
    assert fused.tok_emb is tok_emb and head.weight is fused.tok_emb.weight
    ref_tok_emb, ref_head, pair = tied_model(lambda tok, pos: (tok, pos))
    ids = torch.randint(0, 20, (2, 5))
    head(fused(ids)).square().mean().backward()
    ref_head(ref_tok_emb(ids) + pair[1](torch.arange(5))).square().mean().backward()
    # The tied gradient holds both contributions, the head's and the embedding's.
    torch.testing.assert_close(tok_emb.weight.grad, ref_tok_emb.weight.grad)


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("freeze", [True, False])
def test_from_pretrained_is_the_pair_from_pretrained(freeze, padding_idx):
    """As nn.Embedding.from_pretrained: the tensors become the parameters (no copy), freeze
    (default True) stops their gradients, and the outputs and gradients are the pair's."""
    torch.manual_seed(6)
    tok, pos = torch.randn(20, 6), torch.randn(5, 6)
    ids = torch.randint(0, 20, (3, 5))
    ids[0, :2] = 2 if padding_idx is None else padding_idx % 20
    fused = fusedemb.FusedEmbedding.from_pretrained(tok, pos, freeze=freeze, padding_idx=padding_idx)
    tok_emb = nn.Embedding.from_pretrained(tok.clone(), freeze=freeze, padding_idx=padding_idx)
    pos_emb = nn.Embedding.from_pretrained(pos.clone(), freeze=freeze)
    assert fused.tok_emb.weight.data_ptr() == tok.data_ptr() and fused.pos_emb.weight.data_ptr() == pos.data_ptr()
    assert fused.padding_idx == tok_emb.padding_idx
    assert [p.requires_grad for p in fused.parameters()] == [not freeze] * 2
    out, expected = fused(ids), tok_emb(ids) + pos_emb(torch.arange(5))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out.grad_fn is None) == freeze
    if not freeze:
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(fused.tok_emb.weight.grad, tok_emb.weight.grad)
        torch.testing.assert_close(fused.pos_emb.weight.grad, pos_emb.weight.grad)
    with pytest.raises(ValueError, match="same embedding_dim, got 6 and 7"):
        fusedemb.FusedEmbedding.from_pretrained(tok, torch.randn(5, 7))


def test_from_embeddings_rejects_mismatched_or_unsupported_modules():
    with pytest.raises(ValueError, match="same embedding_dim, got 6 and 7"):
        fusedemb.FusedEmbedding.from_embeddings(nn.Embedding(20, 6), nn.Embedding(5, 7))
    for option in ({"max_norm": 1.0}, {"sparse": True}, {"scale_grad_by_freq": True}):
        with pytest.raises(ValueError, match="max_norm, sparse and scale_grad_by_freq are not supported"):
            fusedemb.FusedEmbedding.from_embeddings(nn.Embedding(20, 6, **option), nn.Embedding(5, 6))
    with pytest.raises(ValueError, match="pos_emb must not have a padding_idx"):
        fusedemb.FusedEmbedding.from_embeddings(nn.Embedding(20, 6), nn.Embedding(5, 6, padding_idx=0))
    with pytest.raises(TypeError, match="tok_emb is a ScaledEmbedding with a forward of its own"):
        fusedemb.FusedEmbedding.from_embeddings(ScaledEmbedding(20, 6), nn.Embedding(5, 6))


class ScaledEmbedding(nn.Embedding):
    """An nn.Embedding whose forward FusedEmbedding, which reads the weight only, cannot run."""

    def forward(self, ids):
        return super().forward(ids) * 10


def test_replacing_a_table_module_is_checked_as_construction_is():
    """PEFT and vocabulary resizing replace tok_emb; what the constructor refuses is refused
    then too, by every way of setting it, and the module is left as it was."""
    fused = fusedemb.FusedEmbedding(20, 6, 5)
    tok_emb = fused.tok_emb
    for replacement, error, message in (
        (ScaledEmbedding(20, 6), TypeError, "forward of its own"),
        (nn.Embedding(20, 6, max_norm=1.0), ValueError, "max_norm"),
        (nn.Embedding(20, 7), ValueError, "same embedding_dim, got 7 and 6"),
        (None, TypeError, "tok_emb must be an nn.Embedding, got NoneType"),
    ):
        with pytest.raises(error, match=message):
            fused.tok_emb = replacement
        with pytest.raises(error, match=message):
            fused.register_module("tok_emb", replacement)
        assert fused.tok_emb is tok_emb
    fused.register_module("tok_emb", replacement := nn.Embedding(20, 6))  # a valid one is taken
    assert fused.tok_emb is replacement
    del fused.tok_emb
    with pytest.raises(TypeError, match="forward of its own"):
        fused.tok_emb = ScaledEmbedding(20, 6)
    fused.tok_emb = nn.Embedding(30, 6)  # a larger vocabulary
    assert fused(torch.tensor([[29, 0]])).shape == (1, 2, 6)
    with pytest.raises(ValueError, match="pos_emb must not have a padding_idx"):
        fused.pos_emb = nn.Embedding(5, 6, padding_idx=0)


@pytest.mark.parametrize("table", ["tok_emb", "pos_emb"])
@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward", "full_backward_pre"])
def test_hooks_on_a_table_module_are_reported_not_silently_skipped(table, hook):
    """FusedEmbedding never calls its submodules, so their hooks cannot run: every call that
    would skip them warns (hooks on FusedEmbedding itself run as usual)."""
    fused = fusedemb.FusedEmbedding(20, 6, 5)
    ids = torch.tensor([[1, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(ids)  # no hooks yet: no warning
    handle = getattr(getattr(fused, table), f"register_{hook}_hook")(lambda *args: None)
    for _ in range(2):
        with pytest.warns(UserWarning, match=f"hooks on FusedEmbedding.{table} .*do not run"):
            fused(ids)
    handle.remove()
    calls = []
    fused.register_forward_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(ids)
    assert calls == [1]


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("table", ["tok_emb", "pos_emb"])
@pytest.mark.parametrize("utility", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_norms_are_refused_and_their_parametrizations_train(table, utility):
    """torch.nn.utils.weight_norm and spectral_norm recompute the weight in a forward pre-hook,
    which FusedEmbedding would skip: it would read a stale weight, and weight_orig (or weight_g
    and weight_v) would never train. Refused, at a call (a compiled one too: adding the hook
    recompiles) and when such a module is assigned, naming the torch.nn.utils.parametrizations
    version, which trains as with nn.Embedding."""
    torch.manual_seed(0)
    fused = fusedemb.FusedEmbedding(20, 6, 5)
    ids = torch.tensor([[1, 2, 1]])
    hooked = getattr(torch.nn.utils, utility)(copy.deepcopy(getattr(fused, table)))
    message = f"hook of torch.nn.utils.{utility}.*use torch.nn.utils.parametrizations.{utility} instead"
    with pytest.raises(ValueError, match=message):
        setattr(fused, table, hooked)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    compiled(ids)  # compiled before the hook is added
    getattr(torch.nn.utils, utility)(getattr(fused, table))
    with pytest.raises(ValueError, match=message):
        fused(ids)
    with pytest.raises(Exception, match=message):  # Dynamo's Unsupported, which carries the message
        compiled(ids)

    fused = fusedemb.FusedEmbedding(20, 6, 5)
    getattr(torch.nn.utils.parametrizations, utility)(getattr(fused, table))
    pair = copy.deepcopy(fused)  # the same tables (and spectral_norm's state), called as two nn.Embedding
    out = fused(ids)
    expected = pair.tok_emb(ids) + pair.pos_emb(torch.arange(3))
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), list(fused.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(pair.parameters()))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_the_hooks_warning_names_the_users_line():
    """Under Python's default filter a warning shows once per place: the place is the user's
    call, not a line inside fusedemb or torch, so each call site is told. A forward set on the
    instance (accelerate's hooks do that) is skipped too, and said so."""
    fused = fusedemb.FusedEmbedding(20, 6, 5)
    fused.tok_emb.forward = lambda ids: ids
    ids = torch.tensor([[1, 2]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        fused(ids)
        fused(ids)
        fusedemb.FusedEmbedding.from_embeddings(fused.tok_emb, nn.Embedding(5, 6))
    assert [warning.filename for warning in caught] == [__file__] * 3  # two lines in a loop would be one
    assert "hooks on FusedEmbedding.tok_emb (or a forward set on it) do not run" in str(caught[0].message)


def test_a_module_with_hooked_tables_still_compiles_whole():
    """Dynamo cannot trace the hooks' warning: compiled calls skip it, and fullgraph holds."""
    fused = fusedemb.FusedEmbedding(20, 6, 5)
    fused.pos_emb.register_forward_hook(lambda *args: None)
    ids = torch.tensor([[1, 2]])
    with pytest.warns(UserWarning):
        expected = fused(ids)
    torch.testing.assert_close(torch.compile(fused, fullgraph=True)(ids), expected)


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
def test_device_and_dtype_arguments(dtype):
    fused = fusedemb.FusedEmbedding(11, 4, 6, device="cpu", dtype=dtype)
    assert fused.tok_emb.weight.dtype == dtype and fused.pos_emb.weight.dtype == dtype
    assert fused(torch.randint(0, 11, (2, 6))).dtype == dtype
    on_meta = fusedemb.FusedEmbedding(11, 4, 6, device="meta", dtype=dtype)  # not the default device
    assert {table.weight.device.type for table in (on_meta.tok_emb, on_meta.pos_emb)} == {"meta"}


def test_shapes_without_values_on_meta_and_fake_tensors():
    """A model built on the meta device (or traced with FakeTensorMode) runs for its shapes, as
    nn.Embedding does: there are no ids to range-check."""
    for backend in (None, "triton", "cpp", "reference"):  # whatever backend the model will run on
        fused = fusedemb.FusedEmbedding(11, 4, 6, device="meta", backend=backend)
        out = fused(torch.zeros(2, 5, dtype=torch.long, device="meta"))
        assert out.shape == (2, 5, 4) and out.is_meta
    with FakeTensorMode():
        fused = fusedemb.FusedEmbedding(11, 4, 6)
        for backend in fusedemb.available_backends("cpu"):
            fused.backend = backend
            assert fused(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 4)


def test_fx_symbolic_trace_records_one_call():
    """torch.fx.symbolic_trace (FX graph-mode quantization, pipeline splitters) records
    fused_embedding as one call_function node, as it records F.embedding, through the module and
    through the functional form; the traced graph computes and trains as the model does."""
    torch.manual_seed(6)
    model = nn.Sequential(fusedemb.FusedEmbedding(11, 4, 8, padding_idx=2), nn.Linear(4, 3))
    traced = torch.fx.symbolic_trace(model)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert calls == [fusedemb.fused_embedding]
    ids = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(traced(ids), model(ids), rtol=0, atol=0)
    traced_grads = torch.autograd.grad(traced(ids).square().sum(), list(model.parameters()))
    for traced_grad, grad in zip(traced_grads, torch.autograd.grad(model(ids).square().sum(), list(model.parameters()))):
        torch.testing.assert_close(traced_grad, grad, rtol=0, atol=0)
    tok, pos = model[0].tok_emb.weight, model[0].pos_emb.weight
    traced_function = torch.fx.symbolic_trace(lambda ids, tok, pos: fusedemb.fused_embedding(ids, tok, pos, position_offset=3))
    torch.testing.assert_close(traced_function(ids, tok, pos), fusedemb.fused_embedding(ids, tok, pos, position_offset=3))


def test_torch_jit_script_is_refused_by_name():
    with pytest.raises(RuntimeError, match=r"cannot be scripted with torch.jit.script .* use torch.jit.trace"):
        torch.jit.script(fusedemb.FusedEmbedding(11, 4, 8))


# On CPU tensors these record the C++ kernels' operator; without the extension the default
# backend there is the reference, which records aten lookups instead.
@requires_cpp
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input checks' shape tests
def test_torch_jit_trace_records_the_operator():
    """The trace records fusedemb::fused_embedding whether or not grad mode is on (the tracer's
    own check re-traces without it), and the traced module trains on other shapes."""
    torch.manual_seed(3)
    fused = fusedemb.FusedEmbedding(11, 4, 8, padding_idx=1)
    traced = torch.jit.trace(fused, (torch.randint(0, 11, (2, 5)),))
    assert "fusedemb::fused_embedding" in str(traced.graph)
    ids = torch.randint(0, 11, (3, 7))
    out, expected = traced(ids), fused(ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    traced_grads = torch.autograd.grad((out**2).sum(), list(fused.parameters()))
    for actual, wanted in zip(traced_grads, torch.autograd.grad((expected**2).sum(), list(fused.parameters()))):
        torch.testing.assert_close(actual, wanted)


@requires_cpp
def test_torch_export_with_a_dynamic_batch_and_length():
    """A dynamic length needs its bound, the position table's rows (export names the fix,
    Dim("seq", max=8), when it is missing); a longer sequence then fails the exported program's
    own guard on the length."""
    torch.manual_seed(4)
    fused = fusedemb.FusedEmbedding(11, 4, 8, padding_idx=1)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=8)}
    exported = torch.export.export(fused, (torch.randint(0, 11, (2, 5)),), dynamic_shapes=(dims,))
    assert "fusedemb.fused_embedding" in str(exported.graph)
    for shape in ((3, 5), (1, 8), (4, 2)):
        ids = torch.randint(0, 11, shape)
        torch.testing.assert_close(exported.module()(ids), fused(ids), rtol=0, atol=0)
    with pytest.raises(AssertionError, match=r"ids\.size\(\)\[1\] <= 8"):
        exported.module()(torch.randint(0, 11, (2, 9)))
    strided = torch.randint(0, 11, (3, 10))[:, ::2]  # the graph has the operator, which takes any layout
    torch.testing.assert_close(exported.module()(strided), fused(strided), rtol=0, atol=0)


def test_position_arguments_reach_the_kernel():
    torch.manual_seed(1)
    fused = fusedemb.FusedEmbedding(11, 4, 8)
    ids = torch.randint(0, 11, (2, 3))
    expected = fusedemb.fused_embedding_reference(ids, fused.tok_emb.weight, fused.pos_emb.weight, position_offset=5)
    torch.testing.assert_close(fused(ids, position_offset=5), expected, rtol=0, atol=0)
    position_ids = torch.tensor([[0, 0, 1], [7, 6, 5]])
    expected = fusedemb.fused_embedding_reference(ids, fused.tok_emb.weight, fused.pos_emb.weight, position_ids=position_ids)
    torch.testing.assert_close(fused(ids, position_ids=position_ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("deterministic", [None, False, True])
def test_backend_and_mode_reach_the_functional_form(monkeypatch, deterministic):
    """The module's backend= and deterministic= arrive, as given, at every call."""
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], kwargs["deterministic"]))
        return real(*args, **kwargs)

    real = fusedemb.module.fused_embedding
    monkeypatch.setattr(fusedemb.module, "fused_embedding", spy)
    fused = fusedemb.FusedEmbedding(11, 4, 6, backend="reference", deterministic=deterministic)
    wrapped = fusedemb.FusedEmbedding.from_embeddings(fused.tok_emb, fused.pos_emb, backend="reference", deterministic=deterministic)
    for module in (fused, wrapped):
        module(torch.randint(0, 11, (2, 6))).sum().backward()
    assert seen == [("reference", deterministic)] * 2


def test_extra_repr_and_properties():
    fused = fusedemb.FusedEmbedding(50257, 768, 1024, padding_idx=0, backend="reference", deterministic=True)
    assert "50257, 768, context_length=1024, padding_idx=0, backend='reference', deterministic=True" in repr(fused)
    assert (fused.num_embeddings, fused.embedding_dim, fused.context_length, fused.padding_idx) == (50257, 768, 1024, 0)
