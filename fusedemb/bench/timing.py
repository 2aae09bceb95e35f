"""Timers: perf_counter medians on the CPU, CUDA events on the GPU, last-level cache flushed.

Both time one call at a time and report quantiles over the repeats, never a mean: a benchmark's
time distribution has a long right tail (interrupts, other processes, clock changes) that a
median ignores and a mean does not. The number of repeats adapts to a time budget per
measurement, so small problems get many repeats and large ones a few.

On both devices the inputs would stay resident in the last-level cache between repeats (L2
on a GPU, L3 on a CPU), which a training step, whose other layers evict them, does not see: a
buffer larger than that cache is overwritten before every timed call, outside the timed
region, as triton.testing.do_bench does on a GPU (or read instead: CacheFlush says what each
way leaves in the cache).

On a GPU two more things would otherwise distort the figures:
- launches are asynchronous: CUDA events record when the GPU itself reaches them;
- the GPU would idle while Python queues the work (autograd, argument checks, kernel launches:
  a few hundred microseconds for a forward+backward, as long as its kernels take at GPT-2 sizes),
  and that idling would be timed as if the kernels were slow. So before each timed call the GPU
  is held by a spin kernel (`torch.cuda._sleep`) that outlasts the host's queuing, and the events
  time the device's work alone: what a training step sees when the host runs ahead of the GPU,
  as it does in a model with enough work per layer. The host's time to queue a call is timed
  too and reported beside it (`host_median_s`): where it exceeds the device time, an eager step
  of that size is bound by the host, whatever the kernels do. A call that synchronises with the
  GPU is timed without the hold: its device time then includes the GPU idling while the host
  works after the sync, which is what such a call costs. Its host work before the sync
  overlaps the (untimed) cache flush, as in training it overlaps the work the step before
  queued, and is not counted as far as the flush lasts (beyond that the GPU idles inside the
  timed region); in a loop of nothing but this call it would all be GPU idle time. A call is
  taken for one that syncs when its host time reaches the first hold (FIRST_HOLD_S), so a call
  whose host time alone is longer is timed so too. Such results say so (TimingStats.held is
  False), and the table marks them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TimingStats:
    median_s: float  # device time on a GPU (host hidden, see above); wall time on a CPU
    p25_s: float
    p75_s: float
    reps: int
    host_median_s: float  # the host's time to run (CPU) or queue (GPU) one call
    # On a GPU, whether the timed calls ran behind the hold (see above): False for a call that
    # waits for the GPU, whose device time then includes the GPU's idling. None on a CPU.
    held: bool | None = None
    # On a GPU, how many held calls outran their hold: the GPU had finished it before the host
    # had queued the whole call, so it may have idled inside the timed region. None on a CPU.
    hold_outruns: int | None = None

    @property
    def spread(self) -> float:
        """Half the interquartile range, relative to the median: the "+-" of the median."""
        return (self.p75_s - self.p25_s) / (2 * self.median_s)

    @classmethod
    def from_samples(
        cls,
        samples: list[float],
        host_samples: list[float] | None = None,
        held: bool | None = None,
        hold_outruns: int | None = None,
    ) -> TimingStats:
        host_median = statistics.median(host_samples if host_samples else samples)
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], 1, host_median, held, hold_outruns)
        p25, median, p75 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median, p25, p75, len(samples), host_median, held, hold_outruns)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a CUDA device; a CPU call's work is done when it returns."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_and_spread(samples: list[float], unit: str) -> str:
    """Seconds, printed in `unit` ("ms" or "us") as the median ± half the interquartile range,
    for the standalone scripts of benchmarks/ that time with perf_counter themselves. The
    quartiles are TimingStats' (inclusive method, as the benchmark's ±): range_check_cost.py's
    first form used the exclusive one, whose ± is wider on few rounds."""
    return format_median_and_spread(TimingStats.from_samples(samples), unit)


def format_median_and_spread(stats: TimingStats, unit: str) -> str:
    """median_and_spread's format, for stats a Timer measured."""
    scale, digits = {"ms": (1e3, 3), "us": (1e6, 1)}[unit]
    return f"{scale * stats.median_s:9.{digits}f} ±{scale * (stats.p75_s - stats.p25_s) / 2:.{digits}f}"


