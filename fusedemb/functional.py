"""fused_embedding: the functional form, on the weights of existing nn.Embedding modules."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.overrides import handle_torch_function, has_torch_function_variadic

from fusedemb.cpp_extension import CPP_EXTENSION_AVAILABLE
from fusedemb.func_transforms import apply_forward as apply_transformable
from fusedemb.ops import (
    INTERPRETED,
    TRITON_AVAILABLE,
    FusedEmbeddingFunction,
    checked_indices,
    dispatch_mode_active,
    eager_forward,
    fused_embedding_op,
)
from fusedemb.reference import fused_embedding_reference
from fusedemb.validation import TRITON_DEVICES, EmbeddingInputs, RangeCheck, bounds_check_enabled, prepare_inputs

BACKENDS = ("triton", "cpp", "reference")


def triton_runs_on(device: torch.device) -> bool:
    """CUDA tensors run compiled Triton kernels; CPU tensors only under Triton's interpreter."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def cpp_runs_on(device: torch.device) -> bool:
    """The C++ kernels run on CPU tensors, where the extension was built."""
    return device.type == "cpu" and CPP_EXTENSION_AVAILABLE


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors of `device`: Triton (compiled on CUDA, interpreted
    on CPU), the C++ kernels, the reference. (None picks: see resolve_backend.)"""
    device = torch.device(device)
    backends = []
    if triton_runs_on(device):
        backends.append("triton")
    if cpp_runs_on(device):
        backends.append("cpp")
    backends.append("reference")
    return backends


def check_options(backend: str | None, deterministic: bool | None) -> None:
    """The choices fused_embedding and FusedEmbedding take, checked where they are given."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be None, True or False, got {deterministic!r}")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """None picks Triton on CUDA and the C++ kernels on CPU (the reference where neither can
    run: no triton, or no build of the extension); an explicit choice (one of BACKENDS:
    check_options) is checked against the device. Meta tensors, which have shapes and no values
    (a model built for deferred initialisation), run the reference whatever the choice."""
    if device.type == "meta":
        return "reference"
    if backend is None:
        if device.type == "cuda" and TRITON_AVAILABLE:
            return "triton"
        return "cpp" if cpp_runs_on(device) else "reference"
    if backend not in available_backends(device):
        check_options(backend, None)  # an unknown name is a ValueError, not a backend missing here
        reasons = {
            "triton": TRITON_DEVICES,
            "cpp": "the C++ kernels run on CPU tensors and need the extension built (pip install --no-build-isolation -e .)",
        }
        raise RuntimeError(f"backend {backend!r} cannot run on {device} tensors here: {reasons[backend]}")
    return backend


