"""torch.func through fusedemb, next to the same transforms of the reference (nn.Embedding's ops).

    python benchmarks/func_transforms_cost.py [--device cuda] [--batch 16] [--vocab 2000]

Each row times one transformed call, forward and (where it says gradients) backward, on a batch
of --batch ensembles or sequences (fusedemb/func_transforms.py says how each becomes one
kernel call per direction):

  ensemble outputs         vmap over a batch of models' tables (torch.func.stack_module_state)
  ensemble gradients       grad of the vmapped models' summed loss
  per-model gradients      vmap of grad over the models
  per-sample gradients     vmap of grad over the sequences of one model (differential privacy)
  jacobian (jacrev)        of a short sequence's output with respect to the position table
  compiled batches         torch.compile of a vmap over --batch batches of sequences (shared
                           tables), and the tables' gradients taken outside the vmap

and the same with a padding_idx (every model's padding row gets no gradient). Each
cell is the median ± half the interquartile range in ms (fusedemb.bench.timing's timer), the
last column fusedemb's median over the reference's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.func import grad, jacrev, vmap

import fusedemb
from fusedemb.bench.cli import add_device_argument, check_device, positive_int
from fusedemb.bench.timing import format_median_and_spread, make_timer
from fusedemb.reference import fused_embedding_reference

CONTEXT, DIM, SEQUENCES, SEQ, JACOBIAN_SEQ = 64, 64, 4, 64, 8


def fused(padding_idx: int | None, backend: str | None):
    return lambda ids, tok, pos: fusedemb.fused_embedding(ids, tok, pos, padding_idx=padding_idx, backend=backend)


def reference(padding_idx: int | None):
    return lambda ids, tok, pos: fused_embedding_reference(ids, tok, pos, padding_idx=padding_idx)


def cases(embed: Callable, batch: int, vocab: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The transformed calls of the docstring, for one embedding function; same inputs for each
    (the generator is seeded)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    ids = torch.randint(0, vocab, (SEQUENCES, SEQ), generator=generator, device=device)
    sequences = torch.randint(0, vocab, (batch, SEQ), generator=generator, device=device)
    toks, poss = randn(batch, vocab, DIM), randn(batch, CONTEXT, DIM)
    tok, pos = toks[0], poss[0]
    batches = torch.randint(0, vocab, (batch, SEQUENCES, SEQ), generator=generator, device=device)
    tables = [table.clone().requires_grad_() for table in (tok, pos)]
    compiled_batches = torch.compile(vmap(lambda ids: embed(ids, *tables)), fullgraph=True)

    def loss(tok, pos, ids):
        return (embed(ids, tok, pos).tanh() ** 2).sum()  # not linear: second derivatives are not zero

    def ensemble_loss(toks, poss):
        return vmap(loss, (0, 0, None))(toks, poss, ids).sum()

    def sequence_loss(tok, pos, sequence):
        return loss(tok, pos, sequence[None])

    def compiled_batch_gradients():
        out = compiled_batches(batches)
        return torch.autograd.grad(out, tables, torch.ones_like(out))

    return {
        "ensemble outputs": lambda: vmap(lambda t, p: embed(ids, t, p))(toks, poss),
        "ensemble gradients": lambda: grad(ensemble_loss, (0, 1))(toks, poss),
        "per-model gradients": lambda: vmap(grad(loss, (0, 1)), (0, 0, None))(toks, poss, ids),
        "per-sample gradients": lambda: vmap(grad(sequence_loss, (0, 1)), (None, None, 0))(tok, pos, sequences),
        "jacobian (jacrev)": lambda: jacrev(lambda p: embed(ids[:1, :JACOBIAN_SEQ], tok, p))(pos[:JACOBIAN_SEQ]),
        "compiled batches": compiled_batch_gradients,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--backend", choices=("triton", "cpp"), help="fusedemb's backend (default: the device's own)")
    parser.add_argument("--batch", type=positive_int, default=16, help="models of the ensemble, or sequences")
    parser.add_argument("--vocab", type=positive_int, default=2000, help="token table rows")
    parser.add_argument("--quick", action="store_true", help="a short timing budget (smoke tests)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    device = torch.device(args.device)
    timer = make_timer(device.type, quick=args.quick)
    print(f"torch.func, {device.type}, float32, batch {args.batch}, V {args.vocab} P {CONTEXT} D {DIM}, "
          f"{SEQUENCES} x {SEQ} ids; ms: fusedemb, reference, and fusedemb's time over the reference's "
          "(below 1: fusedemb faster; the CLI's vs columns are the inverse)")  # fmt: skip
    for padding_idx in (None, 0):
        fused_cases = cases(fused(padding_idx, args.backend), args.batch, args.vocab, device)
        reference_cases = cases(reference(padding_idx), args.batch, args.vocab, device)
        for label in fused_cases:
            fused_stats, reference_stats = (timer.measure(calls[label]) for calls in (fused_cases, reference_cases))
            cells = [format_median_and_spread(stats, "ms") for stats in (fused_stats, reference_stats)]
            label += ", padding_idx" if padding_idx is not None else ""
            ratio = fused_stats.median_s / reference_stats.median_s
            print(f"  {label:36s} {cells[0]:20s} {cells[1]:20s} {ratio:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
