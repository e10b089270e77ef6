"""Hopper kernels of the grouped GEMM op family: persistent, TMA-fed, warp-specialised grouped GEMMs on rows that
are already in expert order (the expert MLP's forward GEMMs on materialised rows, dH, dX) and the variable-K dW.

Spec: moe_kernels.reference.grouped_gemm; the pointer kernels of moe_kernels.triton.grouped_gemm compute the same
functions on any GPU and with gathered / scattered rows. These kernels take no gather or scatter: TMA moves whole
tiles, and a pointer-gathered operand defeats both TMA and warp specialisation.

grouped_gemm_tma: a persistent grid (one program per SM) walks the device tile schedule (tile_end, as the pointer
kernel's) in a grouped raster order (GROUP_M row tiles share each weight tile while it is in L2). Operands come
through tensor descriptors made on the device: one over all sorted rows [R, K] (a tile that overhangs into the
next expert computes rows that the store discards), one 3-D over the weights [E, N, K] (or [E, K, N]) with block
[1, BN, BK], so no load is masked. The output goes out through a descriptor whose row bound is the end of the
tile's expert, so TMA clips the overhang; the tiles after the last expert's write the zero rows [offsets[E], R).
The epilogue fuses bias, the (gated) activation, a per-row scale and optionally the pre-activation's store.

grouped_gemm_tn_tma: dw[e] = dy[rows of e]^T x[rows of e], one program per SM over (expert, M tile, K tile);
per-expert descriptors (base + offsets[e] * stride, shape [count, .]) make TMA zero-fill each expert's ragged tail,
and an expert without rows stores zeros.

`tl.range(..., warp_specialize=True)` splits each program into a TMA producer and wgmma consumers with
`setmaxnreg` on sm_90a; it takes effect at num_warps=4 only (configs carry it as their last field). Device
descriptors need a scratch allocator (`triton.set_allocator`), set by each launcher because the allocator is
context-local and autograd runs backwards on its own thread.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ..reference.activations import check_activation
from .grouped_gemm import (_ACT_CODE, _TL_TYPE, _activation, _expert_of_tile, _load_tuned, _log_default,
                           _device_name, config_file, tile_schedule, GEMM_BLOCK_E)

_TMA_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _raster(tile, m_tiles, n_tiles, GROUP_M: tl.constexpr):
    """(m, n) of linear tile `tile`: GROUP_M row tiles walk each column of tiles together (L2 reuse of w)."""
    per_group = GROUP_M * n_tiles
    first_m = (tile // per_group) * GROUP_M
    size = tl.minimum(m_tiles - first_m, GROUP_M)
    r = tile % per_group
    return first_m + r % size, r // size


# --- grouped_gemm_tma -----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_gemm_tma_kernel(
    a_ptr, w_ptr, out_ptr, pre_ptr, offsets_ptr, tile_end_ptr, scale_ptr, bias_ptr,
    R, K, MW, MO, E, NUM_PROGS,
    TRANS_W: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """a [R, K] sorted rows; w [E, MW, K] (TRANS_W) or [E, K, MW]; out [R, MO], MO = MW (MW/2 when GATED: gate
    columns n, up columns MO + n); pre [R, MW] (SAVE_PRE: the pre-activation, bias included)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if TRANS_W:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, MW, K], strides=[MW * K, K, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, K, MW], strides=[K * MW, MW, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    expert_tiles = tl.load(tile_end_ptr + E - 1)
    end = tl.load(offsets_ptr + E)
    m_tiles = expert_tiles + tl.cdiv(R - end, BLOCK_M)      # then the zero tiles of rows [offsets[E], R)
    n_tiles = tl.cdiv(MO, BLOCK_N)
    for tile in tl.range(tl.program_id(0), m_tiles * n_tiles, NUM_PROGS, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _raster(tile, m_tiles, n_tiles, GROUP_M)
        zero_tile = pid_m >= expert_tiles
        e = tl.minimum(_expert_of_tile(tile_end_ptr, pid_m, E, BLOCK_E), E - 1)
        lo = tl.load(offsets_ptr + e)
        first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
        row0 = tl.where(zero_tile, end + (pid_m - expert_tiles) * BLOCK_M, lo + (pid_m - first) * BLOCK_M)
        row_end = tl.where(zero_tile, R, tl.load(offsets_ptr + e + 1))
        k_end = tl.where(zero_tile, 0, K)
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            a = a_desc.load([row0, k0])
            if TRANS_W:
                b = w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                b = w_desc.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
            acc = tl.dot(a, b, acc)
            if GATED:
                acc_up = tl.dot(a, w_desc.load([e, MO + n0, k0]).reshape(BLOCK_N, BLOCK_K).T, acc_up)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            b_e = bias_ptr + e.to(tl.int64) * MW + cols
            acc += tl.load(b_e, mask=cols < MO, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(b_e + MO, mask=cols < MO, other=0.0).to(tl.float32)[None, :]
        if SAVE_PRE:
            # gate and up halves through descriptors of width MO each, so a gate tile never spills into the up half
            gate_desc = tl.make_tensor_descriptor(pre_ptr, shape=[row_end, MO], strides=[MW, 1],
                                                  block_shape=[BLOCK_M, BLOCK_N])
            gate_desc.store([row0, n0], tl.where(zero_tile, 0.0, acc).to(pre_ptr.dtype.element_ty))
            if GATED:
                up_desc = tl.make_tensor_descriptor(pre_ptr + MO, shape=[row_end, MO], strides=[MW, 1],
                                                    block_shape=[BLOCK_M, BLOCK_N])
                up_desc.store([row0, n0], tl.where(zero_tile, 0.0, acc_up).to(pre_ptr.dtype.element_ty))
        v = _activation(acc, ACT, 1.0)
        if GATED:
            v = v * acc_up
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + rows, mask=rows < row_end, other=0.0).to(tl.float32)[:, None]
        v = tl.where(zero_tile, 0.0, v)
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[row_end, MO], strides=[MO, 1],
                                             block_shape=[BLOCK_M, BLOCK_N])
        out_desc.store([row0, n0], v.to(out_ptr.dtype.element_ty))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize). BLOCK_N counts output columns: a gated tile
