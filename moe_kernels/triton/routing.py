"""Triton kernels of the routing op family (top-k gating forward and backward).

Spec: moe_kernels.reference.routing. Each program handles BLOCK_T tokens x BLOCK_E (>= E) experts, loads the
logits once in fp32 and does everything else in registers:

- forward: scores (softmax | sigmoid), choice = scores + bias, group-limited masking, top-k by k rounds of
  (max, lowest index attaining it, mask it out) -- ties to the lower index, as the reference's stable sort --,
  weights (renormalised, scaled), per-block partial sums of counts and of the load-balancing probabilities
  (reduced by the launcher with torch .sum(0): deterministic, no atomics), and logsumexp per token.
- backward: recomputes the scores and applies the formulas of reference.topk_route_backward.

NaN logits: a NaN choice score ranks above everything (as torch.sort puts NaN first in descending order), so the
NaN token gets NaN weights and valid expert ids; other tokens are untouched. float64 logits run the reference.
"""
import torch
import triton
import triton.language as tl

from ..reference import routing as ref

EPS = tl.constexpr(ref.EPS)  # a constexpr global, so the kernels may read it


# --- shared by both kernels ----------------------------------------------------------------------------------
@triton.jit
def _load_logits(logits_ptr, rows, offs_e, mask, row_ok, E: tl.constexpr):
    """The block's logits z in fp32 (padded columns -inf, padded rows 0: finite, never stored), their row max m,
    ex = exp(z - m) and its row sum."""
    z = tl.load(logits_ptr + rows[:, None] * E + offs_e[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    z = tl.where(row_ok[:, None], z, 0.0)
    m = tl.max(z, axis=1)
    ex = tl.exp(z - m[:, None])
    return z, m, ex, tl.sum(ex, axis=1)


# --- forward kernel -------------------------------------------------------------------------------------------
@triton.jit
def _topk_route_fwd_kernel(
    logits_ptr, bias_ptr, weights_ptr, experts_ptr, counts_part_ptr, prob_part_ptr, lse_ptr,
    T, scale,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_t < T
    col_ok = offs_e < E
    mask = row_ok[:, None] & col_ok[None, :]
    rows = offs_t.to(tl.int64)

    # logits, once, in fp32
    z, m, ex, den = _load_logits(logits_ptr, rows, offs_e, mask, row_ok, E)
    # logsumexp as torch.logsumexp gives it: an infinite max (a +inf logit, or every logit -inf) is the result,
    # where m + log(sum exp(z - m)) would be inf - inf = NaN; a row holding a NaN stays NaN
    nans = tl.sum(tl.where(mask & (z != z), 1, 0), axis=1)
    lse = tl.where((tl.abs(m) == float("inf")) & (nans == 0), m, m + tl.log(den))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-z))
        s = tl.where(col_ok[None, :], s, 0.0)
        p = s / (tl.sum(s, axis=1)[:, None] + EPS)
    else:
        s = ex / den[:, None]
        p = s
    tl.store(prob_part_ptr + pid * E + offs_e, tl.sum(tl.where(mask, p, 0.0), axis=0), mask=col_ok)

    # choice scores: bias shifts the choice only; NaN ranks first (torch.sort's order), padded columns never chosen
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_e, mask=col_ok, other=0.0)[None, :]
    c = tl.where(c != c, float("inf"), c)
    c = tl.where(col_ok[None, :], c, float("-inf"))

    if NUM_GROUPS > 1:
        GS: tl.constexpr = E // NUM_GROUPS
        grp = offs_e // GS  # padded columns fall in groups >= NUM_GROUPS
        # group score (sum of the group's top-2 choice scores), broadcast to the group's experts
        gse = tl.full((BLOCK_T, BLOCK_E), float("-inf"), tl.float32)
        for g in range(NUM_GROUPS):
            in_g = (grp == g)[None, :]
            m1 = tl.max(tl.where(in_g, c, float("-inf")), axis=1)
            if GS > 1:
                i1 = tl.min(tl.where(in_g & (c == m1[:, None]), offs_e[None, :], BLOCK_E), axis=1)
                m2 = tl.max(tl.where(in_g & (offs_e[None, :] != i1[:, None]), c, float("-inf")), axis=1)
                gsc = m1 + m2
            else:
                gsc = m1
            gse = tl.where(in_g, gsc[:, None], gse)
        # keep the TOPK_GROUPS groups of largest score, ties to the lower group index
        kept = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
        for i in range(TOPK_GROUPS):
            avail = col_ok[None, :] & (kept == 0)
            gm = tl.max(tl.where(avail, gse, float("-inf")), axis=1)
            sel = tl.min(tl.where(avail & (gse == gm[:, None]), grp[None, :], NUM_GROUPS), axis=1)
            kept = kept | (grp[None, :] == sel[:, None])
        c = tl.where(kept, c, float("-inf"))

    # top-k: k rounds of (max, lowest index attaining it, take it out)
    taken = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    vals = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for j in range(K):
        avail = col_ok[None, :] & (taken == 0)
        cm = tl.max(tl.where(avail, c, float("-inf")), axis=1)
        idx = tl.min(tl.where(avail & (c == cm[:, None]), offs_e[None, :], BLOCK_E), axis=1)
        hit = offs_e[None, :] == idx[:, None]
        v = tl.sum(tl.where(hit, s, 0.0), axis=1)
        taken = taken | hit
        vals = tl.where(offs_k[None, :] == j, v[:, None], vals)
        ids = tl.where(offs_k[None, :] == j, idx[:, None], ids)

    if RENORMALIZE:
        vals = vals / (tl.sum(vals, axis=1)[:, None] + EPS)
    vals = vals * scale
    out_mask = row_ok[:, None] & (offs_k[None, :] < K)
    out_offs = rows[:, None] * K + offs_k[None, :]
    tl.store(weights_ptr + out_offs, vals, mask=out_mask)
    tl.store(experts_ptr + out_offs, ids.to(tl.int64), mask=out_mask)
    cnt = tl.sum(tl.where(taken & row_ok[:, None], 1, 0), axis=0)
    tl.store(counts_part_ptr + pid * E + offs_e, cnt.to(tl.int32), mask=col_ok)


