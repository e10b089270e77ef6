"""The expert MLP of a sparse MoE layer, `moe_mlp`, in the transformers v5 experts contract, composed of
the routing-metadata, permutation and grouped-GEMM ops (each with its own backend and backward).
Spec: moe_kernels.reference.expert_mlp."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend
from .. import triton as _triton
from ..reference import expert_mlp as ref
from ..reference.activations import check_activation, glu
from . import _checks
from .grouped_gemm import grouped_mm
from .permutation import permute, sort_by_expert, unpermute
from .quantized import QuantizedWeight, check_quantized, moe_mlp_quantized


# --- the fused op ----------------------------------------------------------------------------------------
# moe_mlp runs this op where the triton or the native backend runs; elsewhere it composes the sort, permute,
# grouped_mm and unpermute ops (see moe_mlp below), each with its own backends. The op's reference implementation
# is the same composition of reference pieces.
@torch.library.custom_op("moe_kernels::moe_mlp_fused", mutates_args=())
def _moe_mlp_fused(x: Tensor, experts: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                   gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], activation: str, gated: bool,
                   capacity: int, save_for_backward: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (out [T, D], pre-activation [T*k, 2H] (empty unless saved), order, inverse, offsets)."""
    fn = _backend.dispatch("moe_mlp_fused", x.device.type)
    return fn(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated,
              None if capacity < 0 else capacity, save_for_backward)


@_moe_mlp_fused.register_fake
def _(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, capacity,
      save_for_backward):
    T, k = experts.shape
    E, H2, _ = gate_up_proj.shape
    h_pre = x.new_empty(T * k, H2) if save_for_backward else x.new_empty(0)
    idx = dict(dtype=torch.int32)
    return (x.new_empty(T, down_proj.shape[1]), h_pre, x.new_empty(T * k, **idx), x.new_empty(T, k, **idx),
            x.new_empty(E + 1, **idx))


@torch.library.custom_op("moe_kernels::moe_mlp_fused_backward", mutates_args=())
def _moe_mlp_fused_backward(grad: Tensor, x: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                            gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], h_pre: Tensor, order: Tensor,
                            inverse: Tensor, offsets: Tensor, activation: str,
                            gated: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _backend.dispatch("moe_mlp_fused_backward", x.device.type)
    gx, gw, gu, gd, gub, gdb = fn(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order,
                                  inverse, offsets, activation, gated)
    return gx, gw, gu, gd, gub if gub is not None else x.new_empty(0), gdb if gdb is not None else x.new_empty(0)


@_moe_mlp_fused_backward.register_fake
def _(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order, inverse, offsets, activation,
      gated):
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(gate_up_proj),
            torch.empty_like(down_proj), torch.empty_like(gate_up_bias) if gate_up_bias is not None else x.new_empty(0),
            torch.empty_like(down_bias) if down_bias is not None else x.new_empty(0))


def _fused_setup(ctx, inputs, output):
    x, experts, weights, up, down, up_b, down_b, activation, gated, capacity, save = inputs
    _, h_pre, order, inverse, offsets = output
    # h_pre is saved state, not a result: no gradient flows into it, and none is materialised as [T*k, 2H] zeros
    ctx.mark_non_differentiable(h_pre)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weights, up, down, up_b, down_b, h_pre, order, inverse, offsets)
    ctx.args = (activation, gated)


def _fused_backward(ctx, grad, *_):
    if grad is None:  # no gradient reached the output (grads are not materialised): nothing flows back
        return (None,) * 11
    x, weights, up, down, up_b, down_b, h_pre, order, inverse, offsets = ctx.saved_tensors
    gx, gw, gu, gd, gub, gdb = _moe_mlp_fused_backward(grad.contiguous(), x, weights, up, down, up_b, down_b, h_pre,
                                                       order, inverse, offsets, *ctx.args)
    return (gx, None, gw, gu, gd, gub if up_b is not None else None, gdb if down_b is not None else None,
            None, None, None, None)


def _fused_native(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, capacity,
                  save_for_backward):
    if not _backend.native_takes(activation):
        return ref.moe_mlp_fused(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                                 gated, None if capacity is None or capacity < 0 else capacity, save_for_backward)
    return torch.ops.moe_kernels_C.moe_mlp_forward(x, experts, weights, gate_up_proj, down_proj, gate_up_bias,
                                                   down_bias, activation, gated, -1 if capacity is None else capacity,
                                                   save_for_backward)


def _fused_backward_native(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order, inverse,
                           offsets, activation, gated):
    if not _backend.native_takes(activation):
        return ref.moe_mlp_fused_backward(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre,
                                          order, inverse, offsets, activation, gated)
    gx, gw, gu, gd, gub, gdb = torch.ops.moe_kernels_C.moe_mlp_backward(
        grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order, inverse, offsets, activation,
        gated)
    return gx, gw, gu, gd, gub if gate_up_bias is not None else None, gdb if down_bias is not None else None


