"""What the id range check costs inside a GPT training step, and on its own.

    python benchmarks/range_check_cost.py [--device cuda] [--config tiny gpt2-124M] [--batch 4]

On CUDA the range check waits for the GPU each call (fusedemb/validation.py, RangeCheck), so
the host loses its lead over the GPU. How much that costs depends on what else the step does:
this prints the median time of one training step (zero_grad, forward, cross-entropy, backward,
AdamW) of examples/gpt_model.py with its first layer as nn.Embedding, as fusedemb with the
check on and as fusedemb with it off, timed two ways:

  synced  synchronise, one step, synchronise (as examples/train_gpt.py times its steps);
  queued  --queued steps back to back, one `loss.item()` at the end (the host runs ahead).

The three take turns within each round, starting one later each round, so that none is timed
on a warmer machine than the others; `±` is half the interquartile range over the rounds.
First it prints the round trip of the check alone: the wall time of a forward plus a
synchronisation on an idle device, check on, off, on, off (the repeat shows the drift), called
eagerly and compiled (a graph checks by an operator, fusedemb::range_checked, which waits for
the GPU before the forward is queued rather than after).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fusedemb
from fusedemb.bench.cli import add_device_argument, bounds_check_restored, check_device, int_at_least, positive_int
from fusedemb.bench.timing import median_and_spread, synchronize

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
from gpt_model import CONFIGS, GPTModel  # noqa: E402
from train_gpt import training_step  # noqa: E402


def time_round_trip(device: torch.device, config_name: str, batch: int, repeats: int) -> None:
    """A forward of that config's tables at that batch on an idle device: wall time of the call plus a sync."""
    config = CONFIGS[config_name]
    tok = torch.randn(config.vocab_size, config.emb_dim, device=device)
    pos = torch.randn(config.context_length, config.emb_dim, device=device)
    ids = torch.randint(0, config.vocab_size, (batch, config.context_length), device=device)
    print(f"forward alone, {config_name} B{batch} float32, idle {device.type}: median wall time of call + sync")
    forwards = {"eager": fusedemb.fused_embedding, "torch.compile": torch.compile(fusedemb.fused_embedding, fullgraph=True)}
    for label, forward in forwards.items():
        for check in (True, False, True, False):
            fusedemb.set_bounds_check(check)  # (torch.compile: one graph with the check, one without)
            forward(ids, tok, pos)  # warm-up (compilation, allocator)
            times = []
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                forward(ids, tok, pos)
                synchronize(device)
                times.append(time.perf_counter() - start)
            print(f"  {label:13s} check {'on ' if check else 'off'} {1e6 * statistics.median(times):9.1f} us")


def time_training_steps(device: torch.device, config_name: str, batch: int, rounds: int, queued: int) -> None:
    config = CONFIGS[config_name]
    models = {}
    for fused in (False, True):
        torch.manual_seed(0)  # the same weights for both
        model = GPTModel(config, fused).to(device).train()
        models[fused] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    generator = torch.Generator(device=device).manual_seed(1)
    inputs, targets = (
        torch.randint(0, config.vocab_size, (batch, config.context_length), device=device, generator=generator)
        for _ in range(2)
    )
    # (label, fused first layer, range check)
    contenders = [("nn.Embedding", False, True), ("fusedemb check on", True, True), ("fusedemb check off", True, False)]
    synced = {label: [] for label, *_ in contenders}
    queued_steps = {label: [] for label, *_ in contenders}
    for round_index in range(rounds + 1):  # round 0 warms up and is not counted
        turn = round_index % len(contenders)
        for label, fused, check in contenders[turn:] + contenders[:turn]:
            fusedemb.set_bounds_check(check)
            model, optimizer = models[fused]
            synchronize(device)
            start = time.perf_counter()
            training_step(model, optimizer, inputs, targets)
            synchronize(device)
            synced_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(queued):
                loss = training_step(model, optimizer, inputs, targets)
            loss.item()
            if round_index:
                synced[label].append(synced_seconds)
                queued_steps[label].append((time.perf_counter() - start) / queued)
    print(f"{config_name}, batch {batch} x {config.context_length}, {device.type}, {rounds} rounds: ms per step")
    for label, *_ in contenders:
        print(f"  {label:20s} synced {median_and_spread(synced[label], 'ms')}   queued x{queued} "
              f"{median_and_spread(queued_steps[label], 'ms')}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser, "; cpu only tries the script")
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["tiny", "gpt2-124M"])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[4], help="sequences per step")
    parser.add_argument("--rounds", type=positive_int, default=8, help="timed rounds (each times all three once)")
    parser.add_argument("--queued", type=positive_int, default=5, help="steps queued back to back per round")
    parser.add_argument("--round-trips", type=int_at_least(0), default=200, help="forwards timed for the round trip, 0: none")
    parser.add_argument("--round-trip-config", choices=sorted(CONFIGS), default="gpt2-124M")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    device = torch.device(args.device)
    with bounds_check_restored():
        if args.round_trips:
            time_round_trip(device, args.round_trip_config, 8, args.round_trips)
        for config_name in args.config:
            for batch in args.batch:
                time_training_steps(device, config_name, batch, args.rounds, args.queued)


if __name__ == "__main__":
    main()