# --- forward launcher -----------------------------------------------------------------------------------------
def _block_e(E):
    return max(16, triton.next_power_of_2(E))


def _block_t(block_e):
    # tiles of at most 32 tokens and 1024 elements (8 per thread at 4 warps), 2048 from BLOCK_E = 128 on (whole rows
    # per warp): every [BLOCK_T, BLOCK_E] tile of the kernels stays in registers on sm_80 and sm_90 (no spills;
    # 64 x 32 and 32 x 64 with groups spilled on sm_80)
    return max(1, min(32, (2048 if block_e >= 128 else 1024) // block_e))


def fwd_config(E, k):
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps) of the forward kernel for E experts, top-k."""
    block_e = _block_e(E)
    # from 512 experts on, 8 warps: at 4 the [4, 512] tiles of the top-k loop spill on sm_90
    return _block_t(block_e), block_e, max(2, triton.next_power_of_2(k)), 8 if block_e >= 512 else 4


def bwd_config(E, k):
    """(BLOCK_T, BLOCK_E, num_warps) of the backward kernel."""
    block_e = _block_e(E)
    return _block_t(block_e), block_e, 4


def topk_route(logits, k, *, score="softmax", renormalize=True, bias=None, num_groups=None, topk_groups=None,
               scale=1.0):
    """Same contract as reference.topk_route: (weights [T,k] fp32, experts [T,k] int64, counts [E] int32,
    prob_sum [E] fp32, lse [T] fp32); float64 logits run the reference."""
    if logits.dtype == torch.float64:
        return ref.topk_route(logits, k, score=score, renormalize=renormalize, bias=bias, num_groups=num_groups,
                              topk_groups=topk_groups, scale=scale)
    logits = logits.contiguous()
    T, E = logits.shape
    dev = logits.device
    BLOCK_T, BLOCK_E, BLOCK_K, num_warps = fwd_config(E, k)
    nb = max(triton.cdiv(T, BLOCK_T), 1)  # one program even for T = 0: the partial sums are then zero
    weights = torch.empty(T, k, device=dev, dtype=torch.float32)
    experts = torch.empty(T, k, device=dev, dtype=torch.int64)
    lse = torch.empty(T, device=dev, dtype=torch.float32)
    counts_part = torch.empty(nb, E, device=dev, dtype=torch.int32)
    prob_part = torch.empty(nb, E, device=dev, dtype=torch.float32)
    bias32 = prob_part if bias is None else bias.to(device=dev, dtype=torch.float32).contiguous()
    grouped = num_groups is not None and num_groups > 1
    _topk_route_fwd_kernel[(nb,)](
        logits, bias32, weights, experts, counts_part, prob_part, lse, T, float(scale),
        E=E, K=k, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K,
        SIGMOID=score == "sigmoid", RENORMALIZE=bool(renormalize), HAS_BIAS=bias is not None,
        NUM_GROUPS=num_groups if grouped else 0, TOPK_GROUPS=topk_groups if grouped else 0,
        num_warps=num_warps, num_stages=1,
    )
    return weights, experts, counts_part.sum(0, dtype=torch.int32), prob_part.sum(0), lse


# --- backward kernel ------------------------------------------------------------------------------------------
@triton.jit
def _topk_route_bwd_kernel(
    grad_weights_ptr, grad_prob_ptr, grad_lse_ptr, logits_ptr, experts_ptr, grad_logits_ptr,
    T, scale,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_PROB: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_t < T
    col_ok = offs_e < E
    mask = row_ok[:, None] & col_ok[None, :]
    rows = offs_t.to(tl.int64)

    z, m, ex, den = _load_logits(logits_ptr, rows, offs_e, mask, row_ok, E)
    soft = ex / den[:, None]
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-z))
        s = tl.where(col_ok[None, :], s, 0.0)
    else:
        s = soft

    grad_s = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    if HAS_GRAD_WEIGHTS:
        gw_rows = grad_weights_ptr + rows * K
        ex_rows = experts_ptr + rows * K
        if RENORMALIZE:
            # Z = sum_j p_j + EPS, gp = sum_j g_j p_j over the chosen experts
            Z = tl.zeros((BLOCK_T,), tl.float32)
            gp = tl.zeros((BLOCK_T,), tl.float32)
            for j in range(K):
                e = tl.load(ex_rows + j, mask=row_ok, other=0)
                g = tl.load(gw_rows + j, mask=row_ok, other=0.0) * scale
                pj = tl.sum(tl.where(offs_e[None, :] == e[:, None], s, 0.0), axis=1)
                Z += pj
                gp += g * pj
            Z += EPS
            corr = gp / (Z * Z)
        for j in range(K):
            e = tl.load(ex_rows + j, mask=row_ok, other=0)
            g = tl.load(gw_rows + j, mask=row_ok, other=0.0) * scale
            if RENORMALIZE:
                g = g / Z - corr
            grad_s += tl.where(offs_e[None, :] == e[:, None], g[:, None], 0.0)
    if HAS_GRAD_PROB:
        gpr = tl.load(grad_prob_ptr + offs_e, mask=col_ok, other=0.0)[None, :]
        if SIGMOID:
            Zs = tl.sum(s, axis=1)[:, None] + EPS
            grad_s += gpr / Zs - tl.sum(gpr * s, axis=1)[:, None] / (Zs * Zs)
        else:
            grad_s += gpr
    if SIGMOID:
        grad_z = grad_s * s * (1.0 - s)
    else:
        grad_z = s * (grad_s - tl.sum(grad_s * s, axis=1)[:, None])
    if HAS_GRAD_LSE:
        gl = tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)
        grad_z += gl[:, None] * soft
    tl.store(grad_logits_ptr + rows[:, None] * E + offs_e[None, :],
             grad_z.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# --- backward launcher ----------------------------------------------------------------------------------------
def topk_route_backward(grad_weights, grad_prob_sum, grad_lse, logits, experts, score, renormalize, scale):
    """Same contract as reference.topk_route_backward: grad_logits [T, E] in logits' dtype; None grads are zero."""
    if logits.dtype == torch.float64:
        return ref.topk_route_backward(grad_weights, grad_prob_sum, grad_lse, logits, experts, score, renormalize,
                                       scale)
    logits = logits.contiguous()
    T, E = logits.shape
    k = experts.shape[1]
    dev = logits.device
    BLOCK_T, BLOCK_E, num_warps = bwd_config(E, k)
    grad_logits = torch.empty_like(logits)
    dummy = None
    if grad_weights is None or grad_prob_sum is None or grad_lse is None:
        dummy = torch.empty(1, device=dev, dtype=torch.float32)

    def f32(t):
        return dummy if t is None else t.to(device=dev, dtype=torch.float32).contiguous()

    _topk_route_bwd_kernel[(max(triton.cdiv(T, BLOCK_T), 1),)](
        f32(grad_weights), f32(grad_prob_sum), f32(grad_lse), logits, experts.contiguous(), grad_logits,
        T, float(scale),
        E=E, K=k, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, SIGMOID=score == "sigmoid", RENORMALIZE=bool(renormalize),
        HAS_GRAD_WEIGHTS=grad_weights is not None, HAS_GRAD_PROB=grad_prob_sum is not None,
        HAS_GRAD_LSE=grad_lse is not None,
        num_warps=num_warps, num_stages=1,
    )
    return grad_logits


# --- ahead-of-time compile configurations ---------------------------------------------------------------------
_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot_configs():
    configs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ty = _TL_DTYPE[dtype]
        for E, k, score, bias, groups in (
            (8, 2, "softmax", False, (0, 0)),          # Mixtral
            (32, 4, "softmax", False, (0, 0)),         # BLOCK_E 32
            (64, 8, "softmax", False, (0, 0)),         # OLMoE
            (64, 8, "sigmoid", True, (8, 4)),          # groups at the tile of most tokens x experts
            (128, 8, "softmax", False, (0, 0)),        # Qwen3-MoE
            (256, 8, "sigmoid", True, (8, 4)),         # DeepSeek-V3: bias + groups
            (512, 8, "softmax", False, (0, 0)),        # largest E
            (512, 1, "sigmoid", True, (0, 0)),         # k = 1, bias without groups
            (512, 512, "softmax", False, (0, 0)),      # k = E at the largest E: the widest BLOCK_K
            (13, 13, "sigmoid", False, (0, 0)),        # prime E, padded columns
        ):
            BLOCK_T, BLOCK_E, BLOCK_K, nw = fwd_config(E, k)
            configs.append({
                "name": f"topk_route_fwd-{ty}-E{E}-k{k}-{score}{'-bias' if bias else ''}"
                        f"{'-groups' if groups[0] else ''}",
                "fn": _topk_route_fwd_kernel,
                "signature": {"logits_ptr": f"*{ty}", "bias_ptr": "*fp32", "weights_ptr": "*fp32",
                              "experts_ptr": "*i64", "counts_part_ptr": "*i32", "prob_part_ptr": "*fp32",
                              "lse_ptr": "*fp32", "T": "i32", "scale": "fp32",
                              **{c: "constexpr" for c in ("E", "K", "BLOCK_T", "BLOCK_E", "BLOCK_K", "SIGMOID",
                                                          "RENORMALIZE", "HAS_BIAS", "NUM_GROUPS", "TOPK_GROUPS")}},
                "constexprs": {"E": E, "K": k, "BLOCK_T": BLOCK_T, "BLOCK_E": BLOCK_E, "BLOCK_K": BLOCK_K,
                               "SIGMOID": score == "sigmoid", "RENORMALIZE": True, "HAS_BIAS": bias,
                               "NUM_GROUPS": groups[0], "TOPK_GROUPS": groups[1]},
                "num_warps": nw, "num_stages": 1,
            })
        for E, k, score in ((8, 2, "softmax"), (32, 4, "softmax"), (64, 8, "softmax"), (128, 8, "softmax"),
                            (256, 8, "sigmoid"), (512, 8, "softmax"), (512, 8, "sigmoid")):
            BLOCK_T, BLOCK_E, nw = bwd_config(E, k)
            configs.append({
                "name": f"topk_route_bwd-{ty}-E{E}-k{k}-{score}",
                "fn": _topk_route_bwd_kernel,
                "signature": {"grad_weights_ptr": "*fp32", "grad_prob_ptr": "*fp32", "grad_lse_ptr": "*fp32",
                              "logits_ptr": f"*{ty}", "experts_ptr": "*i64", "grad_logits_ptr": f"*{ty}",
                              "T": "i32", "scale": "fp32",
                              **{c: "constexpr" for c in ("E", "K", "BLOCK_T", "BLOCK_E", "SIGMOID", "RENORMALIZE",
                                                          "HAS_GRAD_WEIGHTS", "HAS_GRAD_PROB", "HAS_GRAD_LSE")}},
                "constexprs": {"E": E, "K": k, "BLOCK_T": BLOCK_T, "BLOCK_E": BLOCK_E,
                               "SIGMOID": score == "sigmoid", "RENORMALIZE": True,
                               "HAS_GRAD_WEIGHTS": True, "HAS_GRAD_PROB": True, "HAS_GRAD_LSE": True},
                "num_warps": nw, "num_stages": 1,
            })
    return configs


AOT_CONFIGS = _aot_configs()