# holds two accumulators, so the gated config halves it.
TMA_CONFIGS = {
    "large": (128, 128, 64, 4, 3, 1),
    "gated": (128, 64, 64, 4, 3, 1),
    "wide": (128, 256, 64, 4, 3, 1),        # 128x256: the tile of the fastest Hopper GEMMs (plain epilogues)
    "plain8": (128, 128, 64, 8, 3, 0),      # 8 warps, software pipelining only (no warp specialisation)
}
TN_TMA_CONFIGS = {
    "large": (128, 128, 64, 4, 3, 1),
    "wide": (128, 256, 64, 4, 3, 1),
    "plain8": (128, 128, 64, 8, 3, 0),
}
TMA_CONFIG_ENV = "MOE_KERNELS_TMA_CONFIG"
TN_TMA_CONFIG_ENV = "MOE_KERNELS_TN_TMA_CONFIG"
GROUP_M = 8


def _parse_config(text, env):
    """'BM,BN,BK,warps,stages,ws' -> a tuple (tiles powers of two >= 16, ws 0 or 1)."""
    try:
        cfg = tuple(int(v) for v in text.split(","))
    except ValueError:
        cfg = ()
    if (len(cfg) != 6 or any(b < 16 or b & (b - 1) for b in cfg[:3]) or cfg[3] not in (4, 8) or cfg[4] < 1
            or cfg[5] not in (0, 1)):
        raise ValueError(f"{env} must be 'BM,BN,BK,warps,stages,ws' with BM, BN, BK powers of two >= 16, warps 4 or "
                         f"8, stages >= 1 and ws 0 or 1; got {text!r}")
    return cfg


def _config(kernel, env, defaults, name, rows, E, N, K, device, dtype):
    pinned = os.environ.get(env)
    if pinned:
        return _parse_config(pinned, env)
    tuned = _load_tuned(config_file(E, N, K, _device_name(device), dtype, kernel))
    if tuned:
        return tuned[min(tuned, key=lambda m: (abs(m - rows), m))]
    _log_default((kernel, E, N, K, _device_name(device), str(dtype)), name)
    return defaults[name]


def tma_config(rows, E, N, K, dtype, gated, device):
    """(BM, BN, BK, warps, stages, ws) of grouped_gemm_tma: pinned by MOE_KERNELS_TMA_CONFIG, else the tuned data
    file configs/grouped_gemm_tma-E-N-K-device-dtype.json (nearest rows), else the default."""
    return _config("grouped_gemm_tma", TMA_CONFIG_ENV, TMA_CONFIGS, "gated" if gated else "large", rows, E, N, K,
                   device, dtype)


