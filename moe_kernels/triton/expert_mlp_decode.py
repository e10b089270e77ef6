"""The expert MLP of a decode step (T <= DECODE_MAX_TOKENS tokens, inference) in two launches, each active expert's
weights read once: float weights (fp32 / fp16 / bf16) or quantized ones (FP8 block-scaled, MXFP4; dequantised in
registers, moe_kernels.triton.dequant).

Spec: moe_kernels.reference.expert_mlp (and moe_kernels.reference.quantized for the weights).

1. `_decode_schedule_kernel`, one program: the stable counting sort of the (token, slot) pairs by expert
   (capacity drops included), the same order / inverse / offsets as moe_kernels.triton.permutation.sort_by_expert,
   and the list of active experts (id, first row, end row); it also zeroes the grid barrier's counter.
2. `_decode_kernel`, persistent (one program per SM at most, a cooperative launch so that all are resident):
   A. items (active expert, BLOCK_N columns of H): h = glu(x[token rows] @ W_up[e]^T + bias) for the expert's rows
      (gate and up tiles of the same columns in one item) -> h scratch [N, H] in x's dtype;
   grid barrier;
   B. items (active expert, BLOCK_N columns of O): y = h rows @ W_down[e]^T + bias -> y scratch [N, O] in fp32;
   grid barrier;
   C. items (BLOCK_T tokens, BLOCK_N columns of O): out[t] = sum over kept slots j, in slot order, of
      weights[t, j] * y[inverse[t, j]] (the combine of moe_kernels.triton.permutation.unpermute, a pair not kept
      adds nothing).
   Every weight tile is loaded by exactly one item, so a pass over the active experts' weights is the whole weight
   traffic while an expert's rows fit one row tile (BLOCK_M = the tokens rounded up to a power of two, at least 16;
   top-k gives an expert at most T rows; repeated ids in a token get more row tiles, each reading the tile again).
   The barrier is an arrival counter (release) that each program then reads until all have arrived (acquire);
   phase 1 zeroed it, so no state carries from one step to the next and a CUDA graph replays it.
No atomics touch data (each output element is written by exactly one item, sums run in a fixed order: results are
deterministic) and no host syncs (grids come from shapes and the device's SM count).
The Triton interpreter runs programs one after another, so a grid barrier there would wait forever: under it the
kernel runs either as one program (the barriers pass at once) or one launch per phase (PHASE 0, 1, 2).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ..reference.activations import check_activation
from .activations import _glu_args, bias_glu, gate_up_rows
from .dequant import FMT_CODE, MX_GROUP, _weight_tile
from .engines import _load_engines, engine_file, nearest
from .grouped_gemm import _PREC_16BIT, _PREC_IEEE, _TL_TYPE, _device_name, _dot
from .permutation import _rank_in_block

DECODE_MAX_TOKENS = 64
DECODE_MAX_PAIRS = 4096          # T * k the one-program schedule takes
DECODE_MAX_EXPERTS = 1023        # E + 1 buckets in one block
DECODE_ENV = "MOE_KERNELS_DECODE"
_FLOAT = 2                       # FORMAT of plain float weights (FMT_CODE holds the quantized ones)
_SCHED_BLOCK = 32                # pairs per step of the schedule's loops
_NO_CAPACITY = 2 ** 30


# --- 1. the schedule ----------------------------------------------------------------------------------------------
@triton.jit
def _pair_keys(ids_ptr, i, valid, K, S_T, S_K, E):
    """Key of pairs i (= t * K + j; ids [T, K] with strides S_T, S_K): their expert id when in [0, E), else E
    (not kept); -1 past the pairs."""
    ids = tl.load(ids_ptr + (i // K).to(tl.int64) * S_T + (i % K) * S_K, mask=valid, other=0)
    return tl.where(valid, tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32), -1)


@triton.jit
def _decode_schedule_kernel(ids_ptr, order_ptr, inverse_ptr, offsets_ptr, active_ptr, sync_ptr, N, T, K, S_T, S_K,
                            E, AMAX, capacity, HAS_CAPACITY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """ids [T, K] -> order [N] (pair of each sorted row, dropped pairs last), inverse [T, K] (sorted row of each
    pair, -1 if not kept), offsets [E + 1], active [3, AMAX] (expert, first row, end row of each active expert in
    expert order) and active[3 * AMAX] = their number; sync[0] = 0. A stable counting sort: a pair's row is its
    expert's start + the earlier pairs (pair order) of the same expert. With a capacity, a pair is kept when fewer
    than `capacity` pairs of its expert come before it in slot-major order (j * T + t), as sort_by_expert keeps."""
    lanes = tl.arange(0, BLOCK)
    buckets = tl.arange(0, BLOCK_E)
    if HAS_CAPACITY:          # keys with the capacity applied, parked in inverse until the last pass rewrites it
        seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for q0 in range(0, N, BLOCK):
            q = q0 + lanes
            valid = q < N
            i = (q % T) * K + q // T
            key = _pair_keys(ids_ptr, i, valid, K, S_T, S_K, E)
            hit = key[:, None] == buckets[None, :]
            rank = tl.sum(tl.where(hit, seen[None, :], 0), axis=1) + _rank_in_block(key, BLOCK)
            tl.store(inverse_ptr + i, tl.where((key < E) & (rank < capacity), key, E), mask=valid)
            seen += tl.sum(hit.to(tl.int32), axis=0)
        tl.debug_barrier()
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for i0 in range(0, N, BLOCK):
        i = i0 + lanes
        valid = i < N
        if HAS_CAPACITY:
            key = tl.load(inverse_ptr + i, mask=valid, other=-1)
        else:
            key = _pair_keys(ids_ptr, i, valid, K, S_T, S_K, E)
        counts += tl.sum((key[:, None] == buckets[None, :]).to(tl.int32), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    tl.store(offsets_ptr + buckets, starts, mask=buckets <= E)
    active = (counts > 0) & (buckets < E)
    slot = tl.cumsum(active.to(tl.int32), axis=0) - active.to(tl.int32)
    tl.store(active_ptr + slot, buckets, mask=active)
    tl.store(active_ptr + AMAX + slot, starts, mask=active)
    tl.store(active_ptr + 2 * AMAX + slot, starts + counts, mask=active)
    tl.store(active_ptr + 3 * AMAX, tl.sum(active.to(tl.int32), axis=0))
    tl.store(sync_ptr, 0)
    placed = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for i0 in range(0, N, BLOCK):
        i = i0 + lanes
        valid = i < N
        if HAS_CAPACITY:
            key = tl.load(inverse_ptr + i, mask=valid, other=-1)
            tl.debug_barrier()          # every lane has read its key before any lane overwrites it below
        else:
            key = _pair_keys(ids_ptr, i, valid, K, S_T, S_K, E)
        hit = key[:, None] == buckets[None, :]
        pos = tl.sum(tl.where(hit, (starts + placed)[None, :], 0), axis=1) + _rank_in_block(key, BLOCK)
        tl.store(order_ptr + pos, i, mask=valid)
        tl.store(inverse_ptr + i, tl.where(key < E, pos, -1), mask=valid)
        placed += tl.sum(hit.to(tl.int32), axis=0)


# --- 2. the expert MLP ----------------------------------------------------------------------------------------------
@triton.jit
def _grid_barrier(sync_ptr, target):
    """Waits until `target` arrivals were counted: this program's writes before it are visible to every program
    after it (a release add per program, then acquire reads; all programs are resident: cooperative launch)."""
    tl.debug_barrier()
    seen = tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu") + 1
    while seen < target:
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _active_expert(active_ptr, AMAX, a):
    """(expert, first row, end row) of active expert a of the schedule."""
    return tl.load(active_ptr + a), tl.load(active_ptr + AMAX + a), tl.load(active_ptr + 2 * AMAX + a)


@triton.jit
def _w_tile(w_e, ws_e, rows, row_ok, s_rows, k0, K, BK_S, FORMAT: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight rows `rows`, columns k0 + [0, BLOCK_K) of one expert ([*, K]), zero where masked: float weights as
    stored, quantized ones dequantised to fp32 (dequant._weight_tile)."""
    if FORMAT == 2:
        k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_e + rows.to(tl.int64)[:, None] * K + k[None, :], mask=row_ok[:, None] & (k < K)[None, :],
                       other=0.0)
    else:
        return _weight_tile(w_e, ws_e, rows, row_ok, s_rows, k0, K, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N, BLOCK_K)


