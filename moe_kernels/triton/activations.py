"""The activations of the expert MLPs on the triton backend: the elementwise functions the GEMM epilogues call, and
the two passes around the GEMMs when the activation is not fused into one (a pre-activation to save, a GEMM of
another engine, GLU options): glu_forward after GEMM1, glu_backward between dH and the backward GEMMs.

Spec: moe_kernels.reference.activations (the spec strings, the GLU options alpha, limit, clamp_after, up_offset,
interleaved). Everything computes in fp32; NaN propagates as in torch (a clamp keeps it, relu keeps it), and the
clamps' gradients pass where the input lies within the bounds, bounds included, as torch.clamp's do.
"""
import torch
import triton
import triton.language as tl

from ..reference.activations import ACTIVATIONS, check_activation

# activation name -> the ACT constexpr of the kernels
ACT_CODE = {"identity": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4, "relu2": 5}
assert set(ACT_CODE) == set(ACTIVATIONS)
# CLAMP constexpr: 0 none, 1 the gate before the activation, 2 the gate after it (the up half either way)
_NO_CLAMP, _CLAMP_BEFORE, _CLAMP_AFTER = 0, 1, 2
GEMM_BLOCK_E = 64


@triton.jit
def activation(h, ACT: tl.constexpr, ALPHA=1.0):
    """h fp32 -> act(h): 0 identity, 1 silu (h * sigmoid(ALPHA h)), 2 gelu (erf), 3 gelu_tanh, 4 relu, 5 relu^2."""
    if ACT == 1:
        return h / (1.0 + tl.exp(-ALPHA * h))
    elif ACT == 2:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        # 0.5 h (1 + tanh(u)) = h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h / (1.0 + tl.exp(-2.0 * u))
    elif ACT == 4:
        return tl.where((h > 0) | (h != h), h, 0.0)  # NaN stays, as in torch
    elif ACT == 5:
        r = tl.where((h > 0) | (h != h), h, 0.0)
        return r * r
    else:
        return h


@triton.jit
def act_backward(grad, h, ACT: tl.constexpr, ALPHA=1.0):
    """grad * act'(h) (fp32); relu selects as torch's threshold_backward: 0 where h <= 0, grad elsewhere."""
    if ACT == 1:
        s = 1.0 / (1.0 + tl.exp(-ALPHA * h))
        return grad * (s * (1.0 + ALPHA * h * (1.0 - s)))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        return grad * (cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327)
    elif ACT == 3:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))      # tanh(u), saturating to +-1
        return grad * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h))
    elif ACT == 4:
        return tl.where(h <= 0, 0.0, grad)
    elif ACT == 5:
        return tl.where(h <= 0, 0.0, grad * 2.0 * h)
    else:
        return grad


@triton.jit
def _clamp_max(x, LIMIT):
    return tl.where(x > LIMIT, LIMIT, x)     # NaN stays NaN, as torch.clamp


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x))     # saturating to +-1


@triton.jit
def _gate_act(g, ACT: tl.constexpr, ALPHA, GCAP, HAS_GCAP: tl.constexpr):
    """act(g); with a gate softcap (silu): GCAP tanh(g / GCAP) sigmoid(ALPHA g)."""
    if HAS_GCAP:
        return GCAP * _tanh(g / GCAP) / (1.0 + tl.exp(-ALPHA * g))
    else:
        return activation(g, ACT, ALPHA)


@triton.jit
def _gate_act_backward(grad, g, ACT: tl.constexpr, ALPHA, GCAP, HAS_GCAP: tl.constexpr):
    if HAS_GCAP:
        t = _tanh(g / GCAP)
        sg = 1.0 / (1.0 + tl.exp(-ALPHA * g))
        return grad * ((1.0 - t * t) * sg + GCAP * t * ALPHA * sg * (1.0 - sg))
    else:
        return act_backward(grad, g, ACT, ALPHA)


