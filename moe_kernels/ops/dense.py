"""Dense mixture op: moe_kernels::dense_moe (+ backward), every expert on every token weighted by a dense
gate, computed as two dense GEMMs over the concatenated experts:

    h = x @ W_up_cat^T + b_up     [T, E*2H]      (W_up_cat = gate_up_proj viewed as [E*2H, D])
    z = gates (x) 1_H * glu(h)    [T, E*H]
    out = z @ W_down_cat^T + gates @ b_down      (W_down_cat = down_proj permuted to [O, E*H])

Spec: moe_kernels.reference.dense (a loop over experts). Every backend runs this form: it is dense matmul.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference.activations import check_activation, glu, glu_backward
from . import _checks
from .expert_mlp import check_experts_weights


def _pre_activation(x, gate_up_proj, gate_up_bias):
    """x: [T, D] -> h [T, E*2H|E*H], every expert's first layer as one GEMM."""
    h = x @ gate_up_proj.reshape(-1, x.shape[1]).t()
    return h + gate_up_bias.reshape(-1) if gate_up_bias is not None else h


def _forward(x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, save):
    """-> (out [T, O], the pre-activation h [T, E*2H|E*H] when save (the backward's input), else an empty tensor)."""
    T, D = x.shape
    E, H2, _ = gate_up_proj.shape
    O = down_proj.shape[1]
    h = _pre_activation(x, gate_up_proj, gate_up_bias)
    a = glu(h.view(T, E, H2), activation, gated)                     # [T, E, H]
    z = a * gates.to(x.dtype).unsqueeze(-1)
    w_down = down_proj.permute(1, 0, 2).reshape(O, -1)               # [O, E*H]
    out = z.reshape(T, w_down.shape[1]) @ w_down.t()
    if down_bias is not None:
        out = out + gates.to(x.dtype) @ down_bias
    return out, (h if save else x.new_empty(0))


def _backward_impl(grad, x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, h, activation, gated):
    T, D = x.shape
    E, H2, _ = gate_up_proj.shape
    O = down_proj.shape[1]
    if h.numel() != T * E * H2:   # not saved by the forward (it ran with nothing requiring grad): recomputed
        h = _pre_activation(x, gate_up_proj, gate_up_bias)
    h = h.view(T, E, H2)
    a = glu(h, activation, gated)                                    # [T, E, H], from the saved h
    g = gates.to(x.dtype)
    H = a.shape[-1]
    w_down = down_proj.permute(1, 0, 2).reshape(O, E * H)
    grad_z = (grad @ w_down).view(T, E, H)                           # [T, E, H]
    grad_gates = (grad_z * a).sum(-1)
    z = a * g.unsqueeze(-1)
    grad_down = (grad.t() @ z.reshape(T, E * H)).view(O, E, H).permute(1, 0, 2).contiguous()
    grad_down_bias = g.t() @ grad if down_bias is not None else x.new_empty(0)
    if down_bias is not None:
        grad_gates = grad_gates + grad @ down_bias.t()
    grad_h = glu_backward(grad_z * g.unsqueeze(-1), h, activation, gated).reshape(T, E * H2)
    grad_x = grad_h @ gate_up_proj.reshape(E * H2, D)
    grad_up = (grad_h.t() @ x).view(E, H2, D)
    grad_up_bias = grad_h.sum(0).view(E, H2) if gate_up_bias is not None else x.new_empty(0)
    return grad_x, grad_gates.to(gates.dtype), grad_up, grad_down, grad_up_bias, grad_down_bias


@torch.library.custom_op("moe_kernels::dense_moe", mutates_args=())
def _dense_moe(x: Tensor, gates: Tensor, gate_up_proj: Tensor, down_proj: Tensor, gate_up_bias: Optional[Tensor],
               down_bias: Optional[Tensor], activation: str, gated: bool, save_for_backward: bool) -> tuple[Tensor, Tensor]:
    """-> (out [T, O], pre-activation [T, E*2H] (empty unless saved))."""
    fn = _backend.dispatch("dense_moe", x.device.type)
    return fn(x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, save_for_backward)


@_dense_moe.register_fake
def _(x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, save_for_backward):
    E, H2, _ = gate_up_proj.shape
    h = x.new_empty(x.shape[0], E * H2) if save_for_backward else x.new_empty(0)
    return x.new_empty(x.shape[0], down_proj.shape[1]), h


@torch.library.custom_op("moe_kernels::dense_moe_backward", mutates_args=())
def _dense_moe_backward(grad: Tensor, x: Tensor, gates: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                        gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], h: Tensor, activation: str,
                        gated: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _backend.dispatch("dense_moe_backward", x.device.type)
    return fn(grad, x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, h, activation, gated)


@_dense_moe_backward.register_fake
def _(grad, x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, h, activation, gated):
    return (torch.empty_like(x), torch.empty_like(gates), torch.empty_like(gate_up_proj), torch.empty_like(down_proj),
            torch.empty_like(gate_up_bias) if gate_up_bias is not None else x.new_empty(0),
            torch.empty_like(down_bias) if down_bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    # h is saved state, not a result: no gradient flows into it, and none is materialised as [T, E*2H] zeros
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:6], output[1])
    ctx.args = inputs[6:8]


def _backward(ctx, grad, _grad_h):
    x, gates, up, down, up_b, down_b, h = ctx.saved_tensors
    if grad is None:   # no gradient reached the output (grads are not materialised): nothing flows back
        return None, None, None, None, None, None, None, None, None
    gx, gg, gu, gd, gub, gdb = _dense_moe_backward(grad.contiguous(), x, gates, up, down, up_b, down_b, h, *ctx.args)
    return gx, gg, gu, gd, gub if up_b is not None else None, gdb if down_b is not None else None, None, None, None


_backend.register_autograd(_dense_moe, _backward, _setup_context)
_backend.register("dense_moe", "reference", _forward)
_backend.register("dense_moe_backward", "reference", _backward_impl)


def dense_moe(x: Tensor, gates: Tensor, gate_up_proj: Tensor, down_proj: Tensor, *, activation: str = "silu",
              gated: bool = True, gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None) -> Tensor:
    """x: [T, D], gates: [T, E], gate_up_proj: [E, 2H|H, D], down_proj: [E, O, H] -> [T, O] =
    sum_e gates[:, e] * down_e(glu(gate_up_e x))."""
    E, H, D, _ = check_experts_weights(gate_up_proj, down_proj, gated, gate_up_bias, down_bias)
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("gates", gates, shape=(x.shape[0], E), dtypes=_checks.FLOAT_DTYPES)
    if x.shape[1] != D:
        raise ValueError(f"x: [T, D] must have D = {D} of gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(x.shape)}")
    _checks.same_dtype(x=x, gate_up_proj=gate_up_proj)
    _checks.same_device(x=x, gates=gates, gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias,
                        down_bias=down_bias)
    activation = str(check_activation(activation, gated))     # ValueError naming the activation argument
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias))
    return _dense_moe(x, gates, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, save)[0]
