"""The tiles around the forward's and the fast backward's chosen ones, timed side by side.

    python benchmarks/tile_sweep.py [--preset gpt2-124M] [--batch 32 ...] [--dtype float32 bfloat16]
        [--ids uniform] [--kernel forward sweep] [--row-factors 0.5 1 2 4] [--warps 4 8] [--quick]

A Triton kernel tuned by tile has one function that picks the tile (rows and columns per
program, warps) from the problem's sizes: forward_tile in fusedemb/kernels/forward.py, sweep_tile
in fusedemb/kernels/backward.py. For each kernel and dtype this swaps that function for one that
returns a candidate, the chosen tile's rows times each of --row-factors with each of --warps (the
chosen tile's columns), and for each candidate checks the results against fusedemb.reference
(fusedemb.bench's gate) and then prints its device time and bytes-model GB/s as a fraction of the
copy bandwidth measured in the same run, and its time over the chosen tile's. That is the data
for changing a rule, which is then changed in its function, where launchers and tests read it.
On a GPU it first times an empty kernel the same way: the floor under any one-kernel call's time.

- forward: the bench's forward pass (forward_tile's kernel is the whole of it).
- sweep: the bench's backward pass in the fast mode, where sweep_batch_kernel adds the token
  gradient with atomics while it sums the position gradient (only the token-adding sweep takes
  the candidate). Where the fast mode sorts instead (16-bit tables with many tokens:
  fast_mode_sorts), that kernel does not run and the row is left out.

Each candidate is a kernel of its own, compiled on its first call (outside the timed calls).
"""

from __future__ import annotations

import argparse
import functools
from unittest import mock

import torch

import fusedemb
from fusedemb.bench.cli import (
    add_device_argument,
    bounds_check_restored,
    check_device,
    copy_buffer_mib,
    id_distribution,
    positive_int,
)
from fusedemb.bench.configs import DTYPES, PRESETS, Problem
from fusedemb.bench.gate import check_against_reference
from fusedemb.bench.ids import parse_distribution
from fusedemb.bench.passes import bytes_moved, make_inputs, make_pass
from fusedemb.bench.timing import copy_bandwidth, make_timer
from fusedemb.kernels import INTERPRETED, backward, forward
from fusedemb.kernels.common import Tile

KERNELS = ("forward", "sweep")


# Row factors from 1/256 to 64: Triton's blocks are powers of two, of at most 2^20 elements, and
# a chosen tile has at most 4096 (TILE_ELEMENTS; fewer rows than that keeps it further below).
ROW_FACTORS = [2.0**k for k in range(-8, 7)]
# Warps per program: powers of two, at most 32 (1024 threads, CUDA's limit per block).
WARPS = [1, 2, 4, 8, 16, 32]


