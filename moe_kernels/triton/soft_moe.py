"""Triton kernels of the Soft-MoE op family: slot dispatch and combine as masked attention without scale.

Spec: moe_kernels.reference.soft_moe. Both ops are one kernel family, "attention" out[b, i] = sum_j P[b, i, j]
v[b, j] with P = softmax_j(L), L[b, i, j] = q[b, i] . k[b, j] (no scale), and L = -finfo(float32).max where
q_keep[b, i] or k_keep[b, j] is False (a row whose logits are all filled is a uniform average of its Mk values;
a filled logit of a row with one live logit gets weight 0):

- dispatch: q = phi (slots, Mq = S), k = v = x (tokens, Mk = N), q_keep = slot_mask, k_keep = mask;
- combine:  q = x (tokens, Mq = N), k = phi (slots, Mk = S), v = y, q_keep = mask, k_keep = slot_mask.

phi [S, D] shared by the batch is read with batch stride 0; its gradient is reduced over the batch inside the
programs (a loop over b in a fixed order: deterministic, no atomics, no [B, S, D] partials).

Flash-style, the [B, Mq, Mk] logits never exist in memory: memory is linear in tokens and slots. Grids and tiles:

- forward `_attn_fwd_kernel`, grid (cdiv(Mq, BLOCK_M), cdiv(Dv, BLOCK_C), B): a program owns BLOCK_M query rows
  and BLOCK_C output columns, loops over key blocks of BLOCK_N with an online softmax, and computes each logit tile
  q k^T by a loop over D in chunks of BLOCK_K. It writes out and, from its first column block, the row's
  logsumexp lse [B, Mq] (fp32), which the autograd saves for the backward.
- `_row_dot_kernel`: Delta[b, i] = dOut[b, i] . Out[b, i] (fp32 [B, Mq]), FlashAttention-2's preprocessing.
- `_attn_bwd_dkdv_kernel`, grid (cdiv(Mk, BLOCK_N), cdiv(C, BLOCK_C), B or 1): a program owns BLOCK_N key rows and
  BLOCK_C gradient columns and loops over query blocks: P^T = exp(k q^T - lse), dP^T = v dO^T, dS = P (dP - Delta)
  (zero on filled logits); dv += P^T dO (DV), dk += dS^T q (DK), or both into one accumulator (dispatch: keys and
  values are both x, whose gradient is their sum).
- `_attn_bwd_dq_kernel`, grid (cdiv(Mq, BLOCK_M), cdiv(D, BLOCK_C), B or 1): dq += dS k, looping over key blocks.

The backward's P on filled logits is set from the masks, not from lse: 0 in a row with a live logit, 1/Mk in a
dead row (q_keep False, or every k_keep of the batch row False), so any backend's lse of the live rows will do.

Recompute factor. The output's column width (Dv, or D for the gradients) is split across programs because a
[BLOCK_M, Dv] fp32 accumulator does not fit in registers at Dv = 1024; every column block recomputes its logit
tiles (and, for dS, its dP tiles). With c(W) = cdiv(W, BLOCK_C) column blocks, in multiply-adds per (query, key)
pair, against the minimum (forward D + Dv; backward FlashAttention-2's 3 D + 2 Dv: S, dP, dv, dk, dq once each):

- forward: c(Dv) * D + Dv;
- backward, dispatch (Dv = D): dk + dv fused c(D) * (D + Dv) + 2 D, dq c(D) * (D + Dv) + D;
- backward, combine: dv c(Dv) * D + Dv, dk c(D) * (D + Dv) + D, dq c(D) * (D + Dv) + D.

With the 16-bit tiles (BLOCK_C 256 forward and dq, 128 dk / dv) at D = Dv = 1024: forward 4 * 1024 + 1024 = 5120
against 2048 (2.5x); dispatch backward 8 * 2048 + 2048 + 4 * 2048 + 1024 = 27648 against 5120 (5.4x); combine
backward 9216 + 17408 + 9216 = 35840 (7x). That is the price of never storing the logits; at D <= BLOCK_C
(c = 1) the factors are 1x, 1.4x and 1.6x.

float64 runs the reference. fp32 uses ieee dot precision (fp32-exact up to summation order); fp16 / bf16 feed
the tensor cores (P and dS rounded to the input dtype before their dots, as FlashAttention does), accumulating
in fp32. No host syncs, no atomics: every output element has one writer. Row offsets within a batch row are
int32: Mq * D, Mk * D and Mk * Dv must stay below 2**31 (checked in the launchers from shapes).
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference import soft_moe as ref

FILL = tl.constexpr(-torch.finfo(torch.float32).max)  # the logit of a masked (token, slot) pair
_DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INT32_MAX = 2**31 - 1


# --- shared by the kernels ------------------------------------------------------------------------------------
@triton.jit
def _abt(a_ptr, a_rows, a_ok, b_ptr, b_rows, b_ok, K,
         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A[a_rows] @ B[b_rows]^T in fp32 [BLOCK_A, BLOCK_B] for row-major A [*, K], B [*, K], in chunks of BLOCK_K
    columns (rows outside a_ok / b_ok read as zeros)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_row_ptrs = a_ptr + a_rows[:, None] * K
    b_row_ptrs = b_ptr + b_rows[None, :] * K
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(a_row_ptrs + kk[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_row_ptrs + kk[:, None], mask=b_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _keep(keep_ptr, idx, ok, HAS_KEEP: tl.constexpr):
    """keep[idx] as int1 where ok (all True without a mask), False past the end."""
    if HAS_KEEP:
        return tl.load(keep_ptr + idx, mask=ok, other=0) != 0
    else:
        return ok


@triton.jit
def _probs(s, lse, live, dead, valid, inv_mk, MASKED: tl.constexpr):
    """Backward probabilities of a logit tile s (unfilled logits): exp(s - lse) on live logits; 1/Mk in a dead
    row; 0 on the filled logits of other rows and outside valid. lse, live, dead broadcast against s."""
    if MASKED:
        p = tl.where(dead, inv_mk, tl.exp(tl.where(live, s - lse, float("-inf"))))
    else:
        p = tl.exp(s - lse)
    return tl.where(valid, p, 0.0)


# --- forward --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, q_keep_ptr, k_keep_ptr, out_ptr, lse_ptr,
    Mq, Mk, D, DV, q_bstride, k_bstride,
    HAS_Q_KEEP: tl.constexpr, HAS_K_KEEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """q [B or 1, Mq, D], k [B or 1, Mk, D] (batch strides q_bstride, k_bstride: 0 when shared), v [B, Mk, DV],
    q_keep [B, Mq], k_keep [B, Mk] (uint8) -> out [B, Mq, DV], lse [B, Mq] fp32."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Mq
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < DV
    q_b = q_ptr + b * q_bstride
    k_b = k_ptr + b * k_bstride
    v_b = v_ptr + b * Mk * DV
    q_keep = _keep(q_keep_ptr + b * Mq, rows, row_ok, HAS_Q_KEEP)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, Mk, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < Mk
        s = _abt(q_b, rows, row_ok, k_b, keys, key_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        if HAS_Q_KEEP or HAS_K_KEEP:
            k_keep = _keep(k_keep_ptr + b * Mk, keys, key_ok, HAS_K_KEEP)
            s = tl.where(q_keep[:, None] & k_keep[None, :], s, FILL)
        s = tl.where(key_ok[None, :], s, float("-inf"))  # past the last key: no weight at all
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_b + keys[:, None] * DV + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # Mk = 0: out = 0 (the reference's empty sum), lse = -inf
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * Mq * DV + rows[:, None] * DV + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if pid_c == 0:
        tl.store(lse_ptr + b * Mq + rows, m_i + tl.log(l_i), mask=row_ok)


# --- backward: Delta = rowsum(dOut * Out) ---------------------------------------------------------------------
@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """a, b [R, C] -> out [R] fp32 = sum_c a[r, c] b[r, c]."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < R
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        m = row_ok[:, None] & (cols < C)[None, :]
        a = tl.load(a_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * bb, axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


# --- backward: dk and dv --------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_keep_ptr, k_keep_ptr, k_any_ptr, out_ptr,
    Mq, Mk, D, DV, C, q_bstride, k_bstride, out_bstride, B_INNER, inv_mk,
    DK: tl.constexpr, DV_: tl.constexpr, HAS_Q_KEEP: tl.constexpr, HAS_K_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out [*, Mk, C]: dk (DK, C = D), dv (DV_, C = DV) or dk + dv (both, D == DV). Program (n, c, g): key rows
    n*BLOCK_N.., columns c*BLOCK_C.., summed over the batch rows g*B_INNER + [0, B_INNER) (B_INNER = B and
    out_bstride = 0 for the gradient of a shared k); do [B, Mq, DV], lse / delta [B, Mq] fp32, k_any [B] uint8."""
    MASKED: tl.constexpr = HAS_Q_KEEP or HAS_K_KEEP
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < Mk
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for bi in range(0, B_INNER):
        b = (pid_g * B_INNER + bi).to(tl.int64)
        q_b = q_ptr + b * q_bstride
        k_b = k_ptr + b * k_bstride
        v_b = v_ptr + b * Mk * DV
        do_b = do_ptr + b * Mq * DV
        k_keep = _keep(k_keep_ptr + b * Mk, keys, key_ok, HAS_K_KEEP)
        if HAS_K_KEEP:
            batch_dead = tl.load(k_any_ptr + b) == 0
        else:
            batch_dead = False
        for m0 in range(0, Mq, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < Mq
            q_keep = _keep(q_keep_ptr + b * Mq, rows, row_ok, HAS_Q_KEEP)
            lse = tl.load(lse_ptr + b * Mq + rows, mask=row_ok, other=0.0)
            s_t = _abt(k_b, keys, key_ok, q_b, rows, row_ok, D, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION)  # [N, M]
            live = k_keep[:, None] & q_keep[None, :]
            p_t = _probs(s_t, lse[None, :], live, (~q_keep | batch_dead)[None, :],
                         key_ok[:, None] & row_ok[None, :], inv_mk, MASKED)
            if DV_:
                do = tl.load(do_b + rows[:, None] * DV + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                             other=0.0)
                acc = tl.dot(p_t.to(do.dtype), do, acc, input_precision=DOT_PRECISION)
            if DK:
                delta = tl.load(delta_ptr + b * Mq + rows, mask=row_ok, other=0.0)
                dp_t = _abt(v_b, keys, key_ok, do_b, rows, row_ok, DV, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                if MASKED:
                    ds_t = tl.where(live, ds_t, 0.0)
                qc = tl.load(q_b + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                             other=0.0)
                acc = tl.dot(ds_t.to(qc.dtype), qc, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + pid_g.to(tl.int64) * out_bstride + keys[:, None] * C + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=key_ok[:, None] & col_ok[None, :])


# --- backward: dq ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_keep_ptr, k_keep_ptr, k_any_ptr, dq_ptr,
    Mq, Mk, D, DV, q_bstride, k_bstride, dq_bstride, B_INNER, inv_mk,
    HAS_Q_KEEP: tl.constexpr, HAS_K_KEEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dq [*, Mq, D]. Program (m, c, g): query rows m*BLOCK_M.., columns c*BLOCK_C.. of D, summed over the batch
    rows g*B_INNER + [0, B_INNER) (B_INNER = B and dq_bstride = 0 for the gradient of a shared q)."""
    MASKED: tl.constexpr = HAS_Q_KEEP or HAS_K_KEEP
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Mq
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < D
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for bi in range(0, B_INNER):
        b = (pid_g * B_INNER + bi).to(tl.int64)
        q_b = q_ptr + b * q_bstride
        k_b = k_ptr + b * k_bstride
        v_b = v_ptr + b * Mk * DV
        do_b = do_ptr + b * Mq * DV
        q_keep = _keep(q_keep_ptr + b * Mq, rows, row_ok, HAS_Q_KEEP)
        if HAS_K_KEEP:
            dead = ~q_keep | (tl.load(k_any_ptr + b) == 0)
        else:
            dead = ~q_keep
        lse = tl.load(lse_ptr + b * Mq + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + b * Mq + rows, mask=row_ok, other=0.0)
        for n0 in range(0, Mk, BLOCK_N):
            keys = n0 + offs_n
            key_ok = keys < Mk
            k_keep = _keep(k_keep_ptr + b * Mk, keys, key_ok, HAS_K_KEEP)
            s = _abt(q_b, rows, row_ok, k_b, keys, key_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
            live = q_keep[:, None] & k_keep[None, :]
            p = _probs(s, lse[:, None], live, dead[:, None], row_ok[:, None] & key_ok[None, :], inv_mk, MASKED)
            dp = _abt(do_b, rows, row_ok, v_b, keys, key_ok, DV, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            if MASKED:
                ds = tl.where(live, ds, 0.0)
            kc = tl.load(k_b + keys[:, None] * D + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(ds.to(kc.dtype), kc, acc, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + pid_g.to(tl.int64) * dq_bstride + rows[:, None] * D + cols[None, :],
             acc.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --- launchers ------------------------------------------------------------------------------------------------
class Config(NamedTuple):
    """Tiles of one kernel: BLOCK_M query rows, BLOCK_N key rows, BLOCK_K contraction chunk (of D, and of Dv for
    dP), BLOCK_C output columns per program."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    BLOCK_C: int
    num_warps: int
    num_stages: int

    def tiles(self):
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K, "BLOCK_C": self.BLOCK_C}


# kernel -> operand width ("16": fp16 / bf16 on the tensor cores, wgmma on sm_90; "32": fp32 ieee on FMA) -> tiles.
# The largest BLOCK_C that compiles without spills on sm_80 and sm_90 (aot_check): dk/dv hold two logit tiles
# (P and dP) beside the accumulator and stop at 128 columns (256 spills); the fp32 tiles need 8 warps.
CONFIGS = {
    "fwd": {"16": Config(64, 64, 32, 256, 8, 2), "32": Config(32, 32, 32, 64, 8, 2)},
    "dkdv": {"16": Config(64, 64, 32, 128, 8, 2), "32": Config(32, 32, 32, 64, 8, 2)},
    "dq": {"16": Config(64, 64, 32, 256, 8, 2), "32": Config(32, 32, 32, 64, 8, 2)},
}
ROW_DOT_CONFIG = (64, 64, 4)  # BLOCK_R, BLOCK_C, num_warps


def _dot_precision(dtype):
    """tl.dot's input_precision: "ieee" (exact fp32 products) for fp32; 16-bit operands ignore it ("tf32", the
    default, leaves them on the tensor cores)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def config(kernel: str, dtype: torch.dtype) -> Config:
    return CONFIGS[kernel]["32" if dtype == torch.float32 else "16"]


def _u8(keep, dummy):
    """A bool mask as uint8 (same storage, no copy for a contiguous mask); `dummy` (never read) for no mask."""
    return dummy if keep is None else keep.contiguous().view(torch.uint8)


def _check_sizes(**sizes):
    for name, n in sizes.items():
        if n > _INT32_MAX:
            raise ValueError(f"soft_moe triton kernels index a batch row with int32: {name} = {n} is too large")


def attention(q, k, v, q_keep=None, k_keep=None):
    """Masked attention without scale: q [Mq, D] (shared) or [B, Mq, D], k [Mk, D] or [B, Mk, D], v [B, Mk, Dv],
    q_keep [B, Mq] / k_keep [B, Mk] bool or None -> (out [B, Mq, Dv] in v's dtype, lse [B, Mq] fp32)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Mk, DV = v.shape
    Mq, D = q.shape[-2:]
    _check_sizes(q=Mq * D, k=Mk * D, v=Mk * DV, out=Mq * DV)
    out = torch.empty(B, Mq, DV, device=v.device, dtype=v.dtype)
    lse = torch.empty(B, Mq, device=v.device, dtype=torch.float32)
    cfg = config("fwd", v.dtype)
    grid = (triton.cdiv(Mq, cfg.BLOCK_M), triton.cdiv(DV, cfg.BLOCK_C), B)
    if min(grid) > 0:
        _attn_fwd_kernel[grid](
            q, k, v, _u8(q_keep, lse), _u8(k_keep, lse), out, lse, Mq, Mk, D, DV,
            Mq * D if q.dim() == 3 else 0, Mk * D if k.dim() == 3 else 0,
            HAS_Q_KEEP=q_keep is not None, HAS_K_KEEP=k_keep is not None, DOT_PRECISION=_dot_precision(v.dtype),
            **cfg.tiles(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def row_dot(a, b):
    """a, b [..., C] -> fp32 [...] = sum over the last dimension of a * b."""
    a, b = a.contiguous(), b.contiguous()
    C = a.shape[-1]
    R = math.prod(a.shape[:-1])
    out = torch.empty(a.shape[:-1], device=a.device, dtype=torch.float32)
    BLOCK_R, BLOCK_C, warps = ROW_DOT_CONFIG
    if R > 0:
        _row_dot_kernel[(triton.cdiv(R, BLOCK_R),)](a, b, out, R, C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                                   num_warps=warps, num_stages=1)
    return out


def attention_backward(grad, q, k, v, out, lse, q_keep=None, k_keep=None, sum_kv=False):
    """Gradients of attention(q, k, v, q_keep, k_keep) = (out, lse) for grad of out [B, Mq, Dv] -> (dq like q,
    dk like k, dv like v); sum_kv (k and v the same tensor [B, Mk, D]) -> (dq, dk + dv). The gradient of a shared
    (2-D) q or k is summed over the batch."""
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    grad = grad.to(out.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    B, Mk, DV = v.shape
    Mq, D = q.shape[-2:]
    _check_sizes(q=Mq * D, k=Mk * D, v=Mk * DV, out=Mq * DV)
    dev = v.device
    delta = row_dot(grad, out)
    # masks, and k_any [B]: whether a batch row keeps any key (else all its query rows are dead)
    masks = (_u8(q_keep, delta), _u8(k_keep, delta), _u8(None if k_keep is None else k_keep.any(1), delta))
    q_bs, k_bs = (Mq * D if q.dim() == 3 else 0), (Mk * D if k.dim() == 3 else 0)
    inv_mk = 1.0 / max(Mk, 1)
    flags = dict(HAS_Q_KEEP=q_keep is not None, HAS_K_KEEP=k_keep is not None, DOT_PRECISION=_dot_precision(v.dtype))

    def dkdv(out_t, C, dk, dv, shared):
        cfg = config("dkdv", v.dtype)
        grid = (triton.cdiv(Mk, cfg.BLOCK_N), triton.cdiv(C, cfg.BLOCK_C), 1 if shared else B)
        if min(grid) > 0:
            _attn_bwd_dkdv_kernel[grid](
                q, k, v, grad, lse, delta, *masks, out_t, Mq, Mk, D, DV, C, q_bs, k_bs,
                0 if shared else Mk * C, B if shared else 1, inv_mk, DK=dk, DV_=dv, **flags,
                **cfg.tiles(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        return out_t

    # dq: the batch loop runs inside the programs when q is shared
    dq = torch.empty(q.shape, device=dev, dtype=q.dtype)
    cfg = config("dq", v.dtype)
    q_shared = q.dim() == 2
    grid = (triton.cdiv(Mq, cfg.BLOCK_M), triton.cdiv(D, cfg.BLOCK_C), 1 if q_shared else B)
    if min(grid) > 0:
        _attn_bwd_dq_kernel[grid](
            q, k, v, grad, lse, delta, *masks, dq, Mq, Mk, D, DV, q_bs, k_bs, 0 if q_shared else Mq * D,
            B if q_shared else 1, inv_mk, **flags, **cfg.tiles(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if sum_kv:
        dkv = dkdv(torch.empty(v.shape, device=dev, dtype=v.dtype), D, True, True, False)
        return dq, dkv
    dk = dkdv(torch.empty(k.shape, device=dev, dtype=k.dtype), D, True, False, k.dim() == 2)
    dv = dkdv(torch.empty(v.shape, device=dev, dtype=v.dtype), DV, False, True, False)
    return dq, dk, dv


# --- the soft ops ---------------------------------------------------------------------------------------------
def soft_dispatch(x, phi, mask=None, slot_mask=None):
    """x [B, N, D], phi [S, D] or [B, S, D], mask [B, N], slot_mask [B, S] -> (slots [B, S, D], lse [B, S] fp32: the
    logsumexp over tokens of each slot's masked logits). Queries = slots, keys = values = tokens."""
    if x.dtype not in _DATA_DTYPES:
        return ref.soft_dispatch_forward(x, phi, mask, slot_mask)
    return attention(phi, x, x, slot_mask, mask)


def soft_dispatch_backward(grad, x, phi, out, lse, mask=None, slot_mask=None):
    """grad [B, S, D] of the slots, out / lse from soft_dispatch -> (grad_x [B, N, D], grad_phi like phi)."""
    if x.dtype not in _DATA_DTYPES:
        return ref.soft_dispatch_backward(grad, x, phi, mask, slot_mask)
    grad_phi, grad_x = attention_backward(grad, phi, x, x, out, lse, slot_mask, mask, sum_kv=True)
    return grad_x, grad_phi


def soft_combine(x, phi, y, mask=None, slot_mask=None):
    """x [B, N, D], phi [S, D] or [B, S, D], y [B, S, Dv] -> (out [B, N, Dv], lse [B, N] fp32: the logsumexp over
    slots of each token's masked logits). Queries = tokens, keys = slots, values = y."""
    if x.dtype not in _DATA_DTYPES:
        return ref.soft_combine_forward(x, phi, y, mask, slot_mask)
    return attention(x, phi, y, mask, slot_mask)


def soft_combine_backward(grad, x, phi, y, out, lse, mask=None, slot_mask=None):
    """grad [B, N, Dv] of the output, out / lse from soft_combine -> (grad_x, grad_phi like phi, grad_y)."""
    if x.dtype not in _DATA_DTYPES:
        return ref.soft_combine_backward(grad, x, phi, y, mask, slot_mask)
    return attention_backward(grad, x, phi, y, out, lse, mask, slot_mask)


# --- ahead-of-time compile configurations ---------------------------------------------------------------------
_INTS = ("Mq", "Mk", "D", "DV")


def _aot_configs():
    out = []
    for dtype in _DATA_DTYPES:
        ty = _TL_TYPE[dtype]
        wgmma = dtype != torch.float32  # 16-bit operands on 64-row tiles; fp32 ieee runs on FMA
        for masked in (False, True):
            keep = "*u8" if masked else "*fp32"
            flags = {"HAS_Q_KEEP": masked, "HAS_K_KEEP": masked, "DOT_PRECISION": _dot_precision(dtype)}
            tag = f"{ty}{'-masked' if masked else ''}"
            cfg = config("fwd", dtype)
            out.append({
                "name": f"soft_attn_fwd-{tag}", "fn": _attn_fwd_kernel,
                "signature": {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "v_ptr": f"*{ty}", "q_keep_ptr": keep,
                              "k_keep_ptr": keep, "out_ptr": f"*{ty}", "lse_ptr": "*fp32",
                              **{n: "i32" for n in _INTS}, "q_bstride": "i32", "k_bstride": "i32",
                              **{c: "constexpr" for c in (*flags, "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C")}},
                "constexprs": {**flags, **cfg.tiles()},
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "wgmma": wgmma,
            })
            bwd_sig = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "v_ptr": f"*{ty}", "do_ptr": f"*{ty}", "lse_ptr": "*fp32",
                       "delta_ptr": "*fp32", "q_keep_ptr": keep, "k_keep_ptr": keep, "k_any_ptr": keep}
            for dk, dv in ((True, True), (True, False), (False, True)):
                cfg = config("dkdv", dtype)
                out.append({
                    "name": f"soft_attn_bwd_dkdv-{tag}-{'dk' if dk else ''}{'dv' if dv else ''}",
                    "fn": _attn_bwd_dkdv_kernel,
                    "signature": {**bwd_sig, "out_ptr": f"*{ty}", **{n: "i32" for n in _INTS}, "C": "i32",
                                  "q_bstride": "i32", "k_bstride": "i32", "out_bstride": "i32", "B_INNER": "i32",
                                  "inv_mk": "fp32",
                                  **{c: "constexpr" for c in ("DK", "DV_", *flags, "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                              "BLOCK_C")}},
                    "constexprs": {"DK": dk, "DV_": dv, **flags, **cfg.tiles()},
                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "wgmma": wgmma,
                })
            cfg = config("dq", dtype)
            out.append({
                "name": f"soft_attn_bwd_dq-{tag}", "fn": _attn_bwd_dq_kernel,
                "signature": {**bwd_sig, "dq_ptr": f"*{ty}", **{n: "i32" for n in _INTS}, "q_bstride": "i32",
                              "k_bstride": "i32", "dq_bstride": "i32", "B_INNER": "i32", "inv_mk": "fp32",
                              **{c: "constexpr" for c in (*flags, "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C")}},
                "constexprs": {**flags, **cfg.tiles()},
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "wgmma": wgmma,
            })
        BLOCK_R, BLOCK_C, warps = ROW_DOT_CONFIG
        out.append({
            "name": f"soft_row_dot-{ty}", "fn": _row_dot_kernel,
            "signature": {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "out_ptr": "*fp32", "R": "i32", "C": "i32",
                          "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
            "constexprs": {"BLOCK_R": BLOCK_R, "BLOCK_C": BLOCK_C}, "num_warps": warps, "num_stages": 1,
        })
    return out


AOT_CONFIGS = _aot_configs()