_backend.register_autograd(_moe_mlp_fused, _fused_backward, _fused_setup)
_backend.register("moe_mlp_fused", "reference", ref.moe_mlp_fused)
_backend.register("moe_mlp_fused_backward", "reference", ref.moe_mlp_fused_backward)
_backend.register("moe_mlp_fused", "native", _fused_native)
_backend.register("moe_mlp_fused_backward", "native", _fused_backward_native)
if _triton.AVAILABLE:
    from ..triton import expert_mlp as _tri

    _backend.register("moe_mlp_fused", "triton", _tri.moe_mlp_forward)
    _backend.register("moe_mlp_fused_backward", "triton", _tri.moe_mlp_backward)


# --- LoRA adapters on the projections ------------------------------------------------------------------------
class LoRA(NamedTuple):
    """A LoRA adapter on an expert projection w [E, N, K]: the layer computes with w + scale * B[e] @ A[e] without
    ever forming it. A [E, r, K], B [E, N, r] (each expert's rank-r pair, w's dtype and device), scale a float."""
    A: Tensor
    B: Tensor
    scale: float = 1.0


def check_lora(name: str, lora, w: Tensor) -> None:
    """lora: a LoRA (or None) on the projection `name` of shape [E, N, K]."""
    if lora is None:
        return
    if not isinstance(lora, LoRA):
        raise TypeError(f"{name}: expected a moe_kernels.ops.LoRA(A, B, scale) or None, got {type(lora).__name__}")
    E, N, K = w.shape
    _checks.tensor(f"{name}.A", lora.A, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(f"{name}.B", lora.B, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    r = lora.A.shape[1]
    if r < 1 or lora.A.shape != (E, r, K) or lora.B.shape != (E, N, r):
        raise ValueError(f"{name}: A must be [E, r, K] = [{E}, r, {K}] and B [E, N, r] = [{E}, {N}, r] with r >= 1 "
                         f"for the weight {tuple(w.shape)}, got A {tuple(lora.A.shape)} and B {tuple(lora.B.shape)}")
    if isinstance(lora.scale, bool) or not isinstance(lora.scale, (int, float)):
        raise TypeError(f"{name}: scale must be a float, got {type(lora.scale).__name__}")
    _checks.same_dtype(**{"weight": w, f"{name}.A": lora.A, f"{name}.B": lora.B})
    _checks.same_device(**{"weight": w, f"{name}.A": lora.A, f"{name}.B": lora.B})


def project(a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor] = None, lora: Optional[LoRA] = None, *,
            activation: str = "identity", gated: bool = False) -> Tensor:
    """grouped_mm of rows in expert order with an optional LoRA adapter on w: act(a w^T + bias + scale (a A^T) B^T)
    per expert, the low-rank term as its own grouped GEMM pair (through rank r) added to the pre-activation. With
    a frozen w only A, B and a get gradients (w's own GEMM is skipped in the backward)."""
    if lora is None:
        return grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)
    low = grouped_mm(grouped_mm(a, lora.A, offsets) * lora.scale, lora.B, offsets)
    pre = grouped_mm(a, w, offsets, bias) + low
    return pre if not gated and activation == "identity" else glu(pre, activation, gated)


