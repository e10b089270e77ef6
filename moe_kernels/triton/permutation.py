"""Triton kernels of the permutation op family (counting sort, permute, unpermute).

Spec: moe_kernels.reference.permutation (same signatures, same outputs). Each family reads top to bottom:
@triton.jit kernel(s), then the launcher. Launch parameters are chosen in the launchers (no autotune, no
heuristics); AOT_CONFIGS at the bottom lists every (kernel, config, dtype) a launcher can launch.

No atomics anywhere: every output element is written by exactly one program, so results are deterministic.
No host syncs: grids come from shapes only.
"""
import torch
import triton
import triton.language as tl

from ..reference import permutation as _ref

# data dtypes the row kernels handle, all accumulating in fp32; anything else (float64, an integer x) runs
# the reference, which accumulates float64 in float64
_DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}


# --- sort_by_expert -----------------------------------------------------------------------------------
# An index-only stable counting sort in three launches, each over blocks of SORT_BLOCK pairs:
#   1. _sort_hist_kernel: per-block histogram of the keys over E+1 buckets (bucket E = not kept) -> [NB, E+1];
#   2. torch.cumsum on the device turns it into exclusive prefixes;
#   3. _sort_scatter_kernel: a pair's position = its bucket's start + the counts of its bucket in earlier
#      blocks + its rank among the same-key pairs earlier in its block ([BLOCK, BLOCK] comparison).
# With a capacity, a first pass does 1-2 over the slot-major sequence (q = j*T + t) and
# _sort_capacity_kernel turns each pair's rank within its expert into the key E when rank >= capacity.
@triton.jit
def _sort_keys(ids_ptr, q, N, T, K, E, SLOT_MAJOR: tl.constexpr):
    """Flat pair index and key (id in [0, E), else E; -1 past N) of sequence positions q."""
    valid = q < N
    if SLOT_MAJOR:
        i = (q % T) * K + q // T
    else:
        i = q
    ids = tl.load(ids_ptr + i, mask=valid, other=0)
    key = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    return i, tl.where(valid, key, -1)


@triton.jit
def _rank_in_block(key, BLOCK: tl.constexpr):
    """Number of earlier lanes of the block with the same key (lanes past N hold -1 and come last)."""
    lane = tl.arange(0, BLOCK)
    same = (key[:, None] == key[None, :]) & (lane[None, :] < lane[:, None])
    return tl.sum(same.to(tl.int32), axis=1)


