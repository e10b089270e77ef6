"""moe_kernels.ops.dense_moe (custom ops moe_kernels::dense_moe and ::dense_moe_backward): every expert on every
token, weighted by a dense gate.

Oracles: a naive loop over tokens and experts calling a per-expert MLP written with explicit matrix-vector
products in float64, and moe_kernels.reference.dense_moe (the spec). Lower precision passes on the earned
tolerance against plain PyTorch in the same dtype (one matmul pair per expert). Also: gradcheck, opcheck,
determinism, NaN isolation, strides, bad input.
"""
import math

import pytest
import torch

from moe_kernels import reference as ref
from moe_kernels.ops import dense_moe
from moe_kernels.reference.activations import ACTIVATIONS
from tests.helpers import (assert_close64, assert_grads_close64, assert_earned_dtype, naive_glu,
                           poison_, torch_glu)

F64 = torch.float64


# --- independent oracles ------------------------------------------------------------------------------
def naive_dense_moe(x, gates, gate_up, down, gate_up_bias=None, down_bias=None, *, activation="silu", gated=True):
    """out[t] = sum_e gates[t, e] * down_e(glu(gate_up_e x[t])), token by token and expert by expert, float64."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    x, gates, gate_up, down, gate_up_bias, down_bias = map(d, (x, gates, gate_up, down, gate_up_bias, down_bias))
    T, E = gates.shape
    out = poison_(torch.empty(T, down.shape[1], dtype=F64))  # every row must be written below
    for t in range(T):
        acc = torch.zeros(down.shape[1], dtype=F64)
        for e in range(E):
            h = gate_up[e] @ x[t]
            if gate_up_bias is not None:
                h = h + gate_up_bias[e]
            y = down[e] @ naive_glu(h, activation, gated)
            if down_bias is not None:
                y = y + down_bias[e]
            acc = acc + gates[t, e] * y
        out[t] = acc
    return out


def same_dtype_dense_moe(x, gates, gate_up, down, gate_up_bias=None, down_bias=None, *, activation="silu", gated=True):
    """Plain PyTorch in x's dtype: one pair of matmuls per expert, summed."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=x.dtype)
    for e in range(gate_up.shape[0]):
        h = x @ gate_up[e].t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        y = torch_glu(h, activation, gated) @ down[e].t()
        if down_bias is not None:
            y = y + down_bias[e]
        out = out + gates[:, e, None].to(x.dtype) * y
    return out


# --- inputs -----------------------------------------------------------------------------------------
def make_inputs(T, D, H, E, *, gated=True, with_bias=True, dtype=F64, gates_dtype=None, out_dim=None):
    """Projections scaled by 1/sqrt(fan-in) as in a real layer; gates a softmax over all experts. out_dim: the
    output width O of down_proj [E, O, H] (D by default)."""
    O = D if out_dim is None else out_dim
    x = torch.randn(T, D, dtype=F64)
    gates = torch.randn(T, E, dtype=F64).softmax(-1)
    gate_up = torch.randn(E, 2 * H if gated else H, D, dtype=F64) / math.sqrt(D)
    down = torch.randn(E, O, H, dtype=F64) / math.sqrt(H)
    gate_up_bias = torch.randn(E, 2 * H if gated else H, dtype=F64) if with_bias else None
    down_bias = torch.randn(E, O, dtype=F64) if with_bias else None
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return (cast(x), gates.to(gates_dtype or dtype), cast(gate_up), cast(down), cast(gate_up_bias), cast(down_bias))


def call(inputs, **kw):
    x, gates, gate_up, down, gate_up_bias, down_bias = inputs
    return dense_moe(x, gates, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias, **kw)


def spec(inputs, **kw):
    x, gates, gate_up, down, gate_up_bias, down_bias = inputs
    return ref.dense_moe(x, gates, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias, **kw)


