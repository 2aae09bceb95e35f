"""The figure: achieved GB/s against problem size, one line per implementation, one panel per pass.

The device's copy bandwidth is drawn across each panel: the ceiling of a memory-bound kernel,
so the distance from it is the headroom left. matplotlib is imported here only, and through its
object API (no pyplot), so plotting neither needs a display nor changes global state.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fusedemb.bench.report import Report

# Each variant of the varying fields gets a line style and a marker: the marker tells the
# variants apart where a run has one problem size per line (a dot, no line to style). Eleven
# markers against four styles, coprime, so the first 44 variants each get a pair of their own.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def plot_suffixes() -> tuple[str, ...]:
    """The file suffixes savefig can write here (it picks a format by the suffix), for the CLI to
    refuse another before a sweep rather than after it. Not pgf: it needs a TeX installation,
    and would fail after the sweep where none is."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(f".{suffix}" for suffix in FigureCanvasBase.get_supported_filetypes() if suffix != "pgf")


def plot_report(report: Report, path: Path):
    """Draw the report's timed results and save the figure to path; the matplotlib Figure is
    returned too."""
    from matplotlib.figure import Figure

    timed = [result for result in report.results if result.status == "ok"]
    passes = list(dict.fromkeys(result.pass_name for result in timed)) or ["forward"]
    # Lines are told apart by implementation, plus whichever problem fields vary in this run.
    varying = [
        key
        for key in ("config", "dtype", "ids")
        if len({result.problem.describe()[key] for result in timed}) > 1
    ]

    # One colour per implementation, one (line style, marker) per variant of the varying fields.
    impls = list(dict.fromkeys(result.impl for result in timed))
    variants = list(dict.fromkeys(_variant(result, varying) for result in timed))
    colors = {impl: f"C{index % 10}" for index, impl in enumerate(impls)}
    styles = {
        variant: (LINE_STYLES[index % len(LINE_STYLES)], MARKERS[index % len(MARKERS)])
        for index, variant in enumerate(variants)
    }

    figure = Figure(figsize=(5 * len(passes) + 2.5, 4.2), layout="constrained")
    axes = figure.subplots(1, len(passes), squeeze=False)[0]
    for ax, pass_name in zip(axes, passes):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for result in timed:
            if result.pass_name == pass_name:
                lines[result.impl, _variant(result, varying)].append((result.problem.tokens, result.gbps))
        for (impl, variant), points in lines.items():
            tokens, gbps = zip(*sorted(points))
            linestyle, marker = styles[variant]
            ax.plot(tokens, gbps, marker=marker, color=colors[impl], linestyle=linestyle,
                    label=f"{impl} {variant}".strip())
        ax.axhline(report.copy_bandwidth / 1e9, color="black", linewidth=2, alpha=0.4, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per batch (B*T)")
        ax.set_ylabel("achieved GB/s (bytes model)")
        ax.set_title(pass_name)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize="small")  # clear of the title
    env = report.environment
    # A plot travels without its table: it names what the table's header does, the commit, and a
    # --quick run's status (a smoke test's figures look like a measurement's otherwise).
    source = env.get("fusedemb_commit") or env["fusedemb"]
    quick = "; --quick: a smoke test, not a measurement" if report.settings.get("quick") else ""
    figure.suptitle(f"fusedemb {source} on {env['device_name']} ({env['device']}, torch {env['torch']}){quick}")
    figure.savefig(path, dpi=120)
    return figure


def _variant(result, varying: list[str]) -> str:
    fields = result.problem.describe()
    return " ".join(str(fields[key]) for key in varying)
