"""What a result was measured on: device, versions, threads. Numbers without it can't be compared."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_model() or platform.processor() or platform.machine()


def device_capability(device: str) -> str:
    """What code the device runs: a GPU's compute capability (sm_90 on an H100 or H200), which
    Triton compiles the kernels for; on a CPU, the instruction set ATen's vectorized kernels
    (eager's baseline) were picked for at start-up (AVX2, AVX512...; ATEN_CPU_CAPABILITY)."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return torch.backends.cpu.get_cpu_capability()


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_commit() -> str | None:
    """The git commit fusedemb was imported from, with "+modified" if its checkout has
    uncommitted changes; None for an installed copy (or without git). Tables cite commits."""
    checkout = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True, timeout=10, check=True)
        return run.stdout.strip()

    try:
        if not (checkout / ".git").exists():
            return None
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+modified" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> float | None:
    """The system's 1-minute load average (runnable processes), None where the OS has none: a
    load near the CPU count means other work competes with the benchmark's threads."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def warn_if_cpu_busy(device: str) -> None:
    """Before timing on the CPU: a warning on stderr when the load average says other work
    holds more than half of the CPUs, so that the timings will be noisy."""
    load, cpus = load_average(), os.cpu_count() or 1
    if device == "cpu" and load is not None and load > 0.5 * cpus:
        print(f"warning: load average {load:.2f} on {cpus} CPUs: other work is running, and CPU timings will be "
              "noisy", file=sys.stderr)  # fmt: skip


def _transparent_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise or never; Linux only): with
    THP_MEM_ALLOC_ENABLE it decides what large CPU tensors' page faults cost (docs/benchmarks.md)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
    return chosen or None


def describe_environment(device: str) -> dict[str, object]:
    return {
        "device": device,
        "device_name": device_name(device),
        "device_capability": device_capability(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "triton": _version("triton"),
        "fusedemb": _version("fusedemb"),
        "fusedemb_commit": source_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "transparent_hugepage": _transparent_huge_pages(),
        # Settings that change CPU results: the allocator's huge pages, OpenMP's threads, ATen's
        # instruction set (capped by ATEN_CPU_CAPABILITY).
        "env": {name: os.environ.get(name) for name in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY")},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