# (T, D, H, E)
SHAPES = [
    pytest.param(37, 15, 9, 7, id="T37-D15-H9-E7"),   # prime E, odd D and H
    pytest.param(1, 8, 4, 4, id="T1-D8-H4-E4"),       # T=1 (decode)
    pytest.param(0, 8, 4, 4, id="T0-D8-H4-E4"),       # T=0: an empty batch
    pytest.param(10, 6, 5, 1, id="T10-D6-H5-E1"),     # E=1
    pytest.param(12, 5, 3, 13, id="T12-D5-H3-E13"),   # prime E=13, more experts than D
]
GATED = [pytest.param(False, id="plain"), pytest.param(True, id="gated")]
BIAS = [pytest.param(False, id="nobias"), pytest.param(True, id="bias")]


# --- forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("T, D, H, E", SHAPES)
def test_forward_float64_matches_naive_and_reference(backend, T, D, H, E, gated, with_bias):
    inputs = make_inputs(T, D, H, E, gated=gated, with_bias=with_bias)
    kw = dict(activation="silu", gated=gated)
    out = call(inputs, **kw)
    assert out.shape == (T, D) and out.dtype == F64
    assert_close64(out, naive_dense_moe(*inputs, **kw), "vs naive loop")
    assert_close64(out, spec(inputs, **kw), "vs reference")


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_every_activation(backend, activation, gated):
    inputs = make_inputs(23, 9, 7, 7, gated=gated)  # prime E, odd D and H
    kw = dict(activation=activation, gated=gated)
    out = call(inputs, **kw)
    assert_close64(out, naive_dense_moe(*inputs, **kw), "vs naive loop")
    assert_close64(out, spec(inputs, **kw), "vs reference")


