"""``python -m fusedemb.bench`` (also ``fusedemb-bench``): compare fusedemb with PyTorch.

Examples:

    python -m fusedemb.bench                                   # defaults, a minute or two
    python -m fusedemb.bench --device cuda --preset gpt2-124M large-vocab --dtype float32 bfloat16 \\
        --batch 4 16 64 --ids uniform zipf:1.1 same text:../shared/data/the-verdict.txt \\
        --json bench.json --plot bench.png
    python -m fusedemb.bench --device cpu --vocab 8192 --dim 256 --seq 128 --batch 1 8 --quick
    python -m fusedemb.bench --preset tiny --batch 1 --quick  # a smoke test in seconds

The exit status is 0 when every implementation asked for (by --impl, or by default) was timed;
1 when one could not run here (listed under "skipped:" with the reason), failed the correctness
gate or raised (the table says which and why); 2 for a bad argument, before anything runs;
130 when the sweep was cut short by Ctrl-C or SIGTERM (what `timeout` sends): what finished by
then is still printed, written and plotted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fusedemb.bench import implementations
from fusedemb.bench.bytes_model import PASSES
from fusedemb.bench.configs import DEFAULT_PRESET, DTYPES, PRESETS, resolve_configs, sweep
from fusedemb.bench.environment import describe_environment, warn_if_cpu_busy
from fusedemb.bench.ids import parse_distribution
from fusedemb.bench.plot import plot_report, plot_suffixes
from fusedemb.bench.report import Report, format_table, write_json
from fusedemb.bench.runner import Runner
from fusedemb.bench.timing import CACHE_FLUSHES, bytes_beyond_cache, copy_bandwidth, make_timer
from fusedemb.data import load_gpt2_tokenizer, use_checkout_tiktoken_cache
from fusedemb.validation import bounds_check_enabled, set_bounds_check

# Defaults sized so that a bare run takes about a minute: on a GPU three batch sizes from 4k to
# 64k tokens at gpt2-124M; on a CPU two small ones (the CPU is 100x slower, and compiling for
# each shape is most of the minute).
DEFAULT_BATCHES = {"cuda": [4, 16, 64], "cpu": [1, 4]}
DEFAULT_IDS = ["uniform", "zipf:1.1"]
# Copy-bandwidth buffers, far larger than the last-level cache (L2 on a GPU, L3 on a CPU), or
# larger still on a CPU with a large L3 (copy_buffer_mib).
COPY_BUFFER_MIB = {"cuda": 1024, "cpu": 256}
QUICK_COPY_BUFFER_MIB = {"cuda": 256, "cpu": 64}
INTERRUPTED_STATUS = 130  # 128 + SIGINT, the shell's status for a command stopped by Ctrl-C


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for a non-integer
    return parse


positive_int = int_at_least(1)

# The seeds torch.Generator.manual_seed takes: anything in 64 bits, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def seed(text: str) -> int:
    """An argparse type: a seed torch.Generator.manual_seed takes. Checked now: make_inputs seeds
    a generator per problem, so a seed out of range would only fail after the start-up, as an
    error row for every problem (exit 1, where a bad argument exits 2)."""
    value = int(text)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from -2**63 to 2**64 - 1 (a 64-bit seed), got {value}")
    return value


seed.__name__ = "int"  # argparse names the type in its message for a non-integer


@contextlib.contextmanager
def bounds_check_restored() -> Iterator[None]:
    """Puts the id range check's switch back as it was when the block ends, for a script that flips
    it (as run by the tests, in their own process)."""
    was_on = bounds_check_enabled()
    try:
        yield
    finally:
        set_bounds_check(was_on)


def text_file(path: str) -> str:
    """An argparse type: the contents of a UTF-8 text file, which must have some (an empty
    one tokenizes to no ids). A usage error, not a traceback, for one that cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from None
    if not text:
        raise argparse.ArgumentTypeError(f"{path} is empty")
    return text


def add_device_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--device cpu|cuda, cuda by default where torch sees one; check_device after parsing."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available)" + note)  # fmt: skip


