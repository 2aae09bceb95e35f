"""What the Triton kernels assume of their arguments, checked on the host before any launch.

fusedemb.validation normalises what users pass in; these checks guard the registered operators
(torch.ops.fusedemb.*), which anyone can call directly, as the C++ kernels' TORCH_CHECKs do. They
read shapes, strides and dtypes only, never values (out-of-range values are clamped inside the
kernels), so they cost no device work and are fine on torch.compile's fake tensors.

The kernels flatten the ids and the gradient as contiguous [N] and [N, D] arrays, step along a
row with unit stride, and hold token indices and sorted table rows in int32: N and the row counts
must stay below 2^31 (offsets into the tables are 64-bit).
"""

from __future__ import annotations

import torch

INT32_LIMIT = 2**31
ID_DTYPES = (torch.int32, torch.int64)


def check_index(name: str, index: torch.Tensor) -> None:
    if index.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    if not index.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if index.numel() >= INT32_LIMIT:
        raise ValueError(f"{name} has {index.numel()} elements; the Triton kernels index tokens in int32 (< 2^31)")


def check_rows(name: str, num_rows: int) -> None:
    if num_rows >= INT32_LIMIT:
        raise ValueError(f"{name} has {num_rows} rows; the Triton kernels hold table rows in int32 (< 2^31)")


def check_position_ids(position_ids, ids) -> None:
    if position_ids is not None:
        check_index("position_ids", position_ids)
        if position_ids.shape != ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must have the shape of ids {tuple(ids.shape)}")


def check_forward_inputs(ids, tok_weight, pos_weight, position_ids) -> None:
    check_index("ids", ids)
    if ids.dim() == 0:
        raise ValueError("ids must have shape (..., T)")
    for name, table in (("tok_weight", tok_weight), ("pos_weight", pos_weight)):
        if table.dim() != 2 or table.stride(1) != 1:
            raise ValueError(f"{name} must be 2-D with unit stride along dim, got shape {tuple(table.shape)} "
                             f"and strides {table.stride()}")  # fmt: skip
        check_rows(name, table.shape[0])
    if tok_weight.shape[1] != pos_weight.shape[1] or tok_weight.dtype != pos_weight.dtype:
        raise ValueError(f"tok_weight {tuple(tok_weight.shape)} {tok_weight.dtype} and pos_weight "
                         f"{tuple(pos_weight.shape)} {pos_weight.dtype} must have the same dim and dtype")  # fmt: skip
    check_position_ids(position_ids, ids)


def check_backward_inputs(grad_out, ids, position_ids, num_embeddings, context_length) -> None:
    check_index("ids", ids)
    if grad_out.shape[:-1] != ids.shape or not grad_out.is_contiguous():
        raise ValueError(f"grad_out must be contiguous with shape ids.shape + (dim,) = {tuple(ids.shape)} + (dim,), "
                         f"got {tuple(grad_out.shape)}")  # fmt: skip
    check_rows("the token table", num_embeddings)
    check_rows("the position table", context_length)
    check_position_ids(position_ids, ids)
