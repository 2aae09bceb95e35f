"""Where a torch.compile(dynamic=True) graph of fusedemb recompiles on CUDA: the guards that the
Triton backward's launchers add when traced with a symbolic batch and sequence length.

    python benchmarks/dynamic_shape_guards.py [--batch B] [--seq T] [--dim D] [--vocab V]
        [--context P] [--dtype float32] [--deterministic]

On CUDA, Dynamo and AOTAutograd trace the launchers' Python (torch.library.triton_op) on fake
tensors, so each choice there that depends on a size (a grid, a count of tiles, which sort)
becomes a guard of the graph: a later call whose B and T fail one compiles another graph. This
runs triton_backward on fake CUDA tensors whose B and T are symbols (hinted by --batch and --seq;
the tables' V, P and D are static, as Dynamo keeps parameters' shapes) and prints each guard it
added, with the innermost fusedemb line on the stack when it was added. No GPU is needed, but
the deterministic path needs a CUDA build of torch: a CPU build cannot run its prefix sum (an
out= cumsum) on fake CUDA tensors of symbolic size. Start it without TRITON_INTERPRET: the
interpreter would run the kernels rather than trace them.
"""

from __future__ import annotations

import argparse
import os
import traceback

import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from fusedemb.bench.cli import int_at_least, positive_int
from fusedemb.bench.configs import DTYPES
from fusedemb.kernels import INTERPRETED, triton_backward


class GuardLog(list):
    """A ShapeEnv's list of guards that also notes, for each guard added, the innermost fusedemb
    frame on the stack: the guards of size checks inside PyTorch (a tensor's contiguity, say)
    name only PyTorch's line. (ShapeEnv adds its guards with list.append, in torch 2.11-2.13.)"""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[traceback.FrameSummary | None] = []

    def append(self, guard) -> None:
        super().append(guard)
        ours = [frame for frame in traceback.extract_stack() if f"{os.sep}fusedemb{os.sep}" in frame.filename]
        self.frames.append(ours[-1] if ours else None)


B, T = sympy.symbols("B T")


def traced_guards(
    batch: int, seq_len: int, dim: int, vocab: int, context: int, dtype: torch.dtype, deterministic: bool
) -> list[tuple[sympy.Basic, str]]:
    """(guard, where) for each guard that tracing the backward added: a condition on the symbols B
    and T (above), which a call's sizes must meet to reuse the graph."""
    shape_env = ShapeEnv()
    shape_env.guards = log = GuardLog()
    mode = FakeTensorMode(shape_env=shape_env)
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC])
    symbolic_ids = mode.from_tensor(
        torch.empty(batch, seq_len, dtype=torch.int64, device="meta"), source=ConstantSource("ids"),
        symbolic_context=dynamic,
    )  # fmt: skip
    sizes = symbolic_ids.shape
    names = {sizes[0].node.expr: B, sizes[1].node.expr: T}
    with mode:
        ids = torch.zeros(sizes, dtype=torch.int64, device="cuda")
        grad_out = torch.empty(*sizes, dim, dtype=dtype, device="cuda")
        triton_backward(grad_out, ids, None, 0, vocab, context, -1, deterministic)
    return [
        (guard.expr.xreplace(names), _where(frame, guard.sloc.framework_loc))
        for guard, frame in zip(log, log.frames)
    ]


def _where(frame: traceback.FrameSummary | None, framework_loc) -> str:
    inside = "" if isinstance(framework_loc, str) or framework_loc is None else framework_loc.name
    ours = "?" if frame is None else f"{frame.filename[frame.filename.rindex('fusedemb'):]}:{frame.lineno}"
    return ours if not inside or inside == getattr(frame, "name", None) else f"{ours} (in torch's {inside})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # (Dynamo specializes a size of 1: it gets no symbol)
    parser.add_argument("--batch", type=int_at_least(2), default=3, help="B's hint (default 3)")
    parser.add_argument("--seq", type=int_at_least(2), default=7, help="T's hint (default 7)")
    parser.add_argument("--dim", type=positive_int, default=768, help="D (default 768)")
    parser.add_argument("--vocab", type=positive_int, default=50257, help="V (default 50257)")
    parser.add_argument("--context", type=positive_int, default=1024, help="P (default 1024)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--deterministic", action="store_true", help="the sorted token gradient")
    args = parser.parse_args(argv)
    if INTERPRETED:
        parser.error("TRITON_INTERPRET=1 runs the kernels in the interpreter instead of tracing them: unset it")
    if args.seq > args.context:
        parser.error(f"--seq {args.seq} does not fit --context {args.context}")
    try:
        guards = traced_guards(
            args.batch, args.seq, args.dim, args.vocab, args.context, DTYPES[args.dtype], args.deterministic
        )
    except RuntimeError as error:
        if torch.backends.cuda.is_built():
            raise
        parser.error(f"this torch is a CPU build, which cannot trace the sorted path on fake CUDA tensors ({error})")
    mode = "deterministic" if args.deterministic else "fast"
    print(f"{mode} backward, {args.dtype}, D {args.dim}, V {args.vocab}, P {args.context}; traced at B {args.batch}, "
          f"T {args.seq}: {len(guards)} guards (-((-x)//k) is ceil(x / k))")  # fmt: skip
    for guard, where in guards:
        print(f"  {guard!s:<60} {where}")


if __name__ == "__main__":
    main()