def check_output_path(parser: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """A file the run will write, checked now, not after a sweep that may have taken an hour
    of GPU time: opened for appending, which only a writable path allows (a file this makes is
    removed again; os.access would answer yes to root for any path)."""
    if not path.parent.is_dir():
        parser.error(f"{flag} {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        parser.error(f"{flag} {path}: a folder, not a file")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as error:
        parser.error(f"{flag} {path}: cannot be written ({error.strerror})")
    if not existed:
        path.unlink()


def require_gpt2_tokenizer(parser: argparse.ArgumentParser) -> None:
    """A usage error, not a traceback chained through tiktoken's download attempt, where the
    gpt2 encoding cannot be loaded (no tiktoken, no network and no cache). Points
    TIKTOKEN_CACHE_DIR at the checkout's cache first, unless the caller set it."""
    use_checkout_tiktoken_cache()
    try:
        load_gpt2_tokenizer()  # tiktoken keeps the loaded encoding: the tool's own call is free
    except (ImportError, RuntimeError) as error:
        parser.error(str(error))


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """A usage error, not a traceback, for --device cuda on a machine without one."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fusedemb-bench",
        description="Time fusedemb's fused embedding against PyTorch eager and torch.compile: "
        "forward, backward and both, as achieved GB/s and the fraction of the device's copy bandwidth.",
        epilog=__doc__.split("\n\n", 1)[1],  # the examples and the exit status
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_device_argument(parser)
    parser.add_argument("--preset", nargs="+", choices=list(PRESETS), metavar="NAME",
                        help=f"model presets: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})")
    parser.add_argument("--vocab", type=int, help="vocabulary size V, overriding the presets'")
    parser.add_argument("--dim", type=int, help="embedding width D, overriding the presets'")
    parser.add_argument("--seq", type=int, help="sequence length T (= position-table rows), overriding the presets'")
    parser.add_argument("--batch", nargs="+", type=positive_int, metavar="B",
                        help=f"batch sizes to sweep (default: {_per_device(DEFAULT_BATCHES)})")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                        help="table dtypes (default: float32)")
    parser.add_argument("--ids", nargs="+", type=id_distribution, default=[parse_distribution(s) for s in DEFAULT_IDS],
                        metavar="SPEC",
                        help=f"id distributions: uniform, zipf:S, same, text:FILE (default: {' '.join(DEFAULT_IDS)})")
    parser.add_argument("--impl", nargs="+", choices=implementations.NAMES, metavar="NAME",
                        help=f"implementations: {', '.join(implementations.NAMES)} (default: "
                        f"{_per_device({device: implementations.default_names(device) for device in DEFAULT_BATCHES})})")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES),
                        help="passes to time (default: all)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=seed, default=0, help="seed for ids and tables (default: 0)")
    parser.add_argument("--no-bounds-check", action="store_true",
                        help="time fusedemb with its id range check off (fusedemb.set_bounds_check(False)): "
                             "the maximum-speed setting; on CUDA the check costs a reduction and a sync per call "
                             "(the C++ kernels check the ids themselves either way)")
    parser.add_argument("--cache-flush", choices=CACHE_FLUSHES, default="write",
                        help="how the cache is flushed before every timed call: write (overwrite a buffer larger "
                             "than it, as triton.testing.do_bench; its dirty lines' write-back is charged to the "
                             "call) or read (read the buffer: the call's own traffic alone) (default: write)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and a smaller copy buffer: a smoke test, not a measurement")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="plot GB/s against problem size")
    args = parser.parse_args(argv)
    # A value given twice would be swept twice, and a baseline named twice (--impl eager eager)
    # would have the speedups of its first rows divided by its second's time: each once, in order.
    for name in ("preset", "batch", "dtype", "ids", "impl", "passes"):
        if (values := getattr(args, name)) is not None:
            setattr(args, name, list(dict.fromkeys(values)))
    # Rows and plot lines are told apart by label: a text's is its file's name only, a Zipf
    # exponent's is rounded (%g).
    labels = [distribution.label for distribution in args.ids]
    if clash := next((label for label in labels if labels.count(label) > 1), None):
        parser.error(f"--ids: two values would both read {clash} in the table and plot")

    check_device(parser, args.device)
    try:
        args.configs = resolve_configs(args.preset, args.vocab, args.dim, args.seq)
    except ValueError as error:
        parser.error(str(error))
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_path(parser, flag, path)
    if args.json is not None and args.plot is not None and args.json.resolve() == args.plot.resolve():
        parser.error(f"--json and --plot name the same file, {args.json}: the plot would overwrite the JSON")
    if args.plot is not None:
        try:
            suffixes = plot_suffixes()
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib (or this package's [bench] extra)")
        if args.plot.suffix.lower() not in suffixes:
            parser.error(f"--plot {args.plot}: the file name must end in one of {', '.join(suffixes)}")
    args.batch = args.batch or DEFAULT_BATCHES[args.device]
    args.impl = args.impl or implementations.default_names(args.device)
    return args


def _per_device(defaults: dict[str, list]) -> str:
    """A default that depends on the device, for a help text: '4 16 64 on cuda; 1 4 on cpu'."""
    return "; ".join(f"{' '.join(map(str, values))} on {device}" for device, values in defaults.items())


def id_distribution(spec: str):
    """An argparse type: an id distribution's spec (fusedemb.bench.ids.parse_distribution), its
    error a usage error that says what is wrong (argparse hides a ValueError's message)."""
    try:
        return parse_distribution(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def copy_buffer_mib(device: str, quick: bool) -> int:
    """MiB of the copy-bandwidth buffer. A full run's is never smaller than the cache flush's
    (twice the L3 of a CPU with more than 128 MiB of it: 960 MiB on one of this project's VMs,
    whose sysfs lists 480 MiB), so that the copy cannot run from the cache; --quick keeps its
    small preset (a smoke test, not a measurement)."""
    if quick:
        return QUICK_COPY_BUFFER_MIB[device]
    return max(COPY_BUFFER_MIB[device], math.ceil(bytes_beyond_cache(device) / 2**20))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_bounds_check:
        set_bounds_check(False)
    from tqdm.auto import tqdm  # here: it comes with the bench extra, and the demo imports this module without it

    problems = sweep(args.configs, args.batch, [DTYPES[name] for name in args.dtype], args.ids)
    available, skipped = implementations.build_implementations(args.impl, args.device)
    environment = describe_environment(args.device)  # before the sweep: its load average
    warn_if_cpu_busy(args.device)
    timer = make_timer(args.device, quick=args.quick, cache_flush=args.cache_flush)
    buffer_mib = copy_buffer_mib(args.device, args.quick)
    measure_copy = functools.partial(copy_bandwidth, timer, args.device, buffer_mib * 2**20)
    runner = Runner(args.device, timer, measure_copy(), args.passes, args.seed)

    results = []
    complete = interrupted = False
    copy_bandwidth_end = None
    # A long sweep cut short (Ctrl-C, or SIGTERM from `timeout`) still reports what it finished,
    # down to the implementations of the problem it was in: SIGTERM is turned into the
    # KeyboardInterrupt that Ctrl-C raises. Until the copy bandwidth after it is measured too
    # (seconds on a CPU with a large flush): stopped there, the sweep is reported without it.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tqdm(total=len(problems) * len(available), unit="impl", file=sys.stderr, disable=None) as progress:
            for problem in problems:
                progress.set_description(problem.label)
                runner.run_problem(problem, available, after_each=progress.update, into=results)
        complete = True
        # Again at the end: the distance between the two says how far the machine drifted during
        # the sweep (a VM's bandwidth can), which every % copy figure inherits.
        copy_bandwidth_end = measure_copy()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    report = Report(
        environment=environment,
        settings={
            "configs": [dataclasses.asdict(config) for config in args.configs],
            "batches": args.batch,
            "dtypes": args.dtype,
            "ids": [distribution.label for distribution in args.ids],
            "impls": args.impl,
            "passes": args.passes,
            "quick": args.quick,
            "seed": args.seed,
            "bounds_check": bounds_check_enabled(),  # the flag, or FUSEDEMB_BOUNDS_CHECK=0
            "copy_buffer_mib": buffer_mib,
            "cache_flush_mib": bytes_beyond_cache(args.device) / 2**20,  # the timer's CacheFlush
            "cache_flush": args.cache_flush,
            "complete": complete,
        },
        copy_bandwidth=runner.copy_bandwidth,
        copy_bandwidth_end=copy_bandwidth_end,
        skipped=skipped,
        results=results,
    )
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    if interrupted:
        return INTERRUPTED_STATUS
    return 0 if not skipped and all(result.status == "ok" for result in results) else 1
