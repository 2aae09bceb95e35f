"""The deterministic backward's sort by row, both ways: the counting sort of our own kernels, and
torch.sort where the counting sort's per-chunk counts would grow too large (V * N / CHUNK cells).

Both must give the same order (stable: token order inside a row) and the same row runs, so the
segment sums that follow, and so the gradients, are the same bit for bit whichever sort ran."""

from __future__ import annotations

import pytest
import torch
from conftest import ANY_DEVICE, assert_grad_close, check_against_reference, make_tables, requires_triton

pytestmark = requires_triton


def index_cases():
    """(name, index, num_rows): more than one chunk of 256, hot rows, V = 1, N = 1, and ids out of
    range (the kernels clamp them into the table when the host check is off)."""
    torch.manual_seed(20)
    hot = torch.full((700,), 4)
    hot[::7] = torch.randint(0, 9, (100,))
    return [
        ("uniform", torch.randint(0, 37, (601,)), 37),
        ("hot-row", hot, 9),
        ("one-row", torch.zeros(300, dtype=torch.long), 1),
        ("one-token", torch.tensor([5]), 11),
        ("out-of-range", torch.tensor([3, -2, 40, 0, 7, -1, 7, 39, 2] * 40), 8),
    ]


def row_runs(order):
    """[start, end) of every row in the sorted order, whatever the number of chunks."""
    return order.ends[:, 0] - order.counts[:, 0], order.ends[:, -1]


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("name, index, num_rows", index_cases(), ids=[case[0] for case in index_cases()])
def test_both_sorts_give_the_same_stable_order(name, index, num_rows, id_dtype):
    from fusedemb.kernels.sorted_scatter import counting_sort_by_row, library_sort_by_row

    index = index.to(device=ANY_DEVICE, dtype=id_dtype)
    counting = counting_sort_by_row(index, num_rows)
    library = library_sort_by_row(index, num_rows)
    rows = index.clamp(0, num_rows - 1).long()
    expected_rows, expected_tokens = torch.sort(rows.cpu(), stable=True)
    for order in (counting, library):
        assert order.sorted_tokens.dtype == order.sorted_rows.dtype == torch.int32
        torch.testing.assert_close(order.sorted_tokens.cpu().long(), expected_tokens, rtol=0, atol=0)
        torch.testing.assert_close(order.sorted_rows.cpu().long(), expected_rows, rtol=0, atol=0)
        start, end = row_runs(order)
        counts = torch.bincount(rows.cpu(), minlength=num_rows)
        torch.testing.assert_close((end - start).cpu().long(), counts, rtol=0, atol=0)
        torch.testing.assert_close(end.cpu().long(), counts.cumsum(0), rtol=0, atol=0)
    assert library.counts.shape == (num_rows, 1)  # memory grows as V + N, not V * N / CHUNK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_are_the_same_bit_for_bit_whichever_sort_ran(monkeypatch, dtype):
    """A hot row over 2500 tokens covers a whole block of 64 tiles, so the segment sums, block
    sums and combine steps all read the order: with the same order they give the same bits."""
    from fusedemb.kernels import sorted_scatter

    torch.manual_seed(21)
    index = torch.randint(0, 50, (3000,))
    index[200:2700] = 7
    index = index.to(ANY_DEVICE)
    grad_rows = torch.randn(index.numel(), 5, dtype=dtype, device=ANY_DEVICE)
    results = []
    for max_cells in (1 << 40, 0):  # counting sort, then torch.sort
        monkeypatch.setattr(sorted_scatter, "COUNTING_SORT_MAX_CELLS", max_cells)
        results.append(sorted_scatter.sorted_scatter_add(grad_rows, index, 50, 3, dtype))
    assert torch.equal(*results)
    assert_grad_close(results[1], grad_rows, index, dtype, skip_row=3)


def test_the_counting_sort_gives_way_past_its_cell_budget(monkeypatch):
    """sort_by_row takes torch.sort once num_rows * ceil(N / CHUNK) passes the budget."""
    from fusedemb.kernels import sorted_scatter

    index = torch.randint(0, 10, (2 * sorted_scatter.CHUNK + 1,), device=ANY_DEVICE)  # 3 chunks
    monkeypatch.setattr(sorted_scatter, "COUNTING_SORT_MAX_CELLS", 30)
    assert sorted_scatter.sort_by_row(index, 10).counts.shape == (10, 3)  # 30 cells: counting sort
    assert sorted_scatter.sort_by_row(index, 11).counts.shape == (11, 1)  # 33 cells: torch.sort


def test_deterministic_backward_through_torch_sort_matches_the_reference(monkeypatch):
    """The whole operator with torch.sort ordering the ids: skewed ids, a padding row, explicit
    position ids (their scatter sorts too)."""
    from fusedemb.kernels import sorted_scatter

    monkeypatch.setattr(sorted_scatter, "COUNTING_SORT_MAX_CELLS", 0)
    config = ("triton", ANY_DEVICE, True)
    torch.manual_seed(22)
    tok, pos = make_tables(30, 64, 13, torch.float32, ANY_DEVICE)
    ids = torch.where(torch.rand(4, 64, device=ANY_DEVICE) < 0.6, 2, torch.randint(0, 30, (4, 64), device=ANY_DEVICE))
    check_against_reference(config, ids, tok, pos, padding_idx=5)
    check_against_reference(config, ids, tok, pos, position_ids=torch.randint(0, 64, (4, 64), device=ANY_DEVICE))
