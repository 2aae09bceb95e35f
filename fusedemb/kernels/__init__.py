"""Triton kernels of fusedemb: the one-pass forward and the scatter-add backward."""

from fusedemb.kernels.backward import triton_backward
from fusedemb.kernels.common import INTERPRETED
from fusedemb.kernels.forward import triton_forward

__all__ = ["INTERPRETED", "triton_backward", "triton_forward"]
