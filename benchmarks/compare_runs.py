"""Bench runs side by side: each case's median in every run, and its ratio to the first run's.

    python benchmarks/compare_runs.py BASE.json OTHER.json [...] [--labels main variant ...]

Each file is a report of `python -m fusedemb.bench --json`. A case is a row's problem, implementation
and pass (config, B, dtype, ids, impl, pass). The table has one row per case of the first file: its
median in each run, then each later run's median over the first's (below 1: faster than the first).
A case that a run lacks, or did not time (a status other than ok: a gate mismatch, say), shows "-".

This is how kernel variants prepared without a GPU are judged in one GPU session (gpu_session.sh's
variants step: the same bench, once per variant, each in a process that imports that variant's
fusedemb): runs of one machine, one after the other. Each run's copy bandwidth is printed above the
table, so that a machine drifting between runs shows; ratios within a few percent are noise there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CASE_FIELDS = ("config", "batch", "dtype", "ids", "impl", "pass")


def load_run(path: Path) -> dict:
    """A bench report, or an error that names the file and what is wrong with it."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a bench report: {error}") from None
    if not isinstance(report, dict) or report.get("schema_version") != 1 or not isinstance(report.get("results"), list):
        raise ValueError(f"{path}: not a report of python -m fusedemb.bench --json (schema_version 1)")
    return report


def medians(report: dict) -> dict[tuple, float | None]:
    """Case -> median seconds (None where the case was not timed)."""
    return {
        tuple(result.get(field) for field in CASE_FIELDS): result["median_s"] if result.get("status") == "ok" else None
        for result in report["results"]
    }


def format_comparison(labels: list[str], reports: list[dict]) -> str:
    lines = [f"{label}: copy bandwidth {report['copy_bandwidth_gbps']:.1f} GB/s, fusedemb "
             f"{report['environment'].get('fusedemb_commit') or 'commit unknown'}"
             for label, report in zip(labels, reports)]  # fmt: skip
    runs = [medians(report) for report in reports]
    header = [*CASE_FIELDS, *(f"{label} us" for label in labels), *(f"{label} / {labels[0]}" for label in labels[1:])]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, base in runs[0].items():
        times = [run.get(case) for run in runs]
        cells = [str(value) for value in case]
        cells += ["-" if seconds is None else f"{seconds * 1e6:.1f}" for seconds in times]
        cells += ["-" if base is None or seconds is None else f"{seconds / base:.3f}" for seconds in times[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN.json", help="bench reports, the first the base")
    parser.add_argument("--labels", nargs="+", help="a name per run (default: the files' names without .json)")
    args = parser.parse_args(argv)
    labels = args.labels or [path.stem for path in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    try:
        reports = [load_run(path) for path in args.runs]
    except ValueError as error:
        parser.error(str(error))
    print(format_comparison(labels, reports))


if __name__ == "__main__":
    main()
