"""Soft-MoE slot ops: moe_kernels::soft_dispatch and moe_kernels::soft_combine (+ backwards), flash-style; and
the shared-logits form moe_kernels::soft_logits, ::soft_dispatch_logits, ::soft_combine_logits (+ backwards).
Spec: moe_kernels.reference.soft_moe.

The forward ops return (out, lse): lse is the logsumexp of each query row's masked logits (dispatch: per slot over
tokens [B, S]; combine: per token over slots [B, N]; fp32, float64 for float64 inputs). The autograd saves out and
lse, and the backward ops take them, so a flash-style backend recomputes the softmax weights from lse instead of
a second reduction over the logits. lse is not differentiable (its gradient is ignored); the public functions
return out only. Backend contract (moe_kernels._backend): "soft_dispatch" fn(x, phi, mask, slot_mask) -> (out,
lse); "soft_dispatch_backward" fn(grad, x, phi, out, lse, mask, slot_mask) -> (grad_x, grad_phi); likewise
"soft_combine" fn(x, phi, y, mask, slot_mask) -> (out, lse) and "soft_combine_backward" fn(grad, x, phi, y, out,
lse, mask, slot_mask) -> (grad_x, grad_phi, grad_y). A backend may ignore out and lse in its backward.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import triton as _triton
from ..reference import soft_moe as ref
from . import _checks


def _lse_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- dispatch -----------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::soft_dispatch", mutates_args=())
def _soft_dispatch(x: Tensor, phi: Tensor, mask: Optional[Tensor],
                   slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_dispatch", x.device.type)(x, phi, mask, slot_mask)


@_soft_dispatch.register_fake
def _(x, phi, mask, slot_mask):
    B, S = x.shape[0], phi.shape[-2]
    return x.new_empty(B, S, x.shape[2]), x.new_empty(B, S, dtype=_lse_dtype(x))


@torch.library.custom_op("moe_kernels::soft_dispatch_backward", mutates_args=())
def _soft_dispatch_backward(grad: Tensor, x: Tensor, phi: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                            slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_dispatch_backward", x.device.type)(grad, x, phi, out, lse, mask, slot_mask)


@_soft_dispatch_backward.register_fake
def _(grad, x, phi, out, lse, mask, slot_mask):
    return torch.empty_like(x), torch.empty_like(phi)


def _save_inputs_and_outputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])


def _dispatch_bwd(ctx, grad, grad_lse):
    x, phi, mask, slot_mask, out, lse = ctx.saved_tensors
    grad_x, grad_phi = _soft_dispatch_backward(grad.contiguous(), x, phi, out, lse, mask, slot_mask)
    return grad_x, grad_phi, None, None


def _ref_dispatch_backward(grad, x, phi, out, lse, mask, slot_mask):
    return ref.soft_dispatch_backward(grad, x, phi, mask, slot_mask)


_backend.register_autograd(_soft_dispatch, _dispatch_bwd, _save_inputs_and_outputs)
_backend.register("soft_dispatch", "reference", ref.soft_dispatch_forward)
_backend.register("soft_dispatch_backward", "reference", _ref_dispatch_backward)


# --- combine ------------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::soft_combine", mutates_args=())
def _soft_combine(x: Tensor, phi: Tensor, y: Tensor, mask: Optional[Tensor],
                  slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_combine", x.device.type)(x, phi, y, mask, slot_mask)


@_soft_combine.register_fake
def _(x, phi, y, mask, slot_mask):
    B, N = x.shape[:2]
    return y.new_empty(B, N, y.shape[2]), x.new_empty(B, N, dtype=_lse_dtype(x))


@torch.library.custom_op("moe_kernels::soft_combine_backward", mutates_args=())
def _soft_combine_backward(grad: Tensor, x: Tensor, phi: Tensor, y: Tensor, out: Tensor, lse: Tensor,
                           mask: Optional[Tensor], slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _backend.dispatch("soft_combine_backward", x.device.type)(grad, x, phi, y, out, lse, mask, slot_mask)


@_soft_combine_backward.register_fake
def _(grad, x, phi, y, out, lse, mask, slot_mask):
    return torch.empty_like(x), torch.empty_like(phi), torch.empty_like(y)


def _combine_bwd(ctx, grad, grad_lse):
    x, phi, y, mask, slot_mask, out, lse = ctx.saved_tensors
    grad_x, grad_phi, grad_y = _soft_combine_backward(grad.contiguous(), x, phi, y, out, lse, mask, slot_mask)
    return grad_x, grad_phi, grad_y, None, None


def _ref_combine_backward(grad, x, phi, y, out, lse, mask, slot_mask):
    return ref.soft_combine_backward(grad, x, phi, y, mask, slot_mask)


_backend.register_autograd(_soft_combine, _combine_bwd, _save_inputs_and_outputs)
_backend.register("soft_combine", "reference", ref.soft_combine_forward)
_backend.register("soft_combine_backward", "reference", _ref_combine_backward)

# --- the shared-logits form -----------------------------------------------------------------------------
# logits = soft_logits(x, phi) once; soft_dispatch_logits(logits, x) and soft_combine_logits(logits, y) read them.
# Autograd sums the two mixes' logit gradients before soft_logits_backward's two GEMMs: forward and backward
# take 9 logit-sized GEMMs where the flash-style pair takes 14, at [B, N, S] memory (SoftMoE uses it below a
# budget, on CPU). One implementation, ATen ops, serves every device.
@torch.library.custom_op("moe_kernels::soft_logits", mutates_args=())
def _soft_logits(x: Tensor, phi: Tensor, mask: Optional[Tensor], slot_mask: Optional[Tensor]) -> Tensor:
    return _backend.dispatch("soft_logits", x.device.type)(x, phi, mask, slot_mask)


@_soft_logits.register_fake
def _(x, phi, mask, slot_mask):
    return x.new_empty(x.shape[0], x.shape[1], phi.shape[-2])


@torch.library.custom_op("moe_kernels::soft_logits_backward", mutates_args=())
def _soft_logits_backward(grad: Tensor, x: Tensor, phi: Tensor, mask: Optional[Tensor],
                          slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_logits_backward", x.device.type)(grad, x, phi, mask, slot_mask)


@_soft_logits_backward.register_fake
def _(grad, x, phi, mask, slot_mask):
    return torch.empty_like(x), torch.empty_like(phi)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _logits_bwd(ctx, grad):
    x, phi, mask, slot_mask = ctx.saved_tensors
    grad_x, grad_phi = _soft_logits_backward(grad.contiguous(), x, phi, mask, slot_mask)
    return grad_x, grad_phi, None, None


@torch.library.custom_op("moe_kernels::soft_dispatch_logits", mutates_args=())
def _soft_dispatch_logits(logits: Tensor, x: Tensor) -> Tensor:
    return _backend.dispatch("soft_dispatch_logits", x.device.type)(logits, x)


@_soft_dispatch_logits.register_fake
def _(logits, x):
    return x.new_empty(x.shape[0], logits.shape[2], x.shape[2])


@torch.library.custom_op("moe_kernels::soft_dispatch_logits_backward", mutates_args=())
def _soft_dispatch_logits_backward(grad: Tensor, logits: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_dispatch_logits_backward", x.device.type)(grad, logits, x)


@_soft_dispatch_logits_backward.register_fake
def _(grad, logits, x):
    return torch.empty_like(logits), torch.empty_like(x)


def _dispatch_logits_bwd(ctx, grad):
    logits, x = ctx.saved_tensors
    return _soft_dispatch_logits_backward(grad.contiguous(), logits, x)


@torch.library.custom_op("moe_kernels::soft_combine_logits", mutates_args=())
def _soft_combine_logits(logits: Tensor, y: Tensor) -> Tensor:
    return _backend.dispatch("soft_combine_logits", y.device.type)(logits, y)


@_soft_combine_logits.register_fake
def _(logits, y):
    return y.new_empty(y.shape[0], logits.shape[1], y.shape[2])


@torch.library.custom_op("moe_kernels::soft_combine_logits_backward", mutates_args=())
def _soft_combine_logits_backward(grad: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_combine_logits_backward", y.device.type)(grad, logits, y)


@_soft_combine_logits_backward.register_fake
def _(grad, logits, y):
    return torch.empty_like(logits), torch.empty_like(y)


def _combine_logits_bwd(ctx, grad):
    logits, y = ctx.saved_tensors
    return _soft_combine_logits_backward(grad.contiguous(), logits, y)


_backend.register_autograd(_soft_logits, _logits_bwd, _save_inputs)
_backend.register_autograd(_soft_dispatch_logits, _dispatch_logits_bwd, _save_inputs)
_backend.register_autograd(_soft_combine_logits, _combine_logits_bwd, _save_inputs)
for _name in ("soft_logits", "soft_logits_backward", "soft_dispatch_logits", "soft_dispatch_logits_backward",
              "soft_combine_logits", "soft_combine_logits_backward"):
    _backend.register(_name, "reference", getattr(ref, _name))

if _triton.AVAILABLE:
    from ..triton import soft_moe as _tri

    _backend.register("soft_dispatch", "triton", _tri.soft_dispatch)
    _backend.register("soft_dispatch_backward", "triton", _tri.soft_dispatch_backward)
    _backend.register("soft_combine", "triton", _tri.soft_combine)
    _backend.register("soft_combine_backward", "triton", _tri.soft_combine_backward)


# --- public functions ---------------------------------------------------------------------------
def _check(x, phi, mask, slot_mask):
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    B, N, D = x.shape
    _checks.tensor("phi", phi, ndim=(2, 3), dtypes=_checks.FLOAT_DTYPES)
    if phi.shape[-1] != D or (phi.dim() == 3 and phi.shape[0] != B):
        raise ValueError(f"phi must be [S, D] or [B, S, D] for x [B, N, D] = {tuple(x.shape)}, got {tuple(phi.shape)}")
    if mask is not None:
        _checks.tensor("mask", mask, shape=(B, N), dtypes=(torch.bool,))
    if slot_mask is not None:
        _checks.tensor("slot_mask", slot_mask, shape=(B, phi.shape[-2]), dtypes=(torch.bool,))
    _checks.same_dtype(x=x, phi=phi)
    _checks.same_device(x=x, phi=phi, mask=mask, slot_mask=slot_mask)


def soft_dispatch(x: Tensor, phi: Tensor, mask: Optional[Tensor] = None, slot_mask: Optional[Tensor] = None) -> Tensor:
    """x: [B, N, D] tokens, phi: [S, D] or [B, S, D] slot embeddings, mask: [B, N] bool (True = token),
    slot_mask: [B, S] bool (True = slot) -> slots [B, S, D]: slot s is the softmax-over-tokens weighted mean of x
    under logits x . phi_s."""
    _check(x, phi, mask, slot_mask)
    return _soft_dispatch(x, phi, mask, slot_mask)[0]


def soft_combine(x: Tensor, phi: Tensor, y: Tensor, mask: Optional[Tensor] = None,
                 slot_mask: Optional[Tensor] = None) -> Tensor:
    """y: [B, S, D] slot outputs -> [B, N, D]: token n is the softmax-over-slots weighted mean of y under
    logits x_n . phi."""
    _check(x, phi, mask, slot_mask)
    _checks.tensor("y", y, ndim=3, shape=(x.shape[0], phi.shape[-2], None), dtypes=_checks.FLOAT_DTYPES)
    _checks.same_dtype(x=x, y=y)
    _checks.same_device(x=x, y=y)
    return _soft_combine(x, phi, y, mask, slot_mask)[0]


def soft_logits(x: Tensor, phi: Tensor, mask: Optional[Tensor] = None, slot_mask: Optional[Tensor] = None) -> Tensor:
    """-> logits [B, N, S] = x . phi_s, masked tokens and slots filled with -finfo(dtype).max: the logits that
    soft_dispatch_logits and soft_combine_logits share (soft_dispatch(x, phi, mask, slot_mask) ==
    soft_dispatch_logits(soft_logits(x, phi, mask, slot_mask), x)). Memory B*N*S; soft_dispatch and
    soft_combine never hold it whole."""
    _check(x, phi, mask, slot_mask)
    return _soft_logits(x, phi, mask, slot_mask)


def _check_logits(logits, t, name, rows_dim):
    _checks.tensor("logits", logits, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(name, t, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    if t.shape[0] != logits.shape[0] or t.shape[1] != logits.shape[rows_dim]:
        what = "[B, N, D]" if rows_dim == 1 else "[B, S, D]"
        raise ValueError(f"{name} must be {what} for logits [B, N, S] = {tuple(logits.shape)}, got {tuple(t.shape)}")
    _checks.same_dtype(logits=logits, **{name: t})
    _checks.same_device(logits=logits, **{name: t})


def soft_dispatch_logits(logits: Tensor, x: Tensor) -> Tensor:
    """logits: [B, N, S] (soft_logits), x: [B, N, D] -> slots [B, S, D] = softmax over tokens, applied to x."""
    _check_logits(logits, x, "x", 1)
    return _soft_dispatch_logits(logits, x)


def soft_combine_logits(logits: Tensor, y: Tensor) -> Tensor:
    """logits: [B, N, S] (soft_logits), y: [B, S, D] -> [B, N, D] = softmax over slots, applied to y."""
    _check_logits(logits, y, "y", 2)
    return _soft_combine_logits(logits, y)


# --- native backend (csrc/soft_moe.cpp) ---------------------------------------------------------
# The C++ ops make the [B, N, S] logits at most NATIVE_CHUNK elements at a time (a problem that fits is one chunk).
# Their forwards return (out, lse); their backwards recompute the softmax chunk by chunk (out and lse unused).
NATIVE_CHUNK = 1 << 20


def _native_forward(name):
    def run(*args):
        return getattr(torch.ops.moe_kernels_C, name)(*args, NATIVE_CHUNK)
    return run


def _native_dispatch_backward(grad, x, phi, out, lse, mask, slot_mask):
    return torch.ops.moe_kernels_C.soft_dispatch_backward(grad, x, phi, mask, slot_mask, NATIVE_CHUNK)


def _native_combine_backward(grad, x, phi, y, out, lse, mask, slot_mask):
    return torch.ops.moe_kernels_C.soft_combine_backward(grad, x, phi, y, mask, slot_mask, NATIVE_CHUNK)


_backend.register("soft_dispatch", "native", _native_forward("soft_dispatch"))
_backend.register("soft_combine", "native", _native_forward("soft_combine"))
_backend.register("soft_dispatch_backward", "native", _native_dispatch_backward)
_backend.register("soft_combine_backward", "native", _native_combine_backward)