@triton.jit
def _sort_hist_kernel(ids_ptr, hist_ptr, N, T, K, E, SLOT_MAJOR: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    q = b * BLOCK + tl.arange(0, BLOCK)
    _, key = _sort_keys(ids_ptr, q, N, T, K, E, SLOT_MAJOR)
    buckets = tl.arange(0, BLOCK_E)
    for e0 in range(0, E + 1, BLOCK_E):
        e = e0 + buckets
        cnt = tl.sum((key[:, None] == e[None, :]).to(tl.int32), axis=0)
        tl.store(hist_ptr + b.to(tl.int64) * (E + 1) + e, cnt, mask=e <= E)


@triton.jit
def _sort_capacity_kernel(ids_ptr, prefix_ptr, keys_ptr, N, T, K, E, capacity, BLOCK: tl.constexpr):
    """Slot-major pass: keys[i] = key of pair i if it is among the first `capacity` of its expert, else E.
    prefix[b, e]: pairs of key e in slot-major blocks before b."""
    b = tl.program_id(0)
    q = b * BLOCK + tl.arange(0, BLOCK)
    i, key = _sort_keys(ids_ptr, q, N, T, K, E, True)
    valid = q < N
    before = tl.load(prefix_ptr + b.to(tl.int64) * (E + 1) + key, mask=valid, other=0)
    rank = before + _rank_in_block(key, BLOCK)
    keep = (key < E) & (rank < capacity)
    tl.store(keys_ptr + i, tl.where(keep, key, E), mask=valid)


@triton.jit
def _sort_scatter_kernel(ids_ptr, base_ptr, order_ptr, inverse_ptr, N, E, NB, BLOCK: tl.constexpr):
    """base[e, b]: exclusive prefix of the histogram taken bucket-major = position of the first pair of key e in
    block b. Writes order[pos] = i and inverse[i] = pos (or -1 for a pair not kept)."""
    b = tl.program_id(0)
    q = b * BLOCK + tl.arange(0, BLOCK)
    i, key = _sort_keys(ids_ptr, q, N, 1, 1, E, False)
    valid = q < N
    start = tl.load(base_ptr + key.to(tl.int64) * NB + b, mask=valid, other=0)
    pos = start + _rank_in_block(key, BLOCK)
    tl.store(order_ptr + pos, i, mask=valid)
    tl.store(inverse_ptr + i, tl.where(key < E, pos, -1), mask=valid)


SORT_BLOCK = 128
SORT_BLOCK_E = 64
SORT_WARPS = 4


def _sort_hist(ids, N, T, K, E, slot_major, NB):
    hist = torch.empty(NB, E + 1, dtype=torch.int32, device=ids.device)
    _sort_hist_kernel[(NB,)](ids, hist, N, T, K, E, SLOT_MAJOR=slot_major, BLOCK=SORT_BLOCK, BLOCK_E=SORT_BLOCK_E,
                             num_warps=SORT_WARPS)
    return hist


def sort_by_expert(experts: torch.Tensor, num_experts: int, capacity: int | None = None):
    """experts [T, k] int32|int64 -> order [T*k], inverse [T, k], offsets [E+1] (int32); see the reference."""
    T, K = experts.shape
    E = num_experts
    N = T * K
    device = experts.device
    if N == 0:
        return (torch.empty(0, dtype=torch.int32, device=device),
                torch.empty(T, K, dtype=torch.int32, device=device),
                torch.zeros(E + 1, dtype=torch.int32, device=device))
    ids = experts.contiguous()
    NB = triton.cdiv(N, SORT_BLOCK)
    if capacity is not None:
        hist = _sort_hist(ids, N, T, K, E, True, NB)
        prefix = torch.cumsum(hist, 0, dtype=torch.int32) - hist
        keys = torch.empty(N, dtype=torch.int32, device=device)
        _sort_capacity_kernel[(NB,)](ids, prefix, keys, N, T, K, E, min(capacity, N), BLOCK=SORT_BLOCK,
                                     num_warps=SORT_WARPS)
        ids = keys
    hist = _sort_hist(ids, N, T, K, E, False, NB).t().reshape(-1)      # bucket-major [E+1, NB]
    base = torch.cumsum(hist, 0, dtype=torch.int32) - hist
    order = torch.empty(N, dtype=torch.int32, device=device)
    inverse = torch.empty(T, K, dtype=torch.int32, device=device)
    _sort_scatter_kernel[(NB,)](ids, base, order, inverse, N, E, NB, BLOCK=SORT_BLOCK, num_warps=SORT_WARPS)
    offsets = base.view(E + 1, NB)[:, 0].contiguous()
    return order, inverse, offsets


# --- row tiles shared by the permute / unpermute launchers -------------------------------------------------
# (BLOCK_M rows or tokens, BLOCK_D columns per step of the D loop, num_warps), by D.
_ROW_CONFIGS = ((32, 32, 4), (16, 64, 4), (8, 128, 4))


def _row_config(D: int):
    if D <= 32:
        return _ROW_CONFIGS[0]
    if D <= 64:
        return _ROW_CONFIGS[1]
    return _ROW_CONFIGS[2]


# --- permute ------------------------------------------------------------------------------------------------
@triton.jit
def _permute_kernel(x_ptr, order_ptr, inverse_ptr, out_ptr, N, D, K, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """out[p] = x[order[p] // K] when pair order[p] is kept, else 0."""
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = p < N
    i = tl.load(order_ptr + p, mask=rows_ok, other=0)
    kept = (tl.load(inverse_ptr + i, mask=rows_ok, other=-1) >= 0) & rows_ok
    src = (i // K).to(tl.int64) * D
    dst = p.to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + cols
        d_ok = d < D
        v = tl.load(x_ptr + src[:, None] + d[None, :], mask=kept[:, None] & d_ok[None, :], other=0)
        v = tl.where(kept[:, None], v, 0)
        tl.store(out_ptr + dst[:, None] + d[None, :], v, mask=rows_ok[:, None] & d_ok[None, :])


def permute(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _DATA_DTYPES:
        return _ref.permute(x, order, inverse)
    N = order.shape[0]
    D = x.shape[1]
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return out
    BLOCK_M, BLOCK_D, warps = _row_config(D)
    _permute_kernel[(triton.cdiv(N, BLOCK_M),)](x.contiguous(), order.contiguous(), inverse.contiguous(), out, N, D,
                                                inverse.shape[1], BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    return out


# --- unpermute ----------------------------------------------------------------------------------------------
@triton.jit
def _unpermute_kernel(y_ptr, inverse_ptr, w_ptr, out_ptr, T, D, K, HAS_WEIGHTS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum over kept slots j (in order) of w[t, j] * y[inverse[t, j]]; a pair not kept adds nothing
    (tl.where, so a NaN elsewhere cannot leak in)."""
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < T
    dst = t.to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + cols
        d_ok = d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for j in range(0, K):
            r = tl.load(inverse_ptr + t * K + j, mask=t_ok, other=-1)
            kept = r >= 0
            m = kept[:, None] & d_ok[None, :]
            v = tl.load(y_ptr + r.to(tl.int64)[:, None] * D + d[None, :], mask=m, other=0)
            v = tl.where(m, v.to(acc.dtype), 0)
            if HAS_WEIGHTS:
                w = tl.load(w_ptr + t * K + j, mask=t_ok, other=0).to(acc.dtype)
                v = v * w[:, None]
            acc += v
        tl.store(out_ptr + dst[:, None] + d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & d_ok[None, :])


def unpermute(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if y.dtype not in _DATA_DTYPES or (weights is not None and weights.dtype not in _DATA_DTYPES):
        return _ref.unpermute(y, inverse, weights)
    T, K = inverse.shape
    D = y.shape[1]
    out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    if T == 0 or D == 0:
        return out
    y = y.contiguous()
    BLOCK_M, BLOCK_D, warps = _row_config(D)
    _unpermute_kernel[(triton.cdiv(T, BLOCK_M),)](
        y, inverse.contiguous(), y if weights is None else weights.contiguous(), out, T, D, K,
        HAS_WEIGHTS=weights is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        num_warps=warps)
    return out


def permute_backward(grad: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Each token sums the gradients of its kept rows in slot order: unpermute without weights."""
    return unpermute(grad, inverse, None)


# --- unpermute_backward -------------------------------------------------------------------------------------
@triton.jit
def _unpermute_backward_kernel(grad_ptr, y_ptr, inverse_ptr, w_ptr, kept_ptr, grad_y_ptr, grad_w_ptr, T, D, K,
                               HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program m owns tokens [m*BLOCK_M, (m+1)*BLOCK_M) and rows [m*BLOCK_M*K, (m+1)*BLOCK_M*K) of grad_y:
    grad_y[inverse[t, j]] = w[t, j] * grad[t] for its kept pairs, and zero for its rows at or past the number of
    kept pairs (*kept_ptr; those rows belong to pairs not kept). grad_w[t, j] = dot(grad[t], y[inverse[t, j]])."""
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < T
    n_kept = tl.load(kept_ptr)
    cols = tl.arange(0, BLOCK_D)
    for j in range(0, K):
        r = tl.load(inverse_ptr + t * K + j, mask=t_ok, other=-1)
        kept = r >= 0
        src = r.to(tl.int64) * D
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + t * K + j, mask=t_ok, other=0).to(tl.float32)
            dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # rows of this program's range that no kept pair owns: explicit zeros
        p = t * K + j
        p_dead = t_ok & (p >= n_kept)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + cols
            d_ok = d < D
            m = kept[:, None] & d_ok[None, :]
            g = tl.load(grad_ptr + t.to(tl.int64)[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                        other=0)
            if HAS_WEIGHTS:
                g = g.to(w.dtype)
                gy = g * w[:, None]
                v = tl.load(y_ptr + src[:, None] + d[None, :], mask=m, other=0)
                v = tl.where(m, v.to(w.dtype), 0)
                dot += tl.sum(tl.where(d_ok[None, :], v * g, 0), axis=1)
            else:
                gy = g
            tl.store(grad_y_ptr + src[:, None] + d[None, :], gy.to(grad_y_ptr.dtype.element_ty), mask=m)
            zero = tl.zeros((BLOCK_M, BLOCK_D), dtype=grad_y_ptr.dtype.element_ty)
            tl.store(grad_y_ptr + p.to(tl.int64)[:, None] * D + d[None, :], zero, mask=p_dead[:, None] & d_ok[None, :])
        if HAS_WEIGHTS:
            tl.store(grad_w_ptr + t * K + j, dot.to(grad_w_ptr.dtype.element_ty), mask=t_ok)


def unpermute_backward(grad: torch.Tensor, y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None):
    if y.dtype not in _DATA_DTYPES or grad.dtype not in _DATA_DTYPES or (
            weights is not None and weights.dtype not in _DATA_DTYPES):
        return _ref.unpermute_backward(grad, y, inverse, weights)
    T, K = inverse.shape
    N, D = y.shape
    grad_y = torch.empty(N, D, dtype=y.dtype, device=y.device)
    grad_w = None if weights is None else torch.empty(T, K, dtype=weights.dtype, device=weights.device)
    if T == 0 or K == 0:
        return grad_y, grad_w
    if D == 0:      # no row to write; the dots over an empty D are zero
        return grad_y, None if weights is None else grad_w.zero_()
    inverse = inverse.contiguous()
    n_kept = (inverse >= 0).sum(dtype=torch.int32)                     # on the device: rows [n_kept, N) are zero
    y = y.contiguous()
    BLOCK_M, BLOCK_D, warps = _row_config(D)
    _unpermute_backward_kernel[(triton.cdiv(T, BLOCK_M),)](
        grad.contiguous(), y, inverse, y if weights is None else weights.contiguous(), n_kept, grad_y,
        grad_y if weights is None else grad_w, T, D, K, HAS_WEIGHTS=weights is not None,
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    return grad_y, grad_w


# --- ahead-of-time compile list -----------------------------------------------------------------------------
def _aot_configs():
    out = []
    for ids in ("i32", "i64"):
        for slot_major in (False, True):
            out.append({"name": f"sort_hist-{ids}-{'slot' if slot_major else 'flat'}", "fn": _sort_hist_kernel,
                        "signature": {"ids_ptr": f"*{ids}", "hist_ptr": "*i32", "N": "i32", "T": "i32", "K": "i32",
                                      "E": "i32", "SLOT_MAJOR": "constexpr", "BLOCK": "constexpr",
                                      "BLOCK_E": "constexpr"},
                        "constexprs": {"SLOT_MAJOR": slot_major, "BLOCK": SORT_BLOCK, "BLOCK_E": SORT_BLOCK_E},
                        "num_warps": SORT_WARPS, "num_stages": 1})
        out.append({"name": f"sort_capacity-{ids}", "fn": _sort_capacity_kernel,
                    "signature": {"ids_ptr": f"*{ids}", "prefix_ptr": "*i32", "keys_ptr": "*i32", "N": "i32",
                                  "T": "i32", "K": "i32", "E": "i32", "capacity": "i32", "BLOCK": "constexpr"},
                    "constexprs": {"BLOCK": SORT_BLOCK}, "num_warps": SORT_WARPS, "num_stages": 1})
        out.append({"name": f"sort_scatter-{ids}", "fn": _sort_scatter_kernel,
                    "signature": {"ids_ptr": f"*{ids}", "base_ptr": "*i32", "order_ptr": "*i32",
                                  "inverse_ptr": "*i32", "N": "i32", "E": "i32", "NB": "i32", "BLOCK": "constexpr"},
                    "constexprs": {"BLOCK": SORT_BLOCK}, "num_warps": SORT_WARPS, "num_stages": 1})
    floats = [_TL_TYPE[d] for d in _DATA_DTYPES]
    for bm, bd, warps in _ROW_CONFIGS:
        tile = {"BLOCK_M": bm, "BLOCK_D": bd}
        for dt in floats:
            out.append({"name": f"permute-{dt}-M{bm}-D{bd}", "fn": _permute_kernel,
                        "signature": {"x_ptr": f"*{dt}", "order_ptr": "*i32", "inverse_ptr": "*i32",
                                      "out_ptr": f"*{dt}", "N": "i32", "D": "i32", "K": "i32",
                                      "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                        "constexprs": dict(tile), "num_warps": warps, "num_stages": 1})
            for wt in [None] + floats:
                has_w = wt is not None
                wptr = f"*{wt}" if has_w else f"*{dt}"          # the launcher passes y when weights is None
                out.append({"name": f"unpermute-{dt}-w{wt}-M{bm}-D{bd}", "fn": _unpermute_kernel,
                            "signature": {"y_ptr": f"*{dt}", "inverse_ptr": "*i32", "w_ptr": wptr,
                                          "out_ptr": f"*{dt}", "T": "i32", "D": "i32", "K": "i32",
                                          "HAS_WEIGHTS": "constexpr",
                                          "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                            "constexprs": {"HAS_WEIGHTS": has_w, **tile},
                            "num_warps": warps, "num_stages": 1})
                out.append({"name": f"unpermute_backward-{dt}-w{wt}-M{bm}-D{bd}", "fn": _unpermute_backward_kernel,
                            "signature": {"grad_ptr": f"*{dt}", "y_ptr": f"*{dt}", "inverse_ptr": "*i32",
                                          "w_ptr": wptr, "kept_ptr": "*i32", "grad_y_ptr": f"*{dt}",
                                          "grad_w_ptr": wptr if has_w else f"*{dt}", "T": "i32", "D": "i32",
                                          "K": "i32", "HAS_WEIGHTS": "constexpr",
                                          "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                            "constexprs": {"HAS_WEIGHTS": has_w, **tile},
                            "num_warps": warps, "num_stages": 1})
    return out


AOT_CONFIGS = _aot_configs()
