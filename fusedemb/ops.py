"""The torch.library operators of fusedemb: schema, fake kernels, autograd and backend dispatch.

    fusedemb::fused_embedding           forward  -> out [..., D]
    fusedemb::fused_embedding_backward  backward -> (grad_tok [V, D], grad_pos [P, D]), [0, D] for
                                        a table that needs no gradient (tok_needs_grad / pos_needs_grad)
    fusedemb::range_checked             the id range check of graphs -> copies of ids (and
                                        position_ids), or IndexError

The forward and the backward are each other's derivative: the backward's is the forward again
(double backward), so gradients of gradients (create_graph=True) work to any order.

The forward and the backward are `triton_op`s: torch.compile traces into their bodies and sees
the Triton kernels (wrapped with wrap_triton) as well as the C++ operators they call, instead of
one opaque call.
A body runs on fake tensors too (it is its own fake kernel), so it only allocates and launches:
no .item(), no data_ptr(), no branching on tensor values. It branches on `backend`:

    "triton"  the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    "cpp"     the C++ CPU kernels, torch.ops.fusedemb.cpu_forward / cpu_backward

The device picks the backend before these operators are called (fusedemb.functional.resolve_backend:
Triton for CUDA tensors, C++ for CPU ones) and passes it as an argument, rather than the
operators dispatching on the device themselves: a caller may force one (`backend="triton"` on
CPU tensors under TRITON_INTERPRET=1 runs the interpreter), and a recorded graph keeps the
backend it was made with.

Interpreted Triton kernels are plain Python that cannot be traced, so under the interpreter the
Triton path goes through two opaque operators (fusedemb::interpreted_forward / _backward) with
fake kernels of their own, exactly like the C++ path.

Outside recorded graphs (torch.compile, torch.export, torch.jit.trace, make_fx),
`FusedEmbeddingFunction` (an autograd.Function) calls the same kernels with the same saved
context but skips the custom-operator dispatch, which costs 60-130 us of host time per call:
more than the forward kernel itself takes on a GPU at GPT-2 sizes. An eager call with nothing
to differentiate skips that too and launches the kernels alone (eager_forward). Under torch.func
transforms calls take a fourth path, fusedemb.func_transforms.TransformableFusedEmbedding, an
autograd.Function with the vmap and setup_context the transforms need.

Through fused_embedding, inputs reach these operators checked and normalised by
fusedemb.validation. Called directly, they check what their kernels assume (devices, layouts,
shapes, sizes: fusedemb/kernels/preconditions.py and the C++ TORCH_CHECKs); the id values only
the C++ operators and range_checked check (the Triton kernels clamp them; graphs recorded
through fused_embedding check them by range_checked).
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as forward_ad
from torch._library.triton import set_wrap_triton_enabled
from torch.library import custom_op, triton_op
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from fusedemb.cpp_extension import backward_fake, forward_fake  # importing also registers the C++ operators
from fusedemb.validation import (
    RangeCheck,
    check_dense_tensor,
    check_kernel_index_dtype,
    check_same_device,
    index_range_checks,
    is_plain_tensor,
    kernel_layouts,
    with_unit_stride_along_dim,
)

try:
    import triton  # noqa: F401 - a dependency, but its wheels are for Linux only
except ImportError:  # pragma: no cover
    TRITON_AVAILABLE = INTERPRETED = False
else:  # an ImportError in fusedemb's own kernels is a bug, and must not pass for a missing triton
    from fusedemb.kernels import INTERPRETED, triton_backward, triton_forward

    TRITON_AVAILABLE = True


@custom_op("fusedemb::interpreted_forward", mutates_args=())
def interpreted_forward(
    ids: torch.Tensor,
    tok_weight: torch.Tensor,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
) -> torch.Tensor:
    return triton_forward(ids, tok_weight, pos_weight, position_ids, position_offset)


interpreted_forward.register_fake(forward_fake)


@custom_op("fusedemb::interpreted_backward", mutates_args=())
def interpreted_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
    num_embeddings: int,
    context_length: int,
    padding_idx: int,
    deterministic: bool,
    *,
    tok_needs_grad: bool = True,
    pos_needs_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_backward(
        grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, deterministic,
        tok_needs_grad=tok_needs_grad, pos_needs_grad=pos_needs_grad,
    )  # fmt: skip


interpreted_backward.register_fake(backward_fake)


# cudagraph_unsafe: Inductor keeps the operator out of the CUDA graphs of mode="reduce-overhead"
# (splitting the graph around it, or leaving the graph uncaptured), so every call runs it; in a
# CUDA graph it would run once, at capture, where nothing can be checked.
@custom_op("fusedemb::range_checked", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def range_checked(
    ids: torch.Tensor, num_embeddings: int, position_ids: torch.Tensor | None, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ids and one of position_ids (an empty tensor when there are none), returned
    once every value is found within its table; IndexError otherwise, with the eager check's
    message (RangeCheck).

    This is the range check of recorded graphs (torch.compile, torch.export, torch.jit.trace,
    make_fx).
    Eager calls check in Python, which a graph cannot hold: reading tensor values would break
    Dynamo's graph, and a trace would check its example inputs only. An opaque operator keeps
    the check in the graph, and its outputs are what the kernels then read, so it runs before
    them: an operator without outputs would be dropped as dead code. (Two outputs whatever the
    call: Inductor's C++ wrapper in torch 2.13 mishandles an operator that returns a list of one
    tensor, fixed upstream by pytorch/pytorch#190551.) A copy reads and writes 4 or 8 bytes
    each per token (int32 or int64), against the forward's 2 x D x elt (3072 at D 768 in 16
    bits); the wait for the GPU costs what the eager check's does, less its overlap with the
    forward. While a CUDA graph is being captured nothing is checked (RangeCheck)."""
    _check_indices(ids, position_ids)
    RangeCheck(index_range_checks(ids, num_embeddings, position_ids, context_length)).wait()
    return ids.clone(), ids.new_empty(0) if position_ids is None else position_ids.clone()


