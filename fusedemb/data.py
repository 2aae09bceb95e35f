"""Next-token training data for GPT models: sliding windows over one tokenized text.

The text is tokenized once into ids x[0], x[1], ..., x[L-1]. Window k starts at s = k * stride
and holds max_length ids; its target is the same window shifted one token to the right:

    input[k]  = x[s],     x[s + 1], ..., x[s + max_length - 1]
    target[k] = x[s + 1], x[s + 2], ..., x[s + max_length]

so target[k][t] is the token that follows input[k][t], and a model trained on (input, target)
with a causal mask learns to predict every next token of the window at once. A window needs
max_length + 1 ids, so there are floor((L - 1 - max_length) / stride) + 1 windows. stride <
max_length makes windows overlap (more, correlated samples); stride == max_length tiles the
text with no overlap and no gap.

tiktoken is imported only when the gpt2 encoding is asked for, so GPTDataset works with any
tokenizer that has tiktoken's ``encode(text, allowed_special=...)`` method.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

GPT2_ENCODING_NAME = "gpt2"
END_OF_TEXT = "<|endoftext|>"
# Where this project's machines, which have no network, keep tiktoken's gpt2 files: in
# ../shared/data/tiktoken beside a source checkout (fusedemb/data.py -> ../..).
CHECKOUT_TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiktoken"


def use_checkout_tiktoken_cache() -> None:
    """Point TIKTOKEN_CACHE_DIR at CHECKOUT_TIKTOKEN_CACHE when that folder exists; a
    TIKTOKEN_CACHE_DIR set by the caller wins."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and CHECKOUT_TIKTOKEN_CACHE.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(CHECKOUT_TIKTOKEN_CACHE)


def load_gpt2_tokenizer():
    """tiktoken's "gpt2" byte-pair encoding (vocabulary of 50257 tokens).

    tiktoken downloads the encoding's two files on first use and caches them in the folder named
    by the TIKTOKEN_CACHE_DIR environment variable; with no network the files must already be there.
    """
    try:
        import tiktoken
    except ImportError as error:
        raise ImportError("fusedemb.data needs tiktoken for the gpt2 encoding: pip install tiktoken") from error
    try:
        return tiktoken.get_encoding(GPT2_ENCODING_NAME)
    except Exception as error:  # network errors, missing or corrupt cache files: all mean "not available"
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache_dir!r}" if cache_dir else "TIKTOKEN_CACHE_DIR is not set"
        beside = ""
        if not cache_dir and CHECKOUT_TIKTOKEN_CACHE.is_dir():
            beside = f" (this checkout has them in {CHECKOUT_TIKTOKEN_CACHE})"
        raise RuntimeError(
            f"cannot load tiktoken's {GPT2_ENCODING_NAME!r} encoding ({where}): tiktoken downloads it on "
            "first use and caches it in the folder named by TIKTOKEN_CACHE_DIR. With no network, set "
            f"TIKTOKEN_CACHE_DIR to a folder holding the cached gpt2 files{beside} "
            f"(original error: {type(error).__name__}: {error})"
        ) from error


def tile_to_batch(token_ids: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[batch, seq_len] ids: row b is the window [b * seq_len, (b + 1) * seq_len) of the stream
    token_ids repeated end to end, so a batch larger than the text sees it several times, as an
    epoch loop would."""
    if token_ids.numel() == 0:
        raise ValueError("the text produced no tokens")
    needed = batch * seq_len
    repeats = -(-needed // token_ids.numel())  # ceil(needed / len)
    return token_ids.flatten().repeat(repeats)[:needed].view(batch, seq_len)


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """(training text, validation text): the first train_ratio of the characters, then the rest,
    as chapter 5 of "LLMs from scratch" splits its text. The held-out part comes after the
    training part, so no window of one overlaps a window of the other."""
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    split = int(train_ratio * len(text))
    return text[:split], text[split:]


class GPTDataset(Dataset):
    """(input, target) pairs of ``max_length`` token ids each, windows ``stride`` tokens apart.

    Items are int64 tensors of shape (max_length,): views into one tensor of the text's ids.
    """

    def __init__(self, text: str, tokenizer, max_length: int, stride: int):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        token_ids = torch.tensor(tokenizer.encode(text, allowed_special={END_OF_TEXT}), dtype=torch.long)
        if token_ids.numel() < max_length + 1:
            raise ValueError(
                f"text is too short for one window: it has {token_ids.numel()} tokens and a window "
                f"with its shifted target needs max_length + 1 = {max_length + 1}"
            )
        # unfold(0, size, step) is the sliding window as a strided view: no copy per window.
        self.inputs = token_ids[:-1].unfold(0, max_length, stride)
        self.targets = token_ids[1:].unfold(0, max_length, stride)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def create_dataloader(
    text: str,
    batch_size: int | None = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    *,
    generator: torch.Generator | None = None,
    **loader_options,
) -> DataLoader:
    """Batches of (input, target) windows of ``text`` tokenized with tiktoken's gpt2 encoding.

    Each batch is a pair of int64 tensors of shape (batch_size, max_length), the last one shorter
    when ``drop_last`` is False and the windows do not fill it; ``batch_size=None`` yields one
    window per item instead, of shape (max_length,) (the DataLoader's own rule: with
    ``drop_last=False``). ``generator`` seeds
    the shuffle, so two loaders built with equally seeded generators yield the same batches.
    Other keyword arguments (``pin_memory``, ``persistent_workers``, ``prefetch_factor``...) go
    to the DataLoader as they are.
    """
    # A Path (or bytes) is no text to tokenize: said here, not by len() below or by tiktoken.
    if not isinstance(text, str):
        remedy = ": pass the file's contents (Path(name).read_text())" if isinstance(text, os.PathLike) else ""
        raise TypeError(f"create_dataloader takes the text itself, a str, got {type(text).__name__}{remedy}")
    # The text itself, not a file's name: a name would be tokenized as it is, a few ids, and
    # give windows of the name without a word. (A short line only: a text is rarely one.)
    if len(text) < 4096 and "\n" not in text and os.path.isfile(text):
        warnings.warn(
            f"create_dataloader got {text!r}, the name of a file: it tokenizes the string it is given, so pass "
            "the file's contents (Path(name).read_text())",
            stacklevel=2,
        )
    dataset = GPTDataset(text, load_gpt2_tokenizer(), max_length, stride)
    # batch_size=None (no batching: one window per item) is the DataLoader's to accept or refuse.
    if drop_last and batch_size is not None and len(dataset) < batch_size:
        raise ValueError(
            f"text gives {len(dataset)} windows of max_length={max_length}, stride={stride}: fewer than "
            f"batch_size={batch_size}, so drop_last=True would leave no batch at all"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
        **loader_options,
    )
