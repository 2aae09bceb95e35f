"""fused_embedding against the reference, on every backend that runs here.

Forward outputs must equal the reference bit for bit (one rounding of tok + pos, as eager);
gradients element by element with the exact scatter-add, within the error bound of float32
accumulation (fusedemb.accuracy, via conftest.assert_grad_close).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from conftest import (
    ANY_DEVICE,
    BACKEND_CONFIGS,
    ID_DTYPES,
    TABLE_DTYPES,
    TRITON_CONFIGS,
    assert_grad_close,
    assert_output_equal,
    check_against_reference,
    config_id,
    deterministic_algorithms,
    fused_embedding_for,
    interpreted,
    make_tables,
    num_threads,
    requires_cpp,
    requires_triton,
    token_order_sums,
    zipf_ids,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedemb
from fusedemb.ops import FusedEmbeddingFunction
from fusedemb.reference import default_positions, fused_embedding_reference


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
def test_every_dtype_matches_reference(backend_config, dtype, id_dtype):
    _, device, _ = backend_config
    torch.manual_seed(0)
    tok, pos = make_tables(11, 9, 7, dtype, device)
    ids = torch.randint(0, 11, (3, 6), device=device, dtype=id_dtype)
    ids[0, 0] = 3  # make sure the padding row is used
    check_against_reference(backend_config, ids, tok, pos, position_offset=2, padding_idx=3)


@pytest.mark.parametrize(
    "num_embeddings, dim, shape",
    [(1, 5, (2, 4)), (7, 1, (3, 5)), (13, 3, (2, 9)), (40, 127, (2, 33)), (5, 4097, (2, 3)), (9, 16, (4, 1)),
     (11, 16, (601, 1))],
    # B601T1: so many sequences per position that the Triton backward splits the batch into
    # groups of two (the last one holding one) and adds the groups' position sums in a second pass.
    ids=["V1", "D1", "D3", "D127", "D4097", "T1", "B601T1"],
)
def test_odd_sizes(backend_config, num_embeddings, dim, shape):
    _, device, _ = backend_config
    torch.manual_seed(1)
    tok, pos = make_tables(num_embeddings, shape[-1] + 1, dim, torch.float32, device)
    ids = torch.randint(0, num_embeddings, shape, device=device)
    check_against_reference(backend_config, ids, tok, pos, position_offset=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "num_embeddings, dim, shape",
    [(1, 5, (2, 4)), (13, 3, (2, 9)), (20, 300, (2, 7)), (9, 16, (4, 1)), (11, 16, (601, 1))],
    ids=["V1", "D3", "D300", "T1", "B601T1"],
)
def test_odd_sizes_other_dtypes(backend_config, num_embeddings, dim, shape, dtype):
    """The odd sizes in the other table dtypes (D300: two column blocks, the second partial;
    B601T1: the Triton backward's groups of two sequences, whose partial position sums must
    stay in float32 until the second pass adds them: rounded to 16 bits each, they exceed the
    error bound. In the other cases each group holds one sequence, whose sum is exact.)"""
    _, device, _ = backend_config
    torch.manual_seed(1)
    tok, pos = make_tables(num_embeddings, shape[-1] + 1, dim, dtype, device)
    ids = torch.randint(0, num_embeddings, shape, device=device, dtype=torch.int32)
    padding_idx = None if num_embeddings == 1 else 0  # with V = 1 a padding row would leave no token gradient to check
    check_against_reference(backend_config, ids, tok, pos, position_offset=1, padding_idx=padding_idx)


def test_nothing_to_differentiate_builds_no_graph(backend_config, monkeypatch):
    """Under torch.no_grad, or with both tables frozen, the kernels run without an autograd node
    (as nn.Embedding builds none: no autograd.Function's host time), with the same output; with
    a table to train, even one of the two, the node is there."""
    _, device, _ = backend_config
    applied = []

    class Spy:
        @staticmethod
        def apply(*args):
            applied.append(args)
            return FusedEmbeddingFunction.apply(*args)

    monkeypatch.setattr(fusedemb.functional, "FusedEmbeddingFunction", Spy)
    torch.manual_seed(0)
    tok, pos = make_tables(11, 9, 7, torch.float32, device)
    ids = torch.randint(0, 11, (2, 5), device=device)

    def embed(tok, pos):
        return fused_embedding_for(backend_config)(ids, tok, pos)

    trained = [embed(tok, pos), embed(tok.detach(), pos), embed(tok, pos.detach())]
    with torch.no_grad():
        inference = embed(tok, pos)
    frozen = embed(tok.detach(), pos.detach())
    assert len(applied) == 3  # the trained calls' only
    for out in trained:
        assert out.requires_grad and out.grad_fn is not None
    for out in (inference, frozen, *trained[1:]):
        torch.testing.assert_close(out.detach(), trained[0].detach(), rtol=0, atol=0)
    for out in (inference, frozen):
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("dual", ["tok", "pos", "both"])
def test_forward_mode_ad_matches_nn_embedding(backend_config, dual):
    """Tangents live on tensors that need not require grad, so the no-graph path must not take
    them (and drop them); the output's tangent is the reference's, padding row included, with
    a table without a tangent counted as zero. (torch.func's jvp: test_func_transforms.py.)"""
    _, device, _ = backend_config
    torch.manual_seed(16)
    tok, pos = (table.detach() for table in make_tables(11, 9, 7, torch.float32, device))
    tangents = {"tok": torch.randn_like(tok), "pos": torch.randn_like(pos)}
    ids = torch.randint(0, 11, (2, 5), device=device)
    ids[0, 0] = 4

    def tangent_of(embed):
        with forward_ad.dual_level():
            tables = [
                forward_ad.make_dual(table, tangents[name]) if dual in (name, "both") else table
                for name, table in (("tok", tok), ("pos", pos))
            ]
            return forward_ad.unpack_dual(embed(ids, *tables, position_offset=3, padding_idx=4)).tangent

    fused = fused_embedding_for(backend_config)
    torch.testing.assert_close(tangent_of(fused), tangent_of(fused_embedding_reference), rtol=0, atol=0)


def test_zero_tensors_count_as_zeros_as_gradients_and_tangents(backend_config):
    """PyTorch's zeros without storage (torch._efficientzerotensor), which autograd may pass as a
    gradient or a tangent, give zero gradients and tangents, as with nn.Embedding. (The kernels
    read memory a ZeroTensor lacks: the C++ backward refused its strides of 0, Triton's read an
    invalid storage.)"""
    _, device, _ = backend_config
    torch.manual_seed(17)
    tok, pos = make_tables(11, 9, 7, torch.float32, device)
    ids = torch.randint(0, 11, (2, 5), device=device)
    fused = fused_embedding_for(backend_config, padding_idx=4)

    def zeros_of(tensor):
        return torch._efficientzerotensor(tensor.shape, dtype=tensor.dtype, device=tensor.device)

    out = fused(ids, tok, pos)
    grad_out = torch.randn_like(out, requires_grad=True)
    grad_tok, _ = torch.autograd.grad(out, (tok, pos), grad_out, create_graph=True)
    for table, gradient in zip((tok, pos), torch.autograd.grad(out, (tok, pos), zeros_of(out), retain_graph=True)):
        assert torch.equal(gradient, torch.zeros_like(table))
    (double,) = torch.autograd.grad(grad_tok, grad_out, zeros_of(grad_tok))  # double backward
    assert torch.equal(double, torch.zeros_like(grad_out))
    with forward_ad.dual_level():
        dual_tok = forward_ad.make_dual(tok.detach(), zeros_of(tok))
        tangent = forward_ad.unpack_dual(fused(ids, dual_tok, pos.detach())).tangent
    assert torch.equal(tangent, torch.zeros_like(out))


@pytest.mark.parametrize("shape", [(17,), (3, 8), (2, 3, 5)], ids=["1d", "2d", "3d"])
def test_leading_shapes(backend_config, shape):
    _, device, _ = backend_config
    torch.manual_seed(2)
    tok, pos = make_tables(30, shape[-1], 6, torch.float32, device)
    ids = torch.randint(0, 30, shape, device=device)
    check_against_reference(backend_config, ids, tok, pos)


def test_position_ids_for_left_padded_batch(backend_config):
    _, device, _ = backend_config
    torch.manual_seed(3)
    tok, pos = make_tables(20, 16, 10, torch.float32, device)
    ids = torch.randint(1, 20, (3, 12), device=device)
    # Left padding: sequence b starts at column pad[b]; its positions count from there.
    pad = torch.tensor([0, 4, 7], device=device)
    columns = torch.arange(12, device=device)
    position_ids = (columns[None, :] - pad[:, None]).clamp(min=0)
    ids[columns[None, :] < pad[:, None]] = 0
    check_against_reference(backend_config, ids, tok, pos, position_ids=position_ids, padding_idx=0)


@pytest.mark.parametrize(
    "id_dtype, position_dtype, dtype",
    [(torch.int64, torch.int64, torch.bfloat16), (torch.int32, torch.int32, torch.float16),
     (torch.int32, torch.int64, torch.float32), (torch.int64, torch.int32, torch.float64)],
    ids=["int64-bfloat16", "int32-float16", "mixed-float32", "mixed-float64"],
)  # fmt: skip
def test_packed_random_position_ids(backend_config, id_dtype, position_dtype, dtype):
    _, device, _ = backend_config
    torch.manual_seed(4)
    tok, pos = make_tables(25, 40, 9, dtype, device)
    ids = torch.randint(0, 25, (2, 70), device=device, dtype=id_dtype)
    position_ids = torch.randint(0, 40, (2, 70), device=device, dtype=position_dtype)
    check_against_reference(backend_config, ids, tok, pos, position_ids=position_ids)


@pytest.mark.parametrize("shape", ["1 T", "T"])
def test_position_ids_broadcast_over_the_batch(backend_config, shape):
    """One row of positions for the whole batch, (1, T) as Hugging Face models pass them, or
    (T,): broadcast as the pair's add broadcasts pos_emb(position_ids)."""
    _, device, _ = backend_config
    torch.manual_seed(5)
    tok, pos = make_tables(25, 40, 9, torch.float32, device)
    ids = torch.randint(0, 25, (3, 2, 11), device=device)
    position_ids = torch.randperm(40, device=device)[:11]  # repeats nothing, skips rows
    position_ids = position_ids[None] if shape == "1 T" else position_ids
    check_against_reference(backend_config, ids, tok, pos, position_ids=position_ids)


def test_position_offset_for_kv_cache_decoding(backend_config):
    _, device, _ = backend_config
    torch.manual_seed(5)
    tok, pos = make_tables(15, 32, 8, torch.float16, device)
    ids = torch.randint(0, 15, (4, 1), device=device)
    check_against_reference(backend_config, ids, tok, pos, position_offset=31)


def test_the_reference_backend_without_padding_idx_trains_the_last_row():
    """No padding_idx reaches the reference as None, not as the kernels' -1, which it would read
    as the last row (negative values count from the end)."""
    torch.manual_seed(7)
    tok, pos = make_tables(10, 6, 4, torch.float32, "cpu")
    check_against_reference(("reference", "cpu", True), torch.tensor([[9, 1, 9]]), tok, pos)


def test_negative_padding_idx_counts_from_the_end(backend_config):
    _, device, _ = backend_config
    torch.manual_seed(6)
    tok, pos = make_tables(10, 6, 4, torch.float32, device)
    ids = torch.tensor([[9, 9, 1, 2, 9, 0]], device=device)
    out, _, _ = check_against_reference(backend_config, ids, tok, pos, padding_idx=9)
    fused = fused_embedding_for(backend_config)
    out_negative = fused(ids, tok, pos, padding_idx=-1)
    torch.testing.assert_close(out_negative, out, rtol=0, atol=0)
    (grad_negative,) = torch.autograd.grad(out_negative, tok, torch.ones_like(out))
    assert grad_negative[9].abs().sum() == 0
    assert grad_negative[1].abs().sum() > 0
    # -V, the lowest nn.Embedding accepts, is row 0
    out_lowest = fused(ids, tok, pos, padding_idx=-10)
    (grad_lowest,) = torch.autograd.grad(out_lowest, tok, torch.ones_like(out))
    assert grad_lowest[0].abs().sum() == 0
    assert grad_lowest[9].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distribution", ["same", "zipf", "two-hot", "padding-run"])
def test_skewed_ids(backend_config, distribution, dtype):
    """Rows hit by hundreds of tokens: in the sorted backward they cross many tiles."""
    _, device, _ = backend_config
    torch.manual_seed(7)
    vocab, shape = 64, (3, 150)
    if distribution == "same":
        ids = torch.full(shape, 17, device=device)
    elif distribution == "zipf":
        ids = zipf_ids(shape, vocab, 1.1, device)
    elif distribution == "two-hot":
        ids = torch.where(torch.rand(shape, device=device) < 0.5, 2, 5)
    else:  # sequences right-padded with padding_idx 5 from a random length on
        lengths = torch.randint(1, shape[1], (shape[0], 1), device=device)
        ids = torch.where(torch.arange(shape[1], device=device) < lengths, torch.randint(0, vocab, shape, device=device), 5)
    tok, pos = make_tables(vocab, 150, 24, dtype, device)
    check_against_reference(backend_config, ids, tok, pos, padding_idx=None if distribution in ("same", "zipf") else 5)


@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=config_id)
def test_hot_row_over_thousands_of_tokens(config):
    """One id over 4410 of 4800 tokens, with runs of two other ids between: in the sorted
    backward the hot row takes sorted positions 190 to 4599, about 277 tiles of 16, and covers
    three whole blocks of 64 tiles, whose block sums are added to its partial tiles' sums."""
    _, device, _ = config
    torch.manual_seed(8)
    ids = torch.full((16, 300), 3, device=device)
    ids[5, 10:200] = 1
    ids[9, 100:] = 6
    tok, pos = make_tables(8, 300, 5, torch.float32, device)
    check_against_reference(config, ids, tok, pos)


@pytest.mark.parametrize(
    "before, hot, after, dtype",
    [(0, 2048, 0, torch.float32), (16, 2048, 7, torch.float32), (5, 1100, 20, torch.float32),
     (3, 1021, 9, torch.float32)]
    + [(1000, 3200, 3, dtype) for dtype in TABLE_DTYPES],
    ids=["from-block-edge", "from-tile-edge", "no-whole-block", "ends-at-block-edge"]
    + [f"three-blocks-{str(dtype).removeprefix('torch.')}" for dtype in TABLE_DTYPES],
)  # fmt: skip
@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=config_id)
def test_hot_row_across_block_edges(config, before, hot, after, dtype, poisoned_allocations):
    """A hot row of `hot` tokens with `before` tokens of smaller ids and `after` of larger ones:
    in the sorted backward it begins at sorted position `before` and its tiles' partials are
    added in blocks of 64 tiles (1024 positions) where it covers whole blocks. The cases put
    its start on a block edge, on a tile edge and inside a tile, and its end on a block edge;
    the block sums are checked in every table dtype; every scratch buffer starts as garbage
    (poisoned_allocations, below)."""
    _, device, _ = config
    torch.manual_seed(10)
    ids = torch.cat([torch.randint(0, 3, (before,)), torch.full((hot,), 3), torch.randint(4, 7, (after,))])
    ids = ids[torch.randperm(ids.numel())].reshape(1, -1).to(device)  # sorting regroups them
    tok, pos = make_tables(7, ids.shape[1], 3, dtype, device)
    check_against_reference(config, ids, tok, pos)


