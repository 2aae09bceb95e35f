"""Token-id distributions: where the ids of a benchmark batch come from.

Real token streams are skewed: a handful of ids (" the", ",", padding) repeat thousands of times
per batch, and in the backward every repeat of an id adds into the same gradient row. Uniform ids
hide that contention; these distributions expose it:

    uniform     every id equally likely
    zipf:S      P(id of frequency rank k) proportional to k**-S; the ranks are scattered over the
                table by a random permutation, as real frequent tokens are
    same        one id everywhere: the worst case for atomic scatter-adds
    text:FILE   FILE tokenized with tiktoken's gpt2 encoding, the stream tiled to fill the batch
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedemb.data import END_OF_TEXT, load_gpt2_tokenizer, tile_to_batch, use_checkout_tiktoken_cache


class IdDistribution:
    """Draws a (batch, seq) int64 CPU tensor of ids in [0, vocab)."""

    @property
    def label(self) -> str:
        raise NotImplementedError

    def sample(self, batch: int, seq: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Uniform(IdDistribution):
    @property
    def label(self) -> str:
        return "uniform"

    def sample(self, batch, seq, vocab, generator):
        return torch.randint(0, vocab, (batch, seq), generator=generator)


@dataclass(frozen=True)
class Zipf(IdDistribution):
    exponent: float

    @property
    def label(self) -> str:
        return f"zipf:{self.exponent:g}"

    def sample(self, batch, seq, vocab, generator):
        rank_weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-self.exponent)
        ranks = torch.multinomial(rank_weights, batch * seq, replacement=True, generator=generator)
        id_of_rank = torch.randperm(vocab, generator=generator)
        return id_of_rank[ranks].view(batch, seq)


@dataclass(frozen=True)
class Same(IdDistribution):
    @property
    def label(self) -> str:
        return "same"

    def sample(self, batch, seq, vocab, generator):
        only_id = torch.randint(0, vocab, (), generator=generator)
        return only_id.expand(batch, seq).clone()


@dataclass(frozen=True)
class Text(IdDistribution):
    path: Path

    @property
    def label(self) -> str:
        return f"text:{self.path.name}"

    def sample(self, batch, seq, vocab, generator):
        ids = tile_to_batch(_gpt2_tokens(self.path.resolve()), batch, seq)
        # A vocabulary smaller than gpt2's (a custom --vocab) folds the ids; the skew survives.
        return ids % vocab


def parse_distribution(spec: str) -> IdDistribution:
    """``uniform``, ``same``, ``zipf:S`` (0 < S < inf) or ``text:FILE``; raises ValueError otherwise."""
    kind, _, argument = spec.partition(":")
    if kind in ("uniform", "same") and not argument:
        return Uniform() if kind == "uniform" else Same()
    if kind == "zipf":
        try:
            exponent = float(argument)
        except ValueError:
            raise ValueError(f"zipf needs a numeric exponent, as in zipf:1.1, got {spec!r}") from None
        if not 0 < exponent < math.inf:  # (inf would put every id on the first rank: that is `same`)
            raise ValueError(f"the zipf exponent must be positive and finite, got {spec!r}")
        return Zipf(exponent)
    if kind == "text" and argument:
        path = Path(argument)
        if not path.is_file():
            raise ValueError(f"no such text file: {argument}")
        # Tokenized now (once per run: cached), so that a file that cannot be read or holds no
        # tokens, or a missing tokenizer, stops the run before its sweep, not on the file's turn.
        try:
            _gpt2_tokens(path.resolve())
        except (OSError, UnicodeDecodeError, ImportError, RuntimeError) as error:
            raise ValueError(f"text:{argument}: {error}") from None
        # Absolute and normalised, so that one file named two ways is one distribution; its
        # links not resolved, so that its label is the name given.
        return Text(Path(os.path.abspath(path)))
    raise ValueError(f"unknown id distribution {spec!r}: use uniform, same, zipf:S or text:FILE")


@functools.cache
def _gpt2_tokens(path: Path) -> torch.Tensor:
    """The file's gpt2 token ids, tokenized once per run."""
    use_checkout_tiktoken_cache()  # the machines this project runs on have no network
    tokens = load_gpt2_tokenizer().encode(path.read_text(encoding="utf-8"), allowed_special={END_OF_TEXT})
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return torch.tensor(tokens, dtype=torch.int64)
