"""FusedEmbedding: a drop-in nn.Module for a GPT's token + position embedding pair."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from fusedemb.functional import check_options, fused_embedding

# The two submodules that hold the tables, by attribute name.
TABLE_MODULES = ("tok_emb", "pos_emb")


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
        check_options(backend, deterministic)  # at construction, not at the first forward
        self.tok_emb = tok_emb  # checked by __setattr__, as any later assignment is
        self.pos_emb = pos_emb
        self.backend = backend
        self.deterministic = deterministic

    # Every way of setting a table module, at construction or later (PEFT's LoRA injection,
    # a larger vocabulary, del then assign, register_module), is checked alike.
    def __setattr__(self, name: str, value) -> None:
        if name in TABLE_MODULES:
            self._check_table_setting(name, value)
        super().__setattr__(name, value)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        if name in TABLE_MODULES:
            self._check_table_setting(name, module)
        super().add_module(name, module)

    def _check_table_setting(self, name: str, module) -> None:
        """The module about to be set as table `name`, alone and beside the other table."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be an nn.Embedding, got {type(module).__name__}")
        _check_table_module(name, module)
        tables = {**{other: self._modules.get(other) for other in TABLE_MODULES}, name: module}
        if all(table is not None for table in tables.values()):
            _check_same_width(tables["tok_emb"], tables["pos_emb"])

    @classmethod
    def from_embeddings(
        cls, tok_emb: nn.Embedding, pos_emb: nn.Embedding, *, backend: str | None = None, deterministic: bool | None = None
    ) -> FusedEmbedding:
        """Wrap existing modules: their parameters (and any tying) are shared, not copied."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(tok_emb, pos_emb, backend, deterministic)
        return module

    @classmethod
    def from_pretrained(
        cls,
        tok_weight: torch.Tensor,
        pos_weight: torch.Tensor,
        freeze: bool = True,
        padding_idx: int | None = None,
        *,
        backend: str | None = None,
        deterministic: bool | None = None,
    ) -> FusedEmbedding:
        """Tables from tensors (a checkpoint's ``wte`` and ``wpe``), each made a module by
        ``nn.Embedding.from_pretrained``: the parameters are the tensors themselves, not copies,
        and ``freeze=True`` (its default, kept here) stops their gradients."""
        tok_emb = nn.Embedding.from_pretrained(tok_weight, freeze=freeze, padding_idx=padding_idx)
        pos_emb = nn.Embedding.from_pretrained(pos_weight, freeze=freeze)
        return cls.from_embeddings(tok_emb, pos_emb, backend=backend, deterministic=deterministic)

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
        # statistics, PEFT's input hooks), so they are looked for on every call, at the cost of a
        # few dict lookups. Dynamo guards the hook dicts it reads here: a hook added later
        # recompiles, and the refusals of _check_hooks hold in a compiled call too.
        if _has_hooks(tok_emb) or _has_hooks(pos_emb):
            _check_hooks("tok_emb", tok_emb)
            _check_hooks("pos_emb", pos_emb)
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

    def __prepare_scriptable__(self):
        """torch.jit.script asks this first: refuse by name instead of failing on a Python type."""
        raise RuntimeError(
            "FusedEmbedding cannot be scripted with torch.jit.script (its forward is Python that calls custom "
            "operators); use torch.jit.trace, torch.export or torch.compile"
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


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling the module would run more than nn.Embedding's forward: hooks, or a forward
    set on the instance (accelerate's hooks replace it so). (Counted with len: torch 2.11's
    Dynamo cannot trace bool() of a module's hook dict.)"""
    # One sum, not any() over a generator: this runs twice per eager call, and the generator cost
    # 0.3 us more each time (this project's CPU VM).
    hooks = (
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
    )
    return hooks > 0 or "forward" in module.__dict__


# The forward pre-hooks of torch.nn.utils.weight_norm and spectral_norm (the older, hook-based
# ones), by the name of the function that adds them.
_WEIGHT_RECOMPUTING_HOOKS = {WeightNorm: "weight_norm", SpectralNorm: "spectral_norm"}


def _check_hooks(name: str, module: nn.Module) -> None:
    """Refuse a hook that recomputes the weight before each call: skipped, it would leave the
    kernels a stale weight, whose gradient never reaches the parameters it came from. Warn of any
    other hook, which only does not run (in eager calls: Dynamo cannot trace warnings.warn)."""
    for hook in module._forward_pre_hooks.values():
        utility = _WEIGHT_RECOMPUTING_HOOKS.get(type(hook))
        if utility is not None:
            raise ValueError(
                f"FusedEmbedding.{name} has the hook of torch.nn.utils.{utility}, which recomputes its weight "
                "when the module is called; FusedEmbedding reads the weight without calling it, so it would use a "
                f"stale weight that never trains: use torch.nn.utils.parametrizations.{utility} instead"
            )
    if _has_hooks(module) and not torch.compiler.is_compiling():
        warnings.warn(
            f"hooks on FusedEmbedding.{name} (or a forward set on it) do not run: FusedEmbedding reads its weight and "
            "never calls it; register them on the FusedEmbedding",
            stacklevel=_user_stacklevel(),
        )


# fusedemb's files (a folder, with its separator) and nn.Module's __call__ machinery (a file).
_MODULE_MACHINERY = (str(Path(__file__).parent) + os.sep, nn.Module.__call__.__code__.co_filename)


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel, from the function that calls this one, of the first frame
    outside fusedemb and nn.Module's call machinery: the warning then names the user's line, and
    Python's default filter shows it once per such line, not once for everyone. (Python 3.12's
    skip_file_prefixes does this; 3.11 is supported.)"""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_MODULE_MACHINERY):
        frame, level = frame.f_back, level + 1
    return level


def _check_table_module(name: str, module: nn.Module) -> None:
    """Refuse what FusedEmbedding cannot honour, and warn of what it skips: it reads the module's
    weight and never calls it, so a module with a forward of its own (an nn.Embedding subclass
    that overrides forward, a LoRA wrapper), options of F.embedding's that the kernels lack, or
    hooks would otherwise be ignored without a word. (Options changed in place later, such as
    tok_emb.max_norm = 1.0, are not seen.)"""
    if type(module).forward is not nn.Embedding.forward:
        raise TypeError(
            f"{name} is a {type(module).__name__} with a forward of its own, which FusedEmbedding would never "
            "call (it reads the weight only): use an nn.Embedding"
        )
    if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
        raise ValueError(f"{name}: max_norm, sparse and scale_grad_by_freq are not supported by FusedEmbedding")
    if name == "pos_emb" and module.padding_idx is not None:
        raise ValueError("pos_emb must not have a padding_idx: every position row is learned")
    _check_hooks(name, module)


def _check_same_width(tok_emb: nn.Module, pos_emb: nn.Module) -> None:
    if tok_emb.embedding_dim != pos_emb.embedding_dim:
        raise ValueError(
            f"tok_emb and pos_emb must have the same embedding_dim, got {tok_emb.embedding_dim} and {pos_emb.embedding_dim}"
        )
