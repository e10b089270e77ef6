"""moe_kernels.ops.grouped_mm (custom ops moe_kernels::grouped_mm and ::grouped_mm_backward).

Oracles: a naive per-row loop written here in float64 (activations from their formulas, not from
torch.nn.functional), and moe_kernels.reference.grouped_mm (the spec). Lower precision passes on the earned
tolerance (tests/helpers.assert_earned). Also: gradcheck, opcheck, determinism, strides, bad input.
"""
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_kernels
from moe_kernels import _backend
from moe_kernels import reference as ref
from moe_kernels.ops import grouped_mm
from moe_kernels.reference.activations import ACTIVATIONS
from tests.helpers import (assert_close64, assert_earned_dtype, assert_earned_max, check_beyond_exp_range, naive_glu,
                           num_threads, poison_, reordered_sum_atol, torch_glu)

F64 = torch.float64


def naive_grouped_mm(a, w, offsets, bias, activation, gated):
    """Row by row: find the expert that owns row i, then act(w[e] a[i] + bias[e]) in float64."""
    a, w = a.double(), w.double()
    bias = bias.double() if bias is not None else None
    N, (E, M, K) = a.shape[0], w.shape
    bounds = [int(v) for v in offsets]
    out = poison_(torch.empty(N, M // 2 if gated else M, dtype=F64))  # every row must be written below
    for i in range(N):
        owners = [e for e in range(E) if bounds[e] <= i < bounds[e + 1]]
        assert len(owners) <= 1
        if not owners:  # a row at or past offsets[E]: the pair was not kept
            out[i] = 0
            continue
        e = owners[0]
        h = w[e] @ a[i]
        if bias is not None:
            h = h + bias[e]
        out[i] = naive_glu(h, activation, gated)
    return out


def reordered_preactivation_atol(a, w, offsets, bias, activation, gated, dtype):
    """Per output element: two roundings of each pre-activation's sum of |terms| (what another summation order
    may move it by), carried through the activation's derivative. A kernel that sums K in another order than
    the baseline earns this where the baseline happens to land on the float64 value and the activation
    amplifies (relu2's slope is 2 * pre)."""
    a64, w64 = a.double(), w.double()
    N, (E, M, K) = a.shape[0], w.shape
    end = int(offsets[-1])
    rows = torch.arange(end, device=a.device)
    e = torch.searchsorted(offsets[1:].long(), rows, right=True)
    pre = torch.einsum("nk,nmk->nm", a64[:end], w64[e])
    spread = torch.einsum("nk,nmk->nm", a64[:end].abs(), w64[e].abs())
    if bias is not None:
        pre = pre + bias.double()[e]
        spread = spread + bias.double()[e].abs()
    jac = torch.func.vmap(torch.func.jacfwd(lambda h: naive_glu(h, activation, gated)))(pre)  # [end, out, M]
    atol = torch.zeros(N, M // 2 if gated else M, dtype=F64, device=a.device)
    atol[:end] = 2 * torch.finfo(dtype).eps * torch.einsum("nom,nm->no", jac.abs().nan_to_num(0.0, 0.0, 0.0), spread)
    return atol


def same_dtype_grouped_mm(a, w, offsets, bias, activation, gated):
    """Plain PyTorch in the inputs' dtype (the baseline of the earned tolerance): one matmul per expert."""
    out = torch.zeros(a.shape[0], w.shape[1] // 2 if gated else w.shape[1], dtype=a.dtype)
    bounds = [int(v) for v in offsets]
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        h = a[lo:hi] @ w[e].t()
        if bias is not None:
            h = h + bias[e]
        out[lo:hi] = torch_glu(h, activation, gated)
    return out


# --- inputs -----------------------------------------------------------------------------------------
def make_offsets(N, E, layout):
    """offsets [E+1] int32 for N rows. layout: random (random split, some groups may be empty), dropped
    (random split of fewer than N rows: rows past offsets[E]), one (every row to one expert), gaps (groups
    of size 0 at the start, the middle and the end), none (offsets all zero: every row past offsets[E])."""
    if layout == "none":
        return torch.zeros(E + 1, dtype=torch.int32)
    if layout == "one":
        counts = torch.zeros(E, dtype=torch.int64)
        counts[int(torch.randint(E, ()))] = N
    elif layout == "gaps":
        assert E >= 5
        counts = torch.zeros(E, dtype=torch.int64)
        live = list(range(1, E - 1, 2))  # experts 0, 2, 4, ..., E-1 stay empty
        cuts = torch.randint(0, N + 1, (len(live) - 1,)).sort().values.tolist()
        for e, lo, hi in zip(live, [0] + cuts, cuts + [N]):
            counts[e] = hi - lo
    else:
        kept = N if layout == "random" else N - int(torch.randint(1, max(2, N // 3 + 1), ()))
        cuts = torch.randint(0, kept + 1, (E - 1,)).sort().values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([kept])])
        counts = bounds.diff()
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    assert int(offsets[-1]) <= N and bool((offsets.diff() >= 0).all())
    return offsets.to(torch.int32)


def make_inputs(N, K, M, E, layout, *, with_bias, dtype=F64):
    """Weights scaled by 1/sqrt(K) as in a real layer, so values stay O(1) in every dtype."""
    a = torch.randn(N, K, dtype=F64)
    w = torch.randn(E, M, K, dtype=F64) / math.sqrt(K)
    bias = torch.randn(E, M, dtype=F64) if with_bias else None
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(a), cast(w), make_offsets(N, E, layout), cast(bias)


# (N, K, M, E, layout); M is even so that every case also runs gated
SHAPES = [
    pytest.param(37, 15, 18, 7, "random", id="N37-K15-M18-E7-random"),    # prime E, odd K, random group sizes
    pytest.param(29, 9, 10, 13, "dropped", id="N29-K9-M10-E13-dropped"),  # prime E=13 > some groups; rows past offsets[E]
    pytest.param(16, 8, 6, 4, "one", id="N16-K8-M6-E4-one"),             # all rows to one expert, the others empty
    pytest.param(12, 5, 4, 6, "gaps", id="N12-K5-M4-E6-gaps"),           # groups of size 0 at start, middle and end
    pytest.param(1, 7, 6, 1, "random", id="N1-K7-M6-E1"),                # a single row and a single expert
    pytest.param(0, 7, 6, 3, "random", id="N0-K7-M6-E3"),                # no rows at all
    pytest.param(9, 4, 6, 3, "none", id="N9-K4-M6-E3-none"),             # offsets all zero: every row is dropped
]
GATED = [pytest.param(False, id="plain"), pytest.param(True, id="gated")]
BIAS = [pytest.param(False, id="nobias"), pytest.param(True, id="bias")]


# --- forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("N, K, M, E, layout", SHAPES[:2])
def test_forward_float64_every_activation(backend, N, K, M, E, layout, activation, gated, with_bias):
    check_forward_float64(N, K, M, E, layout, activation, gated, with_bias)


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("N, K, M, E, layout", SHAPES[2:])
def test_forward_float64_edge_shapes(backend, N, K, M, E, layout, gated, with_bias):
    # gelu: nonzero at a nonzero bias, so rows past offsets[E] are zero only if the op zeroes them
    check_forward_float64(N, K, M, E, layout, "gelu", gated, with_bias)


def check_forward_float64(N, K, M, E, layout, activation, gated, with_bias):
    a, w, offsets, bias = make_inputs(N, K, M, E, layout, with_bias=with_bias)
    out = grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)
    assert out.shape == (N, M // 2 if gated else M) and out.dtype == F64
    assert_close64(out, naive_grouped_mm(a, w, offsets, bias, activation, gated), "vs naive loop")
    assert_close64(out, ref.grouped_mm(a, w, offsets, bias, activation, gated), "vs reference")
    # rows at or past offsets[E] are exactly zero, whatever the bias and the activation
    assert bool((out[int(offsets[-1]):] == 0).all())


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("M", [9, 1])  # odd output width (and width 1), allowed when not gated
def test_forward_odd_width_not_gated(backend, M, with_bias):
    a, w, offsets, bias = make_inputs(20, 6, M, 5, "dropped", with_bias=with_bias)
    out = grouped_mm(a, w, offsets, bias, activation="gelu")
    assert_close64(out, naive_grouped_mm(a, w, offsets, bias, "gelu", False), "vs naive loop")
    assert_close64(out, ref.grouped_mm(a, w, offsets, bias, "gelu", False), "vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_low_precision_earned(backend, activation, gated, dtype):
    # prime E, odd K, rows past offsets[E]. About 3000 outputs: the tensor-wide maximum error of a 16-bit result is
    # a stable statistic only on this many. (A native backend that runs bf16 GEMMs in bf16 rounds the
    # pre-activation to bf16 as plain PyTorch does; its error is 0.75-0.9x PyTorch's in RMS, but over 150 outputs
    # the maximum alone swings to 3x either way.)
    N, K, M, E = 400, 31, 18, 13
    a, w, offsets, bias = make_inputs(N, K, M, E, "dropped", with_bias=True, dtype=dtype)
    out = grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)
    assert out.dtype == dtype
    ref64 = naive_grouped_mm(a, w, offsets, bias, activation, gated)  # the same rounded inputs, in float64
    atol = 1e-6 + reordered_preactivation_atol(a, w, offsets, bias, activation, gated, dtype)
    assert_earned_dtype(out, ref64, same_dtype_grouped_mm(a, w, offsets, bias, activation, gated), atol=atol)
    assert bool((out[int(offsets[-1]):] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_low_precision_earned(backend, activation, gated, dtype):
    # every gradient against autograd through the naive loop in float64 on the same rounded inputs, within twice
    # the error of autograd through plain PyTorch in the same dtype (over each tensor), plus what reordering a sum
    # of up to N terms may add (the bias gradient has few elements). On CPUs with bf16 dot products the native
    # backend runs its bf16 GEMMs in bf16, the activation backward reading and writing bf16
    N, K, M, E = 160, 31, 18, 5
    a, w, offsets, bias = make_inputs(N, K, M, E, "random", with_bias=True, dtype=dtype)
    grad_out = torch.randn(N, M // 2 if gated else M, dtype=F64)

    def grads(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (a, w, bias)]
        out = fn(leaves[0], leaves[1], offsets, leaves[2], activation, gated)
        return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

    fast = grads(lambda *args: grouped_mm(*args[:4], activation=args[4], gated=args[5]), dtype)
    ref64 = grads(naive_grouped_mm, F64)
    same = grads(same_dtype_grouped_mm, dtype)
    for name, f, r, b in zip(("a", "w", "bias"), fast, ref64, same):
        assert f.dtype == dtype
        assert_earned_max(f, r, b, atol=1e-6 + reordered_sum_atol(r, dtype, N), name=f"grad of {name}")


# --- backward ---------------------------------------------------------------------------------------
def grad_inputs(with_bias=True):
    """Small float64 leaves for gradcheck: expert 1 empty, rows 7 and 8 past offsets[E] (dropped)."""
    a = torch.randn(9, 4, dtype=F64, requires_grad=True)
    w = (torch.randn(3, 6, 4, dtype=F64) / 2).requires_grad_()
    bias = torch.randn(3, 6, dtype=F64, requires_grad=True) if with_bias else None
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    return a, w, offsets, bias


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(backend, activation, gated):
    a, w, offsets, bias = grad_inputs()
    fn = lambda a, w, bias: grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, w, bias))


def test_gradcheck_without_bias(backend):
    a, w, offsets, _ = grad_inputs(with_bias=False)
    fn = lambda a, w: grouped_mm(a, w, offsets, activation="silu", gated=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, w))


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_naive_autograd_and_reference(backend, activation, gated):
    # prime E, odd K, some rows dropped: the gradient of the naive loop (autograd through it) is the oracle
    a, w, offsets, bias = make_inputs(23, 9, 10, 7, "dropped", with_bias=True)
    leaves = [t.requires_grad_() for t in (a, w, bias)]
    grad_out = torch.randn(23, 5 if gated else 10, dtype=F64)
    out = grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(naive_grouped_mm(a, w, offsets, bias, activation, gated), leaves, grad_out)
    spec = ref.grouped_mm_backward(grad_out, a.detach(), w.detach(), offsets, bias.detach(), activation, gated)
    for name, g, n, s in zip(("grad_a", "grad_w", "grad_bias"), got, want, spec):
        assert_close64(g, n, f"{name} vs naive autograd")
        assert_close64(g, s, f"{name} vs reference backward")
    assert bool((got[0][int(offsets[-1]):] == 0).all())  # dropped rows get no gradient


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_pre_activations_beyond_exp_range(backend, activation, gated):
    check_beyond_exp_range(activation, gated)


def test_empty_backward(backend):
    # N=0: gradients of w and bias are exact zeros of their shapes
    a, w, offsets, bias = make_inputs(0, 7, 6, 3, "random", with_bias=True)
    leaves = [t.requires_grad_() for t in (a, w, bias)]
    out = grouped_mm(a, w, offsets, bias, activation="silu", gated=True)
    grads = torch.autograd.grad(out, leaves, torch.randn(0, 3, dtype=F64))
    for leaf, g in zip(leaves, grads):
        assert g.shape == leaf.shape and bool((g == 0).all())


# --- custom-op registration ---------------------------------------------------------------------------
OPCHECK = [pytest.param(torch.float32, "silu", True, id="fp32-silu-gated"),
           pytest.param(F64, "gelu", False, id="fp64-gelu-plain")]


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype, activation, gated", OPCHECK)
def test_opcheck_forward(backend, dtype, activation, gated, with_bias):
    a, w, offsets, bias = make_inputs(11, 5, 6, 3, "dropped", with_bias=with_bias, dtype=dtype)
    args = [t.requires_grad_() if t is not None else None for t in (a, w, bias)]
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm, (args[0], args[1], offsets, args[2], activation, gated))


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype, activation, gated", OPCHECK)
def test_opcheck_backward(backend, dtype, activation, gated, with_bias):
    # the backward op has no autograd of its own (no double backward): its inputs do not require grad
    a, w, offsets, bias = make_inputs(11, 5, 6, 3, "dropped", with_bias=with_bias, dtype=dtype)
    grad = torch.randn(11, 3 if gated else 6, dtype=dtype)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm_backward, (grad, a, w, offsets, bias, activation, gated))


# --- determinism, strides ---------------------------------------------------------------------------
def test_deterministic_forward_and_backward(backend):
    a, w, offsets, bias = make_inputs(64, 32, 48, 7, "dropped", with_bias=True, dtype=torch.float32)
    grad_out = torch.randn(64, 24)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (a, w, bias)]
        out = grouped_mm(leaves[0], leaves[1], offsets, leaves[2], activation="silu", gated=True)
        runs.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for name, x, y in zip(("out", "grad_a", "grad_w", "grad_bias"), *runs):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


@pytest.mark.parametrize("gated", GATED)
def test_non_contiguous_inputs(backend, gated):
    N, K, M, E = 21, 7, 10, 5
    _, _, offsets, _ = make_inputs(N, K, M, E, "dropped", with_bias=False)
    a = torch.randn(K, N, dtype=F64).t()                    # transposed view
    w = torch.randn(E, K, M, dtype=F64).transpose(1, 2)     # [E, M, K] with K not innermost
    bias = torch.randn(M, E, dtype=F64).t()                 # transposed view
    strided = torch.full((2 * (E + 1),), -7, dtype=torch.int32)
    strided[::2] = offsets
    offsets_view = strided[::2]                             # stride-2 offsets
    assert not any(t.is_contiguous() for t in (a, w, bias, offsets_view))
    grad_out = torch.randn(N, M // 2 if gated else M, dtype=F64)
    results = []
    for args in ((a, w, offsets_view, bias), (a.contiguous(), w.contiguous(), offsets, bias.contiguous())):
        leaves = [t.detach().requires_grad_() for t in (args[0], args[1], args[3])]
        out = grouped_mm(leaves[0], leaves[1], args[2], leaves[2], activation="gelu_tanh", gated=gated)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for name, x, y in zip(("out", "grad_a", "grad_w", "grad_bias"), *results):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13, msg=lambda m: f"{name}: {m}")


# --- the native scheduler ----------------------------------------------------------------------------
def offsets_from_counts(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)


# (group sizes, dropped rows after them, threads)
SCHEDULES = [
    pytest.param([9, 7, 0, 11, 8, 10, 6, 9, 12, 0, 7, 8], 5, 4, id="12-small-groups-4-threads"),   # spread evenly
    pytest.param([1] * 30 + [0] * 3, 0, 3, id="30-one-row-groups-3-threads"),                      # decode-like
    pytest.param([70, 3, 4, 2, 5, 3, 4], 2, 4, id="one-heavy-then-light"),                         # heavy, then spread
    pytest.param([30, 2, 25, 1], 0, 4, id="uneven-few"),                                           # one at a time
    pytest.param([9, 7, 0, 11, 8, 10, 6, 9, 12, 0, 7, 8], 5, 1, id="one-thread"),                  # the serial path
]


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("counts, dropped, threads", SCHEDULES)
def test_native_schedules_match_reference(counts, dropped, threads, gated):
    # the native op spreads small groups over the threads (single-threaded GEMMs) and runs large ones in turn;
    # whichever way a group runs, forward and backward equal the reference, and reruns are bit-identical
    E, K, M = len(counts), 9, 10
    offsets = offsets_from_counts(counts)
    N = int(offsets[-1]) + dropped
    a, w, _, bias = make_inputs(N, K, M, E, "random", with_bias=True)
    grad_out = torch.randn(N, M // 2 if gated else M, dtype=F64)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (a, w, bias)]
        with moe_kernels.use_backend(backend), num_threads(threads):
            out = grouped_mm(leaves[0], leaves[1], offsets, leaves[2], activation="gelu_tanh", gated=gated)
            return (out, *torch.autograd.grad(out, leaves, grad_out))

    native, again, reference = run("native"), run("native"), run("reference")
    for name, x, y, r in zip(("out", "grad_a", "grad_w", "grad_bias"), native, again, reference):
        assert torch.equal(x, y), f"{name}: two native runs differ"
        assert_close64(x, r, f"{name} native vs reference")


# --- the streaming kernel (groups of a few rows) ---------------------------------------------------------
@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("K", [9, 16, 37, 300])
def test_native_streaming_groups(K, dtype):
    # groups of 1 to 9 rows: up to 8 stream the weights in their own dtype (4 rows share each load, then 3, 2 or 1),
    # 9 goes to BLAS; a K that is not a multiple of the 16-lane step takes the zero-padded tail
    counts = list(range(1, 10))
    offsets = offsets_from_counts(counts)
    E, M = len(counts), 10
    a, w, _, bias = make_inputs(int(offsets[-1]), K, M, E, "random", with_bias=True, dtype=dtype)
    with moe_kernels.use_backend("native"):
        out = grouped_mm(a, w, offsets, bias)
    ref64 = naive_grouped_mm(a, w, offsets, bias, "identity", False)
    if dtype == F64:
        assert_close64(out, ref64, "out")
    else:
        assert_earned_dtype(out, ref64, same_dtype_grouped_mm(a, w, offsets, bias, "identity", False))


def cpu_flags():
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype, flush_denormal", [(torch.bfloat16, False), (torch.float16, False),
                                                    (torch.float16, True)],
                         ids=["bf16", "fp16", "fp16-flush-denormal"])
def test_native_streaming_every_16bit_value(dtype, flush_denormal):
    # the streaming kernel widens 16-bit weights in vector code (fp16: exponent and mantissa rebased, subnormals,
    # inf and NaN by hand): every one of the 65536 bit patterns, at every lane of a 32-element step, through rows of
    # a that are one-hot, must come back as itself, as float64 computes it (NaN where a zero meets inf or NaN).
    # fp16 under torch.set_flush_denormal(True) too: its subnormals are normal float32 values and must stay exact
    # (bf16's subnormals are float32's own, which that mode flushes by its meaning)
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    w = values.view(1, 2048, 32)                      # one expert, M = 2048 weight rows of K = 32
    offsets = torch.tensor([0, 8], dtype=torch.int32)
    for lo in range(0, 32, 8):                        # 8 rows a call: the streaming path (up to 8 rows)
        a = torch.zeros(8, 32, dtype=dtype)
        a[torch.arange(8), torch.arange(lo, lo + 8)] = 1
        with moe_kernels.use_backend("native"), num_threads(1):
            torch.set_flush_denormal(flush_denormal)
            try:
                out = grouped_mm(a, w, offsets)       # out[r, m] = w[0, m, lo + r]
            finally:
                torch.set_flush_denormal(False)
        want = (a.double() @ w[0].double().t()).to(dtype)
        assert bool((want[~want.isnan()] == w[0, :, lo:lo + 8].t()[~want.isnan()]).all())  # the values themselves
        same = (out == want) | (out.isnan() & want.isnan())
        assert bool(same.all()), f"{int((~same).sum())} values differ, e.g. {want[~same][:4]} -> {out[~same][:4]}"


@pytest.mark.skipif(not _backend.NATIVE or platform.machine() not in ("x86_64", "AMD64"),
                    reason="native extension not built, or not x86-64")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_native_kernels_at_every_isa_level(isa):
    # the vectorised kernels are built for each ISA level and picked once per process: run the streaming, decode,
    # activation-epilogue and routing (float64 exp) tests in a process capped at each level (a level the CPU lacks
    # runs the widest it has below it)
    env = {**os.environ, "MOE_KERNELS_CPU_ISA": isa}
    order = ["baseline", "avx2", "avx512"]
    got, bf16_gemm = subprocess.run(
        [sys.executable, "-c", "from moe_kernels import _backend; print(_backend.native_cpu_isa()); "
         "print(_backend.native_cpu_bf16_gemm())"],
        env=env, capture_output=True, text=True, check=True).stdout.split()
    assert got in order[:order.index(isa) + 1], f"MOE_KERNELS_CPU_ISA={isa} ran with {got}"
    # bf16 GEMMs run in bf16 exactly where the CPU has bf16 dot products, at the avx512 level; below it they widen
    # (so on such a CPU this test runs the bf16 tests in both modes)
    assert bf16_gemm == str(got == "avx512" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})), (got, bf16_gemm)
    tests = ["tests/ops/test_grouped_gemm.py", "tests/ops/test_expert_mlp.py", "tests/ops/test_routing.py", "-k",
             "native_streaming or ((decode or every_activation or wide_pre or beyond_exp or low_precision or route) "
             "and native)"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "deselected" in done.stdout


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
def test_native_isa_cap_must_be_known():
    env = {**os.environ, "MOE_KERNELS_CPU_ISA": "sse9"}
    done = subprocess.run([sys.executable, "-c", "from moe_kernels import _backend; _backend.native_cpu_isa()"],
                          env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "MOE_KERNELS_CPU_ISA must be avx512, avx2 or baseline, got 'sse9'" in done.stderr


# --- bad input --------------------------------------------------------------------------------------
def _bad_cases():
    """(id, change to the good keyword arguments, exception, message pattern naming the argument)."""
    return [
        ("a-rank3", lambda k: k.update(a=k["a"][None]), ValueError, r"^a must have 2 dimensions"),
        ("a-rank1", lambda k: k.update(a=k["a"][0]), ValueError, r"^a must have 2 dimensions"),
        ("a-not-tensor", lambda k: k.update(a=k["a"].tolist()), TypeError, r"^a must be a torch\.Tensor"),
        ("a-int", lambda k: k.update(a=k["a"].long()), TypeError, r"^a must have dtype"),
        ("w-rank2", lambda k: k.update(w=k["w"][0]), ValueError, r"^w must have 3 dimensions"),
        ("K-mismatch", lambda k: k.update(a=k["a"][:, :-1]), ValueError, r"a: \[N, K\] and w: \[E, M, K\] must share K"),
        ("offsets-int64", lambda k: k.update(offsets=k["offsets"].long()), TypeError, r"^offsets must have dtype"),
        ("offsets-float", lambda k: k.update(offsets=k["offsets"].float()), TypeError, r"^offsets must have dtype"),
        ("offsets-short", lambda k: k.update(offsets=k["offsets"][:-1]), ValueError, r"^offsets must have shape"),
        ("offsets-2d", lambda k: k.update(offsets=k["offsets"][None]), ValueError, r"^offsets must have shape"),
        ("bias-shape", lambda k: k.update(bias=k["bias"][:, :-1]), ValueError, r"^bias must have shape"),
        ("bias-rank", lambda k: k.update(bias=k["bias"][0]), ValueError, r"^bias must have shape"),
        ("bias-dtype", lambda k: k.update(bias=k["bias"].double()), TypeError, r"share a dtype.*bias"),
        ("dtype-mismatch", lambda k: k.update(w=k["w"].double()), TypeError,
         r"share a dtype.*a torch\.float32.*w torch\.float64"),
        ("odd-M-gated", lambda k: k.update(w=k["w"][:, :-1], bias=k["bias"][:, :-1], gated=True), ValueError,
         r"gated=True needs an even output width.*w \(3, 5, 4\)"),
        ("activation", lambda k: k.update(activation="swish"), ValueError, r"^activation must be one of"),
    ]


@pytest.mark.parametrize("change, exc, match", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_input_raises_naming_the_argument(backend, change, exc, match):
    kwargs = dict(a=torch.randn(5, 4), w=torch.randn(3, 6, 4), offsets=torch.tensor([0, 2, 2, 5], dtype=torch.int32),
                  bias=torch.randn(3, 6), activation="silu", gated=False)
    grouped_mm(**kwargs)  # the unchanged arguments are fine
    change(kwargs)
    with pytest.raises(exc, match=match):
        grouped_mm(**kwargs)
