"""The correctness gate: an implementation is timed only after it computes the right function.

Each implementation runs forward and backward on the very inputs it is about to be timed on, and
its output and both table gradients are compared with fusedemb.reference. A wrong kernel that is
fast is the easiest benchmark result to get, so a mismatch is reported and never timed.

The output is compared by relative error ||actual - expected|| / ||expected|| in float64: the
forward is a single add, exact in every dtype up to the final rounding, so the bound sits a
little above one ulp of the dtype (float32 2^-24, float16 2^-11, bfloat16 2^-8). The gradients
are sums over up to N tokens, which implementations add in different orders: each element is
checked against the error bound of a sum in the table's own precision (fusedemb.accuracy; what
PyTorch's CPU backward adds 16-bit rows in), which a lost update or a row added to the wrong
place breaks even where a norm-wise error, averaged over N * D elements, would not. (fusedemb's
tests hold its kernels to the tighter bound of float32 accumulation.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusedemb.accuracy import scatter_add_error
from fusedemb.bench.implementations import Forward
from fusedemb.bench.passes import Inputs
from fusedemb.reference import default_positions, fused_embedding_reference

RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str  # what failed and by how much; empty when passed


def check_against_reference(forward: Forward, inputs: Inputs) -> GateResult:
    """Run ``forward`` and its backward once on ``inputs`` and compare all three results."""
    tables = (inputs.tok_weight, inputs.pos_weight)
    out = forward(inputs.ids, *tables)
    grad_tok, grad_pos = torch.autograd.grad(out, tables, inputs.grad_out)

    with torch.no_grad():
        expected_out = fused_embedding_reference(inputs.ids, *tables)
    failures = [problem for problem in (_compare(out, expected_out, RELATIVE_TOLERANCE[out.dtype]),) if problem]
    for name, actual, table, index in (
        ("grad tok_weight", grad_tok, inputs.tok_weight, inputs.ids),
        ("grad pos_weight", grad_pos, inputs.pos_weight, default_positions(inputs.ids)),
    ):
        if actual.shape != table.shape or actual.dtype != table.dtype:
            failures.append(f"{name} is {tuple(actual.shape)} {actual.dtype}, expected {tuple(table.shape)} {table.dtype}")
        elif not (error := scatter_add_error(actual, inputs.grad_out, index, accumulate_in=actual.dtype)) <= 1:
            failures.append(f"{name} off by {error:.3g} times the error bound of its sums")
    return GateResult(passed=not failures, detail="; ".join(failures))


def _compare(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str:
    """Empty if the output ``actual`` matches ``expected``, else a one-line description of the mismatch."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"output is {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    difference = torch.linalg.vector_norm((actual.double() - expected.double()).flatten())
    scale = torch.linalg.vector_norm(expected.double().flatten())
    error = (difference / scale).item() if scale > 0 else difference.item()
    if not error <= tolerance:  # also catches NaN
        return f"output relative error {error:.2e} > {tolerance:.0e}"
    return ""