@range_checked.register_fake
def _range_checked_fake(ids, num_embeddings, position_ids, context_length):
    _check_indices(ids, position_ids)  # (a meta tensor among real ones comes here: see forward_fake)
    return torch.empty_like(ids), ids.new_empty(0) if position_ids is None else torch.empty_like(position_ids)


@range_checked.register_vmap
def _range_checked_batched(info, in_dims, ids, num_embeddings, position_ids, context_length):
    """Under vmap (torch.compile of a vmapped function) the batch is checked as one tensor:
    each entry's values against the same tables (a stacked batch of tables is still checked
    against one table's rows, as the eager check does)."""
    return range_checked(ids, num_embeddings, position_ids, context_length), (in_dims[0], in_dims[2])


def checked_indices(
    ids: torch.Tensor, num_embeddings: int, position_ids: torch.Tensor | None, context_length: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """range_checked's copies of ids and position_ids, position_ids None again where it was."""
    ids, checked_positions = range_checked(ids, num_embeddings, position_ids, context_length)
    return ids, None if position_ids is None else checked_positions


def _check_indices(ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
    """range_checked's arguments as fused_embedding passes them: int32 or int64, on one device."""
    check_same_device(("ids", ids.device), position_ids=position_ids)
    for name, index in (("ids", ids), ("position_ids", position_ids)):
        if index is not None:
            check_kernel_index_dtype(name, index)


def check_kernel_backend(backend: str) -> None:
    """The operators run kernels: "triton" or "cpp" ("reference" is plain PyTorch, no operator)."""
    if backend not in ("triton", "cpp"):
        raise ValueError(f"backend must be 'triton' or 'cpp' for the fusedemb operators, got {backend!r}")


def forward_kernels(ids, tok_weight, pos_weight, position_ids, position_offset, backend):
    """Run the forward kernels of `backend` directly."""
    if backend == "triton":
        return triton_forward(ids, tok_weight, pos_weight, position_ids, position_offset)
    check_kernel_backend(backend)
    return torch.ops.fusedemb.cpu_forward(ids, tok_weight, pos_weight, position_ids, position_offset)


def backward_kernels(
    grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, backend, deterministic,
    *, tok_needs_grad=True, pos_needs_grad=True,
):  # fmt: skip
    """Run the backward kernels of `backend` directly."""
    needs = {"tok_needs_grad": tok_needs_grad, "pos_needs_grad": pos_needs_grad}
    if backend == "triton":
        return triton_backward(
            grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, deterministic,
            **needs,
        )  # fmt: skip
    check_kernel_backend(backend)
    return torch.ops.fusedemb.cpu_backward(
        grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, **needs
    )


def _check_dense(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None:
            check_dense_tensor(name, tensor)


@triton_op("fusedemb::fused_embedding", mutates_args=())
def fused_embedding_op(
    ids: torch.Tensor,
    tok_weight: torch.Tensor,
    pos_weight: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
    padding_idx: int,
    backend: str,
    deterministic: bool,
) -> torch.Tensor:
    """out[..., t, :] = tok_weight[ids[..., t]] + pos_weight[pos[..., t]].

    padding_idx (-1 for none) and deterministic only shape the backward; they are arguments so
    that autograd's saved context has them.
    """
    # fused_embedding passes these layouts already; an exported or traced graph records this
    # operator and may later get others (a decode step's ids[:, -1:] is strided), as
    # aten.embedding takes any. (Dense ones: a sparse tensor has no layout to convert.)
    _check_dense(ids=ids, tok_weight=tok_weight, pos_weight=pos_weight, position_ids=position_ids)
    ids, tok_weight, pos_weight, position_ids = kernel_layouts(ids, tok_weight, pos_weight, position_ids)
    if backend == "triton" and INTERPRETED:
        return interpreted_forward(ids, tok_weight, pos_weight, position_ids, position_offset)
    return forward_kernels(ids, tok_weight, pos_weight, position_ids, position_offset, backend)


@triton_op("fusedemb::fused_embedding_backward", mutates_args=())
def fused_embedding_backward_op(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_offset: int,
    num_embeddings: int,
    context_length: int,
    padding_idx: int,
    backend: str,
    deterministic: bool,
    *,
    tok_needs_grad: bool = True,
    pos_needs_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter-add grad_out into both tables, accumulating in at least float32 (float64 for
    float64; the sorted path adds the partial sums of rows that cross tiles in float64).

    A table whose gradient is not needed (tok_needs_grad / pos_needs_grad False: a frozen table)
    gets an empty [0, D] tensor, and costs nothing: no V x D buffer, no sort."""
    # (as in the forward: the saved ids are the forward's inputs, in whatever layout they came)
    _check_dense(grad_out=grad_out, ids=ids, position_ids=position_ids)
    grad_out, ids = grad_out.contiguous(), ids.contiguous()
    position_ids = None if position_ids is None else position_ids.contiguous()
    args = (grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx)
    needs = {"tok_needs_grad": tok_needs_grad, "pos_needs_grad": pos_needs_grad}
    if backend == "triton" and INTERPRETED:
        return interpreted_backward(*args, deterministic, **needs)
    return backward_kernels(*args, backend, deterministic, **needs)


def _save_indices_and_settings(
    ctx, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, backend, deterministic
):  # fmt: skip
    """What every derivative of either operator needs: the index tensors and the scalars."""
    ctx.save_for_backward(ids, position_ids)
    ctx.position_offset, ctx.padding_idx, ctx.backend, ctx.deterministic = position_offset, padding_idx, backend, deterministic
    ctx.num_embeddings, ctx.context_length = num_embeddings, context_length


def save_forward_context(ctx, inputs, output):
    ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic = inputs
    _save_indices_and_settings(
        ctx, ids, position_ids, position_offset, tok_weight.shape[0], pos_weight.shape[0], padding_idx, backend,
        deterministic,
    )  # fmt: skip


def _materialized(grad: torch.Tensor) -> torch.Tensor:
    """grad, with a ZeroTensor (PyTorch's zeros without storage, torch._efficientzerotensor,
    which autograd may pass as a gradient) as real zeros: the kernels read memory, and a
    ZeroTensor has none to read (the C++ kernels saw strides of 0, Triton an invalid storage).
    Not while Dynamo traces (compiled autograd): it cannot trace the test, and the graph's
    tensors are fake. (A compiled forward's backward graph takes a ZeroTensor as it comes: the
    C++ kernels refuse it, ValueError; in torch 2.13 the compiled nn.Embedding pair crashes.)"""
    if not torch.compiler.is_compiling() and grad._is_zerotensor():
        return torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    return grad


def table_gradients(ctx, grad_out, backward):
    ids, position_ids = ctx.saved_tensors
    _, tok_needs_grad, pos_needs_grad, *_ = ctx.needs_input_grad  # a frozen table gets no work
    grad_tok, grad_pos = backward(
        _materialized(grad_out).contiguous(),
        ids,
        position_ids,
        ctx.position_offset,
        ctx.num_embeddings,
        ctx.context_length,
        ctx.padding_idx,
        ctx.backend,
        ctx.deterministic,
        tok_needs_grad=tok_needs_grad,
        pos_needs_grad=pos_needs_grad,
    )
    return (None, grad_tok if tok_needs_grad else None, grad_pos if pos_needs_grad else None,
            None, None, None, None, None)  # fmt: skip


def _backward(ctx, grad_out):
    return table_gradients(ctx, grad_out, fused_embedding_backward_op)


fused_embedding_op.register_autograd(_backward, setup_context=save_forward_context)


def save_backward_context(ctx, inputs) -> None:
    """What the backward's own derivative needs, from the backward operator's positional inputs
    (the first 9: TransformableFusedEmbeddingBackward passes the two needs-grad flags after them)."""
    grad_out, *indices_and_settings = inputs[:9]
    _save_indices_and_settings(ctx, *indices_and_settings)
    ctx.row = _row_like(grad_out)


def _setup_backward_context(ctx, inputs, keyword_only_inputs, output):
    # (register_autograd passes keyword_only_inputs to the setup of an operator that has some)
    save_backward_context(ctx, inputs)


def _row_like(rows: torch.Tensor) -> dict:
    """torch.zeros arguments of one row like the last dim of rows: _as_table's zero table."""
    return {"size": (1, rows.shape[-1]), "dtype": rows.dtype, "device": rows.device}


def _present(grad: torch.Tensor | None, num_rows: int) -> bool:
    """Whether an incoming gradient (or tangent) of a table is there: not None, and not the [0, D]
    placeholder of a frozen table."""
    return grad is not None and grad.shape[0] == num_rows


def _as_table(grad: torch.Tensor | None, num_rows: int, row: dict) -> torch.Tensor:
    """An incoming gradient of a table gradient, in a layout the forward kernels read; a missing
    one is a zero table that takes no memory: one row of zeros, repeated by a row stride of 0."""
    if not _present(grad, num_rows):
        return torch.zeros(**row).expand(num_rows, -1)
    return with_unit_stride_along_dim(grad)


def gather_table_gradients(ctx, grad_of_grad_tok, grad_of_grad_pos, forward) -> torch.Tensor:
    """The backward's vector-Jacobian product, by `forward` (an apply of the forward).

    The backward is linear in grad_out, grad_tok[v] = sum of grad_out[n] over the tokens with
    ids[n] == v (none for padding_idx) and grad_pos[p] likewise over pos(n) == p, so its
    vector-Jacobian product gathers the incoming gradients back, token by token:

        d/d grad_out[n] = g_tok[ids[n]] + g_pos[pos(n)]    (g_tok's padding_idx row counted as 0)

    which is the forward itself, with g_tok and g_pos as the tables. It is differentiable in turn."""
    # grad_tok's padding row does not depend on grad_out
    return _forward_on_tables(ctx, grad_of_grad_tok, grad_of_grad_pos, forward, zero_padding_row=True)


def _forward_on_tables(ctx, tok_rows, pos_rows, forward, *, zero_padding_row: bool) -> torch.Tensor:
    """forward (an apply of the forward) on the saved indices, with incoming derivatives of the
    tables as the tables (a missing one as a zero table), tok_rows' padding_idx row zeroed if
    asked."""
    ids, position_ids = ctx.saved_tensors
    tok = _as_table(tok_rows, ctx.num_embeddings, ctx.row)
    pos = _as_table(pos_rows, ctx.context_length, ctx.row)
    # (asked of the incoming rows, not of tok's strides: an expanded one has row stride 0 too, as
    # the zero table has)
    if zero_padding_row and ctx.padding_idx >= 0 and _present(tok_rows, ctx.num_embeddings):
        tok = tok.index_fill(0, torch.tensor([ctx.padding_idx], device=tok.device), 0)
    return forward(ids, tok, pos, position_ids, ctx.position_offset, ctx.padding_idx, ctx.backend, ctx.deterministic)


def _backward_of_backward(ctx, grad_of_grad_tok, grad_of_grad_pos):
    """Double backward (create_graph=True: Hessian-vector products, gradient penalties)."""
    return (gather_table_gradients(ctx, grad_of_grad_tok, grad_of_grad_pos, fused_embedding_op),) + (None,) * 8


fused_embedding_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_backward_context)


# Outside tracing, wrap_triton'd kernels would still go through a higher-order op (99.8 us of
# host time per launch against 19.3 launched directly, on an H100 machine: docs/benchmarks.md,
# "Host time per call"); eager calls launch them directly, as a triton_op's own eager path
# does. The C++ backend launches no Triton kernel and skips the context's cost.
def _launch_directly(backend: str):
    if backend != "triton":
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


# Kernels go through the registered operators instead of being launched directly where only the
# dispatcher can handle them: while any dispatch mode is active (make_fx, as torch.func.linearize
# uses, sees only what goes through the dispatcher; FakeTensorMode, FlopCounterMode, a logging
# mode likewise); for tensor subclasses with a
# __torch_dispatch__ (wrappers such as torch.testing's TwoTensor, quantized or float8 tables),
# which hold no storage a Triton kernel could read and unwrap themselves at the dispatcher (as
# the C++ operators, always dispatched, let them); and for autograd's batched tensors
# (is_grads_batched gradients, the tangents of vectorized forward-mode jacobians), which only
# the dispatcher's fallback loops over. Those reach eager calls' backward and jvp, and torch.func's
# forward (func_transforms) as gradients or tangents turned tables: the checks sit there, off the
# path of an ordinary forward.
def dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode is active (FakeTensorMode, make_fx's proxy mode, a logging
    mode): the stack's length sees modes pushed without entering them, as PyTorch's internals
    push some; torch.utils._python_dispatch's flag, entered modes of the pre-dispatch stack too
    (make_fx(pre_dispatch=True))."""
    return torch._C._len_torch_dispatch_stack() > 0 or is_in_torch_dispatch_mode()


_PYTHON_KEY = torch._C.DispatchKey.Python


def _dispatched_in_python(*tensors: torch.Tensor | None) -> bool:
    """Whether a tensor is a subclass that handles its operators in __torch_dispatch__. (Plain
    tensors and parameters are told by their type first: the key set costs more host time.)"""
    return any(
        tensor is not None
        and not is_plain_tensor(tensor)
        and torch._C._dispatch_keys(tensor).has(_PYTHON_KEY)
        for tensor in tensors
    )


def autograd_batched(tensor: torch.Tensor | None) -> bool:
    """Whether tensor is one of autograd's batched tensors (is_grads_batched gradients, the
    tangents of vectorized jacobians), not a tensor under torch.func's vmap (func_transforms)."""
    return tensor is not None and torch._C._functorch.is_legacy_batchedtensor(tensor)


def eager_forward(ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic):
    """The forward kernels of an eager call, launched directly (padding_idx and deterministic
    shape only the backward). Called alone when there is nothing to differentiate (inference,
    decoding): no autograd node is built, as eager PyTorch builds none for nn.Embedding under
    torch.no_grad(). Where only the dispatcher can handle the tensors (above), the registered
    operator runs them instead, with the call's own arguments: a mode may record it."""
    if dispatch_mode_active() or _dispatched_in_python(ids, tok_weight, pos_weight, position_ids):
        return fused_embedding_op(
            ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic
        )
    with _launch_directly(backend):
        return forward_kernels(ids, tok_weight, pos_weight, position_ids, position_offset, backend)


def eager_backward(
    grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, backend, deterministic,
    *, tok_needs_grad, pos_needs_grad,
):  # fmt: skip
    """The backward kernels of an eager call, launched directly (see eager_forward). Traced by
    Dynamo instead (compiled autograd compiling the backward of an eager forward), it records the
    registered operator, as a compiled forward's graph does: Dynamo cannot trace the kernels'
    launches in Triton's interpreter, nor autograd_batched's test."""
    args = (grad_out, ids, position_ids, position_offset, num_embeddings, context_length, padding_idx, backend,
            deterministic)  # fmt: skip
    needs = {"tok_needs_grad": tok_needs_grad, "pos_needs_grad": pos_needs_grad}
    if (
        torch.compiler.is_compiling()
        or dispatch_mode_active()
        or autograd_batched(grad_out)
        or _dispatched_in_python(grad_out, ids, position_ids)
    ):
        return fused_embedding_backward_op(*args, **needs)
    with _launch_directly(backend):
        return backward_kernels(*args, **needs)


def save_for_tangents(ctx, ids, tok_weight, position_ids) -> None:
    ctx.save_for_forward(ids, position_ids)
    ctx.row = _row_like(tok_weight)


def forward_on_tangents(ctx, tok_tangent, pos_tangent, forward) -> torch.Tensor:
    """Forward-mode AD, by `forward` (an apply of the forward, so that it is differentiable in
    turn): the forward is linear in the tables, so the output's tangent is the forward on the
    tables' tangents (a table without one counts as zero); the padding row, returned as stored,
    passes its tangent on too, as in nn.Embedding."""
    return _forward_on_tables(ctx, tok_tangent, pos_tangent, forward, zero_padding_row=False)


class FusedEmbeddingFunction(torch.autograd.Function):
    """Eager-mode twin of fused_embedding_op: same arguments, kernels and saved context; and
    forward-mode AD (torch.autograd.forward_ad), which the operator lacks."""

    @staticmethod
    def forward(ctx, ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic):
        inputs = (ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic)
        save_forward_context(ctx, inputs, None)
        if forward_ad._current_level >= 0:  # forward-mode AD is on: jvp will need these
            save_for_tangents(ctx, ids, tok_weight, position_ids)
        return eager_forward(
            ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx, backend, deterministic
        )

    @staticmethod
    def jvp(ctx, ids_tangent, tok_tangent, pos_tangent, *_):
        batched = autograd_batched(tok_tangent) or autograd_batched(pos_tangent)
        forward = fused_embedding_op if batched else FusedEmbeddingFunction.apply
        return forward_on_tangents(ctx, tok_tangent, pos_tangent, forward)

    @staticmethod
    def backward(ctx, grad_out):
        if forward_ad._current_level >= 0:
            # Forward-over-reverse (a dual table's tangent carried through its gradient): the
            # backward needs a jvp, which torch.func's form of it has.
            from fusedemb.func_transforms import apply_backward  # (func_transforms imports this module)

            return table_gradients(ctx, grad_out, apply_backward)
        if torch.is_grad_enabled():
            # create_graph=True: the registered operator's autograd records the double backward
            return table_gradients(ctx, grad_out, fused_embedding_backward_op)
        return table_gradients(ctx, grad_out, eager_backward)
