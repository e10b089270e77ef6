"""The fused expert MLP on the triton backend (ScatterMoE's scatter-to-scatter idea).

Forward: sort the (token, slot) pairs by expert (index only); GEMM1 gathers its input rows straight from the
unsorted tokens and adds bias; the activation runs on the pre-activation (fused into GEMM1's epilogue when no
backward is needed); GEMM2 multiplies each row by its routing weight and scatters it to its (token, slot)
row; each token sums its k rows in slot order (deterministic, no atomics).
Backward: dH = dOut[token] @ W_down (gather fused), the routing-weight gradient from dH . H (no [T*k, D]
expert output is kept), dW by variable-K grouped X^T dY, dX by a grouped GEMM with W_up and a per-token
sum of its rows. Only the pre-activation [T*k, 2H] is saved; the activation is recomputed from it.
"""
import torch

from ..reference import expert_mlp as ref
from ..reference.activations import glu, glu_backward
from . import grouped_gemm as gg
from . import permutation as perm


def _routing_rows(experts, weights, num_experts, capacity):
    order, inverse, offsets = perm.sort_by_expert(experts, num_experts, capacity)
    k = experts.shape[1]
    token = torch.div(order, k, rounding_mode="floor").to(torch.int32)
    scale = weights.reshape(-1).index_select(0, order.long()).float()  # routing weight of each sorted row
    return order, inverse, offsets, token, scale


def moe_mlp_forward(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated,
                    capacity, save_for_backward):
    """-> (out [T, D], pre-activation [N, 2H] (or [0] when not saved), order, inverse, offsets). float64 runs the
    reference (the kernels take 16-bit and fp32 data)."""
    if x.dtype == torch.float64:
        return ref.moe_mlp_fused(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                                 gated, capacity, save_for_backward)
    T, k = experts.shape
    E = gate_up_proj.shape[0]
    order, inverse, offsets, token, scale = _routing_rows(experts, weights, E, capacity)
    if save_for_backward:
        h_pre = gg.grouped_gemm(x, gate_up_proj, offsets, gather=token, bias=gate_up_bias)
        h = glu(h_pre, activation, gated)
    else:
        h_pre = x.new_empty(0)
        h = gg.grouped_gemm(x, gate_up_proj, offsets, gather=token, bias=gate_up_bias, activation=activation,
                            gated=gated)
    y = gg.grouped_gemm(h, down_proj, offsets, bias=down_bias, row_scale=scale, scatter=order, num_out_rows=T * k)
    out = y.view(T, k, y.shape[1]).sum(1, dtype=torch.float32).to(x.dtype) if k > 1 else y.view(T, y.shape[1])
    return out, h_pre, order, inverse, offsets


def moe_mlp_backward(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order, inverse,
                     offsets, activation, gated):
    """-> (grad_x, grad_weights, grad_gate_up_proj, grad_down_proj, grad_gate_up_bias or None,
    grad_down_bias or None)."""
    if x.dtype == torch.float64:
        return ref.moe_mlp_fused_backward(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre,
                                          order, inverse, offsets, activation, gated)
    T, k = inverse.shape
    E = gate_up_proj.shape[0]
    N = order.shape[0]
    token = torch.div(order, k, rounding_mode="floor").to(torch.int32)
    scale = weights.reshape(-1).index_select(0, order.long()).float()
    rows = torch.arange(N, device=x.device)
    kept = rows < offsets[-1]
    h = glu(h_pre, activation, gated)
    # dOut[t] @ W_down[e], kept in fp32: it feeds both the routing-weight gradient and the scaled dH
    dh = gg.grouped_gemm(grad, down_proj, offsets, gather=token, trans_w=False, out_dtype=torch.float32)
    # routing weight: y = w * (h @ W_down^T + b), so dL/dw = dH . h + dOut . b
    grad_w = (dh * h.float()).sum(-1)
    if down_bias is not None:
        expert_of_row = torch.searchsorted(offsets[1:].long(), rows, right=True).clamp(max=E - 1)
        grad_w = grad_w + (grad.index_select(0, token.long()).float()
                           * down_bias.index_select(0, expert_of_row).float()).sum(-1)
    grad_w = torch.where(kept, grad_w, 0.0)
    grad_weights = torch.zeros(T * k, dtype=torch.float32, device=x.device)
    grad_weights.index_copy_(0, order.long(), grad_w)                                    # a permutation: exact
    grad_down = gg.grouped_gemm_tn(h, grad, offsets, E, gather_dy=token, row_scale=scale)
    grad_down_bias = (gg.grouped_colsum(grad, offsets, E, gather=token, row_scale=scale)
                      if down_bias is not None else None)
    dh_pre = glu_backward((dh * scale.unsqueeze(-1)).to(h_pre.dtype), h_pre, activation, gated)
    grad_x = perm.permute_backward(gg.grouped_gemm(dh_pre, gate_up_proj, offsets, trans_w=False), inverse)
    grad_up = gg.grouped_gemm_tn(x, dh_pre, offsets, E, gather_x=token)
    grad_up_bias = gg.grouped_colsum(dh_pre, offsets, E) if gate_up_bias is not None else None
    return (grad_x, grad_weights.view(T, k).to(weights.dtype), grad_up, grad_down, grad_up_bias, grad_down_bias)
