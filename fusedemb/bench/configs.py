"""Model presets and the problems a benchmark sweep is made of.

A preset fixes the embedding tables of a known model: vocabulary V, width D and context length T
(the position table has T rows, and a training batch uses all T positions). A problem adds the
batch size B, the dtype of the tables and the distribution of the token ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fusedemb.bench.ids import IdDistribution


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab: int
    dim: int
    seq: int


PRESETS: dict[str, ModelConfig] = {
    config.name: config
    for config in (
        ModelConfig("gpt2-124M", vocab=50257, dim=768, seq=1024),
        ModelConfig("gpt2-355M", vocab=50257, dim=1024, seq=1024),
        ModelConfig("gpt2-774M", vocab=50257, dim=1280, seq=1024),
        ModelConfig("gpt2-1.5B", vocab=50257, dim=1600, seq=1024),
        # The table sizes of Llama-3-8B's vocabulary at GPT-2-style learned positions: the case
        # where the dense V x D token gradient dominates the backward's bytes.
        ModelConfig("large-vocab", vocab=128256, dim=4096, seq=2048),
        # A smoke test in seconds (with --quick): fixed costs per call dominate, so its figures
        # say little about bandwidth.
        ModelConfig("tiny", vocab=512, dim=64, seq=32),
    )
}

DEFAULT_PRESET = "gpt2-124M"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_configs(
    preset_names: list[str] | None,
    vocab: int | None = None,
    dim: int | None = None,
    seq: int | None = None,
) -> list[ModelConfig]:
    """The configurations to run: the named presets with any of V, D, T overridden.

    With no preset named, the overrides describe one custom configuration whose other fields are
    those of the default preset, named with all three sizes (``custom[V=1000 D=768 T=64]``):
    the table and the plot show no sizes otherwise. Overridden presets are renamed, e.g.
    ``gpt2-355M[T=256]``, so that a result never carries a preset's name for sizes that are not
    the preset's.
    """
    overrides = {"vocab": vocab, "dim": dim, "seq": seq}
    overrides = {field: value for field, value in overrides.items() if value is not None}
    for field, value in overrides.items():
        if value < 1:
            raise ValueError(f"--{field} must be positive, got {value}")
        if value > _INT64_MAX:  # a size no tensor takes: refused here, not as an error row per problem
            raise ValueError(f"--{field} must fit in 64 bits (at most 2**63 - 1), got {value}")
    if not preset_names:
        if not overrides:
            return [PRESETS[DEFAULT_PRESET]]
        custom = dataclasses.replace(PRESETS[DEFAULT_PRESET], **overrides)
        sizes = {field: getattr(custom, field) for field in _SYMBOLS}
        return [dataclasses.replace(custom, name=f"custom[{_size_suffix(sizes)}]")]
    return [
        dataclasses.replace(PRESETS[name], name=f"{name}[{_size_suffix(overrides)}]", **overrides)
        if overrides
        else PRESETS[name]
        for name in preset_names
    ]


def _size_suffix(sizes: dict[str, int]) -> str:
    return " ".join(f"{_SYMBOLS[field]}={value}" for field, value in sizes.items())


_SYMBOLS = {"vocab": "V", "dim": "D", "seq": "T"}
_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Problem:
    """One point of a sweep: a model's tables, a batch of ids, a dtype and an id distribution."""

    config: ModelConfig
    batch: int
    dtype: torch.dtype
    ids: IdDistribution

    @property
    def tokens(self) -> int:
        return self.batch * self.config.seq

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{self.config.name} {self.dtype_name} {self.ids.label} B={self.batch}"

    def describe(self) -> dict[str, object]:
        """The fields that identify this problem in a report."""
        return {
            "config": self.config.name,
            "vocab": self.config.vocab,
            "dim": self.config.dim,
            "seq": self.config.seq,
            "batch": self.batch,
            "tokens": self.tokens,
            "dtype": self.dtype_name,
            "ids": self.ids.label,
        }


def sweep(
    configs: list[ModelConfig],
    batches: list[int],
    dtypes: list[torch.dtype],
    distributions: list[IdDistribution],
) -> list[Problem]:
    """Every combination, ordered so that problems of one shape and dtype are adjacent.

    torch.compile specializes on shape and dtype; keeping those runs together means each shape
    is compiled once (the id distribution changes values only).
    """
    return [
        Problem(config, batch, dtype, ids)
        for config in configs
        for dtype in dtypes
        for batch in batches
        for ids in distributions
    ]
