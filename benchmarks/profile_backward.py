"""Where a fused forward+backward spends its time, kernel by kernel, on a CUDA device.

    python benchmarks/profile_backward.py [--preset gpt2-124M] [--batch 8] [--dtype float32] [--ids same]

For each token-gradient mode it prints torch.profiler's table of GPU kernels (time on the device)
next to the wall time per call, so that time the GPU spends waiting for the host (launches from
Python) shows up as the difference between the two; then where the host's time goes: the Python
functions that take the most of it (cProfile, own time), for a step queued while the GPU is held
busy so that no function's time includes waiting for the device.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusedemb
from fusedemb.bench.cli import add_device_argument, bounds_check_restored, check_device, id_distribution, positive_int
from fusedemb.bench.configs import DTYPES, PRESETS, Problem
from fusedemb.bench.ids import parse_distribution
from fusedemb.bench.passes import make_inputs
from fusedemb.bench.timing import synchronize as synchronize_device

REPEATS = 20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124M", choices=list(PRESETS))
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--ids", type=id_distribution, default=parse_distribution("uniform"), metavar="SPEC",
                        help="id distribution: uniform, zipf:S, same, text:FILE (as in python -m fusedemb.bench)")  # fmt: skip
    add_device_argument(parser, "; cpu only tries the script")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    with bounds_check_restored():
        fusedemb.set_bounds_check(False)  # the profile shows the kernels, not the range check's sync
        profile_both_modes(args, torch.device(args.device))


def profile_both_modes(args, device: torch.device) -> None:
    inputs = make_inputs(Problem(PRESETS[args.preset], args.batch, DTYPES[args.dtype], args.ids), device.type, seed=0)
    tables = (inputs.tok_weight, inputs.pos_weight)
    # The C++ CPU backward has one mode only; on CPU both rows show it.
    for deterministic in (False, True):

        def step(deterministic=deterministic):
            out = fusedemb.fused_embedding(inputs.ids, *tables, deterministic=deterministic)
            return torch.autograd.grad(out, tables, inputs.grad_out)

        for _ in range(3):  # compile and warm up
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        synchronize = functools.partial(synchronize_device, device)
        synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(REPEATS):
                step()
            synchronize()
        wall_us = (time.perf_counter() - start) / REPEATS * 1e6
        mode = "deterministic" if deterministic else "fast"
        print(f"\n== {args.preset} B{args.batch} {args.dtype} {args.ids.label} ids, {mode} mode: {wall_us:.0f} us wall per step "
              f"(profiled) ==")
        sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=15))
        print_host_profile(step, synchronize, device)


def print_host_profile(step, synchronize, device) -> None:
    host_profile = cProfile.Profile()
    seconds = 0.0
    for _ in range(REPEATS):
        synchronize()
        if device.type == "cuda":
            torch.cuda._sleep(100_000_000)  # ~50 ms: the GPU is busy until all of the step is queued
        start = time.perf_counter()
        host_profile.enable()
        step()
        host_profile.disable()
        seconds += time.perf_counter() - start
    synchronize()
    print(f"host time per step, queued onto a busy GPU, under cProfile: {seconds / REPEATS * 1e6:.0f} us")
    pstats.Stats(host_profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
