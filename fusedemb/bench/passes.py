"""Benchmark inputs and the three timed passes: forward, backward, forward+backward.

A pass is the work to time, ``run(*setup())``: ``setup`` prepares run's arguments before every
repeat and is not timed. The CLI's timers and pytest-benchmark both time exactly ``run``:

    forward            run() = forward(ids, tok, pos), with autograd recording, as in training
    backward           setup() = (forward(ids, tok, pos),): a fresh graph for every repeat
                       run(out) = torch.autograd.grad(out, (tok, pos), grad_out)
    forward+backward   run() = torch.autograd.grad(forward(ids, tok, pos), (tok, pos), grad_out)

The backward is timed on a fresh forward each time, rather than on one graph kept alive with
retain_graph=True, because that is what training does: the backward may free (or, under
torch.compile, donate and overwrite) the forward's saved buffers, and retain_graph would both
change that work and is refused by compiled backwards that donate buffers. autograd.grad returns
new gradients instead of accumulating into .grad, so nothing needs zeroing between repeats; the
backward includes allocating both gradients, as with ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedemb.bench.bytes_model import PASSES, pass_bytes
from fusedemb.bench.configs import Problem
from fusedemb.bench.implementations import Forward


@dataclass(frozen=True)
class Inputs:
    ids: torch.Tensor  # (B, T) int64
    tok_weight: torch.Tensor  # (V, D), requires grad
    pos_weight: torch.Tensor  # (T, D), requires grad
    grad_out: torch.Tensor  # (B, T, D): the gradient the next layer would send back


def make_inputs(problem: Problem, device: str, seed: int) -> Inputs:
    """Random tables and output gradient (never zeros: they hide unwritten rows) and the ids.

    The ids are drawn on the CPU, so a seed gives the same ids on every device; the tables are
    drawn on the device itself, since the large presets' tables are gigabytes.
    """
    config = problem.config
    ids = problem.ids.sample(problem.batch, config.seq, config.vocab, torch.Generator().manual_seed(seed))
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=problem.dtype)

    return Inputs(
        ids=ids.to(device),
        tok_weight=normal(config.vocab, config.dim).requires_grad_(),
        pos_weight=normal(config.seq, config.dim).requires_grad_(),
        grad_out=normal(problem.batch, config.seq, config.dim),
    )


@dataclass(frozen=True)
class TimedPass:
    run: Callable[..., object]
    setup: Callable[[], tuple] = lambda: ()


def make_pass(pass_name: str, forward: Forward, inputs: Inputs) -> TimedPass:
    """The work of one ``pass_name`` (see the module docstring)."""
    tables = (inputs.tok_weight, inputs.pos_weight)
    if pass_name == "forward":
        return TimedPass(run=lambda: forward(inputs.ids, *tables))
    if pass_name == "backward":
        return TimedPass(
            setup=lambda: (forward(inputs.ids, *tables),),
            run=lambda out: torch.autograd.grad(out, tables, inputs.grad_out),
        )
    if pass_name == "forward+backward":
        return TimedPass(run=lambda: torch.autograd.grad(forward(inputs.ids, *tables), tables, inputs.grad_out))
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {PASSES}")


def bytes_moved(pass_name: str, inputs: Inputs) -> int:
    """The bytes model's count for ``pass_name`` on these inputs (see bytes_model)."""
    vocab, dim = inputs.tok_weight.shape
    return pass_bytes(
        pass_name,
        tokens=inputs.ids.numel(),
        seq=inputs.ids.shape[-1],
        vocab=vocab,
        positions=inputs.pos_weight.shape[0],
        dim=dim,
        element_size=inputs.tok_weight.element_size(),
        id_size=inputs.ids.element_size(),
    )