@pytest.mark.parametrize("out_dim", [pytest.param(3, id="O3<D"), pytest.param(11, id="O11>D")])
def test_output_width_differs_from_input_width(backend, out_dim):
    # down_proj [E, O, H] with O != D (a layer whose experts change the width): forward and every gradient
    inputs = make_inputs(13, 7, 5, 4, gated=False, out_dim=out_dim)
    leaves = [t.requires_grad_() for t in inputs]
    kw = dict(activation="relu", gated=False)
    out = call(inputs, **kw)
    assert out.shape == (13, out_dim)
    want = naive_dense_moe(*inputs, **kw)
    assert_close64(out, want, "vs naive loop")
    assert_grads_close64(out, want, leaves, ("x", "gates", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"))


def test_forward_float32_gates_with_float64_experts(backend):
    # gates from a float32 router while the experts run in float64: the gates are taken in x's dtype
    inputs = make_inputs(11, 6, 4, 5, gates_dtype=torch.float32)
    out = call(inputs)
    assert out.dtype == F64
    assert_close64(out, naive_dense_moe(*inputs), "vs naive loop")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gated", GATED)
def test_forward_low_precision_earned(backend, gated, dtype):
    # prime E, odd D and H; T*D = 3968 outputs so that tensor-wide error statistics are stable
    inputs = make_inputs(128, 31, 15, 7, gated=gated, dtype=dtype)
    kw = dict(activation="gelu", gated=gated)
    out = call(inputs, **kw)
    assert out.dtype == dtype
    ref64, same = naive_dense_moe(*inputs, **kw), same_dtype_dense_moe(*inputs, **kw)
    if dtype != torch.float32:
        assert_earned_dtype(out, ref64, same)
        return
    # float32: the op sums the E*H products of its down projection in one GEMM, the per-expert baseline in E
    # GEMMs of H then a sum of E; the long sum's rounding error is ~1.4x the blocked one's (RMS, measured), so
    # its maximum sits at the 2x bound and elementwise or max comparisons fail by chance (36% and 2% of seeds).
    # The same earned rule on the relative RMS error (flash-linear-attention's statistic) is stable (<= 0.83 of
    # the bound in 300 seeds) and still catches any real loss of precision.
    err, base = ((t.double() - ref64).pow(2).mean().sqrt() for t in (out, same))
    assert err <= 2 * base + 1e-7, f"RMS error {err.item():.3g} exceeds the earned {2 * base.item() + 1e-7:.3g}"


# --- backward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu_tanh", False), ("relu", True)],
                         ids=["silu-gated", "gelu_tanh-plain", "relu-gated"])
def test_gradcheck(backend, activation, gated, with_bias):
    inputs = make_inputs(5, 4, 3, 3, gated=gated, with_bias=with_bias)
    leaves = tuple(t.requires_grad_() for t in inputs if t is not None)

    def fn(x, gates, gate_up, down, *biases):
        gate_up_bias, down_bias = biases if biases else (None, None)
        return dense_moe(x, gates, gate_up, down, activation=activation, gated=gated, gate_up_bias=gate_up_bias,
                         down_bias=down_bias)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("gated", GATED)
def test_backward_matches_naive_autograd(backend, gated):
    inputs = make_inputs(19, 9, 5, 7, gated=gated)  # prime E, odd D and H
    leaves = [t.requires_grad_() for t in inputs]
    grad_out = torch.randn(19, 9, dtype=F64)
    kw = dict(activation="gelu", gated=gated)
    got = torch.autograd.grad(call(inputs, **kw), leaves, grad_out)
    want = torch.autograd.grad(naive_dense_moe(*inputs, **kw), leaves, grad_out)
    for name, g, n in zip(("x", "gates", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), got, want):
        assert_close64(g, n, f"grad of {name}")


def test_empty_batch_backward(backend):
    # T=0: the forward gives [0, D]; every parameter gradient is an exact zero of its own shape
    inputs = make_inputs(0, 8, 4, 4)
    leaves = [t.requires_grad_() for t in inputs]
    out = call(inputs)
    assert out.shape == (0, 8)
    grads = torch.autograd.grad(out, leaves, torch.randn(0, 8, dtype=F64))
    for leaf, g in zip(leaves, grads):
        assert g.shape == leaf.shape and bool((g == 0).all())


# --- custom-op registration ---------------------------------------------------------------------------
OPCHECK = [pytest.param(torch.float32, "silu", True, id="fp32-silu-gated"),
           pytest.param(F64, "gelu", False, id="fp64-gelu-plain")]


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype, activation, gated", OPCHECK)
def test_opcheck_forward(backend, dtype, activation, gated, with_bias):
    inputs = [t.requires_grad_() if t is not None else None
              for t in make_inputs(7, 5, 3, 3, gated=gated, with_bias=with_bias, dtype=dtype)]
    for save in (True, False):   # the pre-activation returned for the backward, or not
        torch.library.opcheck(torch.ops.moe_kernels.dense_moe, (*inputs, activation, gated, save))


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("dtype, activation, gated", OPCHECK)
def test_opcheck_backward(backend, dtype, activation, gated, with_bias):
    # the backward op has no autograd of its own (no double backward): its inputs do not require grad
    inputs = make_inputs(7, 5, 3, 3, gated=gated, with_bias=with_bias, dtype=dtype)
    grad = torch.randn(7, 5, dtype=dtype)
    h = torch.ops.moe_kernels.dense_moe(*inputs, activation, gated, True)[1]
    torch.library.opcheck(torch.ops.moe_kernels.dense_moe_backward, (grad, *inputs, h, activation, gated))


# --- determinism, NaN isolation, strides --------------------------------------------------------------
def test_deterministic_forward_and_backward(backend):
    inputs = make_inputs(64, 32, 24, 8, dtype=torch.float32)
    grad_out = torch.randn(64, 32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = call(leaves)
        runs.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


@pytest.mark.parametrize("gated", GATED)
def test_nan_in_one_token_stays_in_its_row(backend, gated):
    inputs = list(make_inputs(20, 8, 4, 5, gated=gated, dtype=torch.float32))
    clean = call(inputs, gated=gated)
    t = 11
    inputs[0] = inputs[0].clone()
    inputs[0][t, 2] = float("nan")
    dirty = call(inputs, gated=gated)
    others = torch.arange(20) != t
    assert torch.equal(dirty[others], clean[others]), "a NaN in one token leaked into another token's row"
    assert bool(dirty[t].isnan().all())


def test_non_contiguous_inputs(backend):
    T, D, H, E = 17, 7, 5, 5
    x = torch.randn(D, T, dtype=F64).t()
    gates = torch.randn(E, T, dtype=F64).softmax(0).t()
    gate_up = (torch.randn(E, D, 2 * H, dtype=F64) / math.sqrt(D)).transpose(1, 2)
    down = (torch.randn(H, E, D, dtype=F64) / math.sqrt(H)).permute(1, 2, 0)
    gate_up_bias = torch.randn(2 * H, E, dtype=F64).t()
    down_bias = torch.randn(2 * E, D, dtype=F64)[::2]
    strided = (x, gates, gate_up, down, gate_up_bias, down_bias)
    assert not any(t.is_contiguous() for t in strided)
    grad_out = torch.randn(T, D, dtype=F64)
    results = []
    for inputs in (strided, tuple(t.contiguous() for t in strided)):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = call(leaves)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=lambda m: f"result {i}: {m}")


# --- bad input --------------------------------------------------------------------------------------
def _bad_cases():
    """(id, change to the good keyword arguments, exception, message pattern naming the argument)."""
    return [
        ("x-rank3", lambda k: k.update(x=k["x"][None]), ValueError, r"^x must have 2 dimensions"),
        ("x-D-mismatch", lambda k: k.update(x=k["x"][:, :-1]), ValueError, r"^x: \[T, D\] must have D = 6"),
        ("x-dtype-mismatch", lambda k: k.update(x=k["x"].double()), TypeError, r"share a dtype.*x torch\.float64"),
        ("gates-T-mismatch", lambda k: k.update(gates=k["gates"][:-1]), ValueError, r"^gates must have shape \(5, 3\)"),
        ("gates-E-mismatch", lambda k: k.update(gates=k["gates"][:, :-1]), ValueError, r"^gates must have shape"),
        ("gates-int", lambda k: k.update(gates=k["gates"].long()), TypeError, r"^gates must have dtype"),
        ("down-H-mismatch", lambda k: k.update(down_proj=k["down_proj"][..., :-1]), ValueError,
         r"gate_up_proj and down_proj must be \[E, 2H, D\] and \[E, O, H\]"),
        ("down-E-mismatch", lambda k: k.update(down_proj=k["down_proj"][:-1]), ValueError, r"gate_up_proj and down_proj"),
        ("gate_up-odd-rows", lambda k: k.update(gate_up_proj=k["gate_up_proj"][:, :-1]), ValueError,
         r"gate_up_proj and down_proj"),
        ("down-rank2", lambda k: k.update(down_proj=k["down_proj"][0]), ValueError, r"^down_proj must have 3 dimensions"),
        ("down-dtype", lambda k: k.update(down_proj=k["down_proj"].double()), TypeError, r"share a dtype.*down_proj"),
        ("gate_up_bias-shape", lambda k: k.update(gate_up_bias=k["gate_up_bias"][:-1]), ValueError,
         r"^gate_up_bias must have shape"),
        ("down_bias-shape", lambda k: k.update(down_bias=k["down_bias"][:, :-1]), ValueError,
         r"^down_bias must have shape"),
        ("activation", lambda k: k.update(activation="tanh"), ValueError, r"^activation must be one of"),
    ]


@pytest.mark.parametrize("change, exc, match", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_input_raises_naming_the_argument(backend, change, exc, match):
    T, D, H, E = 5, 6, 4, 3
    kwargs = dict(x=torch.randn(T, D), gates=torch.randn(T, E).softmax(-1), gate_up_proj=torch.randn(E, 2 * H, D),
                  down_proj=torch.randn(E, D, H), gate_up_bias=torch.randn(E, 2 * H), down_bias=torch.randn(E, D),
                  activation="silu")
    dense_moe(**kwargs)  # the unchanged arguments are fine
    change(kwargs)
    with pytest.raises(exc, match=match):
        dense_moe(**kwargs)