# --- public function ----------------------------------------------------------------------------------------
def check_experts_weights(gate_up_proj: Tensor, down_proj: Tensor, gated: bool, gate_up_bias=None, down_bias=None):
    """gate_up_proj: [E, 2H, D] ([E, H, D] when not gated), down_proj: [E, O, H] (O, the output width, is
    usually D); returns (E, H, D, O)."""
    _checks.tensor("gate_up_proj", gate_up_proj, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("down_proj", down_proj, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    dims = _check_shapes(tuple(gate_up_proj.shape), tuple(down_proj.shape), gated, gate_up_bias, down_bias)
    _checks.same_dtype(gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return dims


def _check_shapes(up_shape, down_shape, gated, gate_up_bias, down_bias, what=""):
    """(E, H, D, O) of projections [E, 2H|H, D] and [E, O, H] and their optional biases [E, 2H|H] and [E, O]."""
    E, H2, D = up_shape
    H = H2 // 2 if gated else H2
    O = down_shape[1]
    if (gated and H2 % 2) or down_shape != (E, O, H):
        want = "[E, 2H, D] and [E, O, H]" if gated else "[E, H, D] and [E, O, H]"
        raise ValueError(f"gate_up_proj and down_proj must be {want} (gated={gated}), got {up_shape} and "
                         f"{down_shape}{what}")
    if gate_up_bias is not None:
        _checks.tensor("gate_up_bias", gate_up_bias, shape=(E, H2))
    if down_bias is not None:
        _checks.tensor("down_bias", down_bias, shape=(E, O))
    return E, H, D, O


def _check_quantized_weights(gate_up_proj, down_proj, gated, gate_up_bias, down_bias, x):
    """check_experts_weights for QuantizedWeight projections (both quantized; biases in x's dtype)."""
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(w, QuantizedWeight):
            raise TypeError(f"gate_up_proj and down_proj must both be QuantizedWeight or both tensors, got {name} "
                            f"{type(w).__name__}")
        check_quantized(name, w)
    if gate_up_proj.format != down_proj.format or (gate_up_proj.format == "fp8" and gate_up_proj.block != down_proj.block):
        raise ValueError(f"gate_up_proj and down_proj must share a format (and FP8 block), got "
                         f"{gate_up_proj.format} {gate_up_proj.block} and {down_proj.format} {down_proj.block}")
    dims = _check_shapes(gate_up_proj.shape, down_proj.shape, gated, gate_up_bias, down_bias, " (quantized)")
    _checks.same_dtype(x=x, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return dims


def check_moe_mlp_inputs(x, experts, weights, gate_up_proj, down_proj, activation, gated, gate_up_bias=None,
                         down_bias=None) -> int:
    """The arguments of moe_mlp (and of its expert-parallel form) checked against each other; returns E."""
    quantized = isinstance(gate_up_proj, QuantizedWeight) or isinstance(down_proj, QuantizedWeight)
    if quantized:
        E, H, D, _ = _check_quantized_weights(gate_up_proj, down_proj, gated, gate_up_bias, down_bias, x)
    else:
        E, H, D, _ = check_experts_weights(gate_up_proj, down_proj, gated, gate_up_bias, down_bias)
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("experts", experts, ndim=2, dtypes=_checks.INDEX_DTYPES)
    if x.shape[1] != D:
        raise ValueError(f"x: [T, D] must have D = {D} of gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(x.shape)}")
    if experts.shape[0] != x.shape[0]:
        raise ValueError(f"experts must be [T, k] with T = {x.shape[0]} of x {tuple(x.shape)}, got {tuple(experts.shape)}")
    _checks.tensor("weights", weights, shape=tuple(experts.shape), dtypes=_checks.FLOAT_DTYPES)
    if not quantized:
        _checks.same_dtype(x=x, gate_up_proj=gate_up_proj)
    up, down = (w.data if quantized else w for w in (gate_up_proj, down_proj))
    _checks.same_device(x=x, experts=experts, weights=weights, gate_up_proj=up, down_proj=down,
                        gate_up_bias=gate_up_bias, down_bias=down_bias)
    check_activation(activation, gated)      # ValueError naming the activation argument
    return E


def moe_mlp(x: Tensor, experts: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor, *,
            activation: str = "silu", gated: bool = True, gate_up_bias: Optional[Tensor] = None,
            down_bias: Optional[Tensor] = None, capacity: Optional[int] = None, gate_up_lora: Optional[LoRA] = None,
            down_lora: Optional[LoRA] = None) -> Tensor:
    """x: [T, D], experts: [T, k] int, weights: [T, k], gate_up_proj: [E, 2H, D] (gate rows first; [E, H, D]
    when not gated), down_proj: [E, O, H] -> [T, O] in x's dtype (O = D in a transformer block). The projections
    may be QuantizedWeight (FP8 block-scaled or MXFP4, both in one format; inference only).

    out[t] = sum_j weights[t, j] * down_e(act(gate_e x[t]) * up_e x[t]) with e = experts[t, j]; ids outside
    [0, E) contribute zero (the expert-parallel sentinel); pairs beyond `capacity` rows per expert are dropped.
    gate_up_lora / down_lora: LoRA adapters on the projections (the weight plus scale * B @ A, never formed: each
    adapter is its own grouped GEMM pair through rank r, see `project`).
    """
    E = check_moe_mlp_inputs(x, experts, weights, gate_up_proj, down_proj, activation, gated, gate_up_bias,
                             down_bias)
    activation = str(check_activation(activation, gated))     # the canonical spec string the ops take
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")
    _checks.pairs(*experts.shape, f"experts of shape {tuple(experts.shape)}")
    if isinstance(gate_up_proj, QuantizedWeight):
        if gate_up_lora is not None or down_lora is not None:
            raise ValueError("LoRA adapters on quantized projections are not supported: dequantize() the weights")
        return moe_mlp_quantized(x, experts, weights, gate_up_proj, down_proj, activation=activation, gated=gated,
                                 gate_up_bias=gate_up_bias, down_bias=down_bias, capacity=capacity)
    check_lora("gate_up_lora", gate_up_lora, gate_up_proj)
    check_lora("down_lora", down_lora, down_proj)
    lora = gate_up_lora is not None or down_lora is not None
    backend = _backend.resolve("moe_mlp_fused", x.device.type)
    if backend in ("triton", "native") and not lora:
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias))
        if backend == "native" and not save and not torch.compiler.is_compiling():
            # eager CPU inference: the native op itself, without the custom op's Python dispatch (a tenth of a
            # decode step); traced code and autograd keep the custom op
            return _fused_native(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                                 gated, capacity, False)[0]
        return _moe_mlp_fused(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated,
                              -1 if capacity is None else capacity, save)[0]
    s = sort_by_expert(experts, E, capacity)
    h = project(permute(x, s), gate_up_proj, s.offsets, gate_up_bias, gate_up_lora, activation=activation, gated=gated)
    return unpermute(project(h, down_proj, s.offsets, down_bias, down_lora), s, weights)
