"""Quantized expert weights (moe_kernels.reference.quantized, ops.QuantizedWeight) and ops.moe_mlp on them: the
dequantisation against the formats' definitions value by value, quantisation's rounding, the container's checks,
and ops.moe_mlp with FP8 / MXFP4 projections on every CPU backend against the float64 reference of the
dequantised weights (edge shapes included); inference only."""
import math

import pytest
import torch

import moe_kernels
from moe_kernels import ops
from moe_kernels.reference import expert_mlp as ref_mlp
from moe_kernels.reference import quantized as ref_q
from tests.helpers import assert_close64, assert_earned_max, rand_experts, reordered_sum_atol

F64 = torch.float64
FORMATS = ["fp8", "mxfp4"]


# --- the formats ------------------------------------------------------------------------------------------------
def test_e2m1_codes_decode_to_their_values():
    # every byte: low nibble then high nibble, sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0
    def e2m1(code):
        sign = -1.0 if code & 8 else 1.0
        exp, man = (code >> 1) & 3, code & 1
        return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))
    data = torch.arange(256, dtype=torch.uint8)
    got = ref_q.unpack_e2m1(data)
    want = torch.tensor([e2m1(c) for b in range(256) for c in (b & 15, b >> 4)], dtype=F64)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_e8m0_scales():
    s = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    got = ref_q.e8m0_to_float(s)
    assert got[:-1].tolist() == [2.0 ** (v - 127) for v in (0, 1, 126, 127, 128, 254)] and math.isnan(got[-1])


@pytest.mark.parametrize("N, K, block", [(200, 96, (128, 128)), (128, 256, (128, 128)), (33, 70, (16, 32))])
def test_fp8_dequantize_applies_each_blocks_scale(N, K, block):
    E = 2
    data = (torch.randn(E, N, K) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(ref_q.fp8_scale_shape(E, N, K, block), dtype=torch.float32) + 0.1
    got = ref_q.dequantize_fp8(data, scale, block)
    for e, n, k in [(0, 0, 0), (1, N - 1, K - 1), (0, N // 2, K // 3), (1, min(N - 1, block[0]), 1)]:
        assert got[e, n, k] == data[e, n, k].double() * scale[e, n // block[0], k // block[1]].double()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_rounds_to_nearest_and_roundtrips(fmt):
    w = torch.randn(3, 130, 96, dtype=F64)
    q = ops.QuantizedWeight.quantize(w, fmt)
    deq = q.dequantize(F64)
    assert deq.shape == w.shape == (3, 130, 96) and q.shape == (3, 130, 96)
    again = ops.QuantizedWeight.quantize(deq, fmt).dequantize(F64)
    assert torch.equal(again, deq)                  # representable values stay as they are
    if fmt == "fp8":   # nearest e4m3 of the scaled value, which the quantizer forms in float32 (w.float() / scale):
        # within half an e4m3 step (3 mantissa bits) of it
        s32 = q.scale.repeat_interleave(128, 1)[:, :130].repeat_interleave(128, 2)[:, :, :96]
        v = (w.float() / s32).double()
        step = torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6)))) / 8
        assert ((deq / s32.double() - v).abs() <= step / 2).all()
    else:              # the block's scale: 2^(floor(log2 amax) - 2)
        blocks = w.view(3, 130, 3, 32)
        want = torch.floor(torch.log2(blocks.abs().amax(-1))) - 2 + 127
        assert torch.equal(q.scale.double(), want)


def test_mxfp4_rounding_ties_to_even_codes_and_saturates():
    # scale 1 (amax in [4, 8)): 0.25 lies between 0 and 0.5 (to 0, the even code), 2.5 between 2 and 3 (to 2),
    # 5 between 4 and 6 (to 4), 7 saturates to 6
    w = torch.zeros(1, 1, 32, dtype=F64)
    w[0, 0, :6] = torch.tensor([0.25, 2.5, 5.0, 7.0, -1.25, 0.75])
    got = ops.QuantizedWeight.quantize(w, "mxfp4").dequantize(F64)[0, 0, :6]
    assert got.tolist() == [0.0, 2.0, 4.0, 6.0, -1.0, 1.0]