def tn_tma_config(rows, E, M, K, dtype, device):
    """(BM, BN, BP, warps, stages, ws) of grouped_gemm_tn_tma (dw [E, M, K] over `rows` sorted rows)."""
    return _config("grouped_gemm_tn_tma", TN_TMA_CONFIG_ENV, TN_TMA_CONFIGS, "large", rows, E, M, K, device, dtype)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4    # the interpreter: a few persistent programs, so each walks several tiles


def _set_scratch_allocator(device):
    """Device-made descriptors live in scratch memory the launch asks for."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def tma_usable(device, dtype, *widths, tensors=()) -> bool:
    """Whether the TMA kernels take these operands: a Hopper GPU (or the interpreter on CPU tensors), fp16/bf16,
    every row width a multiple of 16 bytes and every tensor contiguous on 16 bytes."""
    if dtype not in _TMA_DTYPES:
        return False
    if device.type == "cuda":
        if torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] != 9:
            return False
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return (all(w % 8 == 0 for w in widths)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors if t is not None))


def grouped_gemm_tma(a, w, offsets, *, trans_w=True, row_scale=None, bias=None, activation="identity", gated=False,
                     out_dtype=None, save_pre=False):
    """Sorted row p of expert e (offsets[e] <= p < offsets[e+1]): out[p] = row_scale[p] * glu(a[p] @ W_e + bias[e]),
    W_e = w[e]^T (trans_w, w [E, M, K]) or w[e] (w [E, K, M]); rows at or past offsets[E] are zero. a: [R, K]
    contiguous, fp16/bf16. -> out [R, M or M/2] (out_dtype, default a's), and with save_pre also the
    pre-activation [R, M] (a's dtype, bias included, zero past offsets[E]). An activation with GLU options
    (moe_kernels.reference.activations) runs as the GEMM, then one pass of glu_forward."""
    act = check_activation(activation, gated)
    if not act.plain:
        if row_scale is not None:
            raise ValueError(f"activation {activation!r}: GLU options take no row_scale")
        from .activations import glu_forward
        pre = grouped_gemm_tma(a, w, offsets, trans_w=trans_w, bias=bias)
        out = glu_forward(pre, offsets.to(device=a.device, dtype=torch.int32).contiguous(), None, str(act), gated)
        out = out if out_dtype is None else out.to(out_dtype)
        return (out, pre) if save_pre else out
    activation = act.name
    if gated and not trans_w:
        raise ValueError("a gated grouped_gemm_tma takes w as [E, 2H, K] (trans_w=True)")
    E = w.shape[0]
    R, K = a.shape
    MW = w.shape[1] if trans_w else w.shape[2]
    MO = MW // 2 if gated else MW
    device = a.device
    out = torch.empty(R, MO, dtype=out_dtype or a.dtype, device=device)
    pre = torch.empty(R, MW, dtype=a.dtype, device=device) if save_pre else None
    if R == 0 or MO == 0:
        return (out, pre) if save_pre else out
    if E == 0 or K == 0:
        out.zero_()
        if save_pre:
            pre.zero_()
        return (out, pre) if save_pre else out
    BM, BN, BK, warps, stages, ws = tma_config(R, E, MW, K, a.dtype, gated, device)
    offsets = offsets.to(device=device, dtype=torch.int32).contiguous()
    a, w = a.contiguous(), w.to(a.dtype).contiguous()
    _set_scratch_allocator(device)
    _grouped_gemm_tma_kernel[(_num_sms(device),)](
        a, w, out, out if pre is None else pre, offsets, tile_schedule(offsets, BM),
        a if row_scale is None else row_scale.contiguous(), a if bias is None else bias.to(a.dtype).contiguous(),
        R, K, MW, MO, E, _num_sms(device),
        TRANS_W=bool(trans_w), HAS_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        ACT=_ACT_CODE[activation], GATED=bool(gated), SAVE_PRE=bool(save_pre),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=GEMM_BLOCK_E, GROUP_M=GROUP_M, WARP_SPECIALIZE=bool(ws),
        num_warps=warps, num_stages=stages,
    )
    return (out, pre) if save_pre else out


# --- grouped_gemm_tn_tma: dw[e] = dy[rows of e]^T x[rows of e] --------------------------------------------------------
@triton.jit
def _grouped_gemm_tn_tma_kernel(
    x_ptr, dy_ptr, dw_ptr, offsets_ptr, M, K, E, NUM_PROGS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """x [R, K], dy [R, M] sorted rows -> dw [E, M, K]; the tiles of one expert are consecutive, rastered."""
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(K, BLOCK_N)
    per_e = m_tiles * n_tiles
    for tile in tl.range(tl.program_id(0), E * per_e, NUM_PROGS, warp_specialize=WARP_SPECIALIZE):
        e = tile // per_e
        pid_m, pid_n = _raster(tile % per_e, m_tiles, n_tiles, GROUP_M)
        lo = tl.load(offsets_ptr + e)
        count = tl.load(offsets_ptr + e + 1) - lo
        dy_desc = tl.make_tensor_descriptor(dy_ptr + lo.to(tl.int64) * M, shape=[count, M], strides=[M, 1],
                                            block_shape=[BLOCK_P, BLOCK_M])
        x_desc = tl.make_tensor_descriptor(x_ptr + lo.to(tl.int64) * K, shape=[count, K], strides=[K, 1],
                                           block_shape=[BLOCK_P, BLOCK_N])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p0 in range(0, count, BLOCK_P):
            acc = tl.dot(dy_desc.load([p0, pid_m * BLOCK_M]).T, x_desc.load([p0, pid_n * BLOCK_N]), acc)
        # a 2-D descriptor per expert: a 3-D store of a reshaped tile does not compile warp-specialised
        dw_desc = tl.make_tensor_descriptor(dw_ptr + e.to(tl.int64) * M * K, shape=[M, K], strides=[K, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
        dw_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(dw_ptr.dtype.element_ty))


def grouped_gemm_tn_tma(x, dy, offsets, num_experts):
    """x [R, K], dy [R, M] in expert order (contiguous, fp16/bf16) -> dw [E, M, K] (x's dtype, fp32 accumulation):
    dw[e] = dy[offsets[e]:offsets[e+1]]^T x[offsets[e]:offsets[e+1]]; experts without rows get zeros."""
    E = int(num_experts)
    R, K = x.shape
    M = dy.shape[1]
    device = x.device
    dw = torch.empty(E, M, K, dtype=x.dtype, device=device)
    if E == 0 or M == 0 or K == 0:
        return dw
    BM, BN, BP, warps, stages, ws = tn_tma_config(R, E, M, K, x.dtype, device)
    offsets = offsets.to(device=device, dtype=torch.int32).contiguous()
    x, dy = x.contiguous(), dy.to(x.dtype).contiguous()
    _set_scratch_allocator(device)
    _grouped_gemm_tn_tma_kernel[(_num_sms(device),)](
        x, dy, dw, offsets, M, K, E, _num_sms(device),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_P=BP, GROUP_M=GROUP_M, WARP_SPECIALIZE=bool(ws),
        num_warps=warps, num_stages=stages,
    )
    return dw


# --- ahead-of-time compile list (sm_90 only: TMA and wgmma are Hopper instructions) -------------------------------
# Flag sets the expert MLP launches: name -> (trans_w, row_scale, bias, activation, gated, save_pre, out fp32)
_FLAGS = {
    "up": (True, False, False, "silu", True, False, False),           # GEMM1 on materialised rows, SwiGLU
    "up_save": (True, False, False, "silu", True, True, False),       # ... and the pre-activation for the backward
    "up_gelu_bias": (True, False, True, "gelu", True, True, False),
    "down": (True, True, False, "identity", False, False, False),     # GEMM2 with the routing weight
    "down_bias": (True, False, True, "identity", False, False, False),
    "dh": (False, False, False, "identity", False, False, True),      # dOut[t] @ W_down, fp32 out
    "dx": (False, False, False, "identity", False, False, False),     # dH_pre @ W_up
    "plain_relu": (True, False, True, "relu", False, True, False),
}


def _tma_entry(name, cfg, dtype, flags):
    BM, BN, BK, warps, stages, ws = cfg
    trans_w, scale, bias, act, gated, save_pre, out32 = _FLAGS[flags]
    ty = _TL_TYPE[dtype]
    out_ty = "fp32" if out32 else ty
    sig = {"a_ptr": f"*{ty}", "w_ptr": f"*{ty}", "out_ptr": f"*{out_ty}", "pre_ptr": f"*{ty}" if save_pre else f"*{out_ty}",
           "offsets_ptr": "*i32", "tile_end_ptr": "*i32", "scale_ptr": "*fp32" if scale else f"*{ty}",
           "bias_ptr": f"*{ty}", "R": "i32", "K": "i32", "MW": "i32", "MO": "i32", "E": "i32", "NUM_PROGS": "i32",
           **{c: "constexpr" for c in ("TRANS_W", "HAS_SCALE", "HAS_BIAS", "ACT", "GATED", "SAVE_PRE", "BLOCK_M",
                                       "BLOCK_N", "BLOCK_K", "BLOCK_E", "GROUP_M", "WARP_SPECIALIZE")}}
    return {"name": f"grouped_gemm_tma-{ty}-{name}-{flags}", "fn": _grouped_gemm_tma_kernel, "signature": sig,
            "constexprs": {"TRANS_W": trans_w, "HAS_SCALE": scale, "HAS_BIAS": bias, "ACT": _ACT_CODE[act],
                           "GATED": gated, "SAVE_PRE": save_pre, "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK,
                           "BLOCK_E": GEMM_BLOCK_E, "GROUP_M": GROUP_M, "WARP_SPECIALIZE": bool(ws)},
            "num_warps": warps, "num_stages": stages, "archs": (90,),
            "divisible": tuple(n for n, t in sig.items() if t.startswith("*")) + ("K", "MW", "MO"),
            "wgmma": True, "tma_load": True, "tma_store": True, "warp_specialized": bool(ws)}


def _tn_tma_entry(name, cfg, dtype):
    BM, BN, BP, warps, stages, ws = cfg
    ty = _TL_TYPE[dtype]
    return {"name": f"grouped_gemm_tn_tma-{ty}-{name}", "fn": _grouped_gemm_tn_tma_kernel,
            "signature": {"x_ptr": f"*{ty}", "dy_ptr": f"*{ty}", "dw_ptr": f"*{ty}", "offsets_ptr": "*i32",
                          "M": "i32", "K": "i32", "E": "i32", "NUM_PROGS": "i32",
                          **{c: "constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_P", "GROUP_M", "WARP_SPECIALIZE")}},
            "constexprs": {"BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_P": BP, "GROUP_M": GROUP_M,
                           "WARP_SPECIALIZE": bool(ws)},
            "num_warps": warps, "num_stages": stages, "archs": (90,),
            "divisible": ("x_ptr", "dy_ptr", "dw_ptr", "offsets_ptr", "M", "K"),
            "wgmma": True, "tma_load": True, "tma_store": True, "warp_specialized": bool(ws)}


def _tuned(kernel):
    """(config, dtype, flag sets) of kernel's tuned data files (every flag set when a file names none)."""
    from .grouped_gemm import tuned_configs
    return sorted({(cfg, dtype, flags) for _, dtype, cfg, flags in tuned_configs(kernel)}, key=str)


def _aot_configs():
    out = []
    for dtype in _TMA_DTYPES:
        for flags in _FLAGS:
            trans_w, _, bias, act, gated, save_pre, out32 = _FLAGS[flags]
            # 128x256 only with the plain epilogue: an fp32 output tile overflows shared memory, a saved
            # pre-activation with bias and activation spills
            plain = not (out32 or save_pre or bias or gated or act != "identity")
            names = ("gated",) if gated else ("large", "plain8", "wide") if plain else ("large", "plain8")
            out.extend(_tma_entry(n, TMA_CONFIGS[n], dtype, flags) for n in names)
        out.extend(_tn_tma_entry(n, cfg, dtype) for n, cfg in TN_TMA_CONFIGS.items())
    for cfg, dtype, flags in _tuned("grouped_gemm_tma"):
        out.extend(_tma_entry(f"tuned{'x'.join(map(str, cfg))}", cfg, dtype, f)
                   for f in flags or ("up", "up_save", "down", "dh", "dx"))
    out.extend(_tn_tma_entry(f"tuned{'x'.join(map(str, cfg))}", cfg, dtype)
               for cfg, dtype in sorted({(c, d) for c, d, _ in _tuned("grouped_gemm_tn_tma")}, key=str))
    return out


AOT_CONFIGS = _aot_configs()
