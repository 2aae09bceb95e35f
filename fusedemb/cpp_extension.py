"""Loads the C++ CPU kernels (`fusedemb._C`) and gives their operators fake kernels.

The fake (meta) kernels describe output shapes and dtypes without computing anything; they let
torch.compile and torch.library.opcheck trace through the C++ operators on CPU.
"""

from __future__ import annotations

import importlib
import warnings

import torch

try:
    importlib.import_module("fusedemb._C")  # loading the library registers torch.ops.fusedemb.cpu_*
    CPP_EXTENSION_AVAILABLE = True
except ImportError as error:  # pragma: no cover - exercised only on machines without the build
    CPP_EXTENSION_AVAILABLE = False
    warnings.warn(
        f"fusedemb's C++ extension is not built ({error}); CPU tensors use the plain-PyTorch reference. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

def forward_fake(ids, tok_weight, *_):
    """Output of a forward kernel: ids.shape + (D,), in the tables' dtype."""
    return tok_weight.new_empty((*ids.shape, tok_weight.shape[1]))


def backward_fake(
    grad_out, ids, position_ids, position_offset, num_embeddings, context_length, *_, tok_needs_grad=True,
    pos_needs_grad=True,
):  # fmt: skip
    """Outputs of a backward kernel: the two table gradients ([0, D] for a table that needs none)."""
    dim = grad_out.shape[-1]
    return (
        grad_out.new_empty((num_embeddings if tok_needs_grad else 0, dim)),
        grad_out.new_empty((context_length if pos_needs_grad else 0, dim)),
    )


if CPP_EXTENSION_AVAILABLE:
    torch.library.register_fake("fusedemb::cpu_forward", forward_fake)
    torch.library.register_fake("fusedemb::cpu_backward", backward_fake)