def test_real_tokenized_text(backend_config):
    from shared_data import use_shared_tiktoken_cache, verdict_text

    _, device, _ = backend_config
    text = verdict_text()
    use_shared_tiktoken_cache()
    from fusedemb.data import load_gpt2_tokenizer

    tokens = torch.tensor(load_gpt2_tokenizer().encode(text)[: 2 * 256], device=device).reshape(2, 256)
    torch.manual_seed(8)
    tok, pos = make_tables(50257, 256, 3, torch.float32, device)
    check_against_reference(backend_config, tokens, tok, pos)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty, empty_like and Tensor.new_empty return memory full of garbage (NaN, or -7 in
    integer tensors) instead of what the allocator happens to hold, on CPU often zeros: a kernel
    that reads memory it never wrote, or leaves unwritten an element it owns, then shows."""

    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            return tensor.fill_(float("nan") if tensor.dtype.is_floating_point else -7)

        return allocate_poisoned

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=config_id)
def test_no_kernel_relies_on_what_fresh_memory_holds(config, dtype, poisoned_allocations):
    """Most table rows untouched (V >> N), a padding row and a hot row: every row no token adds
    into must come back exactly zero, with every scratch buffer starting as garbage."""
    _, device, _ = config
    torch.manual_seed(12)
    tok, pos = make_tables(64, 40, 19, dtype, device)
    ids = torch.randint(0, 64, (2, 20), device=device)
    ids[1, 3:] = 7
    ids[0, :2] = 5
    check_against_reference(config, ids, tok, pos, position_offset=4, padding_idx=5)


@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=config_id)
def test_no_kernel_relies_on_what_fresh_memory_holds_at_scale(config, poisoned_allocations):
    """The same with paths small inputs do not take: 720 tokens (three counting-sort chunks), a
    hot row over 40 tiles, 24 sequences of 30 (the position sums split over groups of the
    batch), and explicit position_ids (a second deterministic scatter). The block sums of
    longer hot rows: test_hot_row_across_block_edges, under the same poison."""
    _, device, _ = config
    torch.manual_seed(15)
    tok, pos = make_tables(300, 32, 19, torch.float32, device)
    ids = torch.randint(0, 300, (24, 30), device=device)
    ids[3:] = 0
    check_against_reference(config, ids, tok, pos, position_offset=2, padding_idx=3)
    position_ids = torch.randint(0, 32, (24, 30), device=device)
    check_against_reference(config, ids, tok, pos, position_ids=position_ids, padding_idx=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # 16 bits: a float32 accumulator
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["no-sequences", "no-positions"])
def test_empty_batch(backend_config, shape, dtype):
    _, device, _ = backend_config
    tok, pos = make_tables(10, 6, 4, dtype, device)
    ids = torch.zeros(shape, dtype=torch.long, device=device)
    out, grad_tok, grad_pos = check_against_reference(backend_config, ids, tok, pos)
    assert out.shape == (*shape, 4)
    assert grad_tok.abs().sum() == 0 and grad_pos.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(backend_config, dtype):
    _, device, _ = backend_config
    torch.manual_seed(9)

    def table(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    strided_rows = table(30, 20)[:, 3:14].requires_grad_()  # rows 20 apart
    transposed = table(11, 30).t().requires_grad_()  # column stride 30
    pos = table(8, 11).requires_grad_()
    strided_pos = table(8, 16)[:, 2:13].requires_grad_()  # rows 16 apart
    ids = torch.randint(0, 30, (6, 16), device=device)[::2, ::2]
    position_ids = torch.randint(0, 8, (8, 3), device=device).t()
    grad_out = torch.randn(11, 8, 3, device=device, dtype=dtype).permute(2, 1, 0)
    assert not strided_rows.is_contiguous() and transposed.stride(1) != 1 and not ids.is_contiguous()
    assert not strided_pos.is_contiguous() and not position_ids.is_contiguous() and not grad_out.is_contiguous()
    check_against_reference(backend_config, ids, strided_rows, pos)
    check_against_reference(backend_config, ids, transposed, strided_pos, grad_out=grad_out)
    check_against_reference(backend_config, ids, strided_rows, strided_pos, position_ids=position_ids)


def test_tensor_subclass_tables_are_unwrapped_as_by_nn_embedding(backend_config):
    """Tables of a __torch_dispatch__ subclass (TwoTensor holds two tensors and runs every
    operator on both, as quantized and float8 tables wrap theirs) reach the kernels unwrapped,
    as nn.Embedding's do: the Triton path, which reads tables' memory directly, sends them through
    the dispatcher (a wrapper has no storage of its own to read)."""
    from torch.testing._internal.two_tensor import TwoTensor

    backend, device, _ = backend_config
    torch.manual_seed(14)
    tok, pos = torch.randn(11, 5, device=device), torch.randn(9, 5, device=device)
    ids = torch.randint(0, 11, (2, 6), device=device)
    ids[0, :4] = 3  # a repeated id, and the padding row
    grad_out = torch.randn(2, 6, 5, device=device)
    fused = fused_embedding_for(backend_config, position_offset=2, padding_idx=3)
    tok_pair = TwoTensor(tok, 2 * tok).requires_grad_()
    pos_pair = TwoTensor(pos, -pos).requires_grad_()
    for grad_mode in (torch.no_grad(), torch.enable_grad()):
        with grad_mode:
            out = fused(ids, tok_pair, pos_pair)
        assert type(out) is TwoTensor
        for got, tok_inner, pos_inner in ((out.a, tok, pos), (out.b, 2 * tok, -pos)):
            expected = fused_embedding_reference(ids, tok_inner, pos_inner, position_offset=2, padding_idx=3)
            assert_output_equal(got, expected, device, backend)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok_pair, pos_pair), TwoTensor(grad_out, 3 * grad_out))
    assert type(grad_tok) is TwoTensor and type(grad_pos) is TwoTensor
    for grads, inner_grad_out in (((grad_tok.a, grad_pos.a), grad_out), ((grad_tok.b, grad_pos.b), 3 * grad_out)):
        assert_grad_close(grads[0], inner_grad_out, ids, torch.float32, skip_row=3)
        assert_grad_close(grads[1], inner_grad_out, default_positions(ids, 2), torch.float32)


def test_gradcheck_float64(backend_config):
    _, device, _ = backend_config
    torch.manual_seed(10)
    tok, pos = make_tables(6, 5, 3, torch.float64, device)
    ids = torch.tensor([[1, 4, 1, 0], [5, 1, 2, 2]], device=device)

    fused = fused_embedding_for(backend_config)

    def fn(tok, pos):
        # padding_idx is left out: its row's true derivative is not zero, nn.Embedding's is.
        return fused(ids, tok, pos, position_offset=1)

    assert torch.autograd.gradcheck(fn, (tok, pos))
    position_ids = torch.tensor([[4, 0, 0, 2], [1, 3, 3, 3]], device=device)

    def with_position_ids(tok, pos):
        return fused(ids, tok, pos, position_ids=position_ids)

    assert torch.autograd.gradcheck(with_position_ids, (tok, pos))


def test_gradgradcheck_float64(backend_config):
    """Double backward (create_graph=True), which nn.Embedding supports: gradgradcheck also
    differentiates the table gradients with respect to the output gradient, here with a padding
    row (whose gradient does not depend on it), explicit positions, and a frozen table."""
    _, device, _ = backend_config
    torch.manual_seed(12)
    tok, pos = make_tables(6, 5, 3, torch.float64, device)
    ids = torch.tensor([[1, 4, 1, 0], [5, 1, 2, 2]], device=device)
    position_ids = torch.tensor([[4, 0, 0, 2], [1, 3, 3, 3]], device=device)
    fused = fused_embedding_for(backend_config)

    def with_padding(tok, pos):
        return fused(ids.int(), tok, pos, position_offset=1, padding_idx=1)

    def with_position_ids(tok, pos):
        return fused(ids, tok, pos, position_ids=position_ids)

    def frozen_tokens(pos):
        return fused(ids, tok.detach(), pos, padding_idx=1)

    assert torch.autograd.gradgradcheck(with_padding, (tok, pos), fast_mode=True)
    assert torch.autograd.gradgradcheck(with_position_ids, (tok, pos), fast_mode=True)
    assert torch.autograd.gradgradcheck(frozen_tokens, (pos,), fast_mode=True)


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
def test_hessian_vector_product_matches_nn_embedding(backend_config, id_dtype):
    """A Hessian-vector product through a loss that is not linear in the output (as second-order
    optimisers take through a whole model), against the same product through the reference."""
    _, device, _ = backend_config
    torch.manual_seed(14)
    tok, pos = (table.detach() for table in make_tables(13, 9, 10, torch.float32, device))
    ids = torch.randint(0, 13, (3, 7), device=device, dtype=id_dtype)
    ids[0, :3] = 5  # a repeated id
    target = torch.randn(3, 7, 10, device=device)
    vectors = (torch.randn_like(tok), torch.randn_like(pos))

    def loss(embed):
        return lambda tok, pos: ((embed(ids, tok, pos, padding_idx=0) - target).tanh() ** 2).sum()

    def reference(ids, tok, pos, **kwargs):
        return fused_embedding_reference(ids, tok, pos, position_offset=2, **kwargs)

    fused = fused_embedding_for(backend_config, position_offset=2)
    _, product = torch.autograd.functional.hvp(loss(fused), (tok, pos), vectors)
    _, expected = torch.autograd.functional.hvp(loss(reference), (tok, pos), vectors)
    for actual, wanted in zip(product, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


def test_gradient_penalty_through_a_column_sum_matches_nn_embedding(backend_config):
    """A penalty on the token gradient's column sums: its gradient reaches the backward's own
    derivative expanded along the rows (row stride 0), and the padding row must still count as 0."""
    _, device, _ = backend_config
    torch.manual_seed(16)
    tok, pos = make_tables(7, 5, 4, torch.float32, device)
    ids = torch.tensor([[2, 2, 5, 0, 2], [6, 2, 1, 1, 3]], device=device)  # padding_idx 2, often

    def penalized(embed):
        out = embed(ids, tok, pos, padding_idx=2)
        (grad_tok,) = torch.autograd.grad(out.tanh().sum(), tok, create_graph=True)
        return torch.autograd.grad(out.sum() + (grad_tok.sum(0) ** 2).sum(), (tok, pos))

    for actual, expected in zip(penalized(fused_embedding_for(backend_config)), penalized(fused_embedding_reference)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_position_ids", [False, True], ids=["offset", "position_ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [c for c in BACKEND_CONFIGS if c[2] and not interpreted(c[1], c[0])], ids=config_id)
def test_deterministic_mode_is_bitwise_reproducible(config, dtype, with_position_ids):
    """Both gradients, bit for bit, call after call (and, for the C++ kernels, whatever the
    thread count). On CUDA at a GPT-2 batch of Zipf ids, where the hot rows cross hundreds of
    tiles and the block sums run; the C++ kernels on CPU at a small size. Not in Triton's
    interpreter, which runs programs one after another: atomics too are reproducible there."""
    backend, device, _ = config
    batch, seq_len, vocab, dim, calls = (32, 1024, 50257, 64, 5) if device == "cuda" else (2, 96, 50, 24, 2)
    torch.manual_seed(11)
    tok, pos = make_tables(vocab, seq_len, dim, dtype, device)
    ids = zipf_ids((batch, seq_len), vocab, 1.2, device)
    position_ids = torch.randint(0, seq_len, (batch, seq_len), device=device) if with_position_ids else None
    grad_out = torch.randn(batch, seq_len, dim, device=device, dtype=dtype)

    def grads(threads):
        with num_threads(threads):
            out = fusedemb.fused_embedding(ids, tok, pos, position_ids=position_ids, backend=backend, deterministic=True)
            return torch.autograd.grad(out, (tok, pos), grad_out)

    first = grads(2)
    for call in range(1, calls):
        again = grads(2 - call % 2)  # 1, 2, 1, ... threads
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@requires_cpp
@pytest.mark.parametrize("with_position_ids", [False, True], ids=["offset", "position_ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_backward_adds_each_row_in_token_order(dtype, with_position_ids):
    """The C++ backward's promise (csrc/fused_embedding.cpp): each row of both gradients is the
    float32 sum of its tokens' gradient rows, left to right in token order, rounded once to the
    table's dtype, bit for bit, on any thread count (the order PyTorch's CPU embedding backward
    adds the token table's in). Skewed ids, so that rows gather many tokens, and D past one of
    the kernels' 256-column slices."""
    torch.manual_seed(19)
    batch, seq_len, vocab, dim = 3, 40, 6, 300
    tok, pos = make_tables(vocab, seq_len + 2, dim, dtype, "cpu")
    ids = zipf_ids((batch, seq_len), vocab, 1.2, "cpu")
    if with_position_ids:
        positions = torch.randint(0, seq_len + 2, ids.shape)
        options = {"position_ids": positions}
    else:
        positions = default_positions(ids, 2)
        options = {"position_offset": 2}
    grad_out = torch.randn(batch, seq_len, dim, dtype=dtype)
    expected = [token_order_sums(rows, grad_out, table.shape[0]) for table, rows in ((tok, ids), (pos, positions))]
    for threads in (1, 2):
        with num_threads(threads):
            out = fusedemb.fused_embedding(ids, tok, pos, backend="cpp", **options)
            grads = torch.autograd.grad(out, (tok, pos), grad_out)
        assert all(torch.equal(got, want) for got, want in zip(grads, expected))


