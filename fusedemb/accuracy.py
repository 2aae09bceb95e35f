"""How far a computed scatter-add gradient may be from the exact one, element by element.

Each element of a table gradient is a sum of n output-gradient elements g_1 .. g_n (one per
token of that table row). Every backend adds them in float32 (float64 for float64 tables), in
an order of its own, and rounds the sum to the table's dtype once. Whatever the order or the
tree of additions, a floating-point sum of n terms with unit roundoff u is within

    gamma_n * sum |g_i|,    gamma_n = n * u / (1 - n * u)

of the exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2), and
the final rounding adds at most one ulp of the table dtype (half for round-to-nearest; a whole
one allows Triton's interpreter, which rounds float32 to bfloat16 toward zero). So

    |actual - exact| <= gamma_n * sum |g_i| + ulp(|exact| + gamma_n * sum |g_i|)

and a row that no token adds into must be exactly zero. A norm-wise relative error averages a
local fault away (one lost update among 32k tokens, 16-bit accumulation of a few terms); this
bound does not: the check is element by element.
"""

from __future__ import annotations

import torch


def accumulation_dtype(table_dtype: torch.dtype) -> torch.dtype:
    """What fusedemb (and PyTorch's CUDA kernels) add table_dtype gradients in."""
    return torch.float64 if table_dtype == torch.float64 else torch.float32


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
    (row skip_row left at zero); grad_rows: [N, D] in any float dtype; index: [N] integers.
    accumulate_in: the precision the sums may be computed in, accumulation_dtype(table dtype) by
    default; PyTorch's CPU index_add_ adds 16-bit rows in their own dtype, for example.
    """
    num_rows, dim = actual.shape
    grad_rows = grad_rows.reshape(-1, dim).to(device=actual.device, dtype=torch.float64)
    index = index.reshape(-1).to(actual.device)
    exact = grad_rows.new_zeros(num_rows, dim).index_add_(0, index, grad_rows)
    magnitude = grad_rows.new_zeros(num_rows, dim).index_add_(0, index, grad_rows.abs())
    terms = torch.bincount(index, minlength=num_rows).to(torch.float64)[:, None]
    if skip_row is not None:
        exact[skip_row], magnitude[skip_row], terms[skip_row] = 0, 0, 0
    roundoff = torch.finfo(accumulate_in or accumulation_dtype(actual.dtype)).eps / 2
    # gamma_n is finite only while n * u < 1: beyond that the bound says nothing.
    gamma = torch.where(terms * roundoff < 1, terms * roundoff / (1 - terms * roundoff), float("inf"))
    sum_error = gamma * magnitude
    bound = torch.where(terms > 0, sum_error + ulp(exact.abs() + sum_error, actual.dtype), 0.0)
    error = (actual.to(torch.float64) - exact).abs()
    ratio = torch.where(error == 0, 0.0, error / bound)  # error > 0 with bound 0 gives inf
    return torch.nan_to_num(ratio, nan=float("inf"), posinf=float("inf")).max().item() if ratio.numel() else 0.0
