"""Triton kernels of the grouped GEMM op family: variable-size expert groups, gather / scatter / row scale fused
into the loads and the store, bias and (gated) activation fused into the epilogue; dW by a variable-K grouped
X^T dY; bias gradients by a grouped column sum.

Spec: moe_kernels.reference.grouped_gemm (grouped_mm, grouped_mm_backward). Each family reads top to bottom:
@triton.jit kernel(s), then the launcher. Launch parameters are chosen in the launchers (no autotune, no
heuristics; MOE_KERNELS_GEMM_CONFIG="BM,BN,BK,warps,stages" pins the main kernel's); AOT_CONFIGS at the bottom
lists every (kernel, config, dtype) a launcher can launch, with representative flags.

No host syncs: grids come from shapes only. The row tiles of the main kernel are scheduled on the device:
tile_end[e] = sum_{j <= e} cdiv(count_j, BLOCK_M) (a torch.cumsum on the device), and program m finds its expert
as the number of experts whose tiles end at or before m. The grid reserves cdiv(rows, BLOCK_M) + E row tiles
(each expert adds at most one partial tile); the programs after the last expert tile write the zero rows at and
past offsets[E] (when there is no scatter), the rest do nothing. No atomics: every output element has one writer.

float64 (or any dtype other than fp32 / fp16 / bf16) runs the plain-torch loop `_torch_*` of this file.
"""
import functools
import json
import logging
import os

import torch
import triton
import triton.language as tl

from ..reference.activations import check_activation, glu, glu_backward
from .activations import ACT_CODE as _ACT_CODE
from .activations import activation as _activation

_DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# FP32_PRECISION constexpr: 0 = 16-bit operands (tl.dot's default), 1 = fp32 "ieee" (exact), 2 = fp32 "tf32"
_PREC_16BIT, _PREC_IEEE, _PREC_TF32 = 0, 1, 2


@triton.jit
def _dot(a, b, acc, FP32_PRECISION: tl.constexpr):
    if FP32_PRECISION == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif FP32_PRECISION == 2:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


