"""Loads the C++ CPU kernels (`fusedemb._C`) and gives their operators fake kernels.

The fake (meta) kernels describe output shapes and dtypes without computing anything; they let
torch.compile and torch.library.opcheck trace through the C++ operators on CPU. forward_fake and
backward_fake describe any forward's and backward's outputs: fusedemb/ops.py registers them for
the operators of the interpreted Triton kernels too.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from fusedemb.validation import check_same_device, check_tables

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

# The dispatcher runs a fake kernel whenever one argument is a meta tensor, so each checks the
# devices first: a meta ids beside CPU tables would otherwise return an uninitialised CPU tensor.
def forward_fake(ids, tok_weight, pos_weight, position_ids, *_):
    """Output of a forward kernel: ids.shape + (D,), in the tables' dtype. The tables are checked
    first, as the kernels check them: a compiled direct call with a 1-D table would otherwise fail
    on its missing shape[1] with a bare IndexError."""
    check_same_device(("tok_weight", tok_weight.device), ids=ids, pos_weight=pos_weight, position_ids=position_ids)
    check_tables(tok_weight, pos_weight)
    return tok_weight.new_empty((*ids.shape, tok_weight.shape[1]))


def backward_fake(
    grad_out, ids, position_ids, position_offset, num_embeddings, context_length, *_, tok_needs_grad=True,
    pos_needs_grad=True,
):  # fmt: skip
    """Outputs of a backward kernel: the two table gradients ([0, D] for a table that needs none)."""
    check_same_device(("grad_out", grad_out.device), ids=ids, position_ids=position_ids)
    dim = grad_out.shape[-1]
    return (
        grad_out.new_empty((num_embeddings if tok_needs_grad else 0, dim)),
        grad_out.new_empty((context_length if pos_needs_grad else 0, dim)),
    )


if CPP_EXTENSION_AVAILABLE:
    torch.library.register_fake("fusedemb::cpu_forward", forward_fake)
    torch.library.register_fake("fusedemb::cpu_backward", backward_fake)
