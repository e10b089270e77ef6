"""The Triton grouped GEMM family (moe_kernels/triton/grouped_gemm.py): grouped_gemm (gather / scatter / row scale /
bias / activation / gated / trans_w), grouped_gemm_tn (dW), grouped_colsum (bias grads), and the grouped_mm op
backend through the public API (forward and backward) against the reference backend.

Oracles: plain float64 loops written here (row by row, activations from their formulas). fp32 and fp16 pass on
the earned tolerance (tests/helpers.assert_earned_dtype: the same computation in plain torch in the same dtype is
the baseline). Outputs are poisoned where the launcher preallocates them (torch.empty NaN-filled during the call).
Under TRITON_INTERPRET=1 (tests/conftest.py) the kernels run on CPU tensors: shapes are small, and bf16 (whose
tl.dot is wrong in the interpreter) is tested only in the CUDA section at the bottom.
"""
import contextlib

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import moe_kernels  # noqa: E402
import moe_kernels.triton.grouped_gemm as gg  # noqa: E402
from moe_kernels import _backend, ops  # noqa: E402
from moe_kernels.reference.activations import ACTIVATIONS  # noqa: E402
from tests.helpers import (assert_close64, assert_earned_dtype, check_beyond_exp_range, naive_glu,  # noqa: E402
                           poisoned_empty, reordered_sum_atol, torch_glu)

F64 = torch.float64
DTYPES = (torch.float32, torch.float16)


def test_grouped_mm_op_has_a_triton_backend():
    assert _backend.IMPLS["grouped_mm"]["triton"] is gg.grouped_mm
    assert _backend.IMPLS["grouped_mm_backward"]["triton"] is gg.grouped_mm_backward


# --- oracles -----------------------------------------------------------------------------------------------
def _owner(bounds, p):
    owners = [e for e in range(len(bounds) - 1) if bounds[e] <= p < bounds[e + 1]]
    assert len(owners) <= 1
    return owners[0] if owners else None


