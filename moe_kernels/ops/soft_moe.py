"""Soft-MoE slot ops: moe_kernels::soft_dispatch and moe_kernels::soft_combine (+ backwards).
Spec: moe_kernels.reference.soft_moe."""
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference import soft_moe as ref
from . import _checks


# --- dispatch -----------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::soft_dispatch", mutates_args=())
def _soft_dispatch(x: Tensor, phi: Tensor, mask: Optional[Tensor], slot_mask: Optional[Tensor]) -> Tensor:
    return _backend.dispatch("soft_dispatch", x.device.type)(x, phi, mask, slot_mask)


@_soft_dispatch.register_fake
def _(x, phi, mask, slot_mask):
    return x.new_empty(x.shape[0], phi.shape[-2], x.shape[2])


@torch.library.custom_op("moe_kernels::soft_dispatch_backward", mutates_args=())
def _soft_dispatch_backward(grad: Tensor, x: Tensor, phi: Tensor, mask: Optional[Tensor],
                            slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _backend.dispatch("soft_dispatch_backward", x.device.type)(grad, x, phi, mask, slot_mask)


@_soft_dispatch_backward.register_fake
def _(grad, x, phi, mask, slot_mask):
    return torch.empty_like(x), torch.empty_like(phi)


def _dispatch_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dispatch_bwd(ctx, grad):
    x, phi, mask, slot_mask = ctx.saved_tensors
    grad_x, grad_phi = _soft_dispatch_backward(grad.contiguous(), x, phi, mask, slot_mask)
    return grad_x, grad_phi, None, None


_soft_dispatch.register_autograd(_dispatch_bwd, setup_context=_dispatch_setup)
_backend.register("soft_dispatch", "reference", ref.soft_dispatch)
_backend.register("soft_dispatch_backward", "reference", ref.soft_dispatch_backward)


# --- combine ------------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::soft_combine", mutates_args=())
def _soft_combine(x: Tensor, phi: Tensor, y: Tensor, mask: Optional[Tensor], slot_mask: Optional[Tensor]) -> Tensor:
    return _backend.dispatch("soft_combine", x.device.type)(x, phi, y, mask, slot_mask)


@_soft_combine.register_fake
def _(x, phi, y, mask, slot_mask):
    return y.new_empty(x.shape[0], x.shape[1], y.shape[2])


@torch.library.custom_op("moe_kernels::soft_combine_backward", mutates_args=())
def _soft_combine_backward(grad: Tensor, x: Tensor, phi: Tensor, y: Tensor, mask: Optional[Tensor],
                           slot_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _backend.dispatch("soft_combine_backward", x.device.type)(grad, x, phi, y, mask, slot_mask)


@_soft_combine_backward.register_fake
def _(grad, x, phi, y, mask, slot_mask):
    return torch.empty_like(x), torch.empty_like(phi), torch.empty_like(y)


def _combine_bwd(ctx, grad):
    x, phi, y, mask, slot_mask = ctx.saved_tensors
    grad_x, grad_phi, grad_y = _soft_combine_backward(grad.contiguous(), x, phi, y, mask, slot_mask)
    return grad_x, grad_phi, grad_y, None, None


_soft_combine.register_autograd(_combine_bwd, setup_context=_dispatch_setup)
_backend.register("soft_combine", "reference", ref.soft_combine)
_backend.register("soft_combine_backward", "reference", ref.soft_combine_backward)


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
    return _soft_dispatch(x, phi, mask, slot_mask)


def soft_combine(x: Tensor, phi: Tensor, y: Tensor, mask: Optional[Tensor] = None,
                 slot_mask: Optional[Tensor] = None) -> Tensor:
    """y: [B, S, D] slot outputs -> [B, N, D]: token n is the softmax-over-slots weighted mean of y under
    logits x_n . phi."""
    _check(x, phi, mask, slot_mask)
    _checks.tensor("y", y, ndim=3, shape=(x.shape[0], phi.shape[-2], None), dtypes=_checks.FLOAT_DTYPES)
    _checks.same_dtype(x=x, y=y)
    return _soft_combine(x, phi, y, mask, slot_mask)


# --- native backend (csrc/soft_moe.cpp) ---------------------------------------------------------
# The C++ ops make the [B, N, S] logits at most NATIVE_CHUNK elements at a time (a problem that fits is one chunk).
NATIVE_CHUNK = 1 << 20


def _native(name):
    def run(*args):
        return getattr(torch.ops.moe_kernels_C, name)(*args, NATIVE_CHUNK)
    return run


for _name in ("soft_dispatch", "soft_dispatch_backward", "soft_combine", "soft_combine_backward"):
    _backend.register(_name, "native", _native(_name))
