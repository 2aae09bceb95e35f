"""The sorted backward's side stream (fusedemb/kernels/streams.py): used where it can be, never
where it cannot (CPU tensors, fake tensors under tracing, CUDA graph capture), and results
unchanged by it: against the exact sums, and bit for bit with the sort kept on one stream."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_grad_close, assert_output_equal, deterministic_algorithms, zipf_ids
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedemb
from fusedemb.kernels import backward, sorted_scatter, streams
from fusedemb.reference import default_positions, fused_embedding_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SLEEP_CYCLES = 10**7  # torch.cuda._sleep: a few milliseconds of one stream busy doing nothing


def test_no_side_stream_for_cpu_or_fake_tensors_or_when_disabled():
    with streams.side_stream(torch.empty(2)) as stream:
        assert stream is None
    with FakeTensorMode():
        fake_cuda = torch.empty(2, device="cuda")
    assert fake_cuda.is_cuda and not streams.can_fork(fake_cuda)
    if torch.cuda.is_available():
        with streams.side_stream(torch.empty(2, device="cuda"), enabled=False) as stream:
            assert stream is None


def gpt_step(ids, tok, pos, grad_out, deterministic):
    out = fusedemb.fused_embedding(ids, tok, pos, backend="triton", deterministic=deterministic)
    return (out, *torch.autograd.grad(out, (tok, pos), grad_out))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_side_stream_gives_the_one_stream_result_bit_for_bit(row_sorts, monkeypatch, dtype):
    """At gpt2-124M sizes (8k Zipf ids), the sort on the side stream gives the very gradients of
    the sort on the current stream, and both are within the bound of the exact sums."""
    torch.manual_seed(3)
    vocab, seq_len, dim = 50257, 1024, 768
    tok = torch.randn(vocab, dim, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randn(seq_len, dim, device="cuda", dtype=dtype, requires_grad=True)
    ids = zipf_ids((8, seq_len), vocab, 1.1, "cuda")
    grad_out = torch.randn(8, seq_len, dim, device="cuda", dtype=dtype)
    forked = gpt_step(ids, tok, pos, grad_out, True)
    assert len(row_sorts) == 1 and isinstance(row_sorts[0].stream, torch.cuda.Stream)
    assert row_sorts[0].stream.priority < torch.cuda.current_stream().priority
    monkeypatch.setattr(backward, "side_stream", lambda like, enabled: streams.side_stream(like, enabled=False))
    one_stream = gpt_step(ids, tok, pos, grad_out, True)
    assert row_sorts[1].stream is None
    assert all(torch.equal(a, b) for a, b in zip(forked, one_stream))
    assert_grad_close(forked[1], grad_out, ids, dtype)
    assert_grad_close(forked[2], grad_out, default_positions(ids), dtype)


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_cuda_graph_replays_a_training_step(row_sorts, deterministic):
    """A forward and backward captured in a CUDA graph (the sort stays on the capturing stream)
    and replayed on new ids and gradients gives the reference's output and gradients."""
    torch.manual_seed(4)
    vocab, seq_len, dim, batch = 1000, 128, 96, 4
    tok = torch.randn(vocab, dim, device="cuda", requires_grad=True)
    pos = torch.randn(seq_len, dim, device="cuda", requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seq_len), device="cuda")
    grad_out = torch.randn(batch, seq_len, dim, device="cuda")
    warmup = torch.cuda.Stream()  # compiles the kernels outside the capture, as CUDA graphs ask
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        gpt_step(ids, tok, pos, grad_out, deterministic)
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gpt_step(ids, tok, pos, grad_out, deterministic)
    if deterministic:
        assert row_sorts[-1].stream is None  # the capture's sort
    ids.copy_(torch.randint(0, vocab, ids.shape, device="cuda"))
    grad_out.copy_(torch.randn(grad_out.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_output_equal(captured[0], fused_embedding_reference(ids, tok, pos), "cuda", "triton")
    assert_grad_close(captured[1], grad_out, ids, torch.float32)
    assert_grad_close(captured[2], grad_out, default_positions(ids), torch.float32)


def small_step_both_ways(monkeypatch, deterministic=True):
    """A small deterministic training step (gradients of a 24-row table over 96 tokens) with
    the sort on the side stream, then on the current stream; tables and gradients of the same
    byte size as the sort's buffers, so that a block freed too early gets reused."""
    torch.manual_seed(5)
    tok = torch.randn(24, 4, device="cuda", requires_grad=True)
    pos = torch.randn(96, 4, device="cuda", requires_grad=True)
    ids = torch.randint(0, 24, (1, 96), device="cuda")
    grad_out = torch.randn(1, 96, 4, device="cuda")
    forked = gpt_step(ids, tok, pos, grad_out, deterministic)
    torch.cuda.synchronize()
    with monkeypatch.context() as patch:
        patch.setattr(backward, "side_stream", lambda like, enabled: streams.side_stream(like, enabled=False))
        one_stream = gpt_step(ids, tok, pos, grad_out, deterministic)
    torch.cuda.synchronize()
    return ids, grad_out, forked, one_stream


@requires_cuda
def test_sort_buffers_are_not_reused_while_the_side_stream_runs(row_sorts, monkeypatch):
    """The side stream is held up between its ranking and its scatter, the window in which the
    first version's freed `rank` was zeroed over by the current stream (an illegal memory
    access): the result must not change."""
    real_launch = sorted_scatter.launch

    def held_up_scatter(kernel, grid, *args, **kwargs):
        if kernel is sorted_scatter.scatter_sorted_kernel:
            torch.cuda._sleep(SLEEP_CYCLES)  # on the stream the sort runs on
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(sorted_scatter, "launch", held_up_scatter)
    ids, grad_out, forked, one_stream = small_step_both_ways(monkeypatch)
    assert isinstance(row_sorts[0].stream, torch.cuda.Stream)
    assert all(torch.equal(a, b) for a, b in zip(forked, one_stream))
    assert_grad_close(forked[1], grad_out, ids, torch.float32)


@requires_cuda
def test_side_stream_waits_for_deterministic_fills_of_its_buffers(row_sorts, monkeypatch):
    """Under torch.use_deterministic_algorithms(True), torch.empty queues a fill of new memory
    on the current stream. With the current stream held up, those fills of the sort's buffers
    run late: the sort must wait for them, not be overwritten by them."""
    real_sort = backward.sort_by_row

    def after_a_hold_up(index, num_rows, stream=None):
        torch.cuda._sleep(SLEEP_CYCLES)  # on the current stream
        return real_sort(index, num_rows, stream)

    monkeypatch.setattr(backward, "sort_by_row", after_a_hold_up)
    with deterministic_algorithms(True):
        ids, grad_out, forked, one_stream = small_step_both_ways(monkeypatch, deterministic=None)
    assert isinstance(row_sorts[0].stream, torch.cuda.Stream)
    assert all(torch.equal(a, b) for a, b in zip(forked, one_stream))
    assert_grad_close(forked[1], grad_out, ids, torch.float32)
    assert_grad_close(forked[2], grad_out, default_positions(ids), torch.float32)