class Timer:
    """Times ``run(*setup())`` with ``setup`` excluded; subclasses say how one call is timed."""

    # Host time each repeat spends outside the timed region (a CPU cache flush), counted against
    # the time budget: otherwise a call of microseconds would get max_reps flushes.
    untimed_s_per_call = 0.0

    def __init__(self, budget_s: float, min_reps: int, max_reps: int, warmup_reps: int) -> None:
        self.budget_s = budget_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.warmup_reps = warmup_reps

    def measure(self, run: Callable[..., object], setup: Callable[[], tuple] = lambda: ()) -> TimingStats:
        """Time ``run(*setup())``, ``setup`` untimed: warm up (which also estimates one call's
        time), then repeat enough to fill the time budget."""
        estimate = statistics.median(self.time_calls(run, setup, self.warmup_reps)[0])
        per_call_s = estimate + self.untimed_s_per_call
        reps = min(self.max_reps, max(self.min_reps, math.ceil(self.budget_s / max(per_call_s, 1e-9))))
        return TimingStats.from_samples(*self.time_calls(run, setup, reps))

    def time_calls(
        self, run: Callable[..., object], setup: Callable[[], tuple], reps: int
    ) -> tuple[list[float], list[float], bool | None, int | None]:
        """Seconds taken by each of ``reps`` calls ``run(*setup())``, setup excluded, the host's
        seconds for each, and (on a GPU; None elsewhere) whether the calls ran behind the hold and
        how many outran it: TimingStats.from_samples' arguments."""
        raise NotImplementedError


