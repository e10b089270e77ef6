"""The expert MLP of a sparse MoE layer, in the transformers v5 experts contract.

The spec of `moe_kernels.ops.moe_mlp`, written the plain way: for each expert, the (token, slot) pairs
routed to it, its MLP, weighted by the routing weight, summed per token.
"""
import torch

from .activations import glu
from .grouped_gemm import _pre_activation, grouped_mm, grouped_mm_backward
from .permutation import permute, permute_backward, sort_by_expert, unpermute, unpermute_backward


def lora_weight(w, lora):
    """The weight a LoRA adapter stands for: w [E, N, K] + scale * B @ A, with lora = (A [E, r, K], B [E, N, r],
    scale); w itself without one."""
    return w if lora is None else w + lora.scale * (lora.B @ lora.A)


def moe_mlp(x, experts, weights, gate_up_proj, down_proj, *, activation="silu", gated=True, gate_up_bias=None,
            down_bias=None, capacity=None, gate_up_lora=None, down_lora=None):
    """x: [T, D], experts/weights: [T, k], gate_up_proj: [E, 2H, D] (gate rows first; [E, H, D] when not
    gated), down_proj: [E, O, H] -> [T, O] in x's dtype. Ids outside [0, E) contribute zero. A LoRA adapter on a
    projection (A, B, scale) computes with its weight plus scale * B @ A."""
    gate_up_proj, down_proj = lora_weight(gate_up_proj, gate_up_lora), lora_weight(down_proj, down_lora)
    T, k = experts.shape
    E = gate_up_proj.shape[0]
    kept = sort_by_expert(experts, E, capacity)[1] >= 0  # [T, k]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(T, down_proj.shape[1], dtype=acc, device=x.device)
    for e in range(E):
        tok, slot = torch.nonzero((experts == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ gate_up_proj[e].t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        y = glu(h, activation, gated) @ down_proj[e].t()
        if down_bias is not None:
            y = y + down_bias[e]
        out.index_add_(0, tok, y.to(acc) * weights[tok, slot].to(acc).unsqueeze(-1))
    return out.to(x.dtype)


def moe_mlp_fused(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, capacity,
                  save_for_backward):
    """The contract of the fused op (moe_kernels::moe_mlp_fused), composed of the reference pieces:
    -> (out [T, D], pre-activation [T*k, 2H] (empty unless saved), order, inverse, offsets)."""
    order, inverse, offsets = sort_by_expert(experts, gate_up_proj.shape[0], capacity)
    h_pre = _pre_activation(permute(x, order, inverse), gate_up_proj, offsets, gate_up_bias)
    y = grouped_mm(_glu_kept(h_pre, offsets, activation, gated), down_proj, offsets, down_bias)
    out = unpermute(y, inverse, weights)
    return out, h_pre if save_for_backward else x.new_empty(0), order, inverse, offsets


def moe_mlp_fused_backward(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order, inverse,
                           offsets, activation, gated):
    """-> (grad_x, grad_weights, grad_gate_up_proj, grad_down_proj, grad_gate_up_bias, grad_down_bias)."""
    h = _glu_kept(h_pre, offsets, activation, gated)
    grad_y, grad_w = unpermute_backward(grad, grouped_mm(h, down_proj, offsets, down_bias), inverse, weights)
    grad_h, grad_down, grad_down_bias = grouped_mm_backward(grad_y, h, down_proj, offsets, down_bias)
    xs = permute(x, order, inverse)
    grad_xs, grad_up, grad_up_bias = grouped_mm_backward(grad_h, xs, gate_up_proj, offsets, gate_up_bias, activation,
                                                         gated)
    return permute_backward(grad_xs, inverse), grad_w, grad_up, grad_down, grad_up_bias, grad_down_bias


def _glu_kept(h_pre, offsets, activation, gated):
    h = glu(h_pre, activation, gated)
    h[int(offsets[-1]):] = 0
    return h