# --- the container -----------------------------------------------------------------------------------------------
def test_quantized_weight_checks_name_the_argument():
    E, N, K = 2, 64, 96
    data = torch.zeros(E, N, K).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"weight.scale must have shape \(2, 1, 1\), got \(2, 1, 2\)"):
        ops.QuantizedWeight.fp8(data, torch.ones(2, 1, 2))
    with pytest.raises(TypeError, match=r"weight.data must have dtype in \(float8_e4m3fn\)"):
        ops.QuantizedWeight.fp8(torch.zeros(E, N, K), torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match=r"mxfp4 data \[E, N, K/2\] needs K a multiple of 32"):
        ops.QuantizedWeight.mxfp4(torch.zeros(E, N, 20, dtype=torch.uint8), torch.zeros(E, N, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"weight.scale must have shape \(2, 64, 3\)"):
        ops.QuantizedWeight.mxfp4(torch.zeros(E, N, 48, dtype=torch.uint8), torch.zeros(E, N, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="format must be one of"):
        ops.QuantizedWeight.quantize(torch.randn(E, N, K), "int4")
    if hasattr(torch, "float8_e8m0fnu"):     # the checkpoints' e8m0 dtype is taken as its bytes
        q = ops.QuantizedWeight.mxfp4(torch.zeros(E, N, 48, dtype=torch.uint8),
                                      torch.full((E, N, 3), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu))
        assert q.scale.dtype == torch.uint8 and q.nbytes == E * N * 48 + E * N * 3


# --- ops.moe_mlp on quantized weights ----------------------------------------------------------------------------
def _inputs(T, D, H, E, k, fmt, gated=True, dtype=torch.float32, bias=False, experts=None):
    x = torch.randn(T, D, dtype=F64)
    up = ops.QuantizedWeight.quantize(torch.randn(E, 2 * H if gated else H, D) / D ** 0.5, fmt)
    down = ops.QuantizedWeight.quantize(torch.randn(E, D, H) / H ** 0.5, fmt)
    return dict(x=x.to(dtype), experts=rand_experts(T, k, E) if experts is None else experts,
                weights=(torch.rand(T, k, dtype=F64) + 0.05).to(dtype), gate_up_proj=up, down_proj=down,
                gate_up_bias=torch.randn(E, 2 * H if gated else H).to(dtype) if bias else None,
                down_bias=torch.randn(E, D).to(dtype) if bias else None)


def _reference64(i, **kw):
    as64 = lambda t: None if t is None else t.to(F64)  # noqa: E731
    return ref_mlp.moe_mlp(as64(i["x"]), i["experts"], as64(i["weights"]), i["gate_up_proj"].dequantize(F64),
                           i["down_proj"].dequantize(F64), gate_up_bias=as64(i["gate_up_bias"]),
                           down_bias=as64(i["down_bias"]), **kw)


def _moe_mlp(i, **kw):
    with torch.no_grad():
        return ops.moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"],
                           gate_up_bias=i["gate_up_bias"], down_bias=i["down_bias"], **kw)


SPECS = [pytest.param(dict(activation="silu", gated=True), id="swiglu"),
         pytest.param(dict(activation="gelu", gated=False), id="gelu-plain"),
         pytest.param(dict(activation="silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", gated=True),
                      id="gpt-oss")]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kw", SPECS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [3, 40], ids=["decode", "many"])
def test_moe_mlp_quantized_float64(backend, fmt, kw, bias, T):
    # float64 activations: exactly the float64 math on the dequantised weights; for FP8 K = 96 and 72, N = 2*72
    # and 96, not multiples of its 128 block (MXFP4's K is a multiple of 32 by its layout)
    i = _inputs(T, 96, 72 if fmt == "fp8" else 96, 5, 2, fmt, gated=kw["gated"], dtype=F64, bias=bias)
    assert_close64(_moe_mlp(i, **kw), _reference64(i, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [4, 64], ids=["decode", "many"])
def test_moe_mlp_quantized_low_precision_earned(backend, fmt, dtype, T):
    # within twice the error of the reference computed in the same dtype on the same dequantised weights
    i = _inputs(T, 64, 96, 6, 2, fmt, dtype=dtype)
    got = _moe_mlp(i)
    assert got.dtype == dtype
    want = _reference64(i)
    low = ref_mlp.moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"].dequantize(dtype),
                          i["down_proj"].dequantize(dtype))
    assert_earned_max(got, want, low, atol=1e-6 + reordered_sum_atol(want, dtype, 64 + 96 * 2))


@pytest.mark.parametrize("case", ["E=1", "empty-experts", "T=1", "T=0", "k=E", "dropped-ids", "capacity"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_mlp_quantized_edge_shapes(backend, fmt, case):
    T, E, k, kw = 13, 4, 2, {}
    experts = None
    if case == "E=1":
        E, k = 1, 1
    elif case == "empty-experts":
        experts = rand_experts(T, k, 2)
    elif case in ("T=1", "T=0"):
        T = int(case[-1])
    elif case == "k=E":
        k = E
    elif case == "dropped-ids":
        experts = rand_experts(T, k, E)
        experts[::3, 0] = E
        experts[1::4, 1] = -1
    elif case == "capacity":
        kw = dict(capacity=3)
    i = _inputs(T, 32, 48 if fmt == "fp8" else 64, E, k, fmt, dtype=F64, experts=experts)
    got = _moe_mlp(i, **kw)
    assert got.shape == (T, 32)
    assert_close64(got, _reference64(i, **kw))


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_stays_in_its_token(backend, fmt):
    i = _inputs(12, 32, 64, 4, 2, fmt)
    i["x"][5, 3] = math.nan
    out = _moe_mlp(i)
    assert out[5].isnan().all() and not out[torch.arange(12) != 5].isnan().any()


def test_moe_mlp_quantized_bad_input():
    i = _inputs(4, 32, 64, 3, 2, "fp8")
    args = (i["x"], i["experts"], i["weights"])
    with torch.no_grad():
        with pytest.raises(TypeError, match="must both be QuantizedWeight or both tensors, got down_proj Tensor"):
            ops.moe_mlp(*args, i["gate_up_proj"], i["down_proj"].dequantize())
        mx = ops.QuantizedWeight.quantize(torch.randn(3, 32, 64), "mxfp4")
        with pytest.raises(ValueError, match="must share a format"):
            ops.moe_mlp(*args, i["gate_up_proj"], mx)
        with pytest.raises(ValueError, match=r"\[E, 2H, D\] and \[E, O, H\].*got \(3, 128, 32\) and \(3, 32, 40\)"):
            ops.moe_mlp(*args, i["gate_up_proj"], ops.QuantizedWeight.quantize(torch.randn(3, 32, 40), "fp8"))
        with pytest.raises(ValueError, match=r"x: \[T, D\] must have D = 32"):
            ops.moe_mlp(torch.randn(4, 31), *args[1:], i["gate_up_proj"], i["down_proj"])
    with pytest.raises(NotImplementedError, match="inference only"):
        ops.moe_mlp(i["x"].requires_grad_(), *args[1:], i["gate_up_proj"], i["down_proj"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_mlp_quantized_opcheck(backend, fmt):
    # every CPU backend (tests/test_opcheck.py's programs run a backward, which this inference op has not); the
    # triton backend's in tests/triton/test_quantized.py
    i = _inputs(6, 32, 64, 3, 2, fmt)
    up, down = i["gate_up_proj"], i["down_proj"]
    # torch's schema check compares float8 inputs before and after with a multiply CPU lacks for float8: FP8 runs
    # the other checks
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic") + (
        ("test_schema",) if fmt == "mxfp4" else ())
    torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_quantized,
                          (i["x"], i["experts"], i["weights"], fmt, up.data, up.scale, down.data, down.scale, 128,
                           128, None, None, "silu", True, -1), test_utils=utils)


def test_moe_mlp_quantized_compiles_fullgraph():
    i = _inputs(8, 32, 64, 3, 2, "mxfp4")
    torch._dynamo.reset()
    fn = torch.compile(lambda x, e, w: ops.moe_mlp(x, e, w, i["gate_up_proj"], i["down_proj"]), fullgraph=True,
                       backend="aot_eager")
    with torch.no_grad():
        got = fn(i["x"], i["experts"], i["weights"])
    torch.testing.assert_close(got, _moe_mlp(i))
