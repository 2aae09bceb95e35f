"""Host time per call: what fusedemb's Python layers cost, next to eager nn.Embedding.

    python benchmarks/host_overhead.py [--device cuda] [--calls 500] [--rounds 15]

At small sizes (a tiny model, decoding a token at a time) a call costs host time, not bytes:
checking the inputs, dispatching, allocating, launching. This times calls on tensors so small
(B 1, T 8, V 64, P 16, D 64) that the device never holds the host up: --calls calls back to
back, then one synchronisation, per round; it prints the median per call over the rounds,
± half the interquartile range. Rows, forward and forward+backward (`out.backward(grad)`):

  eager                    F.embedding twice and an add, as two nn.Embedding modules do
  fusedemb, check on/off   fused_embedding with the id range check on and off (the same code
                           for the C++ backend, whose kernels check the ids themselves)

and the forward under torch.no_grad ("inference"), where neither builds an autograd node;

the layers of fused_embedding's forward, each timed with everything below it (check off):

  prepare_inputs           validation and normalisation (fusedemb/validation.py)
  FusedEmbeddingFunction   autograd.Function.apply: the forward kernels' launcher, the launch
  kernel launch            the Triton kernel's launch alone, with the arguments triton_forward
                           gave it (recorded from one call), for the Triton backend

and the backward alone (torch.autograd.grad through a graph made once and kept), of eager and
of fusedemb (in both token-gradient modes for the Triton backend), with the fast mode's layers:

  FusedEmbeddingFunction.backward   called on the calling thread, without autograd's engine
  first kernel launch               the backward's first Triton launch alone (the sweep, in
                                    float32), replayed as the forward's
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedemb
from fusedemb.bench.cli import add_device_argument, bounds_check_restored, check_device, positive_int
from fusedemb.bench.timing import median_and_spread, synchronize
from fusedemb.functional import BACKENDS, resolve_backend
from fusedemb.ops import FusedEmbeddingFunction
from fusedemb.ops import _launch_directly as launching_directly
from fusedemb.validation import prepare_inputs

VOCAB, CONTEXT, DIM, BATCH, SEQ = 64, 16, 64, 1, 8


def per_call_seconds(fn: Callable[[], object], device: torch.device, calls: int, rounds: int) -> list[float]:
    """Seconds per call of `fn`, one sample per round of `calls` calls queued back to back."""
    for _ in range(3):  # warm-up: compilation, allocator, autograd's first-call work
        fn()
    samples = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls)
    return samples


def recorded_launch(module, call: Callable[[], object]) -> Callable[[], None]:
    """Run `call` once with `module.launch` recording its first launch's arguments; returns a
    function that replays that launch alone."""
    original = module.launch
    recorded = []

    def record(*args, **kwargs):
        if not recorded:
            recorded.append((args, kwargs))
        original(*args, **kwargs)

    module.launch = record
    try:
        call()
    finally:
        module.launch = original
    args, kwargs = recorded[0]

    def replay():
        with launching_directly("triton"):  # as FusedEmbeddingFunction launches
            original(*args, **kwargs)

    return replay


def cases(device: torch.device, backend: str | None) -> list[tuple[str, Callable[[], object]]]:
    torch.manual_seed(0)
    tok = torch.randn(VOCAB, DIM, device=device, requires_grad=True)
    pos = torch.randn(CONTEXT, DIM, device=device, requires_grad=True)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    grad = torch.randn(BATCH, SEQ, DIM, device=device)
    backend = resolve_backend(backend, device)

    def eager():
        positions = torch.arange(SEQ, device=device)  # as a GPT model's forward makes them
        return F.embedding(ids, tok) + F.embedding(positions, pos)

    def fused():
        return fusedemb.fused_embedding(ids, tok, pos, backend=backend)

    def with_check(check: bool, fn):
        def call():
            fusedemb.set_bounds_check(check)
            return fn()

        return call

    def forward_backward(fn):
        return lambda: fn().backward(grad)

    def kept(fn):
        """The backward alone: autograd.grad through a graph made once and kept."""
        out = fn()
        return lambda: torch.autograd.grad(out, (tok, pos), grad, retain_graph=True)

    def fused_mode(deterministic: bool):
        return lambda: fusedemb.fused_embedding(ids, tok, pos, backend=backend, deterministic=deterministic)

    def without_grad(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    rows = [
        ("forward: eager", eager),
        ("forward: fusedemb, check on", with_check(True, fused)),
        ("forward: fusedemb, check off", with_check(False, fused)),
        ("inference: eager", without_grad(eager)),
        ("inference: fusedemb, check on", with_check(True, without_grad(fused))),
        ("inference: fusedemb, check off", with_check(False, without_grad(fused))),
    ]
    layers = backend != "reference"  # the reference is plain PyTorch: no layers of fusedemb's own
    if layers:
        inputs = prepare_inputs(ids, tok, pos, None, 0, None)
        args = (inputs.ids, tok, pos, None, 0, -1, backend, False)
        rows += [
            ("  prepare_inputs", with_check(False, lambda: prepare_inputs(ids, tok, pos, None, 0, None))),
            ("  FusedEmbeddingFunction", lambda: FusedEmbeddingFunction.apply(*args)),
        ]
        if backend == "triton":
            import fusedemb.kernels.forward as triton_forward_module

            launch = recorded_launch(triton_forward_module, lambda: FusedEmbeddingFunction.apply(*args))
            rows.append(("  kernel launch", launch))
    # Only Triton's token gradient has two modes; the C++ backward and the reference have one.
    two_modes = backend == "triton"
    rows += [("backward: eager", kept(eager)),
             ("backward: fusedemb, fast" if two_modes else "backward: fusedemb", kept(fused_mode(False)))]  # fmt: skip
    if layers:
        # The fast mode's backward on the calling thread, without autograd's engine (which runs
        # the backward of CUDA tensors on a worker thread per device): its node is its context.
        # The calls hold the output, not only its node: torch 2.10 and older free a node's saved
        # tensors when its output dies. Grad mode off, as the engine runs a backward: with it on,
        # the Function takes the double-backward path, through the registered operator.
        output = FusedEmbeddingFunction.apply(*args)

        def backward_alone():
            with torch.no_grad():
                return FusedEmbeddingFunction.backward(output.grad_fn, grad)

        rows.append(("  FusedEmbeddingFunction.backward", backward_alone))
        if backend == "triton":
            import fusedemb.kernels.backward as triton_backward_module

            rows.append(("  first kernel launch", recorded_launch(triton_backward_module, backward_alone)))
    if two_modes:
        rows.append(("backward: fusedemb, deterministic", kept(fused_mode(True))))
    rows += [
        ("forward+backward: eager", forward_backward(eager)),
        ("forward+backward: fusedemb, check on", with_check(True, forward_backward(fused))),
        ("forward+backward: fusedemb, check off", with_check(False, forward_backward(fused))),
    ]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--backend", choices=BACKENDS, help="fusedemb's backend (default: the device's own)")
    parser.add_argument("--calls", type=positive_int, default=500, help="calls queued back to back per round")
    parser.add_argument("--rounds", type=positive_int, default=15, help="timed rounds per row")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    device = torch.device(args.device)
    print(f"host time per call, {device.type}, backend {resolve_backend(args.backend, device)}, float32, "
          f"B {BATCH} T {SEQ} V {VOCAB} P {CONTEXT} D {DIM}")  # fmt: skip
    with bounds_check_restored():
        for label, fn in cases(device, args.backend):
            print(f"  {label:40s} {median_and_spread(per_call_seconds(fn, device, args.calls, args.rounds), 'us')} us", flush=True)


if __name__ == "__main__":
    main()
