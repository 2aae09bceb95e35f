"""The correctness gate: an implementation is timed only after it computes the right function.

Each implementation runs forward and backward on the very inputs it is about to be timed on, and
its output and both table gradients are compared with fusedemb.reference. A wrong kernel that is
fast is the easiest benchmark result to get, so a mismatch is reported and never timed.

- The output is one rounded add per element, so every element must be within one ulp of the
  reference's (exact in practice; one ulp allows Triton's interpreter's rounding toward zero).
- Each gradient element must be within the error bound of its sum (fusedemb.accuracy): float32
  accumulation for fusedemb and for everything on CUDA, the table's own precision for PyTorch's
  CPU backward of 16-bit tables, which adds in 16 bits (eager's and the reference's; torch.compile's
  adds in float32 in torch 2.13, but is held to the same, looser bound). That catches a lost
  update or a misplaced row wherever rows hold few tokens.
- The bound is loose for rows of thousands of tokens (hot ids, where atomics contend), so each
  gradient must also be close in norm: ||actual - expected|| / ||expected|| below a bound a
  little above the dtype's rounding, which halving or dropping a hot row exceeds by far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusedemb.accuracy import scatter_add_error, ulp
from fusedemb.bench.implementations import Forward, Implementation
from fusedemb.bench.passes import Inputs
from fusedemb.reference import default_positions, fused_embedding_backward_reference, fused_embedding_reference

RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str  # what failed and by how much; empty when passed


def check_against_reference(
    forward: Forward, inputs: Inputs, float32_sums: bool = True, gradients: bool = True
) -> GateResult:
    """Run ``forward`` and its backward once on ``inputs`` and compare all three results.
    float32_sums: whether the implementation's gradients must meet float32 accumulation's bound;
    gradients: whether to check them at all (not when only the forward is timed)."""
    tables = (inputs.tok_weight, inputs.pos_weight)
    out = forward(inputs.ids, *tables)
    with torch.no_grad():
        expected_out = fused_embedding_reference(inputs.ids, *tables)
    failures = []
    if (problem := _mismatch("output", out, expected_out)) or (problem := _output_error(out, expected_out)):
        failures.append(problem)
    if not gradients:
        return GateResult(passed=not failures, detail="; ".join(failures))

    grad_tok, grad_pos = torch.autograd.grad(out, tables, inputs.grad_out)
    expected_grads = fused_embedding_backward_reference(
        inputs.grad_out, inputs.ids, num_embeddings=tables[0].shape[0], context_length=tables[1].shape[0]
    )
    accumulate_in = None if float32_sums else inputs.tok_weight.dtype
    for name, actual, expected, index in (
        ("grad tok_weight", grad_tok, expected_grads[0], inputs.ids),
        ("grad pos_weight", grad_pos, expected_grads[1], default_positions(inputs.ids)),
    ):
        # (no _mismatch: torch.autograd.grad gives every gradient its table's shape and dtype)
        if not (error := scatter_add_error(actual, inputs.grad_out, index, accumulate_in=accumulate_in)) <= 1:
            failures.append(f"{name} off by {error:.3g} times the error bound of its sums")
        elif problem := _norm_error(name, actual, expected, RELATIVE_TOLERANCE[expected.dtype]):
            failures.append(problem)
    return GateResult(passed=not failures, detail="; ".join(failures))


SIXTEEN_BIT_SUMS = (
    " (PyTorch's CPU backward adds 16-bit gradients in 16 bits: a row of thousands of tokens, such as"
    " --ids same gives, drifts past the norm bound; a property of that backward, not of the bench)"
)


def gate(implementation: Implementation, inputs: Inputs, gradients: bool = True) -> GateResult:
    """check_against_reference with the accumulation bound that fits the implementation: float32
    on CUDA and for fusedemb, the table's precision for PyTorch's CPU backward. ``gradients``:
    whether a timed pass runs the backward (a forward-only run checks the output only)."""
    float32_sums = inputs.ids.is_cuda or implementation.float32_sums
    result = check_against_reference(implementation.forward, inputs, float32_sums, gradients)
    if not result.passed and not float32_sums and inputs.tok_weight.dtype in (torch.bfloat16, torch.float16):
        return GateResult(passed=False, detail=result.detail + SIXTEEN_BIT_SUMS)
    return result


def _mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor) -> str:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"{name} is {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    return ""


def _output_error(out: torch.Tensor, expected: torch.Tensor) -> str:
    error = (out.double() - expected.double()).abs()
    bound = ulp(expected.double().abs(), expected.dtype)
    if not bool((error <= bound).all()):  # also catches NaN
        return f"output off by up to {torch.nan_to_num(error / bound, nan=float('inf')).max().item():.3g} ulps"
    return ""


def _norm_error(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str:
    difference = torch.linalg.vector_norm((actual.double() - expected.double()).flatten())
    scale = torch.linalg.vector_norm(expected.double().flatten())
    error = (difference / scale).item() if scale > 0 else difference.item()
    if not error <= tolerance:  # also catches NaN
        return f"{name} relative error {error:.2e} > {tolerance:.0e}"
    return ""
