"""FusedEmbedding: a drop-in nn.Module for a GPT's token + position embedding pair."""

from __future__ import annotations

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
        if tok_emb.embedding_dim != pos_emb.embedding_dim:
            raise ValueError(
                f"tok_emb and pos_emb must have the same embedding_dim, got {tok_emb.embedding_dim} and {pos_emb.embedding_dim}"
            )
        for name, module in (("tok_emb", tok_emb), ("pos_emb", pos_emb)):
            if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
                raise ValueError(f"{name}: max_norm, sparse and scale_grad_by_freq are not supported by FusedEmbedding")
        if pos_emb.padding_idx is not None:
            raise ValueError("pos_emb must not have a padding_idx: every position row is learned")
        self.tok_emb = tok_emb
        self.pos_emb = pos_emb
        self.backend = backend
        self.deterministic = deterministic

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
        return fused_embedding(
            ids,
            self.tok_emb.weight,
            self.pos_emb.weight,
            position_ids=position_ids,
            position_offset=position_offset,
            padding_idx=self.padding_idx,
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