def naive_grouped_gemm(a, w, offsets, trans_w=True, gather=None, scatter=None, row_scale=None, bias=None,
                       activation="identity", gated=False, num_out_rows=None):
    """Row by row in float64: find p's expert, gather, W_e, bias, glu, scale, scatter. Rows nobody writes: 0."""
    a, w = a.double(), w.double()
    N = gather.shape[0] if gather is not None else a.shape[0]
    R = N if num_out_rows is None else num_out_rows
    MW = w.shape[1] if trans_w else w.shape[2]
    out = torch.zeros(R, MW // 2 if gated else MW, dtype=F64)
    bounds = [int(v) for v in offsets]
    for p in range(N):
        e = _owner(bounds, p)
        if e is None:
            continue
        x = a[int(gather[p])] if gather is not None else a[p]
        h = w[e] @ x if trans_w else x @ w[e]
        if bias is not None:
            h = h + bias[e].double()
        v = naive_glu(h, activation, gated)
        if row_scale is not None:
            v = v * float(row_scale[p])
        out[int(scatter[p]) if scatter is not None else p] = v
    return out


def same_dtype_grouped_gemm(a, w, offsets, trans_w=True, gather=None, scatter=None, row_scale=None, bias=None,
                            activation="identity", gated=False, num_out_rows=None):
    """Plain torch in the inputs' dtype, one matmul per expert (the earned tolerance's baseline)."""
    N = gather.shape[0] if gather is not None else a.shape[0]
    R = N if num_out_rows is None else num_out_rows
    MW = w.shape[1] if trans_w else w.shape[2]
    out = torch.zeros(R, MW // 2 if gated else MW, dtype=a.dtype)
    bounds = [int(v) for v in offsets]
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        x = a[gather[lo:hi].long()] if gather is not None else a[lo:hi]
        h = x @ (w[e].t() if trans_w else w[e])
        if bias is not None:
            h = h + bias[e]
        v = torch_glu(h, activation, gated)
        if row_scale is not None:
            v = v * row_scale[lo:hi, None].to(v.dtype)
        out[scatter[lo:hi].long() if scatter is not None else slice(lo, hi)] = v
    return out


def naive_tn(x, dy, offsets, E, gather_x=None, gather_dy=None, row_scale=None):
    """dw[e] += outer(s_p dy[gdy(p)], x[gx(p)]) row by row, float64."""
    x, dy = x.double(), dy.double()
    dw = torch.zeros(E, dy.shape[1], x.shape[1], dtype=F64)
    bounds = [int(v) for v in offsets]
    for p in range(bounds[-1]):
        e = _owner(bounds, p)
        g = dy[int(gather_dy[p])] if gather_dy is not None else dy[p]
        if row_scale is not None:
            g = g * float(row_scale[p])
        dw[e] += torch.outer(g, x[int(gather_x[p])] if gather_x is not None else x[p])
    return dw


def same_dtype_tn(x, dy, offsets, E, gather_x=None, gather_dy=None, row_scale=None):
    dw = torch.zeros(E, dy.shape[1], x.shape[1], dtype=x.dtype)
    bounds = [int(v) for v in offsets]
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        g = dy[gather_dy[lo:hi].long()] if gather_dy is not None else dy[lo:hi]
        if row_scale is not None:
            g = g * row_scale[lo:hi, None].to(g.dtype)
        dw[e] = g.t() @ (x[gather_x[lo:hi].long()] if gather_x is not None else x[lo:hi])
    return dw


def naive_colsum(dy, offsets, E, gather=None, row_scale=None):
    dy = dy.double()
    out = torch.zeros(E, dy.shape[1], dtype=F64)
    bounds = [int(v) for v in offsets]
    for p in range(bounds[-1]):
        g = dy[int(gather[p])] if gather is not None else dy[p]
        out[_owner(bounds, p)] += g * (float(row_scale[p]) if row_scale is not None else 1.0)
    return out


def same_dtype_colsum(dy, offsets, E, gather=None, row_scale=None):
    out = torch.zeros(E, dy.shape[1], dtype=dy.dtype)
    bounds = [int(v) for v in offsets]
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        g = dy[gather[lo:hi].long()] if gather is not None else dy[lo:hi]
        if row_scale is not None:
            g = g * row_scale[lo:hi, None].to(g.dtype)
        out[e] = g.sum(0)
    return out


# --- inputs --------------------------------------------------------------------------------------------------
def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)


def gemm_inputs(N, K, MW, sizes, dtype, trans_w=True, bias=False, gather_rows=None):
    """a rows ~ N(0, 1/4), w ~ N(0, 1/K), bias ~ N(0, 1/16): pre-activations and gated products O(1/2), so that
    fp32's absolute atol of 1e-6 in the earned tolerance stays a few ulp (not dominated by one lucky rounding)."""
    rows = gather_rows if gather_rows is not None else N
    a = (0.5 * torch.randn(rows, K)).to(dtype)
    shape = (len(sizes), MW, K) if trans_w else (len(sizes), K, MW)
    w = (torch.randn(shape) / K**0.5).to(dtype)
    b = (0.25 * torch.randn(len(sizes), MW)).to(dtype) if bias else None
    return a, w, offsets_of(sizes), b


def check_gemm(dtype, a, w, offsets, **kw):
    with poisoned_empty():
        out = gg.grouped_gemm(a, w, offsets, **kw)
    ref = naive_grouped_gemm(a, w, offsets, **kw)
    assert out.dtype == a.dtype and out.shape == ref.shape
    kw.pop("allow_tf32", None)
    assert_earned_dtype(out, ref, same_dtype_grouped_gemm(a, w, offsets, **kw))
    return out, ref


# group sizes (N = their sum plus any rows past offsets[E]); the small config has BLOCK_M 16 on these shapes
SIZES = {
    "gaps": [0, 1, 7, 0, 37, 3, 0],        # empty first / middle / last group, 1 row, < one tile, > two tiles
    "E1": [21],                            # E = 1, one partial tile past a full one
    "one-row": [1],                        # E = 1, N = 1
    "E5-tiny": [2, 1, 3, 1, 2],            # every group smaller than a tile
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(SIZES))
@pytest.mark.parametrize("dropped", [0, 5], ids=["all-kept", "rows-past-end"])
def test_grouped_gemm_layouts(layout, dropped, dtype):
    sizes = SIZES[layout]
    N = sum(sizes) + dropped                        # rows [offsets[E], N): pairs not kept, must come out zero
    a, w, offsets, b = gemm_inputs(N, 40, 24, sizes, dtype, bias=True)   # K = 40, M = 24: not block multiples
    check_gemm(dtype, a, w, offsets, bias=b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_gemm_activations(activation, gated, dtype):
    sizes = [5, 0, 19, 1]
    a, w, offsets, b = gemm_inputs(sum(sizes) + 3, 33, 150, sizes, dtype, bias=True)   # gated: 75 columns, 2 N tiles
    check_gemm(dtype, a, w, offsets, bias=b, activation=activation, gated=gated)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_w", [True, False], ids=["w-MK", "w-KM"])
@pytest.mark.parametrize("case", ["gather", "scatter", "gather-scatter-scale", "scale-bias-gated"])
def test_grouped_gemm_gather_scatter(case, trans_w, dtype):
    sizes = [4, 0, 17, 1, 6]
    N = sum(sizes) + 4                                       # 4 sorted rows past offsets[E]
    T = 13                                                   # gather: source rows are tokens, repeated (top-k)
    gather = torch.randint(0, T, (N,), dtype=torch.int32) if "gather" in case else None
    a, w, offsets, b = gemm_inputs(N, 24, 20, sizes, dtype, trans_w=trans_w, bias="bias" in case,
                                   gather_rows=T if gather is not None else None)
    kw = dict(trans_w=trans_w, gather=gather, bias=b, gated="gated" in case, activation="silu")
    if "scatter" in case:
        R = N + 6                                            # destinations: a permutation into more rows
        kw.update(scatter=torch.randperm(R)[:N].to(torch.int32), num_out_rows=R)
    if "scale" in case:
        kw["row_scale"] = torch.rand(N)                      # fp32 routing weights, also with fp16 data
    out, ref = check_gemm(dtype, a, w, offsets, **kw)
    if "scatter" in case:                                    # uncovered destinations are zero
        written = set(kw["scatter"][: int(offsets[-1])].tolist())
        free = [r for r in range(kw["num_out_rows"]) if r not in written]
        assert (out[free] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_w", [True, False], ids=["w-MK", "w-KM"])
def test_grouped_gemm_aligned_shapes(trans_w, dtype):
    """K, M, M/2 multiples of 16: the launcher sets ALIGNED (vector-load hints), the path of every real model."""
    sizes = [3, 0, 20, 1]
    a, w, offsets, b = gemm_inputs(sum(sizes) + 2, 32, 64, sizes, dtype, trans_w=trans_w, bias=True)
    assert gg._aligned(a, w)
    check_gemm(dtype, a, w, offsets, trans_w=trans_w, bias=b, activation="silu", gated=True)
    check_gemm(dtype, a, w, offsets, trans_w=trans_w, row_scale=torch.rand(a.shape[0]))


def test_grouped_gemm_num_out_rows_without_scatter():
    """num_out_rows > N without scatter: rows [offsets[E], R) zero (written by the kernel, out from torch.empty)."""
    a, w, offsets, _ = gemm_inputs(12, 16, 8, [3, 5], torch.float32)
    out, _ = check_gemm(torch.float32, a, w, offsets, num_out_rows=30)
    assert (out[8:] == 0).all()
    with pytest.raises(ValueError):
        gg.grouped_gemm(a, w, offsets, num_out_rows=5)


def test_grouped_gemm_no_rows_kept():
    """offsets all zero: every row is past offsets[E], the output is all zeros."""
    a, w, _, b = gemm_inputs(20, 16, 8, [0, 0, 0], torch.float32, bias=True)
    with poisoned_empty():
        out = gg.grouped_gemm(a, w, torch.zeros(4, dtype=torch.int32), bias=b, activation="gelu")
    assert out.shape == (20, 8) and (out == 0).all()


@pytest.mark.parametrize("config", ["64,32,16,4,1", "32,16,16,4,1"])
def test_grouped_gemm_pinned_config(config, monkeypatch):
    """MOE_KERNELS_GEMM_CONFIG pins the tile: larger BLOCK_M than most groups, several N and K tiles."""
    monkeypatch.setenv(gg.CONFIG_ENV, config)
    assert gg.gemm_config(10, 2, torch.float32, False) == tuple(int(v) for v in config.split(","))
    sizes = [0, 70, 1, 9]
    a, w, offsets, b = gemm_inputs(sum(sizes) + 2, 40, 70, sizes, torch.float32, bias=True)
    check_gemm(torch.float32, a, w, offsets, bias=b, activation="gelu_tanh", gated=True)


def test_grouped_gemm_tf32_flag():
    """allow_tf32 selects input_precision="tf32" (the interpreter computes it in full fp32: the result still
    passes); the default is exact ieee fp32."""
    a, w, offsets, _ = gemm_inputs(10, 16, 8, [4, 6], torch.float32)
    with poisoned_empty():
        out = gg.grouped_gemm(a, w, offsets, allow_tf32=True)
    torch.testing.assert_close(out.double(), naive_grouped_gemm(a, w, offsets), rtol=1e-2, atol=1e-2)


def test_grouped_gemm_float64_fallback():
    sizes = [3, 0, 5]
    gather = torch.randint(0, 6, (10,), dtype=torch.int32)
    a, w, offsets, b = gemm_inputs(10, 12, 10, sizes, F64, trans_w=False, bias=True, gather_rows=6)
    kw = dict(trans_w=False, gather=gather, scatter=torch.randperm(12)[:10].int(), row_scale=torch.rand(10, dtype=F64),
              bias=b, activation="gelu", gated=True, num_out_rows=12)
    assert_close64(gg.grouped_gemm(a, w, offsets, **kw), naive_grouped_gemm(a, w, offsets, **kw))
    x, dy = torch.randn(10, 7, dtype=F64), torch.randn(10, 5, dtype=F64)
    assert_close64(gg.grouped_gemm_tn(x, dy, offsets, 3, gather_x=gather, row_scale=kw["row_scale"]),
                   naive_tn(x, dy, offsets, 3, gather_x=gather, row_scale=kw["row_scale"]))
    assert_close64(gg.grouped_colsum(dy, offsets, 3, gather=gather), naive_colsum(dy, offsets, 3, gather=gather))


# --- grouped_gemm_tn / grouped_colsum ---------------------------------------------------------------------------
TN_CASES = [
    ([0, 1, 7, 0, 45, 3, 0], 40, 24),      # empty groups (zeros), 1 row, < one chunk, > one chunk; odd M, K
    ([21], 17, 9),                         # E = 1
    ([2, 1, 3, 1, 2], 70, 70),             # tiny groups, two M and two K tiles of the small config
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes,K,M", TN_CASES, ids=["gaps", "E1", "tiny-2tiles"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "gather-scale"])
def test_grouped_gemm_tn(sizes, K, M, fused, dtype):
    E, kept = len(sizes), sum(sizes)
    N = kept + 4                                             # rows past offsets[E] must not contribute
    offsets = offsets_of(sizes)
    x = (0.5 * torch.randn(N, K)).to(dtype)
    dy = (0.2 * torch.randn(N + 3, M)).to(dtype)
    kw = {}
    if fused:
        kw = dict(gather_x=torch.randint(0, N, (N,), dtype=torch.int32),
                  gather_dy=torch.randperm(N + 3)[:N].to(torch.int32), row_scale=torch.rand(N))
    else:
        dy = dy[:N]
    with poisoned_empty():
        dw = gg.grouped_gemm_tn(x, dy, offsets, E, **kw)
    assert dw.dtype == dtype and dw.shape == (E, M, K)
    assert_earned_dtype(dw, naive_tn(x, dy, offsets, E, **kw), same_dtype_tn(x, dy, offsets, E, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes,M", [([0, 1, 7, 0, 45, 3, 0], 24), ([21], 130)], ids=["gaps", "E1-2tiles"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "gather-scale"])
def test_grouped_colsum(sizes, M, fused, dtype):
    E, N = len(sizes), sum(sizes) + 3
    offsets = offsets_of(sizes)
    dy = (0.2 * torch.randn(N, M)).to(dtype)
    kw = dict(gather=torch.randint(0, N, (N,), dtype=torch.int32), row_scale=torch.rand(N)) if fused else {}
    with poisoned_empty():
        out = gg.grouped_colsum(dy, offsets, E, **kw)
    assert out.dtype == dtype and out.shape == (E, M)
    assert_earned_dtype(out, naive_colsum(dy, offsets, E, **kw), same_dtype_colsum(dy, offsets, E, **kw))


# --- the grouped_mm op on the triton backend vs the reference backend ---------------------------------------------
def _op_fwd_bwd(backend, a, w, offsets, bias, activation, gated, grad):
    a, w = a.detach().requires_grad_(), w.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    ctx = poisoned_empty() if backend == "triton" else contextlib.nullcontext()
    with moe_kernels.use_backend(backend), ctx:
        out = ops.grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)
        inputs = (a, w) + ((bias,) if bias is not None else ())
        grads = torch.autograd.grad(out, inputs, grad)
    return (out,) + grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gated,bias", [("identity", False, False), ("silu", True, False),
                                                   ("gelu", False, True), ("gelu_tanh", True, True),
                                                   ("relu", False, False)])
def test_grouped_mm_op_triton_backend(activation, gated, bias, dtype):
    sizes = [6, 0, 1, 18]
    N = sum(sizes) + 3                                       # rows past offsets[E]: zero out, zero grad_a
    a, w, offsets, b = gemm_inputs(N, 20, 26, sizes, dtype, bias=bias)
    grad = (0.5 * torch.randn(N, 13 if gated else 26)).to(dtype)
    fast = _op_fwd_bwd("triton", a, w, offsets, b, activation, gated, grad)
    ref64 = _op_fwd_bwd("reference", a.double(), w.double(), offsets, b.double() if bias else None, activation,
                        gated, grad.double())
    same = _op_fwd_bwd("reference", a, w, offsets, b, activation, gated, grad)
    names = ("out", "grad_a", "grad_w", "grad_bias")
    for name, f, r, s in zip(names, fast, ref64, same):
        assert f.dtype == dtype, name
        # chained reductions over K=20 (forward) and M=26 (backward), summed in tile order, not torch's
        assert_earned_dtype(f, r, s, atol=reordered_sum_atol(r, dtype, 20 + 26), name=name)
    assert (fast[0][offsets[-1]:] == 0).all() and (fast[1][offsets[-1]:] == 0).all()


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_mm_op_triton_beyond_exp_range(activation, gated):
    with moe_kernels.use_backend("triton"), poisoned_empty():
        check_beyond_exp_range(activation, gated)


# --- on a GPU: bf16 at a real size ------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 tl.dot is wrong in the interpreter)")
@pytest.mark.parametrize("case", ["fwd-bias", "up-gather-swiglu", "down-scatter-scale", "dgrad"])
def test_cuda_bf16_grouped_gemm(case):
    torch.set_default_device("cuda")
    try:
        N, K, M, E = 4096, 1024, 2048, 8
        sizes = torch.distributions.Dirichlet(torch.ones(E)).sample().mul(N - 100).floor().long()
        sizes[0] = 0                                                     # an empty expert
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).int()
        trans_w = case != "dgrad"
        kw = dict(trans_w=trans_w)
        T = N // 2
        if case == "up-gather-swiglu":
            kw.update(gather=torch.randint(0, T, (N,), dtype=torch.int32), activation="silu", gated=True)
        if case == "fwd-bias":
            kw["bias"] = 0.5 * torch.randn(E, M, dtype=F64)
            kw["activation"] = "gelu"
        if case == "down-scatter-scale":
            kw.update(scatter=torch.randperm(N).int(), row_scale=torch.rand(N))
        a = torch.randn(T if "gather" in kw else N, K, dtype=F64)
        w = torch.randn((E, M, K) if trans_w else (E, K, M), dtype=F64) / K**0.5
        bias = kw.pop("bias", None)
        out = gg.grouped_gemm(a.bfloat16(), w.bfloat16(), offsets, bias=None if bias is None else bias.bfloat16(),
                              **kw)
        ab, wb = a.bfloat16().double(), w.bfloat16().double()
        bb = None if bias is None else bias.bfloat16().double()
        ref = same_dtype_grouped_gemm(ab, wb, offsets, bias=bb, **kw)
        same = same_dtype_grouped_gemm(a.bfloat16(), w.bfloat16(), offsets,
                                       bias=None if bias is None else bias.bfloat16(), **kw)
        assert_earned_dtype(out, ref, same)
        dy = torch.randn(N, M, dtype=F64).bfloat16()
        dw = gg.grouped_gemm_tn(a.bfloat16(), dy, offsets, E, gather_x=kw.get("gather"), row_scale=kw.get("row_scale"))
        dw_ref = same_dtype_tn(ab, dy.double(), offsets, E, gather_x=kw.get("gather"), row_scale=kw.get("row_scale"))
        dw_same = same_dtype_tn(a.bfloat16(), dy, offsets, E, gather_x=kw.get("gather"),
                                row_scale=kw.get("row_scale"))
        assert_earned_dtype(dw, dw_ref, dw_same)
        cs = gg.grouped_colsum(dy, offsets, E, row_scale=kw.get("row_scale"))
        assert_earned_dtype(cs, same_dtype_colsum(dy.double(), offsets, E, row_scale=kw.get("row_scale")),
                            same_dtype_colsum(dy, offsets, E, row_scale=kw.get("row_scale")))
    finally:
        torch.set_default_device(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 tl.dot is wrong in the interpreter)")
@pytest.mark.parametrize("activation,gated,bias", [("silu", True, False), ("gelu", False, True)])
def test_cuda_bf16_grouped_mm_op(activation, gated, bias):
    N, K, M, E = 4096, 1024, 2048, 8
    dev = "cuda"
    sizes = torch.distributions.Dirichlet(torch.ones(E)).sample().mul(N - 100).floor().long()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).int().to(dev)
    a = torch.randn(N, K, device=dev).bfloat16()
    w = (torch.randn(E, M, K, device=dev) / K**0.5).bfloat16()
    b = (0.5 * torch.randn(E, M, device=dev)).bfloat16() if bias else None
    grad = torch.randn(N, M // 2 if gated else M, device=dev).bfloat16()
    fast = _op_fwd_bwd("triton", a, w, offsets, b, activation, gated, grad)
    ref64 = _op_fwd_bwd("reference", a.double(), w.double(), offsets, b.double() if bias else None, activation,
                        gated, grad.double())
    same = _op_fwd_bwd("reference", a, w, offsets, b, activation, gated, grad)
    for f, r, s in zip(fast, ref64, same):
        assert_earned_dtype(f, r, s)
