"""Triton kernels of fusedemb: the one-pass forward and the scatter-add backward."""

from triton.runtime.jit import JITFunction

from fusedemb.kernels.backward import triton_backward
from fusedemb.kernels.forward import fused_embedding_forward_kernel, triton_forward

# True under Triton's interpreter: TRITON_INTERPRET=1 when these kernels were defined (Triton
# reads it as each @triton.jit function is made), i.e. before fusedemb was imported.
INTERPRETED = not isinstance(fused_embedding_forward_kernel, JITFunction)

__all__ = ["INTERPRETED", "triton_backward", "triton_forward"]
