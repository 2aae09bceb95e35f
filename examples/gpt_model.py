"""A GPT-2-architecture language model whose first layer is either nn.Embedding or fusedemb.

    logits = out_head(final_norm(blocks(dropout(embedding(ids)))))
    embedding(ids)[b, t] = tok_emb.weight[ids[b, t]] + pos_emb.weight[t]

The two first layers hold the same parameters under the same names: ``embedding.tok_emb.weight``
(vocab_size x emb_dim) and ``embedding.pos_emb.weight`` (context_length x emb_dim). So

- a seeded model gets the same initial weights with either first layer (the token table is
  created first in both, and every other module is created in the same order);
- a checkpoint of one loads into the other with ``load_state_dict(strict=True)`` and no key
  mapping. (A GPT that keeps tok_emb/pos_emb at the top level, as the "LLMs from scratch" code
  does, maps by prefixing: ``tok_emb.weight -> embedding.tok_emb.weight``,
  ``pos_emb.weight -> embedding.pos_emb.weight``.)

As in GPT-2 the output head is tied to the token table: ``out_head.weight is
embedding.tok_emb.weight``, so the token table's gradient is the sum of the head's dense
gradient and the embedding's scatter-add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusedemb import FusedEmbedding


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float
    qkv_bias: bool

    def __post_init__(self):
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be a multiple of n_heads ({self.n_heads})")


# GPT-2 small: 124,439,808 parameters with the tied head (the head adds no parameters).
GPT2_124M = GPTConfig(
    vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1, qkv_bias=True
)
# Small enough that two 10-step runs take seconds on two CPU cores; same vocabulary as GPT-2.
TINY = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=True)
CONFIGS = {"tiny": TINY, "gpt2-124M": GPT2_124M}

# GPT-2's initialisation: N(0, 0.02) for every weight matrix and table, zero biases.
INIT_STD = 0.02


class TokenAndPositionEmbedding(nn.Module):
    """The plain-PyTorch first layer: two nn.Embedding lookups and a broadcast add (four kernels,
    with the arange of the positions)."""

    def __init__(self, vocab_size: int, emb_dim: int, context_length: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, emb_dim)
        self.pos_emb = nn.Embedding(context_length, emb_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[-1], device=ids.device)
        return self.tok_emb(ids) + self.pos_emb(positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.drop_rate = config.drop_rate
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        # (B, T, 3D) -> three (B, heads, T, D/heads) tensors
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        attention_dropout = self.drop_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attention_dropout, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.expand = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.project = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.gelu(self.expand(x), approximate="tanh"))  # GPT-2's tanh GELU


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then + drop(ff(norm(x)))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim)
        self.attention = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.emb_dim)
        self.feed_forward = FeedForward(config)
        self.drop_residual = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_residual(self.attention(self.norm1(x)))
        return x + self.drop_residual(self.feed_forward(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 with a tied output head; ``use_fusedemb`` picks fusedemb.FusedEmbedding as first layer."""

    def __init__(self, config: GPTConfig, use_fusedemb: bool):
        super().__init__()
        self.config = config
        first_layer = FusedEmbedding if use_fusedemb else TokenAndPositionEmbedding
        self.embedding = first_layer(config.vocab_size, config.emb_dim, config.context_length)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.blocks = nn.Sequential(*(TransformerBlock(config) for _ in range(config.n_layers)))
        self.final_norm = nn.LayerNorm(config.emb_dim)
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.apply(_init_gpt2_weights)
        # Tie after initialising, so the token table keeps the values it drew first.
        self.out_head.weight = self.embedding.tok_emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.config.context_length:
            raise ValueError(
                f"sequence length {ids.shape[-1]} exceeds the context length {self.config.context_length}"
            )
        x = self.drop_emb(self.embedding(ids))
        return self.out_head(self.final_norm(self.blocks(x)))


def _init_gpt2_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