@pytest.mark.parametrize("config", [c for c in TRITON_CONFIGS if c[2]], ids=config_id)
def test_deterministic_mode_adds_each_row_in_token_order(config):
    """The order the sorted scatter promises at GPT widths (a column block of at least 512
    bytes, D > 64 in float32, where each thread holds whole columns of a tile): a row whose
    tokens fit in one tile of the sorted order is the float32 sum of its gradient rows, left to
    right in token order, bit for bit. Every row here has exactly TILE tokens, so row r fills
    tile r. An atomic scatter adds in the order its programs run, which is not token order, in
    Triton's interpreter too: this is the check that runs in CI that the deterministic mode
    does not add atomically."""
    from fusedemb.kernels.sorted_scatter import TILE

    _, device, _ = config
    num_rows, dim = 8, 128
    torch.manual_seed(17)
    ids = torch.arange(num_rows).repeat_interleave(TILE)[torch.randperm(num_rows * TILE)].view(4, -1).to(device)
    tok, pos = make_tables(num_rows, ids.shape[1], dim, torch.float32, device)
    grad_out = torch.randn(*ids.shape, dim, device=device)
    out = fusedemb.fused_embedding(ids, tok, pos, backend="triton", deterministic=True)
    (grad_tok,) = torch.autograd.grad(out, tok, grad_out)
    assert torch.equal(grad_tok, token_order_sums(ids, grad_out, num_rows))


