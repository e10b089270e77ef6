"""The expert MLP with quantized expert weights on the triton backend (inference): grouped GEMMs that read the
weights as checkpoints store them and dequantise each tile in registers.

Spec: moe_kernels.reference.quantized (layouts, dequantisation) and moe_kernels.reference.expert_mlp.

- w8a16 / w4a16 (`_quant_gemm_kernel`, A_FP8 off): each [BLOCK_N, BLOCK_K] weight tile is loaded as bytes, decoded
  (fp8 e4m3: the byte's bits placed into an fp16 and widened, exact, subnormals included; mxfp4: two e2m1 codes a
  byte, low nibble first, decoded from their bits to fp32), multiplied by its scale in fp32 (fp8: the fp32 scale of
  its (bn, bk) block; mxfp4: 2^(s - 127) per 32 values along K), cast to the activation dtype and fed to tl.dot
  with fp32 accumulation. No fp8 type is used, so it compiles for sm_80 as for sm_90.
- FP8 x FP8 (A_FP8 on, sm_89+; opt-in by MOE_KERNELS_FP8_ACTIVATIONS=1, for fp8 weights whose bk is a multiple of
  128): the GEMM's input rows are quantised at run time per row and per 128 columns (`_quantize_rows_kernel`:
  scale amax / 448, values rounded to nearest e4m3), the dot runs on fp8 operands (wgmma QGMMA on sm_90) one
  128-wide K block at a time, and each block's fp32 result is scaled by its row scale times its column's weight
  scale before it is accumulated (DeepSeek-V3's recipe).

The expert MLP (`moe_mlp_quantized`): routing metadata as the float path has it (moe_kernels.triton.expert_mlp),
the up projection on token rows gathered in its loads with bias and every activation spec (GLU options included,
from moe_kernels.triton.activations) in its epilogue, the down projection on the rows in expert order, and the
weighted combine per token in slot order (permutation.unpermute). Row tiles follow the device schedule of
grouped_gemm (tile_end); the grid is cdiv(rows, BLOCK_M) + min(E, rows) row tiles (each non-empty expert adds at
most one partial tile), so decode launches few programs whatever E. With T <= 64 tokens, BLOCK_M is T rounded up to
a power of two (16 to 64; 16 or 64 on the FP8 x FP8 path): an expert holds at most T rows (top-k picks distinct
experts), so each active expert's weights are read once. No host syncs: grids come from shapes only.
"""
import os

import torch
import triton
import triton.language as tl

from ..reference.activations import check_activation
from . import expert_mlp as _mlp
from . import expert_mlp_decode as _decode
from . import permutation as perm
from .activations import _glu_args, bias_glu, gate_up_rows
from .dequant import FMT_CODE as _FMT_CODE
from .dequant import MX_GROUP, _e2m1, _e4m3_over_256, _e8m0, _weight_tile  # noqa: F401 (the decoders' tests)
from .grouped_gemm import (_PREC_16BIT, _PREC_IEEE, _TL_TYPE, GEMM_BLOCK_E, _dot, _expert_of_tile,
                           tile_schedule)

FP8_ENV = "MOE_KERNELS_FP8_ACTIVATIONS"
ACT_GROUP = 128          # activation columns per scale of the FP8 x FP8 path