class CpuTimer(Timer):
    """perf_counter around run(): the call's result is freed inside the timed region, as a training
    step frees the previous step's gradients. That is a real cost on a CPU (freeing eager's 154 MB
    gpt2-124M token gradient, on 4 KiB pages, takes milliseconds) and none on a GPU."""

    def __init__(self, *args, cache_flush: str = "write", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flush_cache = CacheFlush("cpu", cache_flush)
        flush_seconds = []
        for _ in range(3):
            start = time.perf_counter()
            self.flush_cache()
            flush_seconds.append(time.perf_counter() - start)
        self.untimed_s_per_call = statistics.median(flush_seconds)

    def time_calls(self, run, setup, reps):
        samples = []
        for _ in range(reps):
            arguments = setup()
            self.flush_cache()
            start = time.perf_counter()
            run(*arguments)
            samples.append(time.perf_counter() - start)
        return samples, samples, None, None


def last_level_cache_bytes(cpus: Path = Path("/sys/devices/system/cpu")) -> int:
    """The bytes of all of the CPU's last-level caches together, from Linux's sysfs: each CPU's
    highest-level cache (cpu*/cache/index*: level, size such as "32768K", shared_cpu_list),
    counted once per instance, since a flush written by several threads spreads over all of
    them (several L3s on multi-chiplet or multi-socket machines). 0 where sysfs has none."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    instances = {}
    for cpu in cpus.glob("cpu[0-9]*"):
        caches = []
        for cache in (cpu / "cache").glob("index*"):
            try:
                level = int((cache / "level").read_text())
                size = (cache / "size").read_text().strip()
                size_bytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
                shared_by = (cache / "shared_cpu_list").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            caches.append((level, shared_by, size_bytes))
        if caches:
            level, shared_by, size_bytes = max(caches)
            instances[(level, shared_by)] = size_bytes
    return sum(instances.values())


GPU_BEYOND_CACHE_BYTES = 256 * 2**20
MIN_CPU_BEYOND_CACHE_BYTES = 64 * 2**20


def bytes_beyond_cache(device: str) -> int:
    """The size of a buffer that dwarfs the device's last-level cache: on a GPU 256 MiB, several
    times L2 (50 MB on H100, 60 MB on H200); on a CPU twice its last-level caches together, and
    at least 64 MiB (where sysfs lists none, or only small ones)."""
    if torch.device(device).type == "cpu":
        return max(2 * last_level_cache_bytes(), MIN_CPU_BEYOND_CACHE_BYTES)
    return GPU_BEYOND_CACHE_BYTES


CACHE_FLUSHES = ("write", "read")


class CacheFlush:
    """Calling it evicts whatever a previous call left in the device's last-level cache, by going
    through a buffer larger than it (bytes_beyond_cache; on a GPU queued like any launch). Both
    ways leave the cache full of the buffer; they differ in what the timed call then pays to
    evict it:
    - "write" (the default; every figure in docs/ so far): overwrites the buffer, as
      triton.testing.do_bench does. The cache is left full of dirty lines, which go back to
      memory as the timed call's own accesses evict them, beside its own traffic: as the lines
      written by the step before (the optimizer's) are in training.
    - "read": sums the buffer. The cache is left holding clean lines, which are dropped for
      free: the timed call's own traffic alone. The difference between the two is that
      write-back, which weighs most on the shortest calls."""

    def __init__(self, device: str = "cuda", mode: str = "write") -> None:
        if mode not in CACHE_FLUSHES:
            raise ValueError(f"unknown cache flush {mode!r}; expected one of {CACHE_FLUSHES}")
        self.mode = mode
        # int64 elements: a wide read (the sum) as well as a wide write, of the same bytes. Zeroed
        # once here: on a CPU an untouched allocation's pages all map the kernel's one zero page,
        # which a read-only flush would then read from L1 (256 MiB summed in 2.8 ms, not 22, on this
        # project's VM), evicting nothing.
        self._buffer = torch.zeros(bytes_beyond_cache(device) // 8, dtype=torch.int64, device=device)

    def __call__(self) -> None:
        if self.mode == "write":
            self._buffer.zero_()
        else:
            self._buffer.sum()  # (whatever the buffer holds: the sum is not looked at)


class GpuHold:
    """Calling it with a duration queues a kernel that keeps the GPU busy that long, so that
    whatever the host queues next starts only once all of it is queued."""

    CALIBRATION_CYCLES = 10_000_000

    def __init__(self) -> None:
        # torch.cuda._sleep spins for a number of GPU clock cycles: time some to convert.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(self.CALIBRATION_CYCLES)  # the first call may include lazy set-up
        start.record()
        torch.cuda._sleep(self.CALIBRATION_CYCLES)
        end.record()
        end.synchronize()
        self.cycles_per_s = self.CALIBRATION_CYCLES / (start.elapsed_time(end) / 1e3)

    def __call__(self, seconds: float) -> None:
        torch.cuda._sleep(int(seconds * self.cycles_per_s))


class CudaTimer(Timer):
    # The hold before each timed call: this many times the median host time of the previous
    # calls (the warm-up's, for the timed ones), plus a margin for the host's jitter. A median,
    # because the first warm-up call may include compiling the kernels.
    HOLD_FACTOR = 2.0
    HOLD_MARGIN_S = 50e-6
    FIRST_HOLD_S = 5e-3  # longer than any call's host time but one that waits for it

    def __init__(self, *args, device: str = "cuda", cache_flush: str = "write", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flush_cache = CacheFlush(device, cache_flush)
        self.hold_gpu = GpuHold()
        self._hold_s = self.FIRST_HOLD_S

    def measure(self, run, setup=lambda: ()):
        self._hold_s = self.FIRST_HOLD_S  # until the warm-up has timed this call's host side
        return super().measure(run, setup)

    def time_calls(self, run, setup, reps):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        host = []
        held, outruns = self._hold_s > 0, 0
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            arguments = setup()  # queued before the start event, so it is not timed either
            self.flush_cache()
            self.hold_gpu(self._hold_s)
            start.record()
            host_start = time.perf_counter()
            run(*arguments)
            host.append(time.perf_counter() - host_start)
            # The start event follows the hold: if the GPU has already passed it, the hold ran
            # out while the host was still queuing the call.
            outruns += held and start.query()
            end.record()
            # Wait for the call before the next one: with many calls in flight the launch queue
            # fills up and the host's time would include waiting for room in it.
            end.synchronize()
        if statistics.median(host) >= self._hold_s:
            # The call waited for the hold: it synchronises with the GPU (fusedemb's id range
            # check does). Holding would only lengthen its host time, and the GPU idles while the
            # host works after the sync anyway: that idling is part of such a call's cost.
            self._hold_s = 0.0
        else:
            self._hold_s = self.HOLD_FACTOR * statistics.median(host) + self.HOLD_MARGIN_S
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)], host, held, outruns


def make_timer(device: str, quick: bool = False, cache_flush: str = "write") -> Timer:
    """The timer for ``device``; ``quick`` trades precision for speed (smoke tests, CI);
    ``cache_flush``: how the cache is flushed before each call (CacheFlush)."""
    budget_s, min_reps = (0.05, 3) if quick else (0.3, 5)
    if device == "cuda":
        return CudaTimer(budget_s, min_reps, max_reps=500, warmup_reps=3, device=device, cache_flush=cache_flush)
    return CpuTimer(budget_s, min_reps, max_reps=200, warmup_reps=2, cache_flush=cache_flush)


def copy_bandwidth(timer: Timer, device: str, buffer_bytes: int) -> float:
    """The device's copy bandwidth in bytes/s: the ceiling a memory-bound kernel can reach.

    One large ``dst.copy_(src)``, counting bytes read plus bytes written (2 * buffer_bytes), the
    same way the bytes model counts a kernel's traffic. The buffer must dwarf the caches (L2 on a
    GPU, the last-level cache on a CPU: bytes_beyond_cache) or the cache's bandwidth is measured
    instead.
    """
    source = torch.ones(buffer_bytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    stats = timer.measure(lambda: destination.copy_(source))
    return 2 * source.nbytes / stats.median_s