@requires_cpp
def test_cpp_backward_splits_skewed_work_over_threads_without_changing_a_bit():
    """Large enough for several threads' worth of work (the C++ backward splits its tasks by
    cost), with a hot row, Zipf ids and a partial last column slice: 1, 2 and 3 threads give the
    same bits, and the right sums."""
    torch.manual_seed(13)
    ids = zipf_ids((8, 512), 5000, 1.1, "cpu")
    ids[3] = 42
    grad_out = torch.randn(8, 512, 300)

    def grads(threads):
        with num_threads(threads):
            return torch.ops.fusedemb.cpu_backward(grad_out, ids, None, 0, 5000, 512, 7)

    first = grads(1)
    assert_grad_close(first[0], grad_out, ids, torch.float32, skip_row=7)
    assert_grad_close(first[1], grad_out, default_positions(ids), torch.float32)
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(first, grads(threads)))


def table_sizes(row_sorts) -> list[int]:
    """The sizes of the tables the backward sorted ids for, in call order (conftest.row_sorts)."""
    return [sort.num_rows for sort in row_sorts]


@requires_triton
def test_deterministic_default_follows_torch_setting(row_sorts):
    tok, pos = make_tables(8, 4, 3, torch.float32, ANY_DEVICE)
    ids = torch.randint(0, 8, (2, 4), device=ANY_DEVICE)
    with deterministic_algorithms(False):
        fusedemb.fused_embedding(ids, tok, pos, backend="triton").sum().backward()
    assert table_sizes(row_sorts) == []
    with deterministic_algorithms(True):
        fusedemb.fused_embedding(ids, tok, pos, backend="triton").sum().backward()
        assert table_sizes(row_sorts) == [8]
        fusedemb.fused_embedding(ids, tok, pos, backend="triton", deterministic=False).sum().backward()
        assert table_sizes(row_sorts) == [8]
        # The setting is read when the forward runs (docs/usage.md says so): switching it before
        # the backward changes nothing.
        out = fusedemb.fused_embedding(ids, tok, pos, backend="triton")
        torch.use_deterministic_algorithms(False)
        out.sum().backward()
        assert table_sizes(row_sorts) == [8, 8]


