"""The fused expert MLP on the triton backend.

Forward: sort the (token, slot) pairs by expert (index only); GEMM1 ("up") on the token rows, gathered in its
loads (triton engine) or materialised once in expert order (torch and tma engines), bias and the (gated)
activation in its epilogue or in one pass after it (_glu_forward_kernel); GEMM2 ("down") writes the expert
outputs in expert order; each token sums its k rows times their routing weights in slot order (unpermute:
deterministic, no atomics).
Backward: dH = dOut rows @ W_down; then one pass (_glu_backward_kernel) computes from dH and the saved
pre-activation the routing-weight gradient dH . h, the pre-activation gradient w * dH * act' (the gated
product rule), and w * h for dW_down; dX by a grouped GEMM with W_up and a per-token sum of its rows in slot
order; dW by variable-K grouped X^T dY. Only the pre-activation [T*k, 2H] is saved. No elementwise torch kernel
runs between the GEMMs.
Each of the six GEMMs runs on the engine moe_kernels.triton.engines chooses for it (torch's grouped_mm, our
Hopper TMA kernels, or our pointer kernels).
Inference steps of few tokens can instead run in two launches (moe_kernels.triton.expert_mlp_decode).
"""
import torch
import triton
import triton.language as tl

from ..reference import expert_mlp as ref
from . import engines as _engines
from . import expert_mlp_decode as _decode
from . import grouped_gemm as gg
from . import grouped_gemm_tma as gt
from . import permutation as perm
from .activations import glu_backward, glu_forward


