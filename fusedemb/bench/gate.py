"""The correctness gate: an implementation is timed only after it computes the right function.

Each implementation runs forward and backward on the very inputs it is about to be timed on, and
its output and both table gradients are compared with fusedemb.reference. A wrong kernel that is
fast is the easiest benchmark result to get, so a mismatch is reported and never timed.

Comparison is by relative error ||actual - expected|| / ||expected|| in float64, against a bound
per dtype. The forward is a single add, exact in every dtype up to the final rounding; the
gradients are float32 sums rounded to the table dtype, so implementations that sum in another
order differ by about an ulp of the table dtype in some elements: float32 2^-24, float16 2^-11,
bfloat16 2^-8. The bounds sit a little above those ulps; a wrong row or a lost update moves the
error by orders of magnitude more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusedemb.bench.implementations import Forward
from fusedemb.bench.passes import Inputs
from fusedemb.reference import fused_embedding_backward_reference, fused_embedding_reference

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
    expected_grad_tok, expected_grad_pos = fused_embedding_backward_reference(
        inputs.grad_out, inputs.ids, num_embeddings=tables[0].shape[0], context_length=tables[1].shape[0]
    )
    tolerance = RELATIVE_TOLERANCE[inputs.tok_weight.dtype]
    failures = [
        problem
        for name, actual, expected in (
            ("output", out, expected_out),
            ("grad tok_weight", grad_tok, expected_grad_tok),
            ("grad pos_weight", grad_pos, expected_grad_pos),
        )
        if (problem := _compare(name, actual, expected, tolerance))
    ]
    return GateResult(passed=not failures, detail="; ".join(failures))


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str:
    """Empty if ``actual`` matches ``expected``, else a one-line description of the mismatch."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return (
            f"{name} is {tuple(actual.shape)} {actual.dtype}, "
            f"expected {tuple(expected.shape)} {expected.dtype}"
        )
    difference = torch.linalg.vector_norm((actual.double() - expected.double()).flatten())
    scale = torch.linalg.vector_norm(expected.double().flatten())
    error = (difference / scale).item() if scale > 0 else difference.item()
    if not error <= tolerance:  # also catches NaN
        return f"{name} relative error {error:.2e} > {tolerance:.0e}"
    return ""