@triton.jit
def _decode_kernel(
    x_ptr, weights_ptr, order_ptr, inverse_ptr, active_ptr, sync_ptr, up_ptr, up_s_ptr, down_ptr, down_s_ptr,
    up_bias_ptr, down_bias_ptr, h_ptr, y_ptr, out_ptr,
    T, KT, D, H, O, AMAX, UP_STRIDE, UP_S_STRIDE, DOWN_STRIDE, DOWN_S_STRIDE, SK_UP, SK_DOWN, BN_S, BK_S,
    ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP,
    FORMAT: tl.constexpr, SCALE_PER_TILE: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, CLAMP: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_GCAP: tl.constexpr,
    HAS_UCAP: tl.constexpr, FP32_PRECISION: tl.constexpr, PHASE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """x [T, D], weights [T, KT], up [E, MW, D] (MW = 2H gated: gate rows c and up rows H + c, or 2c and 2c + 1
    when INTERLEAVED), down [E, O, H] -> out [T, O] (x's dtype), through h [N, H] and y [N, O] (fp32). FORMAT: 0
    fp8 (scales [E, cdiv(rows, BN_S), cdiv(K, BK_S)]), 1 mxfp4 (codes [E, rows, K / 2], e8m0 [E, rows, K / 32]), 2
    float. PHASE -1: all three phases with grid barriers; 0, 1, 2: that phase alone."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_act = tl.load(active_ptr + 3 * AMAX)
    lanes_m = tl.arange(0, BLOCK_M)
    lanes_n = tl.arange(0, BLOCK_N)
    lanes_k = tl.arange(0, BLOCK_K)
    if PHASE <= 0:              # A: up projection, bias and activation
        n_h = tl.cdiv(H, BLOCK_N)
        for item in range(pid, n_act * n_h, G):
            e, lo, hi = _active_expert(active_ptr, AMAX, item // n_h)
            cols = (item % n_h) * BLOCK_N + lanes_n
            col_ok = cols < H
            n_gate, n_up = gate_up_rows(cols, H, GATED, INTERLEAVED)
            w_e = up_ptr + e.to(tl.int64) * UP_STRIDE
            ws_e = up_s_ptr + e.to(tl.int64) * UP_S_STRIDE
            s_gate = (n_gate // BN_S).to(tl.int64) * SK_UP
            s_up = (n_up // BN_S).to(tl.int64) * SK_UP
            for m0 in range(lo, hi, BLOCK_M):
                p = m0 + lanes_m
                row_ok = p < hi
                src = tl.load(order_ptr + p, mask=row_ok, other=0) // KT
                x_rows = x_ptr + src.to(tl.int64) * D
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if GATED:
                    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    k = k0 + lanes_k
                    xt = tl.load(x_rows[:, None] + k[None, :], mask=row_ok[:, None] & (k < D)[None, :], other=0.0)
                    w = _w_tile(w_e, ws_e, n_gate, col_ok, s_gate, k0, D, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N,
                                BLOCK_K)
                    acc = _dot(xt, tl.trans(w.to(xt.dtype)), acc, FP32_PRECISION)
                    if GATED:
                        w = _w_tile(w_e, ws_e, n_up, col_ok, s_up, k0, D, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N,
                                    BLOCK_K)
                        acc_up = _dot(xt, tl.trans(w.to(xt.dtype)), acc_up, FP32_PRECISION)
                v = bias_glu(acc, acc_up if GATED else acc, up_bias_ptr + e.to(tl.int64) * (2 * H if GATED else H),
                             n_gate, n_up, col_ok, HAS_UP_BIAS, ACT, ALPHA, LIMIT, UP_OFFSET, GCAP, UCAP, CLAMP, GATED,
                             HAS_GCAP, HAS_UCAP)
                tl.store(h_ptr + p.to(tl.int64)[:, None] * H + cols[None, :], v.to(h_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok[None, :])
    if PHASE < 0:
        _grid_barrier(sync_ptr, G)
    n_o = tl.cdiv(O, BLOCK_N)
    if PHASE < 0 or PHASE == 1:  # B: down projection and bias
        for item in range(pid, n_act * n_o, G):
            e, lo, hi = _active_expert(active_ptr, AMAX, item // n_o)
            cols = (item % n_o) * BLOCK_N + lanes_n
            col_ok = cols < O
            w_e = down_ptr + e.to(tl.int64) * DOWN_STRIDE
            ws_e = down_s_ptr + e.to(tl.int64) * DOWN_S_STRIDE
            s_rows = (cols // BN_S).to(tl.int64) * SK_DOWN
            for m0 in range(lo, hi, BLOCK_M):
                p = m0 + lanes_m
                row_ok = p < hi
                h_rows = h_ptr + p.to(tl.int64) * H
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    k = k0 + lanes_k
                    ht = tl.load(h_rows[:, None] + k[None, :], mask=row_ok[:, None] & (k < H)[None, :], other=0.0)
                    w = _w_tile(w_e, ws_e, cols, col_ok, s_rows, k0, H, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N,
                                BLOCK_K)
                    acc = _dot(ht, tl.trans(w.to(ht.dtype)), acc, FP32_PRECISION)
                if HAS_DOWN_BIAS:
                    acc += tl.load(down_bias_ptr + e.to(tl.int64) * O + cols, mask=col_ok,
                                   other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + p.to(tl.int64)[:, None] * O + cols[None, :], acc,
                         mask=row_ok[:, None] & col_ok[None, :])
    if PHASE < 0:
        _grid_barrier(sync_ptr, 2 * G)
    if PHASE < 0 or PHASE == 2:  # C: the weighted sum of each token's rows, in slot order
        lanes_t = tl.arange(0, BLOCK_T)
        for item in range(pid, tl.cdiv(T, BLOCK_T) * n_o, G):
            t = (item // n_o) * BLOCK_T + lanes_t
            t_ok = t < T
            cols = (item % n_o) * BLOCK_N + lanes_n
            col_ok = cols < O
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for j in range(0, KT):
                r = tl.load(inverse_ptr + t * KT + j, mask=t_ok, other=-1)
                m = (r >= 0)[:, None] & col_ok[None, :]
                v = tl.load(y_ptr + r.to(tl.int64)[:, None] * O + cols[None, :], mask=m, other=0.0)
                w = tl.load(weights_ptr + t * KT + j, mask=t_ok, other=0.0).to(tl.float32)
                acc += tl.where(m, v * w[:, None], 0.0)
            tl.store(out_ptr + t.to(tl.int64)[:, None] * O + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=t_ok[:, None] & col_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) by BLOCK_M, for 16-bit activations and for fp32 (an ieee dot on FMA).
# BLOCK_K 64 divides a 128-wide FP8 block (a scale per tile row) and is mxfp4's minimum (two 32-value groups), 32
# for fp32. The persistent kernel runs one program per SM, so it may take every register (DECODE_MAXNREG): ptxas
# would otherwise keep it near 128 registers and spill.
DECODE_CONFIGS = {
    ("16bit", 16): (64, 64, 4, 4), ("16bit", 32): (64, 64, 8, 4), ("16bit", 64): (32, 64, 8, 4),
    ("fp32", 16): (32, 32, 4, 2), ("fp32", 32): (16, 32, 8, 2), ("fp32", 64): (32, 32, 8, 1),
}
DECODE_MAXNREG = 255
_BLOCK_T = 16


def decode_config(tokens: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a decode step of `tokens` tokens."""
    bm = max(16, triton.next_power_of_2(max(tokens, 1)))
    return (bm,) + DECODE_CONFIGS["fp32" if dtype == torch.float32 else "16bit", bm]


@functools.lru_cache(maxsize=None)
def _cooperative() -> bool:
    """Whether this Triton launches a grid cooperatively (CUDA then guarantees all programs resident, or fails the
    launch); without it the grid, at most one program per SM, is resident in practice."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=None)
def _programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tuned_choice(device: torch.device, dtype: torch.dtype, shape, tokens: int):
    """"fused" or "split" from the tuned data file configs/gemm_engines-{device}-{dtype}.json (role "decode" of
    shape (E, D, H), measured by moe_kernels.tools.tune_gemm on bf16 weights; the nearest token count on a log
    scale), or None without an entry."""
    E, D, H = shape
    table = _load_engines(engine_file(_device_name(device), dtype)).get(f"E{E}-D{D}-H{H}", {}).get("decode")
    return nearest(table, tokens) if table else None


def applies(x: torch.Tensor, experts: torch.Tensor, num_experts: int, hidden: int, training: bool = False) -> bool:
    """Whether a step takes the two-launch decode (at most DECODE_MAX_TOKENS tokens, no gradients):
    MOE_KERNELS_DECODE = "fused" / "split" decides; unset, on a GPU, the tuned data file's choice for the shape
    (E, D, hidden), else the split kernels (until a GPU has measured both)."""
    T, k = experts.shape
    if training or not 0 < T <= DECODE_MAX_TOKENS or T * k > DECODE_MAX_PAIRS or num_experts > DECODE_MAX_EXPERTS:
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    mode = os.environ.get(DECODE_ENV, "").strip()
    if mode not in ("", "fused", "split"):
        raise ValueError(f"{DECODE_ENV} must be 'fused' or 'split', got {mode!r}")
    if mode:
        return mode == "fused"
    return x.device.type == "cuda" and tuned_choice(x.device, x.dtype, (num_experts, x.shape[1], hidden), T) == "fused"


def report() -> str:
    """What moe_kernels.backends() says of decode steps."""
    mode = os.environ.get(DECODE_ENV, "").strip()
    if mode == "fused":
        return (f"two launches ({DECODE_ENV}=fused): inference steps of 1..{DECODE_MAX_TOKENS} tokens on a GPU, "
                f"float, FP8 or MXFP4 weights")
    if mode == "split":
        return f"the split kernels (routing sort, grouped GEMMs, combine): {DECODE_ENV}=split"
    if mode == "":
        return (f"per tuned data file (role 'decode' of gemm_engines-*.json) on a GPU, else the split kernels "
                f"(routing sort, grouped GEMMs, combine); {DECODE_ENV}=fused runs steps of 1..{DECODE_MAX_TOKENS} "
                f"tokens in two launches")
    return f"error: {DECODE_ENV} must be 'fused' or 'split', got {mode!r}"


def moe_mlp_decode(x, experts, weights, up, up_scale, down, down_scale, *, format=None, block=(128, 128),
                   gate_up_bias=None, down_bias=None, activation="silu", gated=True, capacity=None, programs=None,
                   phases=False, schedule=None):
    """The expert MLP of a decode step -> (out [T, O] in x's dtype, order [N], inverse [T, k], offsets [E + 1])
    in two launches. x [T, D] fp32 / fp16 / bf16; experts [T, k] int32 / int64; weights [T, k]; up [E, MW, D] and
    down [E, O, H] in x's dtype (format None) or quantized data with their scales (format "fp8" / "mxfp4", see
    moe_kernels.reference.quantized; scales unused for float weights). programs: the persistent grid (default the
    SM count; 1 under the interpreter), phases: one launch per phase (the interpreter's multi-program form);
    schedule: a dict that receives the active-expert list (tests)."""
    act = check_activation(activation, gated)
    T, KT = experts.shape
    E, MW = up.shape[:2]
    D = x.shape[1]
    H = MW // 2 if gated else MW
    O = down.shape[1]
    N = T * KT
    dev = x.device
    out = torch.empty(T, O, dtype=x.dtype, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    order = torch.empty(N, **i32)
    inverse = torch.empty(T, KT, **i32)
    offsets = torch.empty(E + 1, **i32)
    if N == 0:
        return out.zero_() if T and O else out, order, inverse, offsets.zero_()
    AMAX = min(E, N)
    active = torch.empty(3 * AMAX + 1, **i32)
    sync = torch.empty(1, **i32)
    _decode_schedule_kernel[(1,)](
        experts, order, inverse, offsets, active, sync, N, T, KT, *experts.stride(), E, AMAX,
        _NO_CAPACITY if capacity is None else min(capacity, N), HAS_CAPACITY=capacity is not None,
        BLOCK=_SCHED_BLOCK, BLOCK_E=triton.next_power_of_2(E + 1), num_warps=4,
        **({} if dev.type != "cuda" else dict(maxnreg=DECODE_MAXNREG)))       # one program: every register
    if schedule is not None:
        schedule["active"] = active
    if O == 0:
        return out, order, inverse, offsets
    BM, BN, BK, warps, stages = decode_config(T, x.dtype)
    h = torch.empty(N, H, dtype=x.dtype, device=dev)
    y = torch.empty(N, O, dtype=torch.float32, device=dev)
    if format is None:
        fmt, scale_per_tile, strides = _FLOAT, True, (MW * D, 0, O * H, 0, 0, 0)
        up_scale = down_scale = up
    elif format == "fp8":
        up, down = up.view(torch.uint8), down.view(torch.uint8)
        fmt, scale_per_tile = FMT_CODE[format], block[1] % BK == 0
        strides = (MW * D, up_scale[0].numel(), O * H, down_scale[0].numel(), up_scale.shape[2], down_scale.shape[2])
    else:
        fmt, scale_per_tile = FMT_CODE[format], True
        strides = (MW * D // 2, MW * D // MX_GROUP, O * H // 2, O * H // MX_GROUP, 0, 0)
    runtime, consts = _glu_args(act, gated)
    items = max(AMAX * triton.cdiv(max(H, O), BN), triton.cdiv(T, _BLOCK_T) * triton.cdiv(O, BN))
    interpreted = dev.type != "cuda"
    G = min(items, programs or (1 if interpreted else _programs(dev.index if dev.index is not None else
                                                                 torch.cuda.current_device())))
    args = (x.contiguous(), weights.contiguous(), order, inverse, active, sync, up.contiguous(),
            up_scale.contiguous(), down.contiguous(), down_scale.contiguous(),
            out if gate_up_bias is None else gate_up_bias.to(x.dtype).contiguous(),
            out if down_bias is None else down_bias.to(x.dtype).contiguous(), h, y, out,
            T, KT, D, H, O, AMAX, *strides, block[0], block[1], *runtime.values())
    kw = dict(FORMAT=fmt, SCALE_PER_TILE=scale_per_tile, HAS_UP_BIAS=gate_up_bias is not None,
              HAS_DOWN_BIAS=down_bias is not None, **consts,
              FP32_PRECISION=_PREC_IEEE if x.dtype == torch.float32 else _PREC_16BIT,
              BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_T=_BLOCK_T, num_warps=warps, num_stages=stages)
    if phases:
        for phase in range(3):
            _decode_kernel[(G,)](*args, PHASE=phase, **kw)
    elif interpreted:
        if G != 1:
            raise ValueError(f"the interpreter runs programs one after another: a grid barrier needs programs=1 "
                             f"(or phases=True), got programs={G}")
        _decode_kernel[(1,)](*args, PHASE=-1, **kw)
    else:
        if _cooperative():
            kw["launch_cooperative_grid"] = True
        _decode_kernel[(G,)](*args, PHASE=-1, maxnreg=DECODE_MAXNREG, **kw)
    return out, order, inverse, offsets


# --- ahead-of-time compile list -----------------------------------------------------------------------------------
_DSIG = {**dict.fromkeys(("x_ptr", "weights_ptr", "up_ptr", "up_s_ptr", "down_ptr", "down_s_ptr", "up_bias_ptr",
                          "down_bias_ptr", "h_ptr", "out_ptr")),
         **dict.fromkeys(("order_ptr", "inverse_ptr", "active_ptr", "sync_ptr"), "*i32"), "y_ptr": "*fp32",
         **dict.fromkeys(("T", "KT", "D", "H", "O", "AMAX", "UP_STRIDE", "UP_S_STRIDE", "DOWN_STRIDE",
                          "DOWN_S_STRIDE", "SK_UP", "SK_DOWN", "BN_S", "BK_S"), "i32"),
         **dict.fromkeys(("ALPHA", "LIMIT", "UP_OFFSET", "GCAP", "UCAP"), "fp32"),
         **dict.fromkeys(("FORMAT", "SCALE_PER_TILE", "HAS_UP_BIAS", "HAS_DOWN_BIAS", "ACT", "GATED", "CLAMP",
                          "INTERLEAVED", "HAS_GCAP", "HAS_UCAP", "FP32_PRECISION", "PHASE", "BLOCK_M", "BLOCK_N",
                          "BLOCK_K", "BLOCK_T"), "constexpr")}


def _decode_entry(fmt, dtype, bm, spec="silu", gated=True, bias=False):
    BM, BN, BK, warps, stages = decode_config(bm, dtype)
    ty = _TL_TYPE[dtype]
    w_ty = ty if fmt is None else "u8"
    s_ty = ty if fmt is None else "fp32" if fmt == "fp8" else "u8"
    runtime, consts = _glu_args(check_activation(spec, gated), gated)
    sig = dict(_DSIG, x_ptr=f"*{ty}", weights_ptr=f"*{ty}", up_ptr=f"*{w_ty}", down_ptr=f"*{w_ty}",
               up_s_ptr=f"*{s_ty}", down_s_ptr=f"*{s_ty}", up_bias_ptr=f"*{ty}", down_bias_ptr=f"*{ty}",
               h_ptr=f"*{ty}", out_ptr=f"*{ty}")
    return {"name": f"moe_decode-{fmt or 'float'}-{ty}-m{BM}{'-bias' if bias else ''}", "fn": _decode_kernel,
            "signature": sig,
            "constexprs": {"FORMAT": _FLOAT if fmt is None else FMT_CODE[fmt], "SCALE_PER_TILE": True,
                           "HAS_UP_BIAS": bias, "HAS_DOWN_BIAS": bias, **consts,
                           "FP32_PRECISION": _PREC_IEEE if dtype == torch.float32 else _PREC_16BIT, "PHASE": -1,
                           "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "BLOCK_T": _BLOCK_T},
            "num_warps": warps, "num_stages": stages, "maxnreg": DECODE_MAXNREG,
            "divisible": tuple(n for n, t in sig.items() if t and t.startswith("*")) + ("D", "H", "O", "UP_STRIDE", "DOWN_STRIDE"),
            "cp_async_16": dtype != torch.float32}


def _aot_configs():
    out = []
    for fmt in (None, "fp8", "mxfp4"):
        for dtype in (torch.bfloat16, torch.float16):
            for bm in (16, 32, 64):
                out.append(_decode_entry(fmt, dtype, bm, bias=bm == 32))
        for bm in (16, 32, 64):
            out.append(_decode_entry(fmt, torch.float32, bm, spec="gelu" if bm == 16 else "silu", gated=bm != 16))
    out.append({"name": "moe_decode_schedule", "fn": _decode_schedule_kernel,
                "signature": {"ids_ptr": "*i64", **dict.fromkeys(("order_ptr", "inverse_ptr", "offsets_ptr",
                                                                  "active_ptr", "sync_ptr"), "*i32"),
                              **dict.fromkeys(("N", "T", "K", "S_T", "S_K", "E", "AMAX", "capacity"), "i32"),
                              **dict.fromkeys(("HAS_CAPACITY", "BLOCK", "BLOCK_E"), "constexpr")},
                "constexprs": {"HAS_CAPACITY": True, "BLOCK": _SCHED_BLOCK, "BLOCK_E": 256}, "num_warps": 4,
                "num_stages": 1, "maxnreg": DECODE_MAXNREG, "divisible": ()})
    return out


AOT_CONFIGS = _aot_configs()
