"""Where torch.sort overtakes the counting sort in ordering the deterministic backward's ids.

    python benchmarks/sort_crossover.py [--device cuda] [--vocab V ...] [--tokens N ...] [--quick]

The deterministic token gradient first orders the N ids by table row (sort_by_row in
fusedemb/kernels/sorted_scatter.py). Its counting sort keeps counts of V * ceil(N / CHUNK)
cells, so its cost grows as V * N; past COUNTING_SORT_MAX_CELLS cells torch.sort takes over.
For the vocabularies of the benchmark presets and N from 8k to 256k tokens of uniform ids this
prints the device time of both ways (fusedemb.bench's timer) beside the cell count, the data
for placing that threshold.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from fusedemb.bench.cli import add_device_argument, check_device, positive_int
from fusedemb.bench.timing import make_timer
from fusedemb.kernels import INTERPRETED
from fusedemb.kernels.common import cdiv
from fusedemb.kernels.sorted_scatter import CHUNK, COUNTING_SORT_MAX_CELLS, counting_sort_by_row, library_sort_by_row

VOCABS = (50257, 128256)  # gpt2 and large-vocab presets
TOKENS = (8192, 16384, 32768, 65536, 131072, 262144)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser, "; cpu only tries the script, in Triton's interpreter (TRITON_INTERPRET=1)")
    parser.add_argument("--vocab", type=positive_int, nargs="+", default=VOCABS, help="table rows V")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=TOKENS, help="ids N")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke tests)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.device == "cpu" and not INTERPRETED:
        parser.error("--device cpu runs the Triton kernels in Triton's interpreter: start with TRITON_INTERPRET=1")
    timer = make_timer(args.device, quick=args.quick)
    print(f"threshold: COUNTING_SORT_MAX_CELLS = {COUNTING_SORT_MAX_CELLS} cells (CHUNK {CHUNK})")
    print(f"{'V':>7} {'N':>7} {'cells':>11} {'counting us':>12} {'torch.sort us':>14} {'counting / sort':>16}")
    for vocab in args.vocab:
        for num_tokens in args.tokens:
            ids = torch.randint(0, vocab, (num_tokens,), device=args.device)
            counting = timer.measure(partial(counting_sort_by_row, ids, vocab)).median_s
            library = timer.measure(partial(library_sort_by_row, ids, vocab)).median_s
            cells = vocab * cdiv(num_tokens, CHUNK)
            print(f"{vocab:>7} {num_tokens:>7} {cells:>11} {counting * 1e6:>12.1f} {library * 1e6:>14.1f} "
                  f"{counting / library:>16.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
