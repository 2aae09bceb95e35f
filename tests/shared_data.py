"""Test access to the data kept beside the checkout in ../shared/data (never committed here).

    ../shared/data/the-verdict.txt   the short story of the classic "LLMs from scratch" chapter 2
    ../shared/data/tiktoken/         tiktoken's cache of the gpt2 encoding (no network needed)

Tests that need them call these helpers, which skip the test with the reason when a file is missing.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
VERDICT_PATH = SHARED_DATA_DIR / "the-verdict.txt"
EXAMPLES_DIR = REPO_ROOT / "examples"


def verdict_path() -> Path:
    """Path of the-verdict.txt; skips the test when it is not beside the checkout."""
    if not VERDICT_PATH.is_file():
        pytest.skip(f"{VERDICT_PATH} is missing (the story text lives in ../shared/data beside the checkout)")
    return VERDICT_PATH


def verdict_text() -> str:
    return verdict_path().read_text(encoding="utf-8")


def use_shared_tiktoken_cache() -> None:
    """Point TIKTOKEN_CACHE_DIR at ../shared/data/tiktoken unless the caller already set it.

    Skips the test when the gpt2 encoding still cannot be loaded (no cache and no network).
    """
    from fusedemb.data import load_gpt2_tokenizer, use_checkout_tiktoken_cache

    use_checkout_tiktoken_cache()

    try:
        load_gpt2_tokenizer()
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"tiktoken's gpt2 encoding is unavailable: {error}")


def import_example(name: str):
    """Import examples/<name>.py as a module (examples import their siblings by plain name)."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module(name)