@requires_triton
def test_a_frozen_token_table_is_not_sorted_for(row_sorts):
    """docs/usage.md: a frozen table costs no backward work (no V x D buffer, no sort): in the
    deterministic mode the trainable position table alone gets a gradient, and nothing is sorted."""
    tok, pos = make_tables(8, 4, 3, torch.float32, ANY_DEVICE)
    ids = torch.randint(0, 8, (2, 4), device=ANY_DEVICE)
    fusedemb.fused_embedding(ids, tok.detach(), pos, backend="triton", deterministic=True).sum().backward()
    assert table_sizes(row_sorts) == [] and pos.grad is not None


@requires_triton
def test_explicit_positions_are_scattered_by_the_sort_in_both_modes(row_sorts):
    """The position gradient has no atomics in either mode: with position_ids it is the sorted
    scatter (table size 4 here), after the token table's in the deterministic mode (size 8)."""
    tok, pos = make_tables(8, 4, 3, torch.float32, ANY_DEVICE)
    ids = torch.randint(0, 8, (2, 4), device=ANY_DEVICE)
    position_ids = torch.randint(0, 4, (2, 4), device=ANY_DEVICE)
    for deterministic, calls in ((False, [4]), (True, [4, 8, 4])):
        out = fusedemb.fused_embedding(ids, tok, pos, position_ids=position_ids, backend="triton", deterministic=deterministic)
        out.sum().backward()
        assert table_sizes(row_sorts) == calls