@triton.jit
def _glu_parts(g, u, ACT: tl.constexpr, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, CLAMP: tl.constexpr,
               HAS_GCAP: tl.constexpr, HAS_UCAP: tl.constexpr):
    """(act'ed gate, its input, the up factor, the up softcap's tanh) of gate g and up u under the GLU options."""
    if CLAMP == 1:
        g_in = _clamp_max(g, LIMIT)
    else:
        g_in = g
    a = _gate_act(g_in, ACT, ALPHA, GCAP, HAS_GCAP)
    if CLAMP == 2:
        a = _clamp_max(a, LIMIT)
    if CLAMP != 0:
        u = tl.where(u < -LIMIT, -LIMIT, _clamp_max(u, LIMIT))
    t_up = u
    if HAS_UCAP:
        t_up = _tanh(u / UCAP)
        u = UCAP * t_up
    return a, g_in, u + UP_OFFSET, t_up


@triton.jit
def _row_expert(offsets_ptr, p, E, BLOCK_E: tl.constexpr):
    """Expert of each sorted row p: the number of experts whose rows end at or before p (clamped to E - 1)."""
    lanes = tl.arange(0, BLOCK_E)
    e = tl.zeros(p.shape, tl.int32)
    for e0 in range(0, E, BLOCK_E):
        ends = tl.load(offsets_ptr + 1 + e0 + lanes, mask=e0 + lanes < E, other=2147483647)
        e += tl.sum((ends[None, :] <= p[:, None]).to(tl.int32), axis=1)
    return tl.minimum(e, E - 1)


