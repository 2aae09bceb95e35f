"""fusedemb: a GPT's token + position embedding (gather + add) fused into one pass.

Triton kernels on GPUs, C++ kernels on CPUs, custom backward, torch.library operators that
autograd and torch.compile understand, and a drop-in nn.Module.
"""

from fusedemb.cpp_extension import CPP_EXTENSION_AVAILABLE
from fusedemb.functional import available_backends, fused_embedding
from fusedemb.module import FusedEmbedding
from fusedemb.reference import fused_embedding_reference
from fusedemb.validation import bounds_check_enabled, set_bounds_check

__version__ = "0.1.0"

__all__ = [
    "CPP_EXTENSION_AVAILABLE",
    "FusedEmbedding",
    "available_backends",
    "bounds_check_enabled",
    "fused_embedding",
    "fused_embedding_reference",
    "set_bounds_check",
]
