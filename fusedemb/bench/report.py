"""The results of a run as a table (markdown, readable in a terminal too) and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusedemb.bench.runner import BASELINES, Result
from fusedemb.bench.timing import CudaTimer, TimingStats

SCHEMA_VERSION = 1


@dataclass
class Report:
    environment: dict[str, object]
    settings: dict[str, object]
    copy_bandwidth: float  # bytes/s, measured before the sweep: the % copy column's
    skipped: dict[str, str]  # implementation -> why it could not run
    results: list[Result]
    copy_bandwidth_end: float | None = None  # bytes/s, measured after it (None: interrupted)

    def to_json(self) -> dict[str, object]:
        return {
            "schema_version": SCHEMA_VERSION,
            "environment": self.environment,
            "settings": self.settings,
            "copy_bandwidth_gbps": self.copy_bandwidth / 1e9,
            "copy_bandwidth_end_gbps": None if self.copy_bandwidth_end is None else self.copy_bandwidth_end / 1e9,
            "skipped": self.skipped,
            "results": [result.to_dict() for result in self.results],
        }


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


COLUMNS = ("config", "dtype", "ids", "B", "pass", "impl", "median", "±", "host", "GB/s", "% copy",
           *(f"vs {baseline}" for baseline in BASELINES), "peak extra")
LEGEND = (
    "median: time per call, the device's on a GPU, wall time on a CPU (fusedemb.bench.timing); "
    "±: half the interquartile range, relative; host: the host's time to queue (GPU) or run (CPU) "
    "one call; GB/s: the bytes model (fusedemb.bench.bytes_model) over the median; % copy: that "
    "over the copy bandwidth above; vs X: X's median over this one's (above 1: faster than X); "
    "peak extra: the most memory the pass held at once beyond its inputs."
)
# The marks of GPU medians (_hold_mark), legend of GPU tables only: a CPU table never has them.
GPU_MARKS_LEGEND = (
    f"*: a GPU call that waits for the GPU (the id range check) or takes the host over {CudaTimer.FIRST_HOLD_S * 1e3:g} ms, "
    "timed without the hold, so its median includes the GPU's idling and compares with others' "
    "device times as unlike quantities; "
    "!: the host outran the hold on some calls (the GPU may have idled inside the timed region)."
)


def _copy_of(settings: dict) -> str:
    mib = settings.get("copy_buffer_mib")
    return "dst.copy_(src)" if mib is None else f"dst.copy_(src) of {mib:g} MiB"


def _flush_line(settings: dict) -> list[str]:
    mib = settings.get("cache_flush_mib")
    done = {"write": "overwritten", "read": "read"}[settings.get("cache_flush", "write")]
    return [] if mib is None else [f"cache flush: {mib:g} MiB {done} before every timed call"]


def _device_description(env: dict) -> str:
    capability = env.get("device_capability")  # (absent from reports written before it was recorded)
    return env["device_name"] + (f", {capability}" if capability else "")


def format_table(report: Report) -> str:
    """Header lines, one table row per result, then why anything was skipped or not timed."""
    env = report.environment
    lines = [
        f"device: {env['device']} ({_device_description(env)}), {env['torch_threads']} torch threads; "
        f"torch {env['torch']}, triton {env['triton']}, fusedemb {env.get('fusedemb_commit') or env['fusedemb']}",
        f"copy bandwidth: {report.copy_bandwidth / 1e9:.1f} GB/s before the sweep (% copy's)"
        + ("" if report.copy_bandwidth_end is None else f", {report.copy_bandwidth_end / 1e9:.1f} GB/s after it")
        + f" ({_copy_of(report.settings)}, bytes read + written)",
        *_flush_line(report.settings),
        _load_line(env),
        f"fusedemb id range check: {'on' if report.settings.get('bounds_check', True) else 'off'}"
        + (" (the C++ kernels check the ids themselves either way)" if env["device"] == "cpu" else ""),
        "",
        *_markdown_table(COLUMNS, [_row(result) for result in report.results]),
        "",
        LEGEND + (" " + GPU_MARKS_LEGEND if env["device"] == "cuda" else ""),
    ]
    notes = {
        f"{result.impl} on {result.problem.label}: {result.status}: {result.note}": None
        for result in report.results
        if result.status != "ok"
    }  # a dict keeps order and drops the repeats across passes
    if notes:
        lines += ["", "not timed:", *(f"  {note}" for note in notes)]
    if suspect := _backward_slower_than_forward_and_backward(report.results):
        lines += ["", "suspect (a backward alone slower than forward+backward: drift or noise; rerun):",
                  *(f"  {line}" for line in suspect)]  # fmt: skip
    if report.settings.get("quick"):
        lines += ["", "--quick: few repeats and a small copy buffer: a smoke test, not a measurement"]
    if report.skipped:
        lines += ["", "skipped:", *(f"  {name}: {reason}" for name, reason in report.skipped.items())]
    if not report.settings.get("complete", True):
        lines += ["", "interrupted: the rows above are what finished before it"]
    return "\n".join(lines)


def _backward_slower_than_forward_and_backward(results: list[Result]) -> list[str]:
    """Rows whose backward alone took longer than forward+backward of the same implementation
    and problem, beyond both spreads: impossible for the work, so the machine moved under them."""
    timed = {(r.problem.label, r.impl, r.pass_name): r.timing for r in results if r.status == "ok"}
    suspect = []
    for (label, impl, pass_name), alone in timed.items():
        both = timed.get((label, impl, "forward+backward"))
        if pass_name == "backward" and both is not None and alone.p25_s > both.p75_s:
            suspect.append(f"{impl} on {label}: backward {_format_seconds(alone.median_s)}, "
                           f"forward+backward {_format_seconds(both.median_s)}")  # fmt: skip
    return suspect


def _load_line(env: dict[str, object]) -> str:
    """The CPU's state at the start: what else ran, and the page settings that change CPU results."""
    load = env.get("load_average")
    line = f"load average {load:.2f} on {env.get('cpu_count')} CPUs at the start" if load is not None else "load average unknown"
    if env["device"] == "cpu":
        settings = env.get("env") or {}
        line += (f"; transparent huge pages {env.get('transparent_hugepage') or 'unknown'}, "
                 f"THP_MEM_ALLOC_ENABLE={settings.get('THP_MEM_ALLOC_ENABLE') or 'unset'}")  # fmt: skip
    return line


def _row(result: Result) -> list[str]:
    problem = result.problem
    identity = [problem.config.name, problem.dtype_name, problem.ids.label, str(problem.batch),
                result.pass_name, result.impl]
    if result.status != "ok":
        return [*identity, result.status.upper()] + ["-"] * (len(COLUMNS) - len(identity) - 1)
    return [
        *identity,
        _format_seconds(result.timing.median_s) + _hold_mark(result.timing),
        f"{100 * result.timing.spread:.1f}%",
        _format_seconds(result.timing.host_median_s),
        f"{result.gbps:.1f}",
        f"{100 * result.copy_fraction:.0f}%",
        *(f"{result.speedup[b]:.2f}x" if b in result.speedup else "-" for b in BASELINES),
        f"{result.peak_extra_bytes / 2**20:.1f} MiB",
    ]


def _hold_mark(timing: TimingStats) -> str:
    """'*' for a GPU call timed without the hold, '!' for one that outran it (LEGEND)."""
    if timing.held is False:
        return "*"
    return "!" if timing.hold_outruns else ""


def _format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]