@triton.jit
def _fp8_block_dot(x, xs, w_e, ws_e, rows, row_ok, s_rows, k0, K, BK_S, BLOCK_K: tl.constexpr):
    """FP8 x FP8: x [BLOCK_M, BLOCK_K] e4m3 with row scales xs, times weight rows `rows` (e4m3) of one 128-wide K
    block, scaled by xs and the rows' block scales -> fp32 [BLOCK_M, BLOCK_N]."""
    k = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_e + rows.to(tl.int64)[:, None] * K + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
    s = tl.load(ws_e + s_rows + k0 // BK_S, mask=row_ok, other=0.0)
    return tl.dot(x, tl.trans(w)) * (xs[:, None] * s[None, :])


# --- the grouped GEMM ------------------------------------------------------------------------------------------------
@triton.jit
def _quant_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, offsets_ptr, tile_end_ptr, gather_ptr, bias_ptr,
    K, MW, MO, E, W_STRIDE, WS_STRIDE, SK, BN_S, BK_S, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP,
    FORMAT: tl.constexpr, A_FP8: tl.constexpr, SCALE_PER_TILE: tl.constexpr, HAS_GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_GCAP: tl.constexpr, HAS_UCAP: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Sorted row p of expert e: out[p] = glu(a[gather[p] or p] @ W_e^T + bias[e]), W_e the dequantised [MW, K]
    weight of expert e (data w_ptr + e * W_STRIDE, scales ws_ptr + e * WS_STRIDE); out [*, MO], MO = MW or MW / 2
    (GATED: gate rows n and up rows MO + n, or 2n and 2n + 1 when INTERLEAVED). Program (m, n): row tile m of the
    device schedule, output columns n * BLOCK_N + [0, BLOCK_N); a tile past the last expert's writes nothing.
    A_FP8: a holds e4m3 codes with fp32 scales as_ptr [rows, cdiv(K, 128)] (BLOCK_K = 128, bk a multiple of 128)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = _expert_of_tile(tile_end_ptr, pid_m, E, BLOCK_E)
    idle = e >= E                 # past the last expert tile: no row, an empty K loop (no branch around the dots)
    e = tl.minimum(e, E - 1)
    lo = tl.load(offsets_ptr + e)
    hi = tl.where(idle, lo, tl.load(offsets_ptr + e + 1))
    first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    p = lo + (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < hi
    k_end = tl.where(idle, 0, K)
    if HAS_GATHER:
        src = tl.load(gather_ptr + p, mask=row_ok, other=0)
    else:
        src = p
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < MO
    n_gate, n_up = gate_up_rows(cols, MO, GATED, INTERLEAVED)
    w_e = w_ptr + e.to(tl.int64) * W_STRIDE
    ws_e = ws_ptr + e.to(tl.int64) * WS_STRIDE
    s_gate = (n_gate // BN_S).to(tl.int64) * SK          # fp8 scale rows (unused by mxfp4)
    s_up = (n_up // BN_S).to(tl.int64) * SK
    a_rows = a_ptr + src.to(tl.int64) * K
    lanes_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + lanes_k
        x = tl.load(a_rows[:, None] + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        if A_FP8:
            xs = tl.load(as_ptr + src.to(tl.int64) * tl.cdiv(K, BLOCK_K) + k0 // BLOCK_K, mask=row_ok, other=0.0)
            acc += _fp8_block_dot(x, xs, w_e, ws_e, n_gate, col_ok, s_gate, k0, K, BK_S, BLOCK_K)
            if GATED:
                acc_up += _fp8_block_dot(x, xs, w_e, ws_e, n_up, col_ok, s_up, k0, K, BK_S, BLOCK_K)
        else:
            w = _weight_tile(w_e, ws_e, n_gate, col_ok, s_gate, k0, K, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N, BLOCK_K)
            acc = _dot(x, tl.trans(w.to(x.dtype)), acc, FP32_PRECISION)
            if GATED:
                w = _weight_tile(w_e, ws_e, n_up, col_ok, s_up, k0, K, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N,
                                 BLOCK_K)
                acc_up = _dot(x, tl.trans(w.to(x.dtype)), acc_up, FP32_PRECISION)
    v = bias_glu(acc, acc_up if GATED else acc, bias_ptr + e.to(tl.int64) * MW, n_gate, n_up, col_ok, HAS_BIAS, ACT,
                 ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, CLAMP, GATED, HAS_GCAP, HAS_UCAP)
    tl.store(out_ptr + p.to(tl.int64)[:, None] * MO + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). m16 / m32 / m64: decode (T <= 64, BLOCK_M the tokens rounded
# up, every active expert's weights read once) and groups of few rows; mid / large: prefill. Gated tiles hold two
# weight tiles and two accumulators: smaller BLOCK_N / BLOCK_K and 8 warps keep them within registers on sm_80.
# wgmma on sm_90 from 64 rows on.
QUANT_CONFIGS = {
    "m16": (16, 64, 64, 4, 4),
    "m32": (32, 64, 64, 4, 4),
    "m64": (64, 64, 64, 8, 3),
    "mid": (64, 128, 64, 8, 3),
    "mid_gated": (64, 64, 32, 8, 4),
    "large": (128, 128, 32, 8, 3),
    "large_gated": (128, 64, 32, 8, 3),
    "k32": (16, 64, 32, 4, 2),           # fp8 blocks whose bk another tile's BLOCK_K would split
    "fp32": (16, 32, 32, 4, 2),          # fp32 activations (ieee dot on FMA)
    "fp8x8": (64, 128, 128, 8, 3),        # FP8 x FP8 (BLOCK_K 128: one activation and weight scale per K step)
    "fp8x8_gated": (64, 64, 128, 8, 3),
    "fp8x8_m16": (16, 64, 128, 4, 3),
}
_ROWS_BLOCK = 16        # rows per program of _quantize_rows_kernel


def quant_config_name(tokens: int, rows: int, num_experts: int, dtype: torch.dtype, gated: bool,
                      a_fp8: bool = False) -> str:
    """The QUANT_CONFIGS key of a GEMM over `rows` sorted rows of `tokens` tokens (shape rules only)."""
    if dtype == torch.float32:
        return "fp32"
    avg = rows / max(num_experts, 1)
    if a_fp8:       # 64-row tiles (fp8 wgmma) from 17 tokens on: decode reads each expert's weights once
        small = tokens <= 16 or (tokens > 64 and avg <= 16)
        return "fp8x8_m16" if small else "fp8x8_gated" if gated else "fp8x8"
    if tokens <= 64:
        return f"m{max(16, triton.next_power_of_2(tokens))}"
    if avg <= 32:
        return "m16"
    return ("mid" if avg <= 256 else "large") + ("_gated" if gated else "")


def fp8_activations(x: torch.Tensor, format: str, block_k: int) -> bool:
    """Whether the FP8 x FP8 path runs: asked for (MOE_KERNELS_FP8_ACTIVATIONS=1), fp8 weights with bk a multiple of
    128, 16-bit activations, and a GPU with fp8 tensor cores (sm_89+) or the interpreter."""
    if os.environ.get(FP8_ENV, "0") != "1" or format != "fp8" or block_k % ACT_GROUP:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 9)


# --- activation quantisation (FP8 x FP8) -----------------------------------------------------------------------------
@triton.jit
def _e4m3_code(v):
    """fp32 -> e4m3fn codes (uint8), rounded to nearest even, magnitudes beyond 448 saturated, NaN to 0x7F."""
    a = tl.minimum(tl.abs(v), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    r = bits + 0x7FFFF + ((bits >> 20) & 1)                 # round the mantissa to 3 bits, ties to even
    normal = (r >> 20) - (120 << 3)                          # exponent rebiased 127 -> 7, then the 3 mantissa bits
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # below 2^-6: round(a / 2^-9) subnormal steps
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(v != v, 0x7F, code) | ((v.to(tl.int32, bitcast=True) >> 24) & 0x80)     # the sign bit
    return code.to(tl.uint8)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, R, K, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """Program (m, g): rows m * BLOCK_M + [0, BLOCK_M), columns g * GROUP + [0, GROUP): s = amax / 448 (1 for an
    all-zero group) -> s_ptr [R, cdiv(K, GROUP)], q = e4m3(x / s) -> q_ptr [R, K]."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    k = g * GROUP + tl.arange(0, GROUP)
    r_ok = r < R
    m = r_ok[:, None] & (k < K)[None, :]
    offs = r.to(tl.int64)[:, None] * K + k[None, :]
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    tl.store(q_ptr + offs, _e4m3_code(v / s[:, None]), mask=m)
    tl.store(s_ptr + r.to(tl.int64) * tl.num_programs(1) + g, s, mask=r_ok)


def quantize_rows(x: torch.Tensor, group: int = ACT_GROUP):
    """x [R, K] -> (q [R, K] float8_e4m3fn, s [R, cdiv(K, group)] fp32): x ~ q * s per row and group of columns."""
    R, K = x.shape
    q = torch.empty(R, K, dtype=torch.uint8, device=x.device)
    s = torch.empty(R, triton.cdiv(K, group), dtype=torch.float32, device=x.device)
    if R and K:
        _quantize_rows_kernel[(triton.cdiv(R, _ROWS_BLOCK), triton.cdiv(K, group))](
            x.contiguous(), q, s, R, K, BLOCK_M=_ROWS_BLOCK, GROUP=group, num_warps=4)
    return q.view(torch.float8_e4m3fn), s


# --- launchers -------------------------------------------------------------------------------------------------------
def grouped_gemm_quantized(a, format, data, scale, block, offsets, *, tokens, gather=None, bias=None,
                           activation="identity", gated=False, a_scale=None, out_dtype=None):
    """Sorted row p of expert e (offsets[e] <= p < offsets[e+1]): out[p] = glu(a[gather[p] or p] @ W_e^T + bias[e])
    with W_e the dequantised weight [MW, K] of (format, data, scale, block) (moe_kernels.reference.quantized);
    rows of out past offsets[E] are left unwritten. a: [*, K] fp32 / fp16 / bf16, or (a_scale given) e4m3 codes with
    their per-row, per-128-column scales (FP8 x FP8). `tokens`: the number of tokens the rows come from (decode sizes
    pick a tile of that many rows). -> out [N, MW or MW / 2] (N = len(gather) or len(a)) in out_dtype (default
    a's dtype; given for fp8 a)."""
    act = check_activation(activation, gated)
    E, MW = data.shape[:2]
    K = a.shape[1]
    MO = MW // 2 if gated else MW
    N = gather.shape[0] if gather is not None else a.shape[0]
    a_fp8 = a_scale is not None
    out_dtype = out_dtype or a.dtype
    out = torch.empty(N, MO, dtype=out_dtype, device=a.device)
    if N == 0 or MO == 0:
        return out
    name = quant_config_name(tokens, N, E, a.dtype, gated, a_fp8)
    bn, bk = block
    if format == "fp8" and bk % QUANT_CONFIGS[name][2]:
        name = "k32" if name != "fp32" else name   # bk a multiple of 32: a scale per tile row, else per element
    BM, BN, BK, warps, stages = QUANT_CONFIGS[name]
    if format == "fp8":
        SN, SK = scale.shape[1:]
        w_stride, ws_stride = MW * K, SN * SK
    else:
        SK = 0
        w_stride, ws_stride = MW * K // 2, MW * K // MX_GROUP
    offsets = offsets.to(device=a.device, dtype=torch.int32).contiguous()
    tile_end = tile_schedule(offsets, BM)
    runtime, consts = _glu_args(act, gated)
    grid = (triton.cdiv(N, BM) + min(E, N), triton.cdiv(MO, BN))
    _quant_gemm_kernel[grid](
        a.contiguous(), a if a_scale is None else a_scale.contiguous(),
        data.contiguous() if a_fp8 else data.contiguous().view(torch.uint8), scale.contiguous(), out, offsets,
        tile_end, offsets if gather is None else gather.to(device=a.device, dtype=torch.int32).contiguous(),
        out if bias is None else bias.to(out_dtype).contiguous(),
        K, MW, MO, E, w_stride, ws_stride, SK, bn, bk, *runtime.values(),
        FORMAT=_FMT_CODE[format], A_FP8=a_fp8, SCALE_PER_TILE=bk % BK == 0, HAS_GATHER=gather is not None,
        HAS_BIAS=bias is not None, **consts, FP32_PRECISION=_PREC_IEEE if a.dtype == torch.float32 else _PREC_16BIT,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=GEMM_BLOCK_E, num_warps=warps, num_stages=stages,
    )
    return out


def moe_mlp_quantized(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k,
                      gate_up_bias, down_bias, activation, gated, capacity):
    """The moe_mlp_quantized op on the triton backend -> out [T, O] in x's dtype. float64 runs the reference."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        from ..ops.quantized import _reference
        return _reference(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k,
                          gate_up_bias, down_bias, activation, gated, capacity)
    T, k = experts.shape
    E = up_data.shape[0]
    O = down_data.shape[1]
    if T * k == 0 or E == 0:
        return x.new_zeros(T, O)
    a_fp8 = fp8_activations(x, format, block_k)
    H = up_data.shape[1] // 2 if gated else up_data.shape[1]
    if not a_fp8 and _decode.applies(x, experts, E, H):            # a decode step in two launches
        return _decode.moe_mlp_decode(x, experts, weights, up_data, up_scale, down_data, down_scale, format=format,
                                      block=(block_n, block_k), gate_up_bias=gate_up_bias, down_bias=down_bias,
                                      activation=activation, gated=gated, capacity=capacity)[0]
    order, inverse, offsets, token, _ = _mlp._routing_rows(experts, weights, E, capacity)
    kw = dict(block=(block_n, block_k), offsets=offsets, tokens=T, out_dtype=x.dtype)
    if a_fp8:       # the GEMMs take e4m3 rows and their scales
        xq, xs = quantize_rows(x)
        h = grouped_gemm_quantized(xq, format, up_data, up_scale, gather=token, bias=gate_up_bias,
                                   activation=activation, gated=gated, a_scale=xs, **kw)
        hq, hs = quantize_rows(h)
        ys = grouped_gemm_quantized(hq, format, down_data, down_scale, bias=down_bias, a_scale=hs, **kw)
    else:
        h = grouped_gemm_quantized(x, format, up_data, up_scale, gather=token, bias=gate_up_bias,
                                   activation=activation, gated=gated, **kw)
        ys = grouped_gemm_quantized(h, format, down_data, down_scale, bias=down_bias, **kw)
    return perm.unpermute(ys, inverse, weights)


# --- ahead-of-time compile list -----------------------------------------------------------------------------------
# flag sets the expert MLP launches: name -> (gather, bias, activation spec, gated)
_FLAGS = {
    "up": (True, False, "silu", True),                                                      # SwiGLU
    "up_bias_gelu": (True, True, "gelu", True),
    "up_gptoss": (True, True, "silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", True),  # GPT-OSS (mxfp4)
    "up_softcap": (True, False, "silu[limit=7.0,clamp_after,gate_softcap=20.0,up_softcap=30.0]", True),
    "up_relu2": (True, False, "relu2", False),
    "down": (False, False, "identity", False),
    "down_bias": (False, True, "identity", False),
}
_QSIG = {"a_ptr": None, "as_ptr": None, "w_ptr": None, "ws_ptr": None, "out_ptr": None, "offsets_ptr": "*i32",
         "tile_end_ptr": "*i32", "gather_ptr": "*i32", "bias_ptr": None,
         **dict.fromkeys(("K", "MW", "MO", "E", "W_STRIDE", "WS_STRIDE", "SK", "BN_S", "BK_S"), "i32"),
         **dict.fromkeys(("ALPHA", "LIMIT", "UP_OFFSET", "GCAP", "UCAP"), "fp32"),
         **dict.fromkeys(("FORMAT", "A_FP8", "SCALE_PER_TILE", "HAS_GATHER", "HAS_BIAS", "ACT", "GATED", "CLAMP",
                          "INTERLEAVED", "HAS_GCAP", "HAS_UCAP", "FP32_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                          "BLOCK_E"), "constexpr")}


def _gemm_entry(fmt, dtype, cfg_name, flags, a_fp8=False, scale_per_tile=True):
    BM, BN, BK, warps, stages = QUANT_CONFIGS[cfg_name]
    gather, bias, spec, gated = _FLAGS[flags]
    ty = _TL_TYPE[dtype]
    runtime, consts = _glu_args(check_activation(spec, gated), gated)
    sig = dict(_QSIG, a_ptr="*fp8e4nv" if a_fp8 else f"*{ty}", as_ptr="*fp32" if a_fp8 else f"*{ty}",
               w_ptr="*fp8e4nv" if a_fp8 else "*u8", ws_ptr="*fp32" if fmt == "fp8" else "*u8", out_ptr=f"*{ty}",
               bias_ptr=f"*{ty}")
    name = f"quant_gemm-{fmt}{'xfp8' if a_fp8 else ''}-{ty}-{cfg_name}-{flags}{'' if scale_per_tile else '-scale2d'}"
    return {"name": name, "fn": _quant_gemm_kernel, "signature": sig,
            "constexprs": {"FORMAT": _FMT_CODE[fmt], "A_FP8": a_fp8, "SCALE_PER_TILE": scale_per_tile,
                           "HAS_GATHER": gather, "HAS_BIAS": bias, **consts,
                           "FP32_PRECISION": _PREC_IEEE if dtype == torch.float32 else _PREC_16BIT,
                           "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "BLOCK_E": GEMM_BLOCK_E},
            "num_warps": warps, "num_stages": stages,
            # launched on 16-byte aligned tensors with real model widths
            "divisible": tuple(n for n, t in sig.items() if t.startswith("*")) + ("K", "MW", "MO", "W_STRIDE"),
            # the activation rows (gathered or not) and the weight bytes stream through shared memory by cp.async
            "cp_async_16": True,
            # fp8 x fp8 needs fp8 tensor cores (sm_89+): compiled for sm_90, where its dot must be an fp8 wgmma
            **({"archs": (90,), "qgmma": BM >= 64} if a_fp8 else {"wgmma": dtype != torch.float32 and BM >= 64})}


def _aot_configs():
    out = []
    plain = ["down", "up_relu2", "down_bias"]
    gated = ["up", "up_bias_gelu", "up_softcap", "up_gptoss"]
    i = 0
    for fmt in _FMT_CODE:
        for dtype in (torch.float16, torch.bfloat16):
            for cfg in ("m16", "m32", "m64", "mid", "mid_gated", "large", "large_gated"):
                if not cfg.endswith("_gated"):      # the m tiles are launched gated and plain
                    out.append(_gemm_entry(fmt, dtype, cfg, plain[i % len(plain)]))
                if cfg in ("m16", "m32", "m64") or cfg.endswith("_gated"):
                    out.append(_gemm_entry(fmt, dtype, cfg, gated[i % len(gated)]))
                i += 1
        for flags in ("up", "down_bias"):
            out.append(_gemm_entry(fmt, torch.float32, "fp32", flags))
    for dtype, flags in ((torch.float32, "down"), (torch.float16, "up_bias_gelu"), (torch.bfloat16, "up")):
        cfg = "fp32" if dtype == torch.float32 else "k32"
        out.append(_gemm_entry("fp8", dtype, cfg, flags, scale_per_tile=False))
        if dtype != torch.float32:
            out.append(_gemm_entry("fp8", dtype, cfg, "down"))
    for dtype in (torch.float16, torch.bfloat16):
        out += [_gemm_entry("fp8", dtype, "fp8x8", "down", a_fp8=True),
                _gemm_entry("fp8", dtype, "fp8x8_gated", "up", a_fp8=True),
                _gemm_entry("fp8", dtype, "fp8x8_m16", "up", a_fp8=True),
                _gemm_entry("fp8", dtype, "fp8x8_m16", "down_bias", a_fp8=True)]
        ty = _TL_TYPE[dtype]
        out.append({"name": f"quant_rows-{ty}", "fn": _quantize_rows_kernel,
                    "signature": {"x_ptr": f"*{ty}", "q_ptr": "*u8", "s_ptr": "*fp32", "R": "i32", "K": "i32",
                                  "BLOCK_M": "constexpr", "GROUP": "constexpr"},
                    "constexprs": {"BLOCK_M": _ROWS_BLOCK, "GROUP": ACT_GROUP}, "num_warps": 4, "num_stages": 1,
                    "divisible": ("x_ptr", "q_ptr", "s_ptr", "K")})
    return out


AOT_CONFIGS = _aot_configs()