# --- row_metadata: the token and routing weight of each sorted row ----------------------------------------------------
@triton.jit
def _row_metadata_kernel(order_ptr, weights_ptr, token_ptr, scale_ptr, N, K, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < N
    o = tl.load(order_ptr + p, mask=ok, other=0)
    tl.store(token_ptr + p, o // K, mask=ok)
    tl.store(scale_ptr + p, tl.load(weights_ptr + o, mask=ok, other=0.0).to(tl.float32), mask=ok)


ROW_BLOCK = 1024


def _row_metadata(order, weights, k):
    """token [N] int32 and routing weight scale [N] fp32 of each sorted row, in one launch."""
    N = order.shape[0]
    token = torch.empty(N, dtype=torch.int32, device=order.device)
    scale = torch.empty(N, dtype=torch.float32, device=order.device)
    if N:
        _row_metadata_kernel[(triton.cdiv(N, ROW_BLOCK),)](order, weights.contiguous(), token, scale, N, k,
                                                           BLOCK=ROW_BLOCK, num_warps=4)
    return token, scale


# --- the expert MLP ----------------------------------------------------------------------------------------------
def _routing_rows(experts, weights, num_experts, capacity):
    order, inverse, offsets = perm.sort_by_expert(experts, num_experts, capacity)
    return order, inverse, offsets, *_row_metadata(order, weights, experts.shape[1])


def _choose(role, x, shape, rows, widths, weight, bias=False):
    """The engine of `role`; `weight`, the expert weight the GEMM reads as it is (the other operands are fresh)."""
    return _engines.choose(role, x.device, x.dtype, shape, rows, widths, bias, tensors=(weight,))


def moe_mlp_forward(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated,
                    capacity, save_for_backward):
    """-> (out [T, O], pre-activation [N, MW] (or [0] when not saved), order, inverse, offsets), N = T*k. float64
    runs the reference (the kernels take 16-bit and fp32 data)."""
    if x.dtype == torch.float64:
        return ref.moe_mlp_fused(x, experts, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                                 gated, capacity, save_for_backward)
    T, k = experts.shape
    E, MW, D = gate_up_proj.shape
    H = MW // 2 if gated else MW
    O = down_proj.shape[1]
    N = T * k
    shape = (E, D, H)
    if _decode.applies(x, experts, E, H, training=save_for_backward):   # a decode step in two launches
        out, order, inverse, offsets = _decode.moe_mlp_decode(
            x, experts, weights, gate_up_proj, None, down_proj, None, gate_up_bias=gate_up_bias, down_bias=down_bias,
            activation=activation, gated=gated, capacity=capacity)
        return out, x.new_empty(0), order, inverse, offsets
    order, inverse, offsets = perm.sort_by_expert(experts, E, capacity)
    x = x.contiguous()
    up_engine = _choose("up", x, shape, N, (D, MW, H), gate_up_proj)
    if up_engine == "triton":
        token, _ = _row_metadata(order, weights, k)
        if save_for_backward:
            h_pre = gg.grouped_gemm(x, gate_up_proj, offsets, gather=token, bias=gate_up_bias)
            h = glu_forward(h_pre, offsets, None, activation, gated)
        else:
            h_pre = x.new_empty(0)
            h = gg.grouped_gemm(x, gate_up_proj, offsets, gather=token, bias=gate_up_bias, activation=activation,
                                gated=gated)
    else:
        xs = perm.permute(x, order, inverse)                       # token rows materialised in expert order
        if up_engine == "tma" and save_for_backward:
            h, h_pre = gt.grouped_gemm_tma(xs, gate_up_proj, offsets, bias=gate_up_bias, activation=activation,
                                           gated=gated, save_pre=True)
        elif up_engine == "tma":
            h = gt.grouped_gemm_tma(xs, gate_up_proj, offsets, bias=gate_up_bias, activation=activation, gated=gated)
        else:
            h_pre = _engines.torch_gemm(xs, gate_up_proj, offsets)
            h = glu_forward(h_pre, offsets, gate_up_bias, activation, gated)
        if not save_for_backward:
            h_pre = x.new_empty(0)
    down_engine = _choose("down", x, shape, N, (H, O), down_proj, bias=down_bias is not None)
    if down_engine == "torch":
        ys = _engines.torch_gemm(h, down_proj, offsets)
    elif down_engine == "tma":
        ys = gt.grouped_gemm_tma(h, down_proj, offsets, bias=down_bias)
    else:
        ys = gg.grouped_gemm(h, down_proj, offsets, bias=down_bias)
    out = perm.unpermute(ys, inverse, weights)            # w * y summed per token in slot order, in fp32
    return out, h_pre, order, inverse, offsets


def moe_mlp_backward(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre, order, inverse,
                     offsets, activation, gated):
    """-> (grad_x, grad_weights, grad_gate_up_proj, grad_down_proj, grad_gate_up_bias or None,
    grad_down_bias or None)."""
    if x.dtype == torch.float64:
        return ref.moe_mlp_fused_backward(grad, x, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, h_pre,
                                          order, inverse, offsets, activation, gated)
    T, k = inverse.shape
    E, MW, D = gate_up_proj.shape
    H = MW // 2 if gated else MW
    O = down_proj.shape[1]
    N = order.shape[0]
    shape = (E, D, H)
    token, scale = _row_metadata(order, weights, k)
    grad = grad.to(x.dtype).contiguous()
    dh_engine = _choose("dh", x, shape, N, (O, H), down_proj)
    dwd_engine = _choose("dw_down", x, shape, N, (O, H), None)
    # dOut rows materialised in expert order, where an engine that takes no gathered rows needs them
    gs = perm.permute(grad, order, inverse) if dh_engine != "triton" or dwd_engine != "triton" else None
    # dH = dOut[t] @ W_down[e]; fp32 where our kernels write it (it feeds both the weight gradient and dH_pre)
    if dh_engine == "torch":
        dh = _engines.torch_gemm(gs, down_proj, offsets, trans_w=False)
    elif dh_engine == "tma":
        dh = gt.grouped_gemm_tma(gs, down_proj, offsets, trans_w=False, out_dtype=torch.float32)
    else:
        dh = gg.grouped_gemm(grad, down_proj, offsets, gather=token, trans_w=False, out_dtype=torch.float32)
    extra = None
    if down_bias is not None:
        # y = w * (h @ W_down^T + b): the weight gradient also holds dOut . b[e] (biased layers only)
        rows = torch.arange(N, device=x.device)
        expert_of_row = torch.searchsorted(offsets[1:].long(), rows, right=True).clamp(max=E - 1)
        extra = (grad.index_select(0, token.long()).float()
                 * down_bias.index_select(0, expert_of_row).float()).sum(-1)
    dh_pre, hs, gw = glu_backward(dh, h_pre, scale, order, offsets, activation, gated, extra)
    del dh, extra           # the [N, H] buffers are dropped as soon as they are consumed: a lower peak of memory
    if dwd_engine == "torch":
        grad_down = _engines.torch_gemm_tn(hs, gs, offsets, E)
    elif dwd_engine == "tma":
        grad_down = gt.grouped_gemm_tn_tma(hs, gs, offsets, E)
    else:
        grad_down = gg.grouped_gemm_tn(hs, grad, offsets, E, gather_dy=token)
    grad_down_bias = (gg.grouped_colsum(grad, offsets, E, gather=token, row_scale=scale)
                      if down_bias is not None else None)
    del gs, hs
    dx_engine = _choose("dx", x, shape, N, (MW, D), gate_up_proj)
    if dx_engine == "torch":
        dxs = _engines.torch_gemm(dh_pre, gate_up_proj, offsets, trans_w=False)
    elif dx_engine == "tma":
        dxs = gt.grouped_gemm_tma(dh_pre, gate_up_proj, offsets, trans_w=False)
    else:
        dxs = gg.grouped_gemm(dh_pre, gate_up_proj, offsets, trans_w=False)
    grad_x = perm.permute_backward(dxs, inverse)         # each token sums its kept rows in slot order
    del dxs
    dwu_engine = _choose("dw_up", x, shape, N, (MW, D), None)
    if dwu_engine == "triton":
        grad_up = gg.grouped_gemm_tn(x, dh_pre, offsets, E, gather_x=token)
    else:
        xs = perm.permute(x.contiguous(), order, inverse)
        grad_up = (_engines.torch_gemm_tn(xs, dh_pre, offsets, E) if dwu_engine == "torch"
                   else gt.grouped_gemm_tn_tma(xs, dh_pre, offsets, E))
    grad_up_bias = gg.grouped_colsum(dh_pre, offsets, E) if gate_up_bias is not None else None
    return grad_x, gw.view(T, k).to(weights.dtype), grad_up, grad_down, grad_up_bias, grad_down_bias


# --- ahead-of-time compile list -----------------------------------------------------------------------------------
def _aot_configs():
    return [{"name": f"row_metadata-w{ty}", "fn": _row_metadata_kernel,
            "signature": {"order_ptr": "*i32", "weights_ptr": f"*{ty}", "token_ptr": "*i32", "scale_ptr": "*fp32",
                          "N": "i32", "K": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": ROW_BLOCK}, "num_warps": 4, "num_stages": 1,
            "divisible": ("order_ptr", "weights_ptr", "token_ptr", "scale_ptr")} for ty in ("fp32", "bf16", "fp16")]


AOT_CONFIGS = _aot_configs()
