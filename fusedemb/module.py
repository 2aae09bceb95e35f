"""FusedEmbedding: a drop-in nn.Module for a GPT's token + position embedding pair."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fusedemb.functional import fused_embedding


class FusedEmbedding(nn.Module):
    """The pair ``tok_emb = nn.Embedding(V, D)``, ``pos_emb = nn.Embedding(P, D)`` and their sum.

    The tables live in two plain ``nn.Embedding`` submodules named ``tok_emb`` and ``pos_emb``:
    they are created in that order with nn.Embedding's initialisation, so a seeded model gets
    exactly the weights of a model with two nn.Embedding, and the state_dict keys are
    ``tok_emb.weight`` and ``pos_emb.weight``. A GPT whose embeddings were ``self.tok_emb`` and
    ``self.pos_emb`` loads its checkpoints after renaming ``tok_emb.`` -> ``<name>.tok_emb.`` and
    ``pos_emb.`` -> ``<name>.pos_emb.`` (see `from_embeddings` to reuse the modules as they are).
    Weight tying works as usual: ``head.weight = fused.tok_emb.weight``.

    forward(ids, position_ids=None, position_offset=0): ids (..., T) -> (..., T, D).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        context_length: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str | None = None,
        deterministic: bool | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        tok_emb = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, **factory)
        pos_emb = nn.Embedding(context_length, embedding_dim, **factory)
        self._attach(tok_emb, pos_emb, backend, deterministic)

    def _attach(self, tok_emb: nn.Embedding, pos_emb: nn.Embedding, backend: str | None, deterministic: bool | None):
        _check_submodules(tok_emb, pos_emb)
        self.tok_emb = tok_emb
        self.pos_emb = pos_emb
        self.backend = backend
        self.deterministic = deterministic

    def __setattr__(self, name: str, value) -> None:
        # Replacing a table module (PEFT's LoRA injection does) is checked as construction is.
        if name in ("tok_emb", "pos_emb") and name in self._modules:
            tok_emb, pos_emb = (value, self.pos_emb) if name == "tok_emb" else (self.tok_emb, value)
            if not isinstance(value, nn.Module):
                raise TypeError(f"{name} must be an nn.Embedding, got {type(value).__name__}")
            _check_submodules(tok_emb, pos_emb)
        super().__setattr__(name, value)

    @classmethod
    def from_embeddings(
        cls, tok_emb: nn.Embedding, pos_emb: nn.Embedding, *, backend: str | None = None, deterministic: bool | None = None
    ) -> FusedEmbedding:
        """Wrap existing modules: their parameters (and any tying) are shared, not copied."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(tok_emb, pos_emb, backend, deterministic)
        return module

    @property
    def num_embeddings(self) -> int:
        return self.tok_emb.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.tok_emb.embedding_dim

    @property
    def context_length(self) -> int:
        return self.pos_emb.num_embeddings

    @property
    def padding_idx(self) -> int | None:
        return self.tok_emb.padding_idx

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor | None = None, position_offset: int = 0
    ) -> torch.Tensor:
        tok_emb, pos_emb = self.tok_emb, self.pos_emb
        # Hooks can be added at any time (FSDP's fully_shard of a submodule, activation
        # statistics, PEFT's input hooks), so they are looked for on every call; this costs a few
        # dict lookups, where running all of _check_submodules would cost microseconds.
        if _hooks(tok_emb) or _hooks(pos_emb):
            _check_submodules(tok_emb, pos_emb)
        return fused_embedding(
            ids,
            tok_emb.weight,
            pos_emb.weight,
            position_ids=position_ids,
            position_offset=position_offset,
            padding_idx=tok_emb.padding_idx,
            backend=self.backend,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, context_length={self.context_length}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        if self.deterministic is not None:
            text += f", deterministic={self.deterministic}"
        return text


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _check_submodules(tok_emb: nn.Module, pos_emb: nn.Module) -> None:
    """Refuse what FusedEmbedding cannot honour, and warn of what it skips: it reads the two
    modules' weights and never calls them, so a module with a forward of its own (an
    nn.Embedding subclass, a LoRA wrapper), options of F.embedding's that the kernels lack, or
    hooks on either module would otherwise be ignored without a word."""
    for name, module in (("tok_emb", tok_emb), ("pos_emb", pos_emb)):
        if type(module).forward is not nn.Embedding.forward:
            raise TypeError(
                f"{name} is a {type(module).__name__} with a forward of its own, which FusedEmbedding would never "
                "call (it reads the weight only): use an nn.Embedding"
            )
        if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
            raise ValueError(f"{name}: max_norm, sparse and scale_grad_by_freq are not supported by FusedEmbedding")
        if _hooks(module):
            warnings.warn(
                f"hooks on FusedEmbedding.{name} do not run: FusedEmbedding reads its weight and never calls it; "
                "register them on the FusedEmbedding",
                stacklevel=2,
            )
    if pos_emb.padding_idx is not None:
        raise ValueError("pos_emb must not have a padding_idx: every position row is learned")
    if tok_emb.embedding_dim != pos_emb.embedding_dim:
        raise ValueError(
            f"tok_emb and pos_emb must have the same embedding_dim, got {tok_emb.embedding_dim} and {pos_emb.embedding_dim}"
        )
