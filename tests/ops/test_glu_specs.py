"""Activation spec strings (moe_kernels.reference.activations) on the native CPU ops: relu2 and every GLU option
(alpha, limit, clamp_after, up_offset, interleaved, the softcaps) in the ops' own epilogues, forward and backward.

grouped_mm and moe_mlp against naive float64 loops (tests/ops/test_grouped_gemm.py, test_expert_mlp.py) and the
reference: float64 exactly, float32, bfloat16 and float16 within the earned tolerance; pre-activations exactly on
the clamps' bounds, NaN and +-inf; groups of up to 8 rows (decode: the streaming GEMM and, in moe_mlp, the scalar
epilogue) and of many; the native ops called directly with a spec string (no fallback to the reference can answer
for them), and malformed specs refused by the ops themselves. The vectorised epilogues are built per ISA level: the
native tests here run again at every level the CPU has.
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
from moe_kernels.reference import expert_mlp as ref_mlp
from moe_kernels.ops import grouped_mm, moe_mlp
from moe_kernels.ops import expert_mlp as ops_expert_mlp
from moe_kernels.ops import grouped_gemm as ops_grouped_gemm
from moe_kernels.reference.activations import glu, glu_backward, parse_activation
from tests.helpers import (BEYOND_EXP, GLU_SPECS, assert_close64, assert_earned_max, assert_moe_mlp_earned,
                           rand_experts, reordered_sum_atol, run_moe_mlp)
from tests.ops.test_expert_mlp import naive_moe_mlp
from tests.ops.test_grouped_gemm import make_inputs, naive_grouped_mm, offsets_from_counts

F64 = torch.float64
LOW = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
       pytest.param(torch.float16, id="fp16")]

# (spec, gated): the specs of the transformers families (tests/helpers.GLU_SPECS), relu2 gated and not, and every
# option on every base activation the native ops compute (the vectorised silu, relu, relu2 and identity, ATen's
# gelus), every option at once
SPECS = ([pytest.param(s, True, id=s) for s in GLU_SPECS]
         + [pytest.param("relu2", True, id="relu2-gated"), pytest.param("relu2", False, id="relu2-plain"),
            pytest.param("silu[alpha=0.5]", False, id="silu[alpha=0.5]-plain"),
            pytest.param("relu2[limit=4.0,clamp_after,interleaved]", True, id="relu2[limit=4.0,clamp_after,interleaved]"),
            pytest.param("relu[limit=3.0,up_offset=0.75,up_softcap=2.5]", True,
                         id="relu[limit=3.0,up_offset=0.75,up_softcap=2.5]"),
            pytest.param("identity[limit=1.5,clamp_after,up_offset=-0.25]", True,
                         id="identity[limit=1.5,clamp_after,up_offset=-0.25]"),
            pytest.param("gelu[limit=2.5,interleaved]", True, id="gelu[limit=2.5,interleaved]"),
            pytest.param("silu[alpha=1.702,limit=7.0,clamp_after,up_offset=1.0,interleaved,gate_softcap=5.0,"
                         "up_softcap=6.0]", True, id="silu-every-option")])
# the specs with a clamp, for the bounds and non-finite values
CLAMPED = ["silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", "silu[limit=7.0,clamp_after]",
           "relu2[limit=4.0,clamp_after,interleaved]", "identity[limit=1.5,clamp_after,up_offset=-0.25]",
           "relu[limit=3.0,up_offset=0.75,up_softcap=2.5]", "gelu_tanh[limit=2.0,up_offset=0.5,interleaved]",
           "silu[alpha=1.702,limit=7.0,clamp_after,up_offset=1.0,interleaved,gate_softcap=5.0,up_softcap=6.0]"]
PATHS = [pytest.param("decode", id="decode"), pytest.param("many", id="many")]
native_only = pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")

# pre-activations of a few units: the clamps (limits 1.5 to 10) and the softcaps engage
SCALE = 4.0


def _on_grid(t, step):
    """t rounded to multiples of step (a power of two)."""
    return (t / step).round() * step


def _counts(path):
    """Group sizes of grouped_mm: up to 8 rows a group streams the weights (decode), more goes to BLAS."""
    return [3, 8, 1, 0, 5, 2] if path == "decode" else [40, 17, 0, 23]


# --- grouped_mm --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation, gated", SPECS)
def test_grouped_mm_every_spec_float64(backend, activation, gated, path):
    # forward and every gradient against the naive loop (autograd through it) and the reference; N = 11 outputs a
    # row (a partial vector at every ISA level), rows past offsets[E]
    offsets = offsets_from_counts(_counts(path))
    E, K, N = offsets.numel() - 1, 9, 11
    M = 2 * N if gated else N
    a, w, _, bias = make_inputs(int(offsets[-1]) + 3, K, M, E, "random", with_bias=True)
    a = a * SCALE
    leaves = [t.requires_grad_() for t in (a, w, bias)]
    out = grouped_mm(a, w, offsets, bias, activation=activation, gated=gated)
    want = naive_grouped_mm(a, w, offsets, bias, activation, gated)
    assert_close64(out, want, "out vs naive loop")
    assert_close64(out, ref.grouped_mm(a, w, offsets, bias, activation, gated), "out vs reference")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    naive = torch.autograd.grad(want, leaves, grad_out)
    spec = ref.grouped_mm_backward(grad_out, a.detach(), w.detach(), offsets, bias.detach(), activation, gated)
    for name, g, n, s in zip(("grad_a", "grad_w", "grad_bias"), got, naive, spec):
        assert_close64(g, n, f"{name} vs naive autograd")
        assert_close64(g, s, f"{name} vs reference backward")


def _same_dtype_grouped_mm(a, w, offsets, bias, activation, gated):
    """Plain PyTorch in the inputs' dtype: the reference's own ops (the baseline of the earned tolerance)."""
    return ref.grouped_mm(a, w, offsets, bias, activation, gated)


@native_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation, gated", SPECS)
def test_native_grouped_mm_low_precision_earned(activation, gated, path, dtype):
    # forward and every gradient against the naive float64 loop on the same rounded inputs, within twice the error
    # of plain PyTorch in the same dtype over each tensor (plus what reordering a sum of up to N terms may add).
    # The clamps and relu's threshold are discontinuous: a pre-activation that one dtype's rounding puts on the
    # other side of a bound than float64 does costs a jump no tolerance earns, so the inputs lie on a grid (a and
    # bias multiples of 1/2 and 1/16, w of 1/8) on which every dtype computes the pre-activation exactly (below 16
    # in magnitude; beyond, no bound is near) and the limits, multiples of 1/4, are hit exactly
    counts = [8, 3, 8, 7, 1, 8, 6, 8, 5] * 4 if path == "decode" else [150, 97, 0, 160]
    offsets = offsets_from_counts(counts)
    E, K, N = offsets.numel() - 1, 31, 9
    M = 2 * N if gated else N
    rows = int(offsets[-1])
    a, w, _, bias = make_inputs(rows, K, M, E, "random", with_bias=True)
    a, w, bias = (_on_grid(a * SCALE, 0.5).to(dtype), _on_grid(w, 0.125).to(dtype),
                  _on_grid(bias, 0.0625).to(dtype))
    grad_out = torch.randn(rows, N, dtype=F64)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (a, w, bias)]
        out = fn(leaves[0], leaves[1], offsets, leaves[2], activation, gated)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

    with moe_kernels.use_backend("native"):
        fast = run(lambda *args: grouped_mm(*args[:4], activation=args[4], gated=args[5]), dtype)
    ref64 = run(naive_grouped_mm, F64)
    same = run(_same_dtype_grouped_mm, dtype)
    for name, f, r, b in zip(("out", "grad_a", "grad_w", "grad_bias"), fast, ref64, same):
        assert f.dtype == dtype
        assert_earned_max(f, r, b, atol=1e-6 + reordered_sum_atol(r, dtype, max(K, rows)), name=name)


# --- moe_mlp --------------------------------------------------------------------------------------------
def _moe_inputs(T, D, H, E, k, gated, dtype=F64, grid=False):
    """grid: x, gate_up_proj and gate_up_bias on the grid of test_native_grouped_mm_low_precision_earned, where
    every dtype computes the pre-activation exactly."""
    x = torch.randn(T, D, dtype=F64) * SCALE
    experts = rand_experts(T, k, E)
    weights = torch.rand(T, k, dtype=F64) + 0.05
    gate_up = torch.randn(E, 2 * H if gated else H, D, dtype=F64) / math.sqrt(D)
    down = torch.randn(E, D, H, dtype=F64) / math.sqrt(H)
    gate_up_bias = torch.randn(E, 2 * H if gated else H, dtype=F64)
    if grid:
        x, gate_up, gate_up_bias = _on_grid(x, 0.5), _on_grid(gate_up, 0.125), _on_grid(gate_up_bias, 0.0625)
    down_bias = torch.randn(E, D, dtype=F64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(x=cast(x), experts=experts, weights=cast(weights), gate_up_proj=cast(gate_up), down_proj=cast(down),
                gate_up_bias=cast(gate_up_bias), down_bias=cast(down_bias))


# (T, E, k): up to 8 rows an expert (decode: the streaming GEMMs and the scalar epilogue), or dozens
MOE_SHAPES = {"decode": (6, 5, 2), "many": (60, 3, 2)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation, gated", SPECS)
def test_moe_mlp_every_spec_float64(backend, activation, gated, path):
    T, E, k = MOE_SHAPES[path]
    D, H = 9, 11
    i = _moe_inputs(T, D, H, E, k, gated)
    names = ("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")
    leaves = [i[n].requires_grad_() for n in names]
    kw = dict(activation=activation, gated=gated, gate_up_bias=i["gate_up_bias"], down_bias=i["down_bias"])
    out = moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"], **kw)
    want = naive_moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"], i["gate_up_bias"],
                         i["down_bias"], activation=activation, gated=gated)
    assert_close64(out, want, "out vs naive loop")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    naive = torch.autograd.grad(want, leaves, grad_out)
    for name, g, n in zip(names, got, naive):
        assert_close64(g, n, f"grad of {name} vs naive autograd")


@native_only
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation, gated", SPECS)
def test_native_moe_mlp_low_precision_earned(activation, gated, path, dtype):
    # output and every gradient against the float64 reference on the same rounded inputs, within twice the error
    # of the reference in the same dtype (tests/helpers.assert_moe_mlp_earned); decode: 4 tokens over 32 experts.
    # Inputs on the grid where the pre-activation is exact in every dtype (see the grouped_mm test)
    T, E, k = (4, 32, 4) if path == "decode" else (96, 5, 2)
    D, H = 40, 13
    inputs = _moe_inputs(T, D, H, E, k, gated, dtype, grid=True)
    grad = torch.randn(T, D, dtype=dtype)
    kw = dict(activation=activation, gated=gated)
    fast = run_moe_mlp("native", inputs, grad, **kw)
    assert fast[0].dtype == dtype
    assert_moe_mlp_earned(run_moe_mlp, inputs, grad, fast, dtype, D + H + T * k, **kw)


# --- pre-activations exactly on the bounds -----------------------------------------------------------------
def _identity_moe_mlp(x, activation, E, rows_per_expert):
    """moe_mlp with k = 1, routing weights 1 and identity projections ([2N, 2N] up, [N, N] down): the
    pre-activation is x exactly, the output glu(x) and the gradient of x that of glu (each rounded once to x's
    dtype). Tokens go to the experts in turn, rows_per_expert each."""
    T, M = x.shape
    gated = True
    N = M // 2
    experts = (torch.arange(T) // rows_per_expert % E)[:, None]
    weights = torch.ones(T, 1, dtype=x.dtype)
    up = torch.eye(M, dtype=x.dtype).expand(E, M, M).contiguous()
    down = torch.eye(N, dtype=x.dtype).expand(E, N, N).contiguous()
    return moe_mlp(x, experts, weights, up, down, activation=activation, gated=gated)


def _bound_values(limit):
    """Values on, just inside and just outside the clamps' bounds, and around zero, as float64."""
    up_ = math.nextafter
    return [-2 * limit, up_(-limit, -math.inf), -limit, up_(-limit, 0.0), -limit / 2, -0.0, 0.0, 0.25,
            up_(limit, 0.0), limit, up_(limit, math.inf), 2 * limit, math.sqrt(limit)]


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="fp64"), *LOW])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", CLAMPED)
def test_native_pre_activations_on_the_bounds(activation, path, dtype):
    # every pair of (gate, up) from values on, inside and outside +-limit (and sqrt(limit): relu2's act(gate) =
    # limit exactly, the bound of clamp_after; identity's and relu's at gate = limit): torch.clamp's gradient
    # passes on the bounds (included) and is 0 beyond them. The output and gradient of x against the reference's
    # glu and glu_backward in float64 at the same (rounded) values, and zero exactly where the reference is zero
    a = parse_activation(activation)
    vals = torch.tensor(_bound_values(a.limit), dtype=F64).to(dtype).double()  # as the dtype represents them
    n = vals.numel()
    gate = vals.repeat(n)                      # every (gate, up) pair
    up = vals.repeat_interleave(n)
    N = 13
    rows = gate.numel() // N
    gate, up = gate[:rows * N].view(rows, N), up[:rows * N].view(rows, N)
    pre = torch.stack([gate, up], -1).flatten(-2) if a.interleaved else torch.cat([gate, up], 1)
    x = pre.to(dtype).requires_grad_()
    E, per_expert = (rows, 1) if path == "decode" else (1, rows)
    with moe_kernels.use_backend("native"):
        out = _identity_moe_mlp(x, activation, E, per_expert)
        grad_out = torch.randn(rows, N, dtype=F64).to(dtype)
        grad_x, = torch.autograd.grad(out, x, grad_out)
    want = glu(pre, activation, True)
    want_grad = glu_backward(grad_out.double(), pre, activation, True)
    for name, got, exact in (("out", out, want), ("grad_x", grad_x, want_grad)):
        got = got.double()
        assert torch.equal(got == 0, exact.to(dtype) == 0), (
            f"{name}: zero where the reference is not, or the reverse, at (pre, got, reference) "
            f"{[(p, g, e) for p, g, e in zip(pre.flatten().tolist(), got.flatten().tolist(), exact.flatten().tolist()) if (g == 0) != (e == 0)][:6]}")
        if dtype == F64:
            assert_close64(got, exact, name)
        else:
            tol = {torch.float32: 4e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
            torch.testing.assert_close(got, exact, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# --- NaN and +-inf ---------------------------------------------------------------------------------------
def check_spec_beyond_exp_range(activation, run):
    """A gated spec at float32 pre-activations from -inf to inf, NaN included, with gate = up = the value:
    run(a [n, 1]) -> (out [n, 1], grad_a) of an op whose pre-activation is [a, a]. Output and input gradient as
    torch computes them through the reference's glu (torch.clamp, tanh, ...) with autograd, in float32 or in
    float64 rounded to float32, NaN exactly where torch's is (tests/helpers.check_beyond_exp_range's rule)."""
    pre = torch.tensor(BEYOND_EXP * 2, dtype=torch.float32)[torch.randperm(2 * len(BEYOND_EXP))]
    out, grad_a = run(pre[:, None].clone())

    def torch_values(dtype):
        x = pre[:, None].to(dtype).requires_grad_()
        want = glu(torch.cat([x, x], 1), activation, True)
        want_grad, = torch.autograd.grad(want, x, torch.ones_like(want))
        return want.float(), want_grad.float()

    (want, want_grad), (want64, want_grad64) = torch_values(torch.float32), torch_values(F64)
    for name, got, expected, exact in (("out", out, want, want64), ("grad_a", grad_a, want_grad, want_grad64)):
        got, expected, exact = got.flatten(), expected.flatten(), exact.flatten()
        ok = (torch.isclose(got, expected, rtol=1e-5, atol=1e-36, equal_nan=True) |
              torch.isclose(got, exact, rtol=1e-5, atol=1e-36, equal_nan=True))
        bad = sorted({(p, g, e, x) for p, g, e, x, o in zip(pre.tolist(), got.tolist(), expected.tolist(),
                                                            exact.tolist(), ok.tolist()) if not o})
        assert not bad, f"{activation} {name}: (pre-activation, got, torch's, torch's in float64) {bad}"


# the clamped specs, relu2 and the softcaps: softcaps small enough that tanh saturates in float32 at the moderate
# values here (20 and beyond), where with a larger one 1 - tanh^2 cancels to fewer digits than the rule's 1e-5 (in
# torch's autograd as in the reference's own backward)
BEYOND_SPECS = (["relu2", "silu[gate_softcap=2.0,up_softcap=3.0]", "silu[alpha=1.702,up_offset=1.0]",
                 "silu[alpha=1.702,limit=7.0,clamp_after,up_offset=1.0,interleaved,gate_softcap=2.0,up_softcap=3.0]"]
                + [s for s in CLAMPED if "gate_softcap=5.0" not in s])


@pytest.mark.parametrize("activation", BEYOND_SPECS)
def test_grouped_mm_specs_beyond_exp_range(backend, activation):
    def run(a):
        a.requires_grad_()
        out = grouped_mm(a, torch.ones(1, 2, 1), torch.tensor([0, a.shape[0]], dtype=torch.int32),
                         activation=activation, gated=True)
        return out, torch.autograd.grad(out, a, torch.ones_like(out))[0]
    check_spec_beyond_exp_range(activation, run)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", BEYOND_SPECS)
def test_moe_mlp_specs_beyond_exp_range(backend, activation, path):
    # one value a token, k = 1, weight 1, projections of ones: out = glu([x, x]); decode: 8 experts of up to 7 tokens
    E = 8 if path == "decode" else 1

    def run(x):
        x.requires_grad_()
        T = x.shape[0]
        experts = (torch.arange(T) % E)[:, None]
        out = moe_mlp(x, experts, torch.ones(T, 1), torch.ones(E, 2, 1), torch.ones(E, 1, 1), activation=activation)
        return out, torch.autograd.grad(out, x, torch.ones_like(out))[0]
    check_spec_beyond_exp_range(activation, run)


# --- the native ops themselves ---------------------------------------------------------------------------
@native_only
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation, gated", SPECS)
def test_native_ops_compute_every_spec(activation, gated, path, monkeypatch):
    # the native backend takes every spec, and its ops compute them: called directly with the spec string, and
    # through ops.moe_mlp / ops.grouped_mm with the reference's functions made to fail (no fallback answers)
    assert _backend.native_takes(activation)
    T, E, k = MOE_SHAPES[path]
    D, H = 9, 11
    i = _moe_inputs(T, D, H, E, k, gated)
    C = torch.ops.moe_kernels_C
    args = (i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"], i["gate_up_bias"], i["down_bias"])
    out, h_pre, order, inverse, offsets = C.moe_mlp_forward(*args, activation, gated, -1, True)
    r_out, r_pre, r_order, r_inverse, r_offsets = ref_mlp.moe_mlp_fused(*args, activation, gated, None, True)
    assert_close64(out, r_out, "moe_mlp_forward vs reference")
    assert_close64(out, naive_moe_mlp(*args, activation=activation, gated=gated), "moe_mlp_forward vs naive loop")
    grad = torch.randn_like(out)
    got = C.moe_mlp_backward(grad, *args[:1], *args[2:], h_pre, order, inverse, offsets, activation, gated)
    want = ref_mlp.moe_mlp_fused_backward(grad, *args[:1], *args[2:], r_pre, r_order, r_inverse, r_offsets,
                                          activation, gated)
    for name, g, w in zip(("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), got, want):
        assert_close64(g, w, f"moe_mlp_backward: grad of {name} vs reference")
    a, w, offsets, bias = make_inputs(30, 9, 2 * H if gated else H, 4, "dropped", with_bias=True)
    a = a * SCALE
    assert_close64(C.grouped_mm(a, w, offsets, bias, activation, gated),
                   ref.grouped_mm(a, w, offsets, bias, activation, gated), "grouped_mm vs reference")
    grad = torch.randn(30, H, dtype=F64)
    for name, g, r in zip(("a", "w", "bias"), C.grouped_mm_backward(grad, a, w, offsets, bias, activation, gated),
                          ref.grouped_mm_backward(grad, a, w, offsets, bias, activation, gated)):
        assert_close64(g, r, f"grouped_mm_backward: grad of {name} vs reference")

    def refuse(*_, **__):
        raise AssertionError(f"the reference ran for {activation!r} on the native backend")
    for module, names in ((ops_expert_mlp.ref, ("moe_mlp_fused", "moe_mlp_fused_backward")),
                          (ops_grouped_gemm.ref, ("grouped_mm", "grouped_mm_backward"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    leaves = [t.detach().clone().requires_grad_() for t in (i["x"], i["gate_up_proj"])]
    with moe_kernels.use_backend("native"):
        y = moe_mlp(leaves[0], i["experts"], i["weights"], leaves[1], i["down_proj"], activation=activation,
                    gated=gated, gate_up_bias=i["gate_up_bias"], down_bias=i["down_bias"])
        torch.autograd.grad(y, leaves, torch.randn_like(y))
        g = grouped_mm(a.requires_grad_(), w, offsets, bias, activation=activation, gated=gated)
        torch.autograd.grad(g, a, torch.randn_like(g))


# spec strings: whether the Python side takes them (a ValueError when not) must be whether the native ops do
SPEC_STRINGS = ["silu", " silu ", "relu2", "silu [limit=7.0]", "silu[ limit=7.0 , interleaved ]", "silu[limit=7]",
                "silu[limit=+7.0,up_offset=-1e-1]", "silu[limit=7.,up_offset=.5]", "silu[limit=7.0,]",
                "silu[alpha=1.702,alpha=2.0]", "silu[]", "gelu_tanh[up_softcap=3.0]", "silu[gate_softcap=1e1]",
                # malformed
                "swish", "Silu", "silu[limit=7.0", "silu(limit=7.0)", "silu[foo=1.0]", "silu[limit=abc]",
                "silu[limit = 7.0]", "silu[limit=1e]", "silu[limit=7.0.1]", "silu[limit=+-7.0]", "silu[limit=inf]",
                "silu[limit=-inf]", "silu[limit=-1.0]", "silu[limit=0.0]", "silu[clamp_after]", "gelu[alpha=2.0]",
                "relu[gate_softcap=2.0]", "silu[up_softcap=0.0]", "silu[alpha=+inf]", "silu[up_offset=-inf]",
                "silu[interleaved=1]", "silu[limit=7.0][interleaved]", "silu limit", ""]


@native_only
@pytest.mark.parametrize("gated", [pytest.param(True, id="gated"), pytest.param(False, id="plain")])
@pytest.mark.parametrize("spec", SPEC_STRINGS)
def test_native_ops_parse_specs_as_python_does(spec, gated):
    # the native ops parse the spec string themselves (they can be called directly): they take what
    # moe_kernels.reference.activations.check_activation takes, computing the same as its canonical form, and refuse
    # the rest with an error naming the op and the activation
    from moe_kernels.reference.activations import check_activation

    a, w, offsets, bias = make_inputs(12, 5, 8, 2, "random", with_bias=True)
    C = torch.ops.moe_kernels_C
    try:
        canonical = str(check_activation(spec, gated))
    except ValueError:
        with pytest.raises(RuntimeError, match=r"grouped_mm: activation"):
            C.grouped_mm(a, w, offsets, bias, spec, gated)
        return
    assert_close64(C.grouped_mm(a, w, offsets, bias, spec, gated), C.grouped_mm(a, w, offsets, bias, canonical, gated),
                   f"{spec!r} vs {canonical!r}")


# --- every ISA level ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not _backend.NATIVE or platform.machine() not in ("x86_64", "AMD64"),
                    reason="native extension not built, or not x86-64")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_native_glu_at_every_isa_level(isa):
    # the vectorised epilogues (plain and with options, forward and backward) are built per ISA level and picked
    # once per process: this file's native tests in a process capped at each level (a level the CPU lacks runs the
    # widest it has below it)
    env = {**os.environ, "MOE_KERNELS_CPU_ISA": isa}
    got = subprocess.run([sys.executable, "-c", "from moe_kernels import _backend; print(_backend.native_cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    order = ["baseline", "avx2", "avx512"]
    assert got in order[:order.index(isa) + 1], f"MOE_KERNELS_CPU_ISA={isa} ran with {got}"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "native and not every_isa_level and not parse_specs"], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2], timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "deselected" in done.stdout
