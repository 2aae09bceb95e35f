"""docs/tutorial.md cannot go stale: its Python blocks run, in order, and its excerpts match the source.

Fenced blocks come in three kinds:
- ```python: executed. All of them, in document order, form one script (later blocks use
  earlier names), run in a fresh interpreter with TRITON_INTERPRET=1 when there is no GPU.
  Each block keeps its line numbers from tutorial.md, so a traceback points at the page.
- ```<language> file=PATH: an excerpt of PATH, which must contain it verbatim.
- ```text: output or a shell command, not run (kept to a handful).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from shared_data import REPO_ROOT, use_shared_tiktoken_cache

TUTORIAL = REPO_ROOT / "docs" / "tutorial.md"
MAX_TEXT_BLOCKS = 2
RUN_TIMEOUT_S = 600
# Paths of the repository written in backticks, e.g. `fusedemb/kernels/forward.py`.
REPO_PATH = re.compile(r"`((?:fusedemb|csrc|tests|examples|docs|benchmarks)/[\w./-]+|setup\.py)`")


@dataclass(frozen=True)
class Block:
    language: str
    excerpt_of: str | None  # the file named by file=PATH
    body: str
    first_line: int  # line of tutorial.md (1-based) where the body starts

    @property
    def label(self) -> str:
        return f"tutorial.md:{self.first_line}"


def tutorial_blocks() -> list[Block]:
    blocks, info, body, first_line = [], None, [], 0
    for number, line in enumerate(TUTORIAL.read_text(encoding="utf-8").splitlines(), start=1):
        if info is None and line.startswith("```"):
            info, body, first_line = line[3:].split(), [], number + 1
        elif info is not None and line == "```":
            options = dict(word.split("=", 1) for word in info[1:] if "=" in word)
            blocks.append(Block(info[0] if info else "", options.get("file"), "\n".join(body), first_line))
            info = None
        elif info is not None:
            body.append(line)
    assert info is None, f"tutorial.md: the block opened at line {first_line - 1} is never closed"
    return blocks


def executed_blocks() -> list[Block]:
    return [block for block in tutorial_blocks() if block.language == "python" and block.excerpt_of is None]


def excerpt_blocks() -> list[Block]:
    return [block for block in tutorial_blocks() if block.excerpt_of is not None]


def test_every_block_is_run_or_checked():
    blocks = tutorial_blocks()
    assert executed_blocks() and excerpt_blocks()
    unchecked = [block.label for block in blocks if block.excerpt_of is None and block.language not in ("python", "text")]
    assert not unchecked, f"blocks that are neither run nor checked against a file: {unchecked}"
    text_blocks = [block for block in blocks if block.language == "text"]
    assert len(text_blocks) <= MAX_TEXT_BLOCKS, "keep unexecuted text blocks to a minimum"


@pytest.mark.parametrize("block", excerpt_blocks(), ids=lambda block: block.label)
def test_excerpt_appears_verbatim_in_its_file(block):
    source = REPO_ROOT / block.excerpt_of
    assert source.is_file(), f"{block.label} quotes {block.excerpt_of}, which does not exist"
    assert block.body in source.read_text(encoding="utf-8"), (
        f"{block.label}: the excerpt no longer matches {block.excerpt_of}; update the tutorial"
    )


def test_repository_paths_named_in_the_tutorial_exist():
    named = set(REPO_PATH.findall(TUTORIAL.read_text(encoding="utf-8")))
    assert named, "the tutorial should point at the library's files"
    missing = sorted(path for path in named if not (REPO_ROOT / path).exists())
    assert not missing, f"the tutorial names files that do not exist: {missing}"


def test_python_blocks_run_in_order(tmp_path):
    use_shared_tiktoken_cache()  # section 1 tokenizes with the gpt2 encoding
    total_lines = len(TUTORIAL.read_text(encoding="utf-8").splitlines())
    lines = [""] * total_lines
    for block in executed_blocks():
        for offset, line in enumerate(block.body.splitlines()):
            lines[block.first_line - 1 + offset] = line
    # A real file, not exec() of a string: @triton.jit reads the kernels' source with inspect.
    script = tmp_path / "tutorial_md.py"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # must be set before triton is imported
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    # Line numbers in the traceback are lines of docs/tutorial.md.
    assert result.returncode == 0, f"docs/tutorial.md failed:\n{result.stdout}\n{result.stderr}"