@requires_triton
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
def test_fast_mode_sorts_many_16_bit_gradient_rows(row_sorts, monkeypatch, dtype):
    """Above both thresholds (lowered here) the fast mode's 16-bit token gradient is the sorted
    one, and still matches the reference; 32- and 64-bit tables and smaller batches keep the
    atomics."""
    from fusedemb.kernels import backward

    monkeypatch.setattr(backward, "FAST_SORTS_MIN_TOKENS", 12)
    monkeypatch.setattr(backward, "FAST_SORTS_MIN_ELEMENTS", 12 * 5)
    tok, pos = make_tables(9, 6, 5, dtype, ANY_DEVICE)
    config = ("triton", ANY_DEVICE, False)
    check_against_reference(config, torch.randint(0, 9, (2, 6), device=ANY_DEVICE), tok, pos)
    sorts = dtype.itemsize == 2
    assert table_sizes(row_sorts) == ([9] if sorts else [])
    check_against_reference(config, torch.randint(0, 9, (1, 6), device=ANY_DEVICE), tok, pos)  # 6 tokens
    assert table_sizes(row_sorts) == ([9] if sorts else [])
    monkeypatch.setattr(backward, "FAST_SORTS_MIN_ELEMENTS", 12 * 5 + 1)  # 12 tokens x 5 columns, one short
    check_against_reference(config, torch.randint(0, 9, (2, 6), device=ANY_DEVICE), tok, pos)
    assert table_sizes(row_sorts) == ([9] if sorts else [])
    monkeypatch.setattr(backward, "FAST_SORTS_MIN_ELEMENTS", 12 * 5)
    monkeypatch.setattr(backward, "FAST_SORTS_MIN_TOKENS", 13)  # enough elements, one token short
    check_against_reference(config, torch.randint(0, 9, (2, 6), device=ANY_DEVICE), tok, pos)
    assert table_sizes(row_sorts) == ([9] if sorts else [])


