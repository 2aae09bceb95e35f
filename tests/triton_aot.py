"""Compile every Triton kernel ahead of time for a CUDA GPU, with no GPU present.

Triton's compiler runs on the CPU down to PTX and, with the ptxas it ships, to a cubin; only
launching needs a GPU. This catches what Triton's interpreter cannot (code the compiler rejects)
and exposes the resource report (registers, spills) and the memory instructions, which say
whether loads are 16 bytes wide. tests/test_triton_compile.py runs this file as a script, in a
process without TRITON_INTERPRET, and checks its JSON report.

Each kernel is compiled with the argument types and tile sizes its launcher uses at GPT-2 sizes
(D = 768, 8192 tokens of 1024), for both targets, and for Hopper also at the narrow widths
whose tiles differ most (NARROW_DIMS), with pointers and the integers that are multiples of 16
marked as such, as Triton specializes them at a real launch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedemb.kernels import backward, common, forward, sorted_scatter

DIM = 768
# Widths whose launches tile differently from GPT-2's 256-column blocks: D = 1 puts 4096 tokens
# in a forward program and gives the segment sums a single warp; D = 100 a masked 128-column
# block of 32 tokens. Compiled for sm_90 only, where the spill check applies.
NARROW_DIMS = (1, 100)
# Integer arguments that are multiples of 16 at GPT-2 sizes, which a real launch specializes on;
# the width and the row strides only where D is one.
DIVISIBLE_COUNTS = {"num_tokens", "seq_len", "num_sums", "num_tiles"}
DIVISIBLE_WIDTHS = {"dim", "tok_row_stride", "pos_row_stride"}
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SIXTEEN_BIT_TABLES = ("bf16", "fp16")  # the only tables the touched-rows kernels run for


def kernel_specs(table: str, dim: int):
    """(name, kernel, pointer types, constexprs[, launch options]) for tables of dtype `table`
    and width `dim`, with the tiles the launchers choose for that width."""
    block_dim = common.column_block(dim)
    tokens_per_tile = common.rows_per_tile(block_dim)
    forward_tile = forward.forward_tile(dim)
    dtype = TORCH_DTYPE[table]
    sweep_tile, sums_tile = backward.sweep_tile(dim, True, dtype), backward.sweep_tile(dim, False, dtype)
    ids = "*i64"
    acc64 = table == "fp64"  # float64 tables accumulate in float64
    return [
        ("forward", forward.fused_embedding_forward_kernel,
         {"ids_ptr": ids, "position_ids_ptr": ids, "tok_ptr": f"*{table}", "pos_ptr": f"*{table}", "out_ptr": f"*{table}"},
         {"HAS_POSITION_IDS": False, "ACC_FP64": acc64, "BLOCK_TOKENS": forward_tile.rows,
          "BLOCK_DIM": forward_tile.columns},
         {"num_warps": forward_tile.warps}),
        # int32 ids and explicit positions (left-padded or packed batches)
        ("forward_position_ids", forward.fused_embedding_forward_kernel,
         {"ids_ptr": "*i32", "position_ids_ptr": "*i32", "tok_ptr": f"*{table}", "pos_ptr": f"*{table}",
          "out_ptr": f"*{table}"},
         {"HAS_POSITION_IDS": True, "ACC_FP64": acc64, "BLOCK_TOKENS": forward_tile.rows,
          "BLOCK_DIM": forward_tile.columns},
         {"num_warps": forward_tile.warps}),
        ("sweep_batch", backward.sweep_batch_kernel,
         {"grad_ptr": f"*{table}", "index_ptr": ids, "acc_ptr": "*fp64" if acc64 else "*fp32", "sums_ptr": f"*{table}"},
         {"ADD_TO_TABLE": True, "SUM_OVER_BATCH": True, "ACC_FP64": acc64, "BLOCK_ROWS": sweep_tile.rows,
          "BLOCK_DIM": sweep_tile.columns},
         {"num_warps": sweep_tile.warps}),
        # the fast mode's token gradient alone (explicit positions are scattered apart), int32 ids
        ("scatter_only", backward.sweep_batch_kernel,
         {"grad_ptr": f"*{table}", "index_ptr": "*i32", "acc_ptr": "*fp64" if acc64 else "*fp32",
          "sums_ptr": f"*{table}"},
         {"ADD_TO_TABLE": True, "SUM_OVER_BATCH": False, "ACC_FP64": acc64, "BLOCK_ROWS": sweep_tile.rows,
          "BLOCK_DIM": sweep_tile.columns},
         {"num_warps": sweep_tile.warps}),
        ("position_sums", backward.sweep_batch_kernel,
         {"grad_ptr": f"*{table}", "index_ptr": f"*{table}", "acc_ptr": f"*{table}", "sums_ptr": f"*{table}"},
         {"ADD_TO_TABLE": False, "SUM_OVER_BATCH": True, "ACC_FP64": acc64, "BLOCK_ROWS": sums_tile.rows,
          "BLOCK_DIM": sums_tile.columns},
         {"num_warps": sums_tile.warps}),
        ("chunk_rank", sorted_scatter.chunk_rank_kernel,
         {"index_ptr": ids, "rank_ptr": "*i32", "counts_ptr": "*i32"},
         {"CHUNK": sorted_scatter.CHUNK, "BLOCK": sorted_scatter.RANK_BLOCK}),
        ("scatter_sorted", sorted_scatter.scatter_sorted_kernel,
         {"index_ptr": ids, "rank_ptr": "*i32", "ends_ptr": "*i32", "counts_ptr": "*i32",
          "sorted_tokens_ptr": "*i32", "sorted_rows_ptr": "*i32"},
         {"CHUNK": sorted_scatter.CHUNK, "BLOCK": sorted_scatter.SCATTER_BLOCK}),
        ("segment_sums", sorted_scatter.segment_sums_kernel,
         {"grad_ptr": f"*{table}", "sorted_tokens_ptr": "*i32", "sorted_rows_ptr": "*i32", "table_ptr": f"*{table}",
          "head_ptr": "*fp64", "tail_ptr": "*fp64"},
         {"ACC_FP64": acc64, "TILE": sorted_scatter.TILE, "BLOCK_DIM": block_dim},
         {"num_warps": sorted_scatter.segment_warps(block_dim, dtype.itemsize)}),
        ("sum_head_blocks", sorted_scatter.sum_head_blocks_kernel,
         {"sorted_rows_ptr": "*i32", "head_ptr": "*fp64", "block_sums_ptr": "*fp64"},
         {"TILE": sorted_scatter.TILE, "PARTIALS_BLOCK": sorted_scatter.PARTIALS_BLOCK,
          "BLOCK_DIM": sorted_scatter.COMBINE_BLOCK_DIM}),
        ("combine_partials", sorted_scatter.combine_partials_kernel,
         {"sorted_rows_ptr": "*i32", "ends_ptr": "*i32", "counts_ptr": "*i32", "head_ptr": "*fp64",
          "tail_ptr": "*fp64", "block_sums_ptr": "*fp64", "table_ptr": f"*{table}"},
         {"ACC_FP64": acc64, "TILE": sorted_scatter.TILE, "TILES_PER_PROGRAM": sorted_scatter.COMBINE_TILES,
          "PARTIALS_BLOCK": sorted_scatter.PARTIALS_BLOCK, "BLOCK_DIM": sorted_scatter.COMBINE_BLOCK_DIM}),
    ] + ([] if table not in SIXTEEN_BIT_TABLES else [
        # the fast mode's float32 accumulator of a 16-bit table's touched rows
        ("zero_touched_rows", backward.zero_touched_rows_kernel,
         {"index_ptr": ids, "acc_ptr": "*fp32", "touched_ptr": "*i8"},
         {"BLOCK_TOKENS": tokens_per_tile, "BLOCK_DIM": block_dim}),
        ("round_touched_rows", backward.round_touched_rows_kernel,
         {"acc_ptr": "*fp32", "touched_ptr": "*i8", "table_ptr": f"*{table}"},
         {"BLOCK_ROWS": tokens_per_tile, "BLOCK_DIM": block_dim}),
    ])  # fmt: skip


def compile_kernel(kernel, pointers: dict, constexprs: dict, dim: int, target: GPUTarget, options: dict | None = None):
    params = kernel.params
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in params}
    divisible = set(pointers) | DIVISIBLE_COUNTS | (DIVISIBLE_WIDTHS if dim % 16 == 0 else set())
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p.name in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=target, options=options)


def resource_usage(ptx: str) -> dict:
    """Registers and spill bytes from ptxas -v (the ptxas Triton itself uses for this target)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target (\w+)", ptx, flags=re.M).group(1)  # e.g. sm_90a
    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", "-o", str(source.with_suffix(".cubin")),
                                 str(source)], text=True, capture_output=True, check=True)  # fmt: skip
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills)}


def report() -> dict:
    """{"kernel/table/arch/D<dim>": registers, spill bytes and memory instructions}."""
    results = {}
    for dim, targets in [(DIM, TARGETS)] + [(dim, {"sm_90": TARGETS["sm_90"]}) for dim in NARROW_DIMS]:
        for table in TORCH_DTYPE:
            for name, kernel, pointers, constexprs, *options in kernel_specs(table, dim):
                for arch, target in targets.items():
                    compiled = compile_kernel(kernel, pointers, constexprs, dim, target, *options)
                    ptx = compiled.asm["ptx"]
                    memory_ops = Counter(re.findall(r"\b((?:ld|st)\.global[.\w]*|red\.[.\w]*|atom\.[.\w]*)", ptx))
                    results[f"{name}/{table}/{arch}/D{dim}"] = {**resource_usage(ptx), "memory_ops": dict(memory_ops)}
    return results


if __name__ == "__main__":
    json.dump(report(), sys.stdout, indent=1)
