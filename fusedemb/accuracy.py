"""How far a computed scatter-add gradient may be from the exact one, element by element.

Each element of a table gradient is a sum of n output-gradient elements g_1 .. g_n (one per
token of that table row). fusedemb's kernels (Triton, C++) add them in float32 (float64 for
float64 tables), each in an order of its own, and round the sum to the table's dtype. (PyTorch's
CPU embedding backward, which the "reference" backend's gradients come from, adds 16-bit rows in
16 bits: `accumulate_in` says so.) Whatever the order or the tree of
additions, a floating-point sum of n terms with unit roundoff u is within

    gamma_n * sum |g_i|,    gamma_n = n * u / (1 - n * u)

of the exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2), and
the rounding to the table dtype adds at most one ulp of it (half for round-to-nearest; a whole
one allows Triton's interpreter, which rounds float32 to bfloat16 toward zero, and the sorted
path's float64 -> float32 -> 16-bit double rounding of rows that cross tiles). So

    |actual - exact| <= gamma_n * sum |g_i| + ulp(|exact| + gamma_n * sum |g_i|)

and a row that no token adds into must be exactly zero. Where rows have few tokens this catches
what a norm-wise error averages away (one lost update among 32k tokens, a 16-bit accumulation of
a few terms). The bound grows as n^2 * u times a term, so for rows of thousands of tokens (hot
ids) it is loose: one lost update there can pass it, and callers check those rows by a
norm-wise error as well (tests/conftest.py, fusedemb/bench/gate.py).
"""

from __future__ import annotations

import torch

ROWS_PER_CHECK = 4096  # rows of `actual` looked at at once for stray non-zeros


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s floating-point numbers at the (non-negative float64) magnitudes."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(magnitude.clamp(min=info.smallest_normal)))
    return torch.exp2(exponent) * info.eps


def scatter_add_error(
    actual: torch.Tensor,
    grad_rows: torch.Tensor,
    index: torch.Tensor,
    skip_row: int | None = None,
    accumulate_in: torch.dtype | None = None,
) -> float:
    """The largest |actual - exact| / bound over the elements of a table gradient: at most 1
    where `actual` is a correct scatter-add, inf where a row that must be zero is not.

    actual: [R, D], the computed zeros(R, D).index_add_(0, index, grad_rows) in the table dtype
    (row skip_row left at zero, a negative one counted from the end as padding_idx is; None: no
    such row); grad_rows: [N, D] in any float dtype; index: [N] integers. accumulate_in: the
    precision the sums may be computed in, float32 (float64 for float64 tables) by default;
    PyTorch's CPU embedding backward adds 16-bit rows in their own dtype, for example. Memory:
    float64 buffers of the touched rows only (at most N x D).
    """
    num_rows, dim = actual.shape
    grad_rows = grad_rows.reshape(-1, dim).to(device=actual.device, dtype=torch.float64)
    index = index.reshape(-1).to(actual.device)
    if skip_row is not None:
        kept = index != skip_row % num_rows
        grad_rows, index = grad_rows[kept], index[kept]
    rows, position, terms = torch.unique(index, return_inverse=True, return_counts=True)
    exact = grad_rows.new_zeros(len(rows), dim).index_add_(0, position, grad_rows)
    magnitude = grad_rows.new_zeros(len(rows), dim).index_add_(0, position, grad_rows.abs())
    roundoff = torch.finfo(accumulate_in or torch.promote_types(actual.dtype, torch.float32)).eps / 2
    n_u = terms.to(torch.float64)[:, None] * roundoff
    # gamma_n is finite only while n * u < 1: beyond that the bound says nothing.
    sum_error = torch.where(n_u < 1, n_u / (1 - n_u), float("inf")) * magnitude
    bound = sum_error + ulp(exact.abs() + sum_error, actual.dtype)
    error = (actual[rows].to(torch.float64) - exact).abs()
    ratio = torch.where(error == 0, 0.0, error / bound)
    worst = torch.nan_to_num(ratio, nan=float("inf"), posinf=float("inf")).max().item() if ratio.numel() else 0.0
    # Every other row must be exactly zero: checked a block of rows at a time (no R x D
    # temporaries), the verdict read back once.
    touched = torch.zeros(num_rows, dtype=torch.bool, device=actual.device)
    touched[rows] = True
    stray = torch.zeros((), dtype=torch.bool, device=actual.device)
    for start in range(0, num_rows, ROWS_PER_CHECK):
        block = actual[start : start + ROWS_PER_CHECK]
        stray |= (block.ne(0).any(dim=1) & ~touched[start : start + ROWS_PER_CHECK]).any()
    return float("inf") if stray.item() else worst