# derandomize: the same examples on every run, so that a CI run fails for the commit it tests.
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_and_ids(backend_config, data):
    _, device, _ = backend_config
    batch = data.draw(st.integers(1, 3), label="batch")
    seq_len = data.draw(st.integers(1, 40), label="seq_len")
    vocab = data.draw(st.integers(1, 60), label="vocab")
    dim = data.draw(st.integers(1, 300), label="dim")
    offset = data.draw(st.integers(0, 3), label="offset")
    dtype = data.draw(st.sampled_from(TABLE_DTYPES), label="dtype")
    padding_idx = data.draw(st.one_of(st.none(), st.integers(-vocab, vocab - 1)), label="padding_idx")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    generator = torch.Generator().manual_seed(seed)
    id_dtype = data.draw(st.sampled_from(ID_DTYPES), label="id_dtype")
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device, id_dtype)
    tok = torch.randn(vocab, dim, generator=generator).to(device, dtype).requires_grad_()
    pos = torch.randn(seq_len + offset, dim, generator=generator).to(device, dtype).requires_grad_()
    padding = None if padding_idx is None else padding_idx % vocab
    position_ids = None
    if data.draw(st.booleans(), label="position_ids"):
        position_ids = torch.randint(0, seq_len + offset, (batch, seq_len), generator=generator).to(device, id_dtype)
    check_against_reference(
        backend_config, ids, tok, pos, position_ids=position_ids, position_offset=offset, padding_idx=padding
    )


# A float16 token table of 2^31 + 6144 elements (4 GiB): its last rows lie past element 2^31.
HUGE_VOCAB, HUGE_DIM = (1 << 20) + 3, 2048


def huge_token_table(rows: list[int], device) -> torch.Tensor:
    """A HUGE_VOCAB x HUGE_DIM float16 table that requires grad, with random values in `rows`
    alone (the only ones a test reads: the others are left unwritten)."""
    tok = torch.empty(HUGE_VOCAB, HUGE_DIM, dtype=torch.float16, device=device)
    tok[rows] = torch.randn(len(rows), HUGE_DIM, dtype=torch.float16, device=device)
    return tok.requires_grad_()


