"""Grouped GEMM op: moe_kernels::grouped_mm (+ backward). Spec: moe_kernels.reference.grouped_gemm."""
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import triton as _triton
from ..reference import grouped_gemm as ref
from ..reference.activations import check_activation
from . import _checks


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm(a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str, gated: bool) -> Tensor:
    return _backend.dispatch("grouped_mm", a.device.type)(a, w, offsets, bias, activation, gated)


@_grouped_mm.register_fake
def _(a, w, offsets, bias, activation, gated):
    return a.new_empty(a.shape[0], w.shape[1] // 2 if gated else w.shape[1])


@torch.library.custom_op("moe_kernels::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(grad: Tensor, a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str,
                         gated: bool, grad_w: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_a, grad_w ([0] unless grad_w: a frozen weight skips its GEMM), grad_bias ([0] without bias))."""
    fn = _backend.dispatch("grouped_mm_backward", a.device.type)
    ga, gw, gb = fn(grad, a, w, offsets, bias, activation, gated, grad_w)
    return ga, gw if grad_w else a.new_empty(0), gb if gb is not None else a.new_empty(0)


@_grouped_mm_backward.register_fake
def _(grad, a, w, offsets, bias, activation, gated, grad_w=True):
    return (torch.empty_like(a), torch.empty_like(w) if grad_w else a.new_empty(0),
            torch.empty_like(bias) if bias is not None else a.new_empty(0))


def _setup_context(ctx, inputs, output):
    a, w, offsets, bias, activation, gated = inputs
    ctx.save_for_backward(a, w, offsets, bias)
    ctx.args = (activation, gated)


def _backward(ctx, grad):
    a, w, offsets, bias = ctx.saved_tensors
    want_w = ctx.needs_input_grad[1]
    grad_a, grad_w, grad_b = _grouped_mm_backward(grad.contiguous(), a, w, offsets, bias, *ctx.args, want_w)
    return grad_a, grad_w if want_w else None, None, grad_b if bias is not None else None, None, None


def _grouped_mm_native(a, w, offsets, bias, activation, gated):
    if not _backend.native_takes(activation):
        return ref.grouped_mm(a, w, offsets, bias, activation, gated)
    return torch.ops.moe_kernels_C.grouped_mm(a, w, offsets, bias, activation, gated)


def _grouped_mm_backward_native(grad, a, w, offsets, bias, activation, gated, grad_w=True):
    if not _backend.native_takes(activation):
        return ref.grouped_mm_backward(grad, a, w, offsets, bias, activation, gated, grad_w)
    ga, gw, gb = torch.ops.moe_kernels_C.grouped_mm_backward(grad, a, w, offsets, bias, activation, gated, grad_w)
    return ga, gw if grad_w else None, gb if bias is not None else None


_backend.register_autograd(_grouped_mm, _backward, _setup_context)
_backend.register("grouped_mm", "reference", ref.grouped_mm)
_backend.register("grouped_mm_backward", "reference", ref.grouped_mm_backward)
_backend.register("grouped_mm", "native", _grouped_mm_native)
_backend.register("grouped_mm_backward", "native", _grouped_mm_backward_native)
if _triton.AVAILABLE:
    from ..triton import grouped_gemm as _tri

    _backend.register("grouped_mm", "triton", _tri.grouped_mm)
    _backend.register("grouped_mm_backward", "triton", _tri.grouped_mm_backward)


def grouped_mm(a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor] = None, *, activation: str = "identity",
               gated: bool = False) -> Tensor:
    """a: [N, K] rows in expert order, w: [E, M, K], offsets: [E+1] int32, bias: [E, M] ->
    act(a[rows of e] @ w[e]^T + bias[e]): [N, M], or [N, M/2] when gated (gate = first half of M, then up).
    Rows at or past offsets[E] give zero."""
    _checks.tensor("a", a, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("w", w, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    E, M, K = w.shape
    if a.shape[1] != K:
        raise ValueError(f"a: [N, K] and w: [E, M, K] must share K, got a {tuple(a.shape)} and w {tuple(w.shape)}")
    _checks.tensor("offsets", offsets, shape=(E + 1,), dtypes=(torch.int32,))
    if bias is not None:
        _checks.tensor("bias", bias, shape=(E, M))
    _checks.same_dtype(a=a, w=w, bias=bias)
    _checks.same_device(a=a, w=w, offsets=offsets, bias=bias)
    activation = str(check_activation(activation, gated))     # ValueError naming the activation argument
    if gated and M % 2:
        raise ValueError(f"gated=True needs an even output width (gate and up halves), got w {tuple(w.shape)}")
    _checks.rows("a", a)
    _checks.offset_values(offsets, a.shape[0])
    return _grouped_mm(a, w, offsets, bias, activation, gated)
