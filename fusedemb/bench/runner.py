"""Runs the benchmark: for each problem and implementation, gate, then time and measure each pass."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from fusedemb.bench.configs import Problem
from fusedemb.bench.gate import gate
from fusedemb.bench.implementations import Implementation, describe_error
from fusedemb.bench.memory import peak_extra_bytes
from fusedemb.bench.passes import Inputs, bytes_moved, make_inputs, make_pass
from fusedemb.bench.timing import Timer, TimingStats

# The baselines every other implementation's time is divided by.
BASELINES = ("eager", "compile")


@dataclass
class Result:
    """One implementation on one problem for one pass.

    ``status`` is "ok" (timed), "mismatch" (failed the correctness gate: not timed) or "error"
    (raised, e.g. out of memory: not timed); ``note`` says why when it is not "ok".
    """

    problem: Problem
    impl: str
    pass_name: str
    status: str
    note: str = ""
    bytes: int | None = None
    timing: TimingStats | None = None
    gbps: float | None = None
    copy_fraction: float | None = None
    peak_extra_bytes: int | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # baseline name -> its time / ours

    def to_dict(self) -> dict[str, object]:
        timing = asdict(self.timing) if self.timing else {f.name: None for f in fields(TimingStats)}
        return {
            **self.problem.describe(),
            "impl": self.impl,
            "pass": self.pass_name,
            "status": self.status,
            "note": self.note,
            "bytes": self.bytes,
            **timing,
            "gbps": self.gbps,
            "copy_fraction": self.copy_fraction,
            "peak_extra_bytes": self.peak_extra_bytes,
            **{f"speedup_vs_{baseline}": self.speedup.get(baseline) for baseline in BASELINES},
        }


class Runner:
    def __init__(
        self, device: str, timer: Timer, copy_bandwidth: float, passes: list[str], seed: int = 0
    ) -> None:
        self.device = device
        self.timer = timer
        self.copy_bandwidth = copy_bandwidth  # bytes/s, the ceiling that GB/s is compared with
        self.passes = passes
        self.seed = seed

    def run_problem(
        self,
        problem: Problem,
        implementations: list[Implementation],
        after_each: Callable[[], None] = lambda: None,
        into: list[Result] | None = None,
    ) -> list[Result]:
        """All implementations on one problem's inputs; ``after_each`` reports progress. Inputs
        that cannot be made (out of memory, an unreadable text file) give error rows, not a crash
        that would lose the sweep's finished problems. Each implementation's rows are also
        appended to ``into`` as soon as they are done, so that a run interrupted in the middle of
        a problem (a timeout during a slow torch.compile) keeps the implementations it finished,
        with their speedups over the baselines finished so far (filled in after each one)."""
        results = []
        try:
            inputs = make_inputs(problem, self.device, self.seed)
        except Exception as error:
            note = f"inputs: {describe_error(error)}"
            inputs = None
        for implementation in implementations:
            if inputs is None:
                rows = self._untimed(problem, implementation, "error", note)
            else:
                rows = self._run_implementation(problem, implementation, inputs)
            results += rows
            _add_speedups(results)
            if into is not None:
                into += rows
            after_each()
        return results

    def _untimed(self, problem: Problem, implementation: Implementation, status: str, note: str) -> list[Result]:
        return [Result(problem, implementation.name, name, status, note) for name in self.passes]

    def _run_implementation(self, problem: Problem, implementation: Implementation, inputs: Inputs) -> list[Result]:
        try:
            result = gate(implementation, inputs, gradients=self.passes != ["forward"])
        except Exception as error:
            return self._untimed(problem, implementation, "error", describe_error(error))
        if not result.passed:
            return self._untimed(problem, implementation, "mismatch", result.detail)
        return [self._time_pass(problem, implementation, inputs, name) for name in self.passes]

    def _time_pass(self, problem: Problem, implementation: Implementation, inputs: Inputs, pass_name: str) -> Result:
        result = Result(problem, implementation.name, pass_name, "ok")
        try:
            work = make_pass(pass_name, implementation.forward, inputs)
            stats = self.timer.measure(work.run, work.setup)
            result.peak_extra_bytes = peak_extra_bytes(functools.partial(work.run, *work.setup()), self.device)
        except Exception as error:
            result.status, result.note = "error", describe_error(error)
            return result
        result.bytes = bytes_moved(pass_name, inputs)
        result.timing = stats
        result.gbps = result.bytes / stats.median_s / 1e9
        result.copy_fraction = result.bytes / stats.median_s / self.copy_bandwidth
        return result


def _add_speedups(results: list[Result]) -> None:
    """Fill each timed result's speedup over each baseline timed on the same problem and pass."""
    baseline_time = {
        (result.impl, result.pass_name): result.timing.median_s
        for result in results
        if result.impl in BASELINES and result.status == "ok"
    }
    for result in results:
        for baseline in BASELINES:
            reference_time = baseline_time.get((baseline, result.pass_name))
            if result.status == "ok" and reference_time is not None:
                result.speedup[baseline] = reference_time / result.timing.median_s

