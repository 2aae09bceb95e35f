"""What a benchmark compares: fusedemb's kernels and the PyTorch code they replace.

Every implementation is a differentiable function ``forward(ids, tok_weight, pos_weight) -> out``
with default positions (t for t in 0..T-1); the passes, the gate and the timers need nothing else.

    fusedemb                fusedemb.fused_embedding with the device's own backend: C++ on CPU,
                            Triton on CUDA (token-gradient mode from torch's determinism flag)
    fusedemb-fast           CUDA only: Triton, deterministic=False: float atomics, or the sort
                            where it measured faster (large 16-bit tables: fast_mode_sorts in
                            fusedemb/kernels/backward.py)
    fusedemb-deterministic  CUDA only: Triton, deterministic (sorted) token gradient
    eager                   what a GPT model runs: two F.embedding calls and a broadcast add
    compile                 torch.compile of eager, compiled once per input shape
    reference               fusedemb's plain-PyTorch backend (opt-in; it is eager in another form)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedemb import fused_embedding

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

NAMES = ("fusedemb", "fusedemb-fast", "fusedemb-deterministic", "eager", "compile", "reference")

# name -> (fusedemb backend, deterministic), for the implementations that call fusedemb. The
# backend None entry is filled in per device below.
_FUSEDEMB_VARIANTS: dict[str, tuple[str | None, bool | None]] = {
    "fusedemb": (None, None),
    "fusedemb-fast": ("triton", False),
    "fusedemb-deterministic": ("triton", True),
    "reference": ("reference", None),
}


@dataclass(frozen=True)
class Implementation:
    name: str
    forward: Forward
    # Its gradients are float32 sums on every device (fusedemb's kernels). On CUDA PyTorch's are
    # too; on a CPU PyTorch adds 16-bit gradients in 16 bits (see the correctness gate).
    float32_sums: bool = False


def default_names(device: str) -> list[str]:
    """What a bare run compares: on CUDA both token-gradient modes, on CPU the C++ kernel."""
    fused = ["fusedemb-fast", "fusedemb-deterministic"] if device == "cuda" else ["fusedemb"]
    return [*fused, "eager", "compile"]


def eager_embedding(ids: torch.Tensor, tok_weight: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """GPT's first layer as models write it: ``wte(ids) + wpe(arange(T))``, the add broadcasting
    the (T, D) position rows over the batch."""
    positions = torch.arange(ids.shape[-1], device=ids.device)
    return F.embedding(ids, tok_weight) + F.embedding(positions, pos_weight)


class _CompiledPerShape:
    """torch.compile of ``eager_embedding``, compiled afresh whenever the input shapes change.

    ``dynamic=False`` gives each shape its best static code. Dynamo keeps its compiled variants
    per function, up to a recompile limit (8) after which it silently runs eager; a sweep passes
    more shapes than that, so the cache is reset when the shape changes. Sweeps are ordered to
    keep one shape's runs together (configs.sweep), so each shape compiles once.
    """

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self._compiled: Forward | None = None

    def __call__(self, ids, tok_weight, pos_weight):
        signature = tuple((t.shape, t.dtype, t.device) for t in (ids, tok_weight, pos_weight))
        if signature != self._signature:
            torch.compiler.reset()
            self._compiled = torch.compile(eager_embedding, dynamic=False)
            self._signature = signature
        return self._compiled(ids, tok_weight, pos_weight)


# One per process: dynamo's cache is per function, so two of these would evict each other.
_compiled_eager = _CompiledPerShape()


def build_implementations(names: list[str], device: str) -> tuple[list[Implementation], dict[str, str]]:
    """The implementations that can run on ``device``, and ``{name: reason}`` for those that can't.

    fusedemb's kernels are probed with a tiny forward and backward, so that a missing package,
    an unbuilt C++ extension or a missing GPU shows up here as a reason rather than as a crash in
    the middle of a sweep.
    """
    available, skipped = [], {}
    for name in names:
        if name == "eager":
            available.append(Implementation(name, eager_embedding))
        elif name == "compile":
            available.append(Implementation(name, _compiled_eager))
        elif name in _FUSEDEMB_VARIANTS:
            forward, reason = _fusedemb_forward(name, device)
            if reason is None:
                available.append(Implementation(name, forward, float32_sums=name != "reference"))
            else:
                skipped[name] = reason
        else:
            raise ValueError(f"unknown implementation {name!r}; expected one of {NAMES}")
    return available, skipped


def _fusedemb_forward(name: str, device: str) -> tuple[Forward | None, str | None]:
    backend, deterministic = _FUSEDEMB_VARIANTS[name]
    if backend is None:
        backend = "triton" if device == "cuda" else "cpp"
    if backend == "triton" and device != "cuda":
        return None, "the Triton kernels need a CUDA device"
    forward = functools.partial(fused_embedding, backend=backend, deterministic=deterministic)
    try:
        _probe(forward, device)
    except Exception as error:
        return None, f"the {backend} backend failed a tiny run: {describe_error(error)}"
    return forward, None


def _probe(forward: Forward, device: str) -> None:
    ids = torch.tensor([[0, 2]], device=device)
    tok_weight = torch.randn(3, 4, device=device, requires_grad=True)
    pos_weight = torch.randn(2, 4, device=device, requires_grad=True)
    forward(ids, tok_weight, pos_weight).sum().backward()


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``: enough to say why, short enough for a table note."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