# --- grouped_gemm -----------------------------------------------------------------------------------------
@triton.jit
def _expert_of_tile(tile_end_ptr, m, E, BLOCK_E: tl.constexpr):
    """Expert of row tile m of the device schedule: the number of experts whose tiles end at or before m (empty
    experts end where they start); E for a tile past the last expert tile."""
    lanes_e = tl.arange(0, BLOCK_E)
    e = 0
    for e0 in range(0, E, BLOCK_E):
        ends = tl.load(tile_end_ptr + e0 + lanes_e, mask=e0 + lanes_e < E, other=2147483647)
        e += tl.sum((ends <= m).to(tl.int32), axis=0)
    return e


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, offsets_ptr, tile_end_ptr, gather_ptr, scatter_ptr, scale_ptr, bias_ptr,
    R, K, MW, MO, E,
    TRANS_W: tl.constexpr, HAS_GATHER: tl.constexpr, HAS_SCATTER: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, FP32_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """a [*, K]; w [E, MW, K] (TRANS_W) or [E, K, MW]; out [R, MO] with MO = MW (or MW/2 when GATED: gate columns
    n, up columns MO + n). Program (m, n): row tile m of the device schedule, output columns n*BLOCK_N + [0, BLOCK_N).
    ALIGNED: a, w start on 16 bytes and K, MW, MO are multiples of 16 (every real model shape)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = _expert_of_tile(tile_end_ptr, pid_m, E, BLOCK_E)
    lanes_m = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < MO
    # a tile past the last expert tile (e == E) writes zero rows [offsets[E], R) when there is no scatter; it
    # runs the code of an expert tile with an empty K loop and no valid row (no branch around the dot: a
    # branch costs registers and the pipelining)
    zero_tile = e >= E
    e = tl.minimum(e, E - 1)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    total = tl.load(tile_end_ptr + E - 1)
    end = tl.load(offsets_ptr + E)
    lo = tl.where(zero_tile, end, lo)
    hi = tl.where(zero_tile, lo, hi)
    first = tl.where(zero_tile, total, first)
    k_end = tl.where(zero_tile, 0, K)
    p = lo + (pid_m - first) * BLOCK_M + lanes_m
    row_ok = p < hi
    if HAS_GATHER:
        src = tl.load(gather_ptr + p, mask=row_ok, other=0)
    else:
        src = p
    lanes_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src.to(tl.int64)[:, None] * K + lanes_k[None, :]
    w_e = w_ptr + e.to(tl.int64) * MW * K
    if TRANS_W:
        b_ptrs = w_e + cols.to(tl.int64)[None, :] * K + lanes_k[:, None]     # element (k, n) at n*K + k
        up = MO * K
        b_step = BLOCK_K
    else:
        b_ptrs = w_e + lanes_k[:, None].to(tl.int64) * MW + cols[None, :]    # element (k, n) at k*MW + n
        up = MO
        b_step = BLOCK_K * MW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = lanes_k < K - k0
        xa = a_ptrs
        xb = b_ptrs
        if ALIGNED:     # rows of a and w start on 16 bytes: vector loads (without the hint a compile spills)
            xa = tl.max_contiguous(tl.multiple_of(xa, [16, 16]), [1, BLOCK_K])
            if TRANS_W:
                xb = tl.max_contiguous(tl.multiple_of(xb, [16, 16]), [BLOCK_K, 1])
            else:
                xb = tl.max_contiguous(tl.multiple_of(xb, [16, 16]), [1, BLOCK_N])
        x = tl.load(xa, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & col_ok[None, :]
        acc = _dot(x, tl.load(xb, mask=b_ok, other=0.0), acc, FP32_PRECISION)
        if GATED:
            acc_up = _dot(x, tl.load(xb + up, mask=b_ok, other=0.0), acc_up, FP32_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += b_step
    if HAS_BIAS:
        b_e = bias_ptr + e.to(tl.int64) * MW + cols
        acc += tl.load(b_e, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_e + MO, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    v = _activation(acc, ACT, 1.0)
    if GATED:
        v = v * acc_up
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + p, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_SCATTER:
        dst = tl.load(scatter_ptr + p, mask=row_ok, other=0)
        st_ok = row_ok
    else:
        dst = p
        v = tl.where(zero_tile, 0.0, v)
        st_ok = tl.where(zero_tile, p < R, row_ok)
    tl.store(out_ptr + dst.to(tl.int64)[:, None] * MO + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=st_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the main kernel. BLOCK_N counts output columns: a gated
# tile holds two accumulators (gate and up), so the gated configs halve BLOCK_N where registers would run out.
GEMM_CONFIGS = {
    "small16": (16, 64, 64, 4, 4),      # few rows per expert (decode, many experts), fp16 / bf16
    "mid16": (64, 128, 64, 8, 3),       # wgmma from here on
    "mid16_gated": (64, 64, 64, 4, 3),
    "large16": (128, 128, 64, 8, 3),
    "large16_gated": (128, 64, 64, 8, 3),
    "small32": (16, 64, 16, 4, 3),      # fp32
    "mid32": (64, 64, 16, 8, 3),        # BLOCK_K 32 spills on sm_80 once a launch's 16-byte alignment is known
}   # fp32 has no large tile: ieee fp32 runs on FMA, and a 128-row gated tile spills
GEMM_BLOCK_E = 64
CONFIG_ENV = "MOE_KERNELS_GEMM_CONFIG"


def gemm_config_name(rows: int, num_experts: int, dtype: torch.dtype, gated: bool, fp32_out: bool = False) -> str:
    """The GEMM_CONFIGS key for `rows` sorted rows over `num_experts` groups (shape rules only). A 16-bit GEMM
    with an fp32 output takes the 128x64 tile where it would take 128x128 (whose fp32 epilogue spills)."""
    avg = rows / max(num_experts, 1)
    size = "small" if avg <= 32 else "mid" if avg <= 256 else "large"
    if dtype == torch.float32:
        return "small32" if size == "small" else "mid32"
    return f"{size}16_gated" if (gated or (fp32_out and size == "large")) and size != "small" else f"{size}16"


# Tuned configs are data: configs/grouped_gemm-E{E}-N{N}-K{K}-{device}-{dtype}.json, each mapping a number of
# sorted rows M to [BM, BN, BK, warps, stages]; the entry of the nearest M is used. N is the GEMM's output width
# before the gated halving, K its reduction length, device torch.cuda.get_device_name() with spaces as "_".
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
_log = logging.getLogger(__name__)


def config_file(E, N, K, device_name, dtype, kernel="grouped_gemm"):
    """The tuned data file of `kernel` ("grouped_gemm", or "grouped_gemm_tn" with N = M of dw [E, M, K])."""
    return os.path.join(CONFIG_DIR, f"{kernel}-E{E}-N{N}-K{K}-{device_name.replace(' ', '_')}-"
                                    f"{str(dtype).replace('torch.', '')}.json")


@functools.lru_cache(maxsize=None)
def _load_tuned(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return {int(m): tuple(int(v) for v in cfg) for m, cfg in data.items() if not m.startswith("_")}


def _tuned_flags(path):
    """The "_flags" entry of a tuned file: the flag sets (aot_check's names, "+"-joined) of the expert MLP GEMMs it
    was tuned on, as a tuple (None without the entry)."""
    with open(path) as f:
        flags = json.load(f).get("_flags")
    return tuple(flags.split("+")) if flags else None


@functools.lru_cache(maxsize=None)
def _log_default(key, name):
    _log.info("moe_kernels grouped_gemm: no tuned config for %s, using the default %s", key, name)


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _parse_pinned(pinned, env=CONFIG_ENV):
    """'BM,BN,BK,warps,stages' -> a tuple; tiles must be powers of two of at least 16 (tl.dot's minimum)."""
    try:
        cfg = tuple(int(v) for v in pinned.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) != 5 or any(b < 16 or b & (b - 1) for b in cfg[:3]) or cfg[3] not in (1, 2, 4, 8, 16) or cfg[4] < 1:
        raise ValueError(f"{env} must be 'BM,BN,BK,warps,stages' with BM, BN, BK powers of two >= 16, "
                         f"warps in 1..16 (a power of two) and stages >= 1; got {pinned!r}")
    return cfg


def gemm_config(rows, num_experts, dtype, gated, fp32_out=False, *, N=None, K=None, device=None):
    """(BM, BN, BK, warps, stages): pinned by MOE_KERNELS_GEMM_CONFIG, else the tuned data file's entry of the
    nearest M, else the default shape rule (logged once per shape)."""
    pinned = os.environ.get(CONFIG_ENV)
    if pinned:
        return _parse_pinned(pinned)
    name = gemm_config_name(rows, num_experts, dtype, gated, fp32_out)
    return _tuned_or_default("grouped_gemm", rows, num_experts, N, K, device, dtype, GEMM_CONFIGS, name)


def _tuned_or_default(kernel, rows, E, N, K, device, dtype, defaults, name):
    """The tuned data file's entry of the nearest number of rows, else defaults[name] (logged once per shape)."""
    if N is not None and K is not None and device is not None:
        tuned = _load_tuned(config_file(E, N, K, _device_name(device), dtype, kernel))
        if tuned:
            return tuned[min(tuned, key=lambda m: (abs(m - rows), m))]
        _log_default((kernel, E, N, K, _device_name(device), str(dtype)), name)
    return defaults[name]


def tuned_configs(kernel="grouped_gemm"):
    """(file name, dtype, config, flags or None) of every config of `kernel`'s tuned data files (aot_check
    compiles them too, with the flags of the GEMM they were tuned on)."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    out = []
    for fname in sorted(os.listdir(CONFIG_DIR)):
        if fname.startswith(f"{kernel}-E") and fname.endswith(".json"):
            path = os.path.join(CONFIG_DIR, fname)
            dtype = getattr(torch, fname.rsplit("-", 1)[1][:-len(".json")])
            out.extend((fname, dtype, cfg, _tuned_flags(path)) for cfg in sorted(set(_load_tuned(path).values())))
    return out


def _torch_grouped_gemm(a, w, offsets, trans_w, gather, scatter, row_scale, bias, activation, gated, R, MO):
    """The plain-torch loop (float64 and other dtypes the kernels do not take)."""
    out = torch.zeros(R, MO, dtype=a.dtype, device=a.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        p = torch.arange(lo, hi, device=a.device)
        src = gather[lo:hi].long() if gather is not None else p
        h = a[src] @ (w[e].t() if trans_w else w[e])
        if bias is not None:
            h = h + bias[e]
        v = glu(h, activation, gated)
        if row_scale is not None:
            v = v * row_scale[lo:hi, None].to(v.dtype)
        out[scatter[lo:hi].long() if scatter is not None else p] = v
    return out


def tile_schedule(offsets, block_m):
    """tile_end [E] int32 on the device: tile_end[e] = sum_{j <= e} cdiv(count_j, block_m) (no host sync)."""
    counts = offsets[1:] - offsets[:-1]
    return torch.cumsum(torch.div(counts + (block_m - 1), block_m, rounding_mode="floor"), 0, dtype=torch.int32)


def _aligned(*tensors):
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def grouped_gemm(a, w, offsets, *, trans_w=True, gather=None, scatter=None, row_scale=None, bias=None,
                 activation="identity", gated=False, num_out_rows=None, out_dtype=None, allow_tf32=False):
    """Sorted row p of expert e (offsets[e] <= p < offsets[e+1]): out[scatter[p] or p] =
    row_scale[p] * glu(a[gather[p] or p] @ W_e + bias[e]), W_e = w[e]^T (trans_w, w [E, M, K]) or w[e]
    (w [E, K, M]); gated: glu = act(gate half) * up half, width M/2. Rows of out that no kept row writes are
    zero. out: [num_out_rows (default N), M or M/2] in out_dtype (default a's dtype; float32 keeps the fp32
    accumulator unrounded for 16-bit inputs); N = len(gather) if gather else len(a). An activation with GLU
    options (moe_kernels.reference.activations) runs as the GEMM, then one pass of glu_forward."""
    act = check_activation(activation, gated)
    if not act.plain:
        if scatter is not None or row_scale is not None or num_out_rows not in (None, a.shape[0]):
            raise ValueError(f"activation {activation!r}: GLU options take no scatter, row_scale or num_out_rows")
        from .activations import glu_forward
        pre = grouped_gemm(a, w, offsets, trans_w=trans_w, gather=gather, bias=bias, allow_tf32=allow_tf32)
        out = glu_forward(pre, offsets.to(device=a.device, dtype=torch.int32).contiguous(), None, str(act), gated)
        return out if out_dtype is None else out.to(out_dtype)
    activation = act.name
    E = w.shape[0]
    K = a.shape[1]
    Kw, MW = (w.shape[2], w.shape[1]) if trans_w else (w.shape[1], w.shape[2])
    if Kw != K:
        raise ValueError(f"a {tuple(a.shape)} and w {tuple(w.shape)} (trans_w={trans_w}) do not share K")
    if gated and MW % 2:
        raise ValueError(f"gated needs an even output width, got {MW}")
    MO = MW // 2 if gated else MW
    N = gather.shape[0] if gather is not None else a.shape[0]
    R = N if num_out_rows is None else int(num_out_rows)
    if scatter is None and R < N:
        raise ValueError(f"without scatter, num_out_rows ({R}) must be at least the number of sorted rows ({N})")
    if a.dtype not in _DATA_DTYPES:
        out = _torch_grouped_gemm(a, w, offsets, trans_w, gather, scatter, row_scale, bias, activation, gated, R,
                                  MO)
        return out if out_dtype is None else out.to(out_dtype)
    device = a.device
    alloc = torch.zeros if scatter is not None or N == 0 or E == 0 else torch.empty
    out = alloc(R, MO, dtype=out_dtype or a.dtype, device=device)
    if N == 0 or E == 0 or R == 0 or MO == 0:
        return out
    BM, BN, BK, warps, stages = gemm_config(N, E, a.dtype, gated, out.dtype == torch.float32, N=MW, K=K,
                                            device=device)
    offsets = offsets.to(device=device, dtype=torch.int32).contiguous()
    tile_end = tile_schedule(offsets, BM)
    rows = N if scatter is not None else R
    grid = (triton.cdiv(rows, BM) + E, triton.cdiv(MO, BN))
    a = a.contiguous()
    w = w.to(a.dtype).contiguous()
    i32 = lambda t: offsets if t is None else t.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
    if a.dtype == torch.float32:
        prec = _PREC_TF32 if allow_tf32 else _PREC_IEEE
    else:
        prec = _PREC_16BIT
    _grouped_gemm_kernel[grid](
        a, w, out, offsets, tile_end, i32(gather), i32(scatter),
        a if row_scale is None else row_scale.contiguous(),
        a if bias is None else bias.to(a.dtype).contiguous(),
        R, K, MW, MO, E,
        TRANS_W=bool(trans_w), HAS_GATHER=gather is not None, HAS_SCATTER=scatter is not None,
        HAS_SCALE=row_scale is not None, HAS_BIAS=bias is not None, ACT=_ACT_CODE[activation], GATED=bool(gated),
        FP32_PRECISION=prec, ALIGNED=_aligned(a, w) and K % 16 == 0 and MW % 16 == 0 and MO % 16 == 0,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=GEMM_BLOCK_E,
        num_warps=warps, num_stages=stages,
    )
    return out


# --- grouped_gemm_tn: dW[e] = sum over rows of e of (s_p dy_p)^T x_p ----------------------------------------------
@triton.jit
def _grouped_gemm_tn_kernel(
    x_ptr, dy_ptr, dw_ptr, offsets_ptr, gx_ptr, gdy_ptr, scale_ptr, M, K,
    HAS_GX: tl.constexpr, HAS_GDY: tl.constexpr, HAS_SCALE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program (e, m, n): dw[e, m-tile, n-tile], looping over expert e's rows BLOCK_P at a time (variable K)."""
    e = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < K
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    lanes_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        p = p0 + lanes_p
        ok = p < hi
        if HAS_GDY:
            gdy = tl.load(gdy_ptr + p, mask=ok, other=0)
        else:
            gdy = p
        if HAS_GX:
            gx = tl.load(gx_ptr + p, mask=ok, other=0)
        else:
            gx = p
        dyt = tl.load(dy_ptr + gdy.to(tl.int64)[None, :] * M + m[:, None], mask=m_ok[:, None] & ok[None, :],
                      other=0.0)                                                           # [BLOCK_M, BLOCK_P]
        if HAS_SCALE:
            s = tl.load(scale_ptr + p, mask=ok, other=0.0).to(tl.float32)
            dyt = (dyt.to(tl.float32) * s[None, :]).to(dy_ptr.dtype.element_ty)
        xt = tl.load(x_ptr + gx.to(tl.int64)[:, None] * K + n[None, :], mask=ok[:, None] & n_ok[None, :],
                     other=0.0)                                                            # [BLOCK_P, BLOCK_N]
        acc = _dot(dyt, xt, acc, FP32_PRECISION)
    tl.store(dw_ptr + e.to(tl.int64) * M * K + m.to(tl.int64)[:, None] * K + n[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_P, num_warps, num_stages)
TN_CONFIGS = {
    "small16": (64, 64, 64, 4, 3),
    "large16": (128, 128, 64, 8, 3),
    "small32": (32, 64, 32, 4, 3),
    "large32": (64, 64, 32, 4, 3),
}


TN_CONFIG_ENV = "MOE_KERNELS_TN_CONFIG"


def tn_config_name(M: int, K: int, dtype: torch.dtype) -> str:
    size = "large" if M >= 128 and K >= 128 else "small"
    return f"{size}{'32' if dtype == torch.float32 else '16'}"


def tn_config(rows, num_experts, M, K, dtype, device=None):
    """(BM, BN, BP, warps, stages) of dw [E, M, K] over `rows` sorted rows: pinned by MOE_KERNELS_TN_CONFIG, else
    the tuned data file (configs/grouped_gemm_tn-E-N{M}-K-device-dtype.json), else the default."""
    pinned = os.environ.get(TN_CONFIG_ENV)
    if pinned:
        return _parse_pinned(pinned, TN_CONFIG_ENV)
    return _tuned_or_default("grouped_gemm_tn", rows, num_experts, M, K, device, dtype, TN_CONFIGS,
                             tn_config_name(M, K, dtype))


def _torch_grouped_gemm_tn(x, dy, offsets, E, gather_x, gather_dy, row_scale):
    dw = torch.zeros(E, dy.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        g = dy[gather_dy[lo:hi].long()] if gather_dy is not None else dy[lo:hi]
        if row_scale is not None:
            g = g * row_scale[lo:hi, None].to(g.dtype)
        xs = x[gather_x[lo:hi].long()] if gather_x is not None else x[lo:hi]
        dw[e] = g.to(x.dtype).t() @ xs
    return dw


def grouped_gemm_tn(x, dy, offsets, num_experts, *, gather_x=None, gather_dy=None, row_scale=None):
    """x [*, K], dy [*, M] -> dw [E, M, K] (x's dtype, fp32 accumulation): dw[e] = sum over sorted rows p of
    expert e of (row_scale[p] dy[gather_dy[p] or p])^T x[gather_x[p] or p]. Experts without rows get zeros."""
    E = int(num_experts)
    M, K = dy.shape[1], x.shape[1]
    if x.dtype not in _DATA_DTYPES:
        return _torch_grouped_gemm_tn(x, dy, offsets, E, gather_x, gather_dy, row_scale)
    device = x.device
    dw = torch.empty(E, M, K, dtype=x.dtype, device=device)
    if E == 0 or M == 0 or K == 0:
        return dw
    rows = (gather_x if gather_x is not None else gather_dy if gather_dy is not None else x).shape[0]
    BM, BN, BP, warps, stages = tn_config(rows, E, M, K, x.dtype, device)
    offsets = offsets.to(device=device, dtype=torch.int32).contiguous()
    i32 = lambda t: offsets if t is None else t.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
    x = x.contiguous()
    _grouped_gemm_tn_kernel[(E, triton.cdiv(M, BM), triton.cdiv(K, BN))](
        x, dy.to(x.dtype).contiguous(), dw, offsets, i32(gather_x), i32(gather_dy),
        x if row_scale is None else row_scale.contiguous(), M, K,
        HAS_GX=gather_x is not None, HAS_GDY=gather_dy is not None, HAS_SCALE=row_scale is not None,
        FP32_PRECISION=_PREC_IEEE if x.dtype == torch.float32 else _PREC_16BIT,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_P=BP, num_warps=warps, num_stages=stages,
    )
    return dw


# --- grouped_colsum: per-expert column sums (bias gradients) ----------------------------------------------------
@triton.jit
def _grouped_colsum_kernel(dy_ptr, out_ptr, offsets_ptr, gather_ptr, scale_ptr, M,
                           HAS_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    e = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    lanes_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        p = p0 + lanes_p
        ok = p < hi
        if HAS_GATHER:
            g = tl.load(gather_ptr + p, mask=ok, other=0)
        else:
            g = p
        v = tl.load(dy_ptr + g.to(tl.int64)[:, None] * M + m[None, :], mask=ok[:, None] & m_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + p, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + e.to(tl.int64) * M + m, acc.to(out_ptr.dtype.element_ty), mask=m_ok)


COLSUM_CONFIG = (128, 32, 4)    # BLOCK_M, BLOCK_P, num_warps


def _torch_grouped_colsum(dy, offsets, E, gather, row_scale):
    out = torch.zeros(E, dy.shape[1], dtype=dy.dtype, device=dy.device)
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        g = dy[gather[lo:hi].long()] if gather is not None else dy[lo:hi]
        if row_scale is not None:
            g = g * row_scale[lo:hi, None].to(g.dtype)
        out[e] = g.sum(0)
    return out


def grouped_colsum(dy, offsets, num_experts, *, gather=None, row_scale=None):
    """dy [*, M] -> [E, M] (dy's dtype, fp32 accumulation): sum over sorted rows p of expert e of
    row_scale[p] * dy[gather[p] or p]."""
    E = int(num_experts)
    M = dy.shape[1]
    if dy.dtype not in _DATA_DTYPES:
        return _torch_grouped_colsum(dy, offsets, E, gather, row_scale)
    device = dy.device
    out = torch.empty(E, M, dtype=dy.dtype, device=device)
    if E == 0 or M == 0:
        return out
    BM, BP, warps = COLSUM_CONFIG
    offsets = offsets.to(device=device, dtype=torch.int32).contiguous()
    dy = dy.contiguous()
    _grouped_colsum_kernel[(E, triton.cdiv(M, BM))](
        dy, out, offsets, offsets if gather is None else gather.to(device=device, dtype=torch.int32).contiguous(),
        dy if row_scale is None else row_scale.contiguous(), M,
        HAS_GATHER=gather is not None, HAS_SCALE=row_scale is not None, BLOCK_M=BM, BLOCK_P=BP,
        num_warps=warps, num_stages=1,
    )
    return out


# --- the grouped_mm op backend (contract of moe_kernels.reference.grouped_gemm) -------------------------------
def grouped_mm(a, w, offsets, bias=None, activation="identity", gated=False):
    """a [N, K] in expert order, w [E, M, K], offsets [E+1], bias [E, M] -> [N, M or M/2]; rows >= offsets[E]
    zero."""
    return grouped_gemm(a, w, offsets, bias=bias, activation=activation, gated=gated)


def grouped_mm_backward(grad_out, a, w, offsets, bias=None, activation="identity", gated=False, grad_w=True):
    """-> (grad_a [N, K], grad_w [E, M, K] (None when not grad_w), grad_bias [E, M] or None); the pre-activation
    is recomputed."""
    E = w.shape[0]
    grad_h = grad_out.contiguous()
    if gated or activation != "identity":
        h = grouped_gemm(a, w, offsets, bias=bias)
        grad_h = glu_backward(grad_h, h, activation, gated)
    grad_a = grouped_gemm(grad_h, w, offsets, trans_w=False)            # rows >= offsets[E] zero
    grad_b = grouped_colsum(grad_h, offsets, E) if bias is not None else None
    return grad_a, grouped_gemm_tn(a, grad_h, offsets, E) if grad_w else None, grad_b


# --- ahead-of-time compile list -----------------------------------------------------------------------------
_GEMM_SIG = {"a_ptr": None, "w_ptr": None, "out_ptr": None, "offsets_ptr": "*i32", "tile_end_ptr": "*i32",
             "gather_ptr": "*i32", "scatter_ptr": "*i32", "scale_ptr": None, "bias_ptr": None,
             "R": "i32", "K": "i32", "MW": "i32", "MO": "i32", "E": "i32",
             **{c: "constexpr" for c in ("TRANS_W", "HAS_GATHER", "HAS_SCATTER", "HAS_SCALE", "HAS_BIAS", "ACT",
                                         "GATED", "FP32_PRECISION", "ALIGNED", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                         "BLOCK_E")}}

# Flag sets the launchers use: name -> (trans_w, gather, scatter, row_scale, bias, activation, gated)
_FLAGS = {
    "fwd": (True, False, False, False, True, "identity", False),            # grouped_mm, bias
    "up": (True, True, False, False, False, "silu", True),                  # expert MLP up: gathered, SwiGLU
    "up_gelu": (True, True, False, False, True, "gelu", True),              # GeGLU with bias
    "down": (True, False, True, True, False, "identity", False),            # expert MLP down: weighted scatter
    "dgrad": (False, False, False, False, False, "identity", False),        # grad_a = grad_h @ w[e]
    "dgrad_gather": (False, True, False, True, False, "identity", False),
    "dh": (False, True, False, False, False, "identity", False),            # expert MLP dH = dOut[t] @ W_down
    "up_pre": (True, True, False, False, False, "identity", False),         # expert MLP up, pre-activation kept
    "down_sorted": (True, False, False, False, False, "identity", False),   # expert MLP down, rows in expert order
    "act_gelu_tanh": (True, False, False, False, True, "gelu_tanh", False),
    "act_relu": (True, False, False, True, False, "relu", False),
    "act_silu_gated_tanh": (True, False, True, False, False, "gelu_tanh", True),
}


# grouped_gemm_tn's flag sets: name -> (gather x, gather dy, row scale); the expert MLP's dW_up gathers x, its
# dW_down gathers dOut
_TN_FLAGS = {"plain": (False, False, False), "gather-x": (True, False, False), "gather-dy": (False, True, False),
             "gather-scale": (True, True, True)}


def _gemm_entry(name, cfg, dtype, flags, tf32=False, out_dtype=None):
    BM, BN, BK, warps, stages = cfg
    trans_w, gather, scatter, scale, bias, act, gated = _FLAGS[flags]
    ty = _TL_TYPE[dtype]
    out_ty = _TL_TYPE[out_dtype or dtype]
    sig = dict(_GEMM_SIG)
    sig.update({"a_ptr": f"*{ty}", "w_ptr": f"*{ty}", "out_ptr": f"*{out_ty}",
                "scale_ptr": "*fp32" if scale else f"*{ty}", "bias_ptr": f"*{ty}"})
    prec = _PREC_16BIT if dtype != torch.float32 else _PREC_TF32 if tf32 else _PREC_IEEE
    suffix = ("-tf32" if tf32 else "") + (f"-out{out_ty}" if out_ty != ty else "")
    return {"name": f"grouped_gemm-{ty}-{name}-{flags}{suffix}", "fn": _grouped_gemm_kernel,
            "signature": sig,
            "constexprs": {"TRANS_W": trans_w, "HAS_GATHER": gather, "HAS_SCATTER": scatter, "HAS_SCALE": scale,
                           "HAS_BIAS": bias, "ACT": _ACT_CODE[act], "GATED": gated, "FP32_PRECISION": prec,
                           "ALIGNED": True,
                           "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "BLOCK_E": GEMM_BLOCK_E},
            "num_warps": warps, "num_stages": stages,
            # ALIGNED is launched on 16-byte aligned tensors with K, MW, MO multiples of 16: compiled as such
            "divisible": tuple(n for n, t in sig.items() if t.startswith("*")) + ("K", "MW", "MO"),
            # the A and W tiles (gathered rows included) stream through shared memory by 16-byte cp.async
            "cp_async_16": True,
            # wgmma needs a 64-row tile and 16-bit operands here (fp32 ieee runs on FMA)
            "wgmma": dtype != torch.float32 and BM >= 64}


def _aot_configs():
    out = []
    # every config x dtype once, with flags that match the config (gated configs: gated flags)
    plain = ["fwd", "down", "dgrad", "act_gelu_tanh", "act_relu", "dgrad_gather"]
    gated = ["up", "up_gelu", "act_silu_gated_tanh"]
    i = 0
    for name, cfg in GEMM_CONFIGS.items():
        dtypes = (torch.float32,) if name.endswith("32") else (torch.float16, torch.bfloat16)
        for dtype in dtypes:
            if name.endswith("_gated"):
                out.append(_gemm_entry(name, cfg, dtype, gated[i % len(gated)]))
            else:
                out.append(_gemm_entry(name, cfg, dtype, plain[i % len(plain)]))
                if name.startswith("small") or name.endswith("32"):   # launched gated too (no _gated variant)
                    out.append(_gemm_entry(name, cfg, dtype, gated[i % len(gated)]))
            i += 1
    # every flag set at least once per dtype, on the mid configs
    for dtype in _DATA_DTYPES:
        for flags in _FLAGS:
            g = _FLAGS[flags][6]
            name = "mid32" if dtype == torch.float32 else "mid16_gated" if g else "mid16"
            if not any(e["name"] == f"grouped_gemm-{_TL_TYPE[dtype]}-{name}-{flags}" for e in out):
                out.append(_gemm_entry(name, GEMM_CONFIGS[name], dtype, flags))
    # the expert MLP's dH keeps its fp32 accumulator (16-bit inputs, fp32 output), on every 16-bit plain config
    for name in ("small16", "mid16", "large16_gated"):
        for dtype in (torch.float16, torch.bfloat16):
            out.append(_gemm_entry(name, GEMM_CONFIGS[name], dtype, "dh", out_dtype=torch.float32))
    # configs of the tuned data files, with the expert MLP's forward flags
    for cfg, dtype, flags in sorted({(cfg, dtype, f) for _, dtype, cfg, f in tuned_configs()}, key=str):
        for f in flags or ("up", "up_pre", "down_sorted", "dgrad"):
            out.append(_gemm_entry(f"tuned{'x'.join(map(str, cfg))}", cfg, dtype, f,
                                   out_dtype=torch.float32 if f == "dh" else None))
    out.append(_gemm_entry("mid32", GEMM_CONFIGS["mid32"], torch.float32, "up", tf32=True))
    out.append(_gemm_entry("mid32", GEMM_CONFIGS["mid32"], torch.float32, "fwd", tf32=True))
    # grouped_gemm_tn: the defaults, then the tuned data files' configs
    tn = [(name, cfg, (torch.float32,) if name.endswith("32") else (torch.float16, torch.bfloat16))
          for name, cfg in TN_CONFIGS.items()]
    tn = [(name, cfg, dtypes, tuple(_TN_FLAGS)) for name, cfg, dtypes in tn]
    tn += [(f"tuned{'x'.join(map(str, cfg))}", cfg, (dtype,), flags or tuple(_TN_FLAGS))
           for cfg, dtype, flags in sorted({(cfg, dtype, f) for _, dtype, cfg, f in tuned_configs("grouped_gemm_tn")},
                                           key=str)]
    for name, (BM, BN, BP, warps, stages), dtypes, flag_sets in tn:
        for dtype in dtypes:
            ty = _TL_TYPE[dtype]
            for flags in flag_sets:
                gx, gdy, scale = _TN_FLAGS[flags]
                out.append({
                    "name": f"grouped_gemm_tn-{ty}-{name}{'-' + flags if flags != 'plain' else ''}",
                    "fn": _grouped_gemm_tn_kernel,
                    "signature": {"x_ptr": f"*{ty}", "dy_ptr": f"*{ty}", "dw_ptr": f"*{ty}", "offsets_ptr": "*i32",
                                  "gx_ptr": "*i32", "gdy_ptr": "*i32", "scale_ptr": "*fp32" if scale else f"*{ty}",
                                  "M": "i32", "K": "i32",
                                  **{c: "constexpr" for c in ("HAS_GX", "HAS_GDY", "HAS_SCALE", "FP32_PRECISION",
                                                              "BLOCK_M", "BLOCK_N", "BLOCK_P")}},
                    "constexprs": {"HAS_GX": gx, "HAS_GDY": gdy, "HAS_SCALE": scale,
                                   "FP32_PRECISION": _PREC_IEEE if dtype == torch.float32 else _PREC_16BIT,
                                   "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_P": BP},
                    "num_warps": warps, "num_stages": stages, "wgmma": dtype != torch.float32 and BM >= 64,
                    "divisible": ("x_ptr", "dy_ptr", "dw_ptr", "M", "K"),
                })
    # grouped_colsum
    BM, BP, warps = COLSUM_CONFIG
    for dtype in _DATA_DTYPES:
        ty = _TL_TYPE[dtype]
        for gather, scale in ((False, False), (True, True)):
            out.append({
                "name": f"grouped_colsum-{ty}{'-gather-scale' if gather else ''}", "fn": _grouped_colsum_kernel,
                "signature": {"dy_ptr": f"*{ty}", "out_ptr": f"*{ty}", "offsets_ptr": "*i32", "gather_ptr": "*i32",
                              "scale_ptr": "*fp32" if scale else f"*{ty}", "M": "i32",
                              **{c: "constexpr" for c in ("HAS_GATHER", "HAS_SCALE", "BLOCK_M", "BLOCK_P")}},
                "constexprs": {"HAS_GATHER": gather, "HAS_SCALE": scale, "BLOCK_M": BM, "BLOCK_P": BP},
                "num_warps": warps, "num_stages": 1,
            })
    return out


AOT_CONFIGS = _aot_configs()