def row_factor(text: str) -> float:
    """An argparse type: one of ROW_FACTORS. (A factor below 1 may still round a chosen tile of
    few rows up to 1 row.)"""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value not in ROW_FACTORS:
        raise argparse.ArgumentTypeError(f"must be a power of two from 1/256 to 64 (0.5, 1, 2, ...), got {text}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124M", choices=list(PRESETS))
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[32])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--ids", type=id_distribution, default=parse_distribution("uniform"), metavar="SPEC",
                        help="id distribution: uniform, zipf:S, same, text:FILE "
                             "(as in python -m fusedemb.bench)")  # fmt: skip
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--row-factors", type=row_factor, nargs="+", default=[0.5, 1, 2, 4], metavar="F",
                        help="candidate rows per program: the chosen tile's times F (rounded, at least 1)")  # fmt: skip
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], choices=WARPS, metavar="W",
                        help=f"candidate warps per program, of {WARPS}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke tests)")
    add_device_argument(parser, "; cpu only tries the script, in Triton's interpreter (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.device == "cpu" and not INTERPRETED:
        parser.error("--device cpu runs the Triton kernels in Triton's interpreter: start with TRITON_INTERPRET=1")
    timer = make_timer(args.device, quick=args.quick)
    bandwidth = copy_bandwidth(timer, args.device, copy_buffer_mib(args.device, args.quick) * 2**20)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (bytes read + written)")
    if args.device == "cuda":
        # The floor under every row's time: one kernel that does nothing (a spin of 0 cycles),
        # timed as the rows are (flush, hold, events). Part of any one-kernel call's fixed cost.
        empty = timer.measure(lambda: torch.cuda._sleep(0)).median_s
        print(f"an empty kernel, timed the same way: {empty * 1e6:.1f} us")
    mismatches = 0
    with bounds_check_restored():
        fusedemb.set_bounds_check(False)  # the kernels' time, not the range check's sync
        for kernel in args.kernel:
            for dtype_name in args.dtype:
                for batch in args.batch:
                    problem = Problem(PRESETS[args.preset], batch, DTYPES[dtype_name], args.ids)
                    mismatches += sweep_tiles(kernel, problem, args, timer, bandwidth)
    if mismatches:
        raise SystemExit(f"{mismatches} candidate tiles computed wrong results (see above)")


def candidates(chosen: Tile, row_factors: list[float], warps: list[int]) -> list[Tile]:
    """The chosen tile first, then every other (rows, warps) of the factors, in order."""
    rows = dict.fromkeys(max(1, round(chosen.rows * factor)) for factor in row_factors)
    tiles = [Tile(row, chosen.columns, warp) for row in rows for warp in dict.fromkeys(warps)]
    return [chosen] + [tile for tile in tiles if tile != chosen]


def sweep_tiles(kernel: str, problem: Problem, args, timer, bandwidth: float) -> int:
    """Times `kernel`'s candidate tiles on `problem`; returns how many failed the gate."""
    config = problem.config
    inputs = make_inputs(problem, args.device, seed=0)
    title = f"== {kernel}, {problem.config.name} B{problem.batch} {problem.dtype_name} {problem.ids.label} ids"
    if kernel == "forward":
        chosen = forward.forward_tile(config.dim)
        pass_name = "forward"
    else:
        if backward.fast_mode_sorts(inputs.ids.numel(), config.dim, problem.dtype):
            print(f"{title}: the fast mode sorts here, no sweep adds the token gradient ==")
            return 0
        chosen = backward.sweep_tile(config.dim, True, problem.dtype)
        pass_name = "backward"
    model_bytes = bytes_moved(pass_name, inputs)
    print(f"{title} ({pass_name} pass, {model_bytes / 1e6:.3g} MB by the bytes model) ==")
    print(f"{'rows':>5} {'columns':>7} {'warps':>5} {'us':>9} {'% copy':>7} {'/ chosen':>9}")
    run = functools.partial(fusedemb.fused_embedding, backend="triton", deterministic=False)
    chosen_s = None
    failed = 0
    for tile in candidates(chosen, args.row_factors, args.warps):
        with tile_patched(kernel, tile):
            result = check_against_reference(run, inputs, gradients=kernel == "sweep")
            if not result.passed:
                print(f"{tile.rows:>5} {tile.columns:>7} {tile.warps:>5} mismatch: {result.detail}")
                failed += 1
                continue
            timed = make_pass(pass_name, run, inputs)
            seconds = timer.measure(timed.run, timed.setup).median_s
        if tile == chosen:
            chosen_s = seconds
        ratio = f"{seconds / chosen_s:>9.2f}" if chosen_s else f"{'-':>9}"  # (- where the chosen tile failed)
        print(f"{tile.rows:>5} {tile.columns:>7} {tile.warps:>5} {seconds * 1e6:>9.1f} "
              f"{model_bytes / seconds / bandwidth:>7.0%} {ratio}" + ("  (chosen)" if tile == chosen else ""))
    return failed


def tile_patched(kernel: str, tile: Tile):
    """A context in which `kernel`'s launcher takes `tile` (the position sums keep their own)."""
    if kernel == "forward":
        return mock.patch.object(forward, "forward_tile", lambda dim: tile)
    chosen = backward.sweep_tile

    def sweep_tile(dim, add_to_table, grad_dtype):
        return tile if add_to_table else chosen(dim, add_to_table, grad_dtype)

    return mock.patch.object(backward, "sweep_tile", sweep_tile)


if __name__ == "__main__":
    main()