def fused_embedding(
    ids: torch.Tensor,
    tok_weight: torch.Tensor,
    pos_weight: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    position_offset: int = 0,
    padding_idx: int | None = None,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Token embedding plus absolute position embedding in one pass.

    Equivalent to ``F.embedding(ids, tok_weight, padding_idx) + F.embedding(pos, pos_weight)``
    with ``pos[..., t] = t + position_offset`` (or ``position_ids`` when given), differentiable
    in both tables. Pass the ``.weight`` of existing ``nn.Embedding`` modules: checkpoints and
    weight tying stay as they are.

    Args:
        ids: integer tensor (int32/int64 kernels; other integer dtypes are widened) of shape (..., T).
        tok_weight: token table (V, D); pos_weight: position table (P, D); same dtype and device,
            float32, float64, bfloat16 or float16.
        position_ids: explicit positions (left-padded or packed batches), of ids' shape or
            broadcastable to it (one row of T positions for the whole batch, as Hugging Face
            models pass them).
        position_offset: first position when position_ids is None (decoding with a KV cache).
        padding_idx: as nn.Embedding: that row is returned as stored and gets no gradient;
            negative values count from the end.
        backend: None (Triton on CUDA, C++ on CPU), "triton", "cpp" or "reference".
        deterministic: token-gradient mode of the Triton backend: True sorts (bitwise
            reproducible), False may use float atomics (whichever measured faster: large 16-bit
            gradients sort there too); None follows torch.are_deterministic_algorithms_enabled()
            as it is when this forward runs (the operator's graph records the mode).
            The C++ backend is always deterministic.

    Returns:
        a tensor of shape (..., T, D) and the tables' dtype.
    """
    if has_torch_function_variadic(ids, tok_weight, pos_weight, position_ids):
        # A tensor subclass or proxy that overrides torch functions (torch.fx.symbolic_trace's
        # Proxy records this call as one node) gets it, as it gets F.embedding.
        return handle_torch_function(
            fused_embedding, (ids, tok_weight, pos_weight, position_ids), ids, tok_weight, pos_weight,
            position_ids=position_ids, position_offset=position_offset, padding_idx=padding_idx, backend=backend,
            deterministic=deterministic,
        )  # fmt: skip
    check_options(backend, deterministic)
    inputs = prepare_inputs(ids, tok_weight, pos_weight, position_ids, position_offset, padding_idx)
    backend = resolve_backend(backend, inputs.tok_weight.device)
    # Under torch.func's vmap a batch of tables runs as one stacked table, in which an id past
    # its own table is a row of the next entry's: neither the C++ kernels' check nor the Triton
    # kernels' clamp can tell, so under transforms the range check runs even when switched off.
    transformed = torch._C._are_functorch_transforms_active()
    recording = _recording_a_graph()
    if backend == "cpp" and not transformed:
        # The C++ kernels check every index before they read one and raise the range check's
        # IndexError themselves: checking here too would only cost host time.
        return _run_backend(inputs, backend, deterministic, transformed, recording)
    # Calls that a bad id must never reach, checked whatever the switch says and before they
    # run: the reference (eager PyTorch, whose embedding trips a device-side assert on a bad id;
    # not the backend to pick for speed), and any backend under a transform (a stacked table,
    # in which an id past its own table is a row of the next entry's).
    check_first = backend == "reference" or transformed
    # The switch is read last: Dynamo guards what it reads, so a graph of the reference does not
    # depend on the switch, and a graph of the Triton kernels is recompiled when it changes.
    checked = check_first or bounds_check_enabled()
    if recording:
        # A graph checks by an operator whose outputs the kernels read (ops.range_checked), each
        # time it runs.
        if checked:
            inputs = _range_checked_in_graph(inputs)
        return _run_backend(inputs, backend, deterministic, transformed, recording)
    range_check = inputs.start_range_check() if checked else RangeCheck([])
    # The Triton kernels clamp every index into its table, so they may be queued before the range
    # check's answer is back: the GPU starts the forward as soon as the answer has left for the
    # host, instead of idling until the host has woken up and queued the forward. The call still
    # waits for everything queued before it.
    if check_first:
        range_check.wait()
    out = _run_backend(inputs, backend, deterministic, transformed, recording)
    try:
        range_check.wait()
    except IndexError:
        del out  # not kept alive (with its autograd graph) by the traceback's frame
        raise
    return out


def _recording_a_graph() -> bool:
    """Whether this call is being recorded into a graph (torch.compile, torch.export,
    torch.jit.trace, make_fx and the AOTAutograd it serves) rather than run. (torch._C._is_tracing()
    is torch.jit.is_tracing() in a third of the time; make_fx's proxy mode is looked for only
    under a dispatch mode, which costs less to tell.)"""
    return (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or (dispatch_mode_active() and get_proxy_mode() is not None)
    )


def _range_checked_in_graph(inputs: EmbeddingInputs) -> EmbeddingInputs:
    """inputs with their index tensors replaced by the range-checked copies of ops.range_checked."""
    num_embeddings, context_length = inputs.tok_weight.shape[0], inputs.pos_weight.shape[0]
    ids, position_ids = checked_indices(inputs.ids, num_embeddings, inputs.position_ids, context_length)
    # Built field by field, not with _replace: under forward-mode AD the graph breaks just after
    # this, and torch 2.11's Dynamo fails an assertion rebuilding a _replace'd NamedTuple there.
    return EmbeddingInputs(
        ids, inputs.tok_weight, inputs.pos_weight, position_ids, inputs.position_offset, inputs.padding_idx
    )


def _nothing_to_differentiate(inputs: EmbeddingInputs) -> bool:
    """Whether autograd would record nothing: no table trains, or grad mode is off; and
    forward-mode AD is off (its tangents live on tensors that need not require grad;
    FusedEmbeddingFunction carries them through its jvp)."""
    if torch.is_grad_enabled() and (inputs.tok_weight.requires_grad or inputs.pos_weight.requires_grad):
        return False
    return forward_ad._current_level < 0


# The Functions' apply, run by Python even where torch.compile traces (under forward-mode AD).
_FUNCTION_OUTSIDE_GRAPHS = torch.compiler.disable(FusedEmbeddingFunction.apply)
_TRANSFORMABLE_OUTSIDE_GRAPHS = torch.compiler.disable(apply_transformable)


def _run_backend(
    inputs: EmbeddingInputs, backend: str, deterministic: bool | None, transformed: bool, recording: bool
) -> torch.Tensor:
    """The backend's forward, through what the context needs: the registered operator for a
    recorded graph (`recording`: torch.compile, torch.export, torch.jit.trace, make_fx), torch.func's
    Function under a transform (`transformed`), the kernels alone with nothing to
    differentiate, the eager Function otherwise. With forward-mode AD on, only the Functions carry
    tangents (torch.library gives an operator no jvp rule, and it drops them without a word): a
    recorded call then runs its Function outside the graph (Dynamo breaks the graph there)."""
    if backend == "reference":
        return fused_embedding_reference(
            inputs.ids,
            inputs.tok_weight,
            inputs.pos_weight,
            inputs.position_ids,
            inputs.position_offset,
            inputs.padding_idx if inputs.padding_idx >= 0 else None,
        )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if recording and forward_ad._current_level >= 0:
        apply = _TRANSFORMABLE_OUTSIDE_GRAPHS if transformed else _FUNCTION_OUTSIDE_GRAPHS
    elif recording:
        apply = fused_embedding_op  # graphs record the registered operator
    elif transformed:
        apply = apply_transformable  # torch.func's form: slower to apply, so only here
    elif _nothing_to_differentiate(inputs):
        # The kernels alone, without autograd's bookkeeping: host time that dominates a small
        # call, such as decoding one token.
        apply = eager_forward
    else:
        apply = FusedEmbeddingFunction.apply  # eager calls skip the operator's dispatch overhead
    return apply(
        inputs.ids,
        inputs.tok_weight,
        inputs.pos_weight,
        inputs.position_ids,
        inputs.position_offset,
        inputs.padding_idx,
        backend,
        deterministic,
    )
