"""The per-element error bound that every gradient test relies on: it must pass float32 sums in
any order and fail the faults it exists to catch."""

from __future__ import annotations

import pytest
import torch

from fusedemb.accuracy import scatter_add_error, ulp
from fusedemb.reference import scatter_add_rows

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def scattered(num_rows: int, tokens: int, dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(tokens, dim, generator=generator).to(dtype)
    index = torch.randint(0, num_rows, (tokens,), generator=generator)
    return grad, index


def float32_sum_in_order(grad, index, num_rows, order):
    """zeros(R, D).index_add_(0, index, grad) added token by token in `order`, in float32 (float64
    for float64 rows), rounded once: what a correct kernel may compute."""
    accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
    table = torch.zeros(num_rows, grad.shape[1], dtype=accumulate)
    for token in order.tolist():
        table[index[token]] += grad[token].to(accumulate)
    return table.to(grad.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *SIXTEEN_BIT], ids=str)
def test_float32_sums_in_any_order_pass(dtype):
    grad, index = scattered(num_rows=6, tokens=300, dim=5, dtype=dtype, seed=0)
    for seed in range(3):
        order = torch.randperm(300, generator=torch.Generator().manual_seed(seed))
        assert scatter_add_error(float32_sum_in_order(grad, index, 6, order), grad, index) <= 1


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_sums_in_the_table_dtype_fail(dtype):
    grad, index = scattered(num_rows=5, tokens=200, dim=7, dtype=dtype, seed=1)
    table = torch.zeros(5, 7, dtype=dtype)
    for token in range(200):
        table[index[token]] += grad[token]  # rounded to 16 bits after every addition
    assert scatter_add_error(table, grad, index) > 1
    # ... unless the caller says that is the precision it accepts (the benchmark's gate does).
    assert scatter_add_error(table, grad, index, accumulate_in=dtype) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, *SIXTEEN_BIT], ids=str)
def test_one_lost_update_fails(dtype):
    grad, index = scattered(num_rows=2000, tokens=4000, dim=8, dtype=dtype, seed=2)
    expected = torch.zeros(2000, 8).index_add_(0, index, grad.float())
    expected[index[17]] -= grad[17].float()
    assert scatter_add_error(expected.to(dtype), grad, index) > 1


def test_rows_no_token_adds_into_must_be_exactly_zero():
    grad, index = scattered(num_rows=10, tokens=5, dim=3, dtype=torch.float32, seed=3)
    table = torch.zeros(10, 3).index_add_(0, index, grad)
    untouched = next(row for row in range(10) if row not in index.tolist())
    table[untouched, 1] = 1e-30
    assert scatter_add_error(table, grad, index) == float("inf")


def test_negative_skip_row_counts_from_the_end():
    """As padding_idx does, and as the reference's scatter_add_rows zeroes it."""
    grad, index = scattered(num_rows=4, tokens=50, dim=3, dtype=torch.float32, seed=5)
    table = scatter_add_rows(grad, index, 4, skip_row=-1)
    assert scatter_add_error(table, grad, index, skip_row=-1) <= 1
    table[3] = 1.0
    assert scatter_add_error(table, grad, index, skip_row=-1) == float("inf")


def test_skip_row_must_be_zero_and_nan_fails():
    grad, index = scattered(num_rows=4, tokens=50, dim=3, dtype=torch.float32, seed=4)
    skip = int(index[0])
    table = torch.zeros(4, 3).index_add_(0, index, grad)
    assert scatter_add_error(table, grad, index, skip_row=skip) == float("inf")
    table[skip] = 0
    assert scatter_add_error(table, grad, index, skip_row=skip) <= 1
    # A NaN in a row that is summed (in the skip row it would fail as a stray value instead)
    summed_row = next(row for row in index.tolist() if row != skip)
    table[summed_row, 0] = float("nan")
    assert scatter_add_error(table, grad, index, skip_row=skip) == float("inf")


def test_the_bound_is_gamma_n_times_the_magnitude():
    """The bound itself, within 2x: a float64 sum of n ones may be off by gamma_n * n, with
    gamma_n = n u / (1 - n u) and u half of eps (the rounding of the sum's last ulp is far
    smaller here). 0.9 of that passes and 1.5 of it fails; a bound 10x too loose, or with u
    taken as eps, would pass both."""
    n = 1000
    grad = torch.ones(n, 1, dtype=torch.float64)
    index = torch.zeros(n, dtype=torch.long)
    u = torch.finfo(torch.float64).eps / 2
    gamma_n = n * u / (1 - n * u)
    exact = torch.tensor([[float(n)]], dtype=torch.float64)
    assert scatter_add_error(exact + 0.9 * gamma_n * n, grad, index) <= 1
    assert scatter_add_error(exact + 1.5 * gamma_n * n, grad, index) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *SIXTEEN_BIT], ids=str)
def test_ulp_is_the_spacing_of_the_dtype(dtype):
    values = torch.tensor([1.0, 3.0, 1000.0, torch.finfo(dtype).smallest_normal], dtype=dtype)
    following = torch.nextafter(values, torch.tensor(float("inf"), dtype=dtype))
    assert torch.equal(ulp(values.double(), dtype), (following.double() - values.double()))