@triton.jit
def gate_up_rows(cols, MO, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Weight rows of the gate and up halves of output columns `cols` of a projection [2 MO, K]: gate rows first
    (c, MO + c) or interleaved (2c, 2c + 1); a plain projection's rows are the columns (the up rows unused)."""
    if GATED and INTERLEAVED:
        return 2 * cols, 2 * cols + 1
    else:
        return cols, MO + cols


@triton.jit
def bias_glu(acc, acc_up, bias_row, n_gate, n_up, col_ok, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ALPHA, LIMIT,
             UP_OFFSET, GCAP, UCAP, CLAMP: tl.constexpr, GATED: tl.constexpr, HAS_GCAP: tl.constexpr,
             HAS_UCAP: tl.constexpr):
    """A GEMM epilogue in fp32: the expert's bias (bias_row [MW]) added to the gate (acc) and up (acc_up, unused
    when not GATED) tiles of weight rows n_gate / n_up, then the (gated) activation."""
    if HAS_BIAS:
        acc += tl.load(bias_row + n_gate, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_row + n_up, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        g, _, u, _ = _glu_parts(acc, acc_up, ACT, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, CLAMP, HAS_GCAP, HAS_UCAP)
        return g * u
    else:
        return activation(acc, ACT, ALPHA)


def _glu_args(act, gated):
    """The runtime and constexpr arguments of the GLU options of a parsed activation."""
    clamp = _NO_CLAMP if act.limit is None else _CLAMP_AFTER if act.clamp_after else _CLAMP_BEFORE
    return dict(ALPHA=float(act.alpha), LIMIT=float(act.limit or 0.0), UP_OFFSET=float(act.up_offset),
                GCAP=float(act.gate_softcap or 1.0), UCAP=float(act.up_softcap or 1.0)), dict(
        ACT=ACT_CODE[act.name], CLAMP=clamp, INTERLEAVED=bool(act.interleaved), GATED=bool(gated),
        HAS_GCAP=act.gate_softcap is not None, HAS_UCAP=act.up_softcap is not None)


# --- glu_forward: h = glu(pre + bias) after a GEMM that wrote the raw pre-activation ---------------------------------
@triton.jit
def _glu_forward_kernel(pre_ptr, h_ptr, offsets_ptr, bias_ptr, N, H, E, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
                        GATED: tl.constexpr, HAS_GCAP: tl.constexpr, HAS_UCAP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    """pre [N, MW] (MW = 2H gated: gate column c at c and up at H + c, or at 2c and 2c + 1 when INTERLEAVED)
    -> h [N, H]. The bias is added into pre (the saved pre-activation includes it); rows at or past offsets[E]
    become zero in both (whatever the GEMM left)."""
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < N
    kept = p < tl.load(offsets_ptr + E)
    MW = 2 * H if GATED else H
    rewrite = row_ok & (~kept | HAS_BIAS)     # pre is written back only where it changes
    if HAS_BIAS:
        b_row = bias_ptr + _row_expert(offsets_ptr, p, E, BLOCK_E).to(tl.int64) * MW
    pre_row = pre_ptr + p.to(tl.int64) * MW
    for h0 in range(0, H, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        c_ok = c < H
        m = kept[:, None] & c_ok[None, :]
        st = rewrite[:, None] & c_ok[None, :]
        if GATED and INTERLEAVED:
            cg, cu = 2 * c, 2 * c + 1
        else:
            cg, cu = c, H + c
        g = tl.load(pre_row[:, None] + cg[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            g += tl.load(b_row[:, None] + cg[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.where(m, g, 0.0)
        tl.store(pre_row[:, None] + cg[None, :], g.to(pre_ptr.dtype.element_ty), mask=st)
        if GATED:
            u = tl.load(pre_row[:, None] + cu[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                u += tl.load(b_row[:, None] + cu[None, :], mask=m, other=0.0).to(tl.float32)
            u = tl.where(m, u, 0.0)
            tl.store(pre_row[:, None] + cu[None, :], u.to(pre_ptr.dtype.element_ty), mask=st)
            a, _, uf, _ = _glu_parts(g, u, ACT, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, CLAMP, HAS_GCAP, HAS_UCAP)
            v = a * uf
        else:
            v = activation(g, ACT, ALPHA)
        tl.store(h_ptr + p.to(tl.int64)[:, None] * H + c[None, :], tl.where(m, v, 0.0).to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok[None, :])


GLU_CONFIG = (32, 64, 8)   # BLOCK_M rows, BLOCK_H columns per step, num_warps (fewer elements per thread spill)


def glu_forward(pre, offsets, bias, activation, gated):
    """pre [N, MW] (modified in place: + bias, zero rows past offsets[E]) -> h [N, H] in pre's dtype."""
    act = check_activation(activation, gated)
    N, MW = pre.shape
    H = MW // 2 if gated else MW
    E = offsets.shape[0] - 1
    h = torch.empty(N, H, dtype=pre.dtype, device=pre.device)
    if N == 0 or H == 0:
        return h
    BM, BH, warps = GLU_CONFIG
    runtime, consts = _glu_args(act, gated)
    _glu_forward_kernel[(triton.cdiv(N, BM),)](
        pre, h, offsets, pre if bias is None else bias.contiguous(), N, H, E, *runtime.values(),
        HAS_BIAS=bias is not None, **consts, BLOCK_M=BM, BLOCK_H=BH, BLOCK_E=GEMM_BLOCK_E, num_warps=warps)
    return h


# --- glu_backward: the one pass between dH and the backward GEMMs ----------------------------------------------------
@triton.jit
def _glu_backward_kernel(dh_ptr, pre_ptr, scale_ptr, order_ptr, offsets_ptr, extra_ptr, dpre_ptr, hs_ptr, gw_ptr,
                         N, H, E, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, HAS_EXTRA: tl.constexpr, ACT: tl.constexpr,
                         CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr, GATED: tl.constexpr,
                         HAS_GCAP: tl.constexpr, HAS_UCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Sorted row p (kept when p < offsets[E]), s = scale[p], h = glu(pre[p]):
        dpre[p] = d glu / d pre applied to s * dh[p]      [N, MW]
        hs[p]   = s * h                                   [N, H] (the dY of dW_down = dOut^T (s h))
        gw[order[p]] = dh[p] . h (+ extra[p])             the routing-weight gradient, in pair order
    Rows not kept give zeros everywhere (whatever dh holds there)."""
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < N
    kept = p < tl.load(offsets_ptr + E)
    s = tl.load(scale_ptr + p, mask=kept, other=0.0).to(tl.float32)
    MW = 2 * H if GATED else H
    pre_row = pre_ptr + p.to(tl.int64) * MW
    dpre_row = dpre_ptr + p.to(tl.int64) * MW
    gw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        c_ok = c < H
        m = kept[:, None] & c_ok[None, :]
        st = row_ok[:, None] & c_ok[None, :]
        if GATED and INTERLEAVED:
            cg, cu = 2 * c, 2 * c + 1
        else:
            cg, cu = c, H + c
        g = tl.load(pre_row[:, None] + cg[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.load(dh_ptr + p.to(tl.int64)[:, None] * H + c[None, :], mask=m, other=0.0).to(tl.float32)
        ds = d * s[:, None]
        if GATED:
            u = tl.load(pre_row[:, None] + cu[None, :], mask=m, other=0.0).to(tl.float32)
            a, g_in, uf, t_up = _glu_parts(g, u, ACT, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, CLAMP, HAS_GCAP,
                                           HAS_UCAP)
            h = a * uf
            d_a = ds * uf
            if CLAMP == 2:
                d_a = tl.where(_gate_act(g_in, ACT, ALPHA, GCAP, HAS_GCAP) <= LIMIT, d_a, 0.0)
            dgate = _gate_act_backward(d_a, g_in, ACT, ALPHA, GCAP, HAS_GCAP)
            dup = ds * a
            if HAS_UCAP:
                dup = dup * (1.0 - t_up * t_up)
            if CLAMP == 1:
                dgate = tl.where(g <= LIMIT, dgate, 0.0)
            if CLAMP != 0:
                dup = tl.where((u >= -LIMIT) & (u <= LIMIT), dup, 0.0)
            tl.store(dpre_row[:, None] + cg[None, :], tl.where(m, dgate, 0.0).to(dpre_ptr.dtype.element_ty), mask=st)
            tl.store(dpre_row[:, None] + cu[None, :], tl.where(m, dup, 0.0).to(dpre_ptr.dtype.element_ty), mask=st)
        else:
            h = activation(g, ACT, ALPHA)
            tl.store(dpre_row[:, None] + c[None, :],
                     tl.where(m, act_backward(ds, g, ACT, ALPHA), 0.0).to(dpre_ptr.dtype.element_ty), mask=st)
        gw += tl.sum(tl.where(m, d * h, 0.0), axis=1)
        tl.store(hs_ptr + p.to(tl.int64)[:, None] * H + c[None, :],
                 tl.where(m, h * s[:, None], 0.0).to(hs_ptr.dtype.element_ty), mask=st)
    if HAS_EXTRA:
        gw += tl.load(extra_ptr + p, mask=kept, other=0.0)
    o = tl.load(order_ptr + p, mask=row_ok, other=0)
    tl.store(gw_ptr + o, tl.where(kept, gw, 0.0), mask=row_ok)


def glu_backward(dh, pre, scale, order, offsets, activation, gated, extra=None):
    """dh [N, H] (any float dtype), pre [N, MW], scale [N] fp32, order [N] -> (dpre [N, MW] and hs [N, H] in pre's
    dtype, grad of the routing weights [N] fp32 in pair order)."""
    act = check_activation(activation, gated)
    N, MW = pre.shape
    H = MW // 2 if gated else MW
    E = offsets.shape[0] - 1
    dpre = torch.empty(N, MW, dtype=pre.dtype, device=pre.device)
    hs = torch.empty(N, H, dtype=pre.dtype, device=pre.device)
    gw = torch.empty(N, dtype=torch.float32, device=pre.device)
    if N == 0:
        return dpre, hs, gw
    BM, BH, warps = GLU_CONFIG
    runtime, consts = _glu_args(act, gated)
    _glu_backward_kernel[(triton.cdiv(N, BM),)](
        dh, pre, scale, order, offsets, scale if extra is None else extra, dpre, hs, gw, N, H, E, *runtime.values(),
        HAS_EXTRA=extra is not None, **consts, BLOCK_M=BM, BLOCK_H=BH, num_warps=warps)
    return dpre, hs, gw


# --- ahead-of-time compile list -----------------------------------------------------------------------------------
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (activation spec, gated, bias) of the compiled variants: every base activation, and the GLU options
_AOT_VARIANTS = (("silu", True, False), ("gelu", True, True), ("relu", False, True), ("gelu_tanh", False, False),
                 ("relu2", False, False), ("silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", True, True),
                 ("silu[limit=7.0,clamp_after]", True, False), ("identity", True, False),
                 ("silu[gate_softcap=20.0,up_softcap=30.0]", True, False))


def _aot_configs():
    out = []
    BM, BH, warps = GLU_CONFIG
    floats = {"ALPHA": "fp32", "LIMIT": "fp32", "UP_OFFSET": "fp32", "GCAP": "fp32", "UCAP": "fp32"}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ty = _TL[dtype]
        for spec, gated, bias in _AOT_VARIANTS:
            act = check_activation(spec, gated)
            _, consts = _glu_args(act, gated)
            opts = [f"clamp{consts['CLAMP']}"] * (consts["CLAMP"] != _NO_CLAMP) + ["interleaved"] * consts[
                "INTERLEAVED"] + ["gcap"] * consts["HAS_GCAP"] + ["ucap"] * consts["HAS_UCAP"]
            label = "-".join([act.name, *opts] + ["gated"] * gated + ["bias"] * bias)
            out.append({
                "name": f"glu_forward-{ty}-{label}", "fn": _glu_forward_kernel,
                "signature": {"pre_ptr": f"*{ty}", "h_ptr": f"*{ty}", "offsets_ptr": "*i32", "bias_ptr": f"*{ty}",
                              "N": "i32", "H": "i32", "E": "i32", **floats,
                              **{c: "constexpr" for c in ("HAS_BIAS", "ACT", "CLAMP", "INTERLEAVED", "GATED", "HAS_GCAP",
                                                          "HAS_UCAP", "BLOCK_M", "BLOCK_H", "BLOCK_E")}},
                "constexprs": {"HAS_BIAS": bias, **consts, "BLOCK_M": BM, "BLOCK_H": BH, "BLOCK_E": GEMM_BLOCK_E},
                "num_warps": warps, "num_stages": 2, "divisible": ("pre_ptr", "h_ptr", "offsets_ptr", "bias_ptr", "H")})
            for dh_ty in sorted({ty, "fp32"}):
                out.append({
                    "name": f"glu_backward-{ty}-dh{dh_ty}-{label}", "fn": _glu_backward_kernel,
                    "signature": {"dh_ptr": f"*{dh_ty}", "pre_ptr": f"*{ty}", "scale_ptr": "*fp32",
                                  "order_ptr": "*i32", "offsets_ptr": "*i32", "extra_ptr": "*fp32",
                                  "dpre_ptr": f"*{ty}", "hs_ptr": f"*{ty}", "gw_ptr": "*fp32",
                                  "N": "i32", "H": "i32", "E": "i32", **floats,
                                  **{c: "constexpr" for c in ("HAS_EXTRA", "ACT", "CLAMP", "INTERLEAVED", "GATED",
                                                              "HAS_GCAP", "HAS_UCAP", "BLOCK_M", "BLOCK_H")}},
                    "constexprs": {"HAS_EXTRA": bias, **consts, "BLOCK_M": BM, "BLOCK_H": BH},
                    "num_warps": warps, "num_stages": 2,
                    "divisible": ("dh_ptr", "pre_ptr", "scale_ptr", "order_ptr", "offsets_ptr", "extra_ptr",
                                  "dpre_ptr", "hs_ptr", "gw_ptr", "H")})
    return out


AOT_CONFIGS = _aot_configs()