@pytest.mark.parametrize("config", [c for c in BACKEND_CONFIGS if not interpreted(c[1], c[0])], ids=config_id)
def test_table_with_more_than_2_31_elements(config):
    """64-bit offsets: rows past element 2^31 are read and their gradients written correctly."""
    _, device, _ = config
    num_embeddings, dim = HUGE_VOCAB, HUGE_DIM
    ids = torch.tensor([[num_embeddings - 1, 5, num_embeddings - 2]], device=device)
    tok = huge_token_table(ids[0].tolist(), device)
    pos = torch.randn(3, dim, dtype=torch.float16, device=device, requires_grad=True)
    out = fused_embedding_for(config)(ids, tok, pos)
    torch.testing.assert_close(out[0], tok.detach()[ids[0]] + pos.detach(), rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    (grad_tok,) = torch.autograd.grad(out, tok, grad_out)
    torch.testing.assert_close(grad_tok[ids[0]], grad_out[0], rtol=0, atol=0)
    assert grad_tok[num_embeddings - 3].abs().sum() == 0
    del grad_tok, tok


@requires_triton
def test_deterministic_backward_finishes_rows_across_tiles_past_element_2_31():
    """The sorted backward writes a row within one tile from segment_sums_kernel (the case of
    the test above: one token per row), a row over two tiles from combine_partials_kernel, and a
    longer one from its finish_long_row: their table offsets must be 64-bit too. Here both
    kinds of row lie past element 2^31. The deterministic mode only, which the interpreter runs
    in seconds (the fast mode's rounding pass visits every row of the table)."""
    num_embeddings, dim = HUGE_VOCAB, HUGE_DIM
    two_tiles, long_row = num_embeddings - 2, num_embeddings - 1
    # Sorted by row: 5 at position 0, two_tiles at 1-20 (tiles 0-1), long_row at 21-60 (tiles 1-3), 7 at 61.
    ids = torch.tensor([[5] + [two_tiles] * 20 + [long_row] * 40 + [7]], device=ANY_DEVICE)
    tok = huge_token_table([5, 7, two_tiles, long_row], ANY_DEVICE)
    pos = torch.randn(ids.shape[1], dim, dtype=torch.float16, device=ANY_DEVICE, requires_grad=True)
    out = fusedemb.fused_embedding(ids, tok, pos, backend="triton", deterministic=True)
    grad_out = torch.randn_like(out)
    (grad_tok,) = torch.autograd.grad(out, tok, grad_out)
    del out, tok
    torch.testing.assert_close(grad_tok[5], grad_out[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(grad_tok[7], grad_out[0, -1], rtol=0, atol=0)
    for row, tokens in ((two_tiles, slice(1, 21)), (long_row, slice(21, 61))):
        row_tokens = grad_out[0, tokens]  # the row's gradient: their sum, within the bound
        same_row = torch.zeros(row_tokens.shape[0], dtype=torch.long, device=ANY_DEVICE)
        assert_grad_close(grad_tok[row : row + 1], row_tokens, same_row, torch.float16)
    assert grad_tok[num_embeddings - 3].abs().sum() == 0


@pytest.mark.parametrize("config", [c for c in BACKEND_CONFIGS if not interpreted(c[1], c[0])], ids=config_id)
def test_batch_with_more_than_2_31_output_elements(config):
    """64-bit offsets into the output and its gradient: N * D = 2^31 + 4M elements (4 GiB in
    float16 each). The last sequence, which lies past element 2^31, is checked; its gradient
    rows are the only nonzero ones, so both table gradients are exactly those rows' sums."""
    _, device, _ = config
    batch, seq_len, dim = 513, 2048, 2048
    torch.manual_seed(19)
    tok, pos = make_tables(5, seq_len, dim, torch.float16, device)
    ids = torch.randint(0, 5, (batch, seq_len), device=device)
    out = fused_embedding_for(config)(ids, tok, pos)
    torch.testing.assert_close(out[-1], tok.detach()[ids[-1]] + pos.detach(), rtol=0, atol=0)
    grad_out = torch.zeros(batch, seq_len, dim, dtype=torch.float16, device=device)
    grad_out[-1] = torch.randn(seq_len, dim, dtype=torch.float16, device=device)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok, pos), grad_out)
    del out
    torch.testing.assert_close(grad_pos, grad_out[-1], rtol=0, atol=0)
    assert_grad_close(grad_tok, grad_out[-1], ids[-1], torch.float16)


@pytest.mark.parametrize("with_position_ids", [False, True], ids=["offset", "position_ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_rows_of_negative_zeros_sum_to_positive_zero(backend_config, dtype, with_position_ids):
    """A sum starts from +0.0, as eager's zeroed gradient table does, so rows whose every term is
    -0.0 come back +0.0 (0 + -0 is +0), like untouched rows: the sign of a zero must not depend on
    the backend, the mode or where a row's tokens fall in the sorted order. Row 1's two tokens lie
    inside one tile of the sorted scatter, row 2's 20 cross a tile edge; with position_ids the
    position gradient takes the sorted scatter too."""
    from fusedemb.kernels.sorted_scatter import TILE

    _, device, _ = backend_config
    ids = torch.tensor([[1, 1] + [2] * 20], device=device)
    assert ids.shape[1] - 2 > TILE  # row 2 crosses a tile edge
    position_ids = torch.tensor([[1, 1] + [0] * 20], device=device) if with_position_ids else None
    tok, pos = make_tables(3, ids.shape[1], 5, dtype, device)
    grad_out = torch.full((*ids.shape, 5), -0.0, dtype=dtype, device=device)
    out = fused_embedding_for(backend_config)(ids, tok, pos, position_ids=position_ids)
    grads = torch.autograd.grad(out, (tok, pos), grad_out)
    positions = default_positions(ids, 0) if position_ids is None else position_ids
    eager_out = F.embedding(ids, tok) + F.embedding(positions, pos)
    eager_grads = torch.autograd.grad(eager_out, (tok, pos), grad_out)
    for name, grad, eager_grad in zip(("tok_weight", "pos_weight"), grads, eager_grads):
        assert not eager_grad.any() and not eager_grad.signbit().any()  # eager: +0.0 everywhere
        assert not grad.signbit().any(), f"{name}.grad has -0.0 in rows {grad.signbit().any(1).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_small_gradients_beside_large_ones_are_kept(backend_config, dtype):
    """Rows are summed separately: a tiny gradient row sorted next to a huge one in the same tile
    must come back exactly (a prefix-sum difference would cancel it to zero)."""
    _, device, _ = backend_config
    tok, pos = make_tables(6, 4, 3, dtype, device)
    ids = torch.tensor([[0, 1, 2, 1]], device=device)
    scale = torch.tensor([1e17, 1.0, 1e-6, 2.0], dtype=dtype, device=device)
    grad_out = scale[None, :, None].expand(1, 4, 3).contiguous()
    out = fused_embedding_for(backend_config)(ids, tok, pos)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok, pos), grad_out)
    expected_rows = torch.tensor([1e17, 3.0, 1e-6], dtype=dtype, device=device)
    torch.testing.assert_close(grad_tok[:3], expected_rows[:, None].expand(3, 3), rtol=0, atol=0)
    torch.testing.assert_close(grad_pos, grad_out[0], rtol=0, atol=0)
