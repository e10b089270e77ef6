"""The native CPU backend of moe_kernels::moe_mlp_quantized (csrc/quantized.cpp): the expert MLP on FP8 block-scaled
and MXFP4 expert weights, dequantised inside the kernels.

Against the float64 expert MLP of the dequantised weights (moe_kernels.reference.quantized.dequantize and
moe_kernels.reference.expert_mlp.moe_mlp): exactly in float64 (rounding only), float32/bfloat16/float16 within
the earned tolerance (twice the error of the reference computed in x's dtype on the same dequantised weights, plus
sqrt(n) ulps for sums taken in another order); both paths (experts of up to kStreamRows = 8 rows stream their
weights, dequantising in registers; more rows dequantise the expert into a buffer for the GEMMs); edge shapes,
sentinels, NaN tokens, NaN codes and scales, every activation spec family, the FP8 table path (denormals read as
zero, scales of 2^8 and more), outputs that would hold garbage if unwritten, the op called directly and the
reference made to fail, opcheck, and every ISA level the CPU has.
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
from moe_kernels import _backend, ops
from moe_kernels.ops import QuantizedWeight
from moe_kernels.ops import quantized as ops_quantized
from moe_kernels.reference import expert_mlp as ref_mlp
from moe_kernels.reference import quantized as ref_q
from tests.helpers import assert_close64, assert_earned_max, rand_experts, reordered_sum_atol, same_bits

pytestmark = pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")

F64 = torch.float64
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16"), pytest.param(F64, id="fp64")]
FORMATS = ["fp8", "mxfp4"]
# (T, D, H, E, k): decode, a row or two an expert (the streaming kernel); many, dozens of rows an expert (the
# dequantised GEMMs). FP8's D and H are not multiples of 128 (partial scale blocks) nor of the kernels' steps;
# MXFP4's are multiples of 32 (its format's rule) but not of its 128-column steps. T * D >= 4000 outputs: a
# tensor-wide maximum error of a 16-bit result is a stable statistic only on that many.
SHAPES = {("fp8", "decode"): (4, 1000, 72, 16, 4), ("fp8", "many"): (96, 200, 136, 5, 3),
          ("mxfp4", "decode"): (4, 992, 96, 16, 4), ("mxfp4", "many"): (96, 224, 160, 5, 3)}
PATHS = ["decode", "many"]


def native_op():
    """torch.ops.moe_kernels_C.moe_mlp_quantized (the library loads on first native use)."""
    assert _backend.native_available()
    return torch.ops.moe_kernels_C.moe_mlp_quantized


def make_case(fmt, T, D, H, E, k, dtype=torch.float32, gated=True, bias=False, block=ref_q.FP8_BLOCK, scale=1.0):
    """Random inputs with quantized weights: x [T, D] in dtype, experts [T, k] (distinct ids), weights [T, k] in
    dtype, gate_up / down QuantizedWeight, optional biases in dtype."""
    up = torch.randn(E, 2 * H if gated else H, D) * (scale / math.sqrt(D))
    down = torch.randn(E, D, H) * (scale / math.sqrt(H))
    case = dict(x=torch.randn(T, D).to(dtype), experts=rand_experts(T, k, E), weights=torch.rand(T, k).to(dtype),
                gate_up_proj=QuantizedWeight.quantize(up, fmt, block),
                down_proj=QuantizedWeight.quantize(down, fmt, block))
    if bias:
        case["gate_up_bias"] = (0.1 * torch.randn(E, up.shape[1])).to(dtype)
        case["down_bias"] = (0.1 * torch.randn(E, D)).to(dtype)
    return case


def run_native(case, activation="silu", gated=True, capacity=None):
    """ops.moe_mlp on the native backend."""
    with moe_kernels.use_backend("native"), torch.inference_mode():
        return ops.moe_mlp(case["x"], case["experts"], case["weights"], case["gate_up_proj"], case["down_proj"],
                           activation=activation, gated=gated, gate_up_bias=case.get("gate_up_bias"),
                           down_bias=case.get("down_bias"), capacity=capacity)


def call_direct(case, activation="silu", gated=True, capacity=-1):
    """The native op itself, no fallback in between."""
    up, down = case["gate_up_proj"], case["down_proj"]
    return native_op()(case["x"], case["experts"], case["weights"], up.format, up.data, up.scale, down.data,
                       down.scale, up.block[0], up.block[1], case.get("gate_up_bias"), case.get("down_bias"),
                       activation, gated, capacity)


def reference(case, dtype, activation="silu", gated=True, capacity=None):
    """The reference expert MLP on the dequantised weights, computed in dtype (float64: the exact oracle)."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    up = case["gate_up_proj"].dequantize(F64).to(dtype)
    down = case["down_proj"].dequantize(F64).to(dtype)
    return ref_mlp.moe_mlp(cast(case["x"]), case["experts"], cast(case["weights"]), up, down, activation=activation,
                           gated=gated, gate_up_bias=cast(case.get("gate_up_bias")),
                           down_bias=cast(case.get("down_bias")), capacity=capacity)


def check(out, case, activation="silu", gated=True, capacity=None, name="output"):
    """out against the float64 reference: exactly in float64, else within the earned tolerance."""
    dtype = case["x"].dtype
    assert out.dtype == dtype and out.shape == (case["x"].shape[0], case["down_proj"].shape[1])
    ref64 = reference(case, F64, activation, gated, capacity)
    if dtype == F64:
        assert_close64(out, ref64, name)
        return
    if bool(torch.isfinite(case["x"]).all()) or capacity is not None:
        same = reference(case, dtype, activation, gated, capacity)
    else:  # token by token: torch's bfloat16 matmul on AMX CPUs mixes a NaN row into its neighbour's product
        same = torch.cat([reference({**case, "x": case["x"][t:t + 1], "experts": case["experts"][t:t + 1],
                                     "weights": case["weights"][t:t + 1]}, dtype, activation, gated)
                          for t in range(case["x"].shape[0])])
    D, H = case["x"].shape[1], case["down_proj"].shape[2]
    finite = torch.where(torch.isfinite(ref64), ref64, 0)
    assert_earned_max(out, ref64, same, atol=reordered_sum_atol(finite, dtype, D + H), name=name)


def rows_per_expert(case):
    E = case["gate_up_proj"].shape[0]
    ids = case["experts"].flatten()
    return torch.bincount(ids[(ids >= 0) & (ids < E)], minlength=E)


# --- against the reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_matches_reference(fmt, path, dtype):
    case = make_case(fmt, *SHAPES[fmt, path], dtype=dtype, bias=True)
    counts = rows_per_expert(case)
    assert (counts.max() <= 8) if path == "decode" else (counts.min() > 8), counts
    check(run_native(case), case)


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_bf16_decode_rows_share_nothing(fmt):
    # bfloat16 x, one expert of each group size the streaming kernel takes (1 .. 8 rows, its weight rows taken
    # several at a time; with AMX, groups of 2 .. 16 on tiles, in token groups of 4): against the reference, and a
    # token's output the same bits however many tokens share its group on the dot products, and however many other
    # groups run beside its group on tiles
    amx = _backend.native_cpu_amx()
    n = 16 if amx else 8
    T = n * (n + 1) // 2
    case = make_case(fmt, T, 224, 96, n, 1, dtype=torch.bfloat16, bias=True)
    case["experts"][:, 0] = torch.repeat_interleave(torch.arange(n), torch.arange(1, n + 1))
    assert rows_per_expert(case).tolist() == list(range(1, n + 1))
    out = run_native(case)
    check(out, case)
    for lo, hi in ([(0, 1), (6, 10), (28, 36)] if amx else [(0, 1), (7, 8), (35, 36)]) + [(T - n, T)]:
        alone = dict(case, x=case["x"][lo:hi], experts=case["experts"][lo:hi], weights=case["weights"][lo:hi])
        assert same_bits(run_native(alone), out[lo:hi]), (lo, hi)


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_op_called_directly(fmt):
    # the native op itself against the reference (no fallback can answer for it), both paths in one call: one
    # expert of many rows, the others of a few
    case = make_case(fmt, 40, 224, 96, 6, 1, bias=True)
    case["experts"][:30, 0] = 0
    case["experts"][30:, 0] = torch.arange(10) % 5 + 1
    assert rows_per_expert(case).tolist() == [30, 2, 2, 2, 2, 2]
    check(call_direct(case), case)


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_ran_not_the_reference(fmt, monkeypatch):
    # the native backend must not go through the reference implementation for a spec it computes
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(ops_quantized, "_reference", fail)
    assert _backend.resolve("moe_mlp_quantized", "cpu") in ("native", "reference")
    for path in PATHS:
        case = make_case(fmt, *SHAPES[fmt, path])
        check(run_native(case), case, name=path)


# --- edge shapes, routing, special values ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [pytest.param((1, 64, 32, 1, 1), id="E1-T1"),
                                   pytest.param((20, 64, 32, 1, 1), id="E1-many"),
                                   pytest.param((3, 96, 64, 9, 1), id="empty-experts"),
                                   pytest.param((5, 64, 32, 4, 4), id="k=E"), pytest.param((0, 64, 32, 4, 2), id="T0"),
                                   pytest.param((1, 32, 32, 2, 2), id="T1-k2")])
def test_native_edge_shapes(fmt, shape):
    for dtype in (torch.float32, F64):
        case = make_case(fmt, *shape, dtype=dtype, bias=True)
        check(run_native(case), case, name=str(dtype))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_native_sentinels_and_capacity(fmt, path):
    # ids outside [0, E) contribute zero (a token with only those gets an exact zero row, biases aside), and pairs
    # past the capacity are dropped
    T, D, H, E, k = (6, 64, 32, 4, 2) if path == "decode" else (60, 64, 32, 3, 2)
    case = make_case(fmt, T, D, H, E, k, dtype=F64, bias=True)
    case["experts"][0] = torch.tensor([-1, E])
    case["experts"][1, 1] = E + 5
    out = run_native(case)
    assert bool((out[0] == 0).all())
    check(out, case)
    capacity = 2 if path == "decode" else 30
    check(run_native(case, capacity=capacity), case, capacity=capacity, name="capacity")


LOW = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_native_nan_token_stays_in_its_token(fmt, path, dtype):
    case = make_case(fmt, *SHAPES[fmt, path], dtype=dtype)
    case["x"][1, 5] = math.nan
    out = run_native(case)
    assert bool(torch.isnan(out[1]).all())
    others = torch.ones(out.shape[0], dtype=torch.bool)
    others[1] = False
    assert not bool(torch.isnan(out[others]).any())
    check(out, case)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_native_nan_weights(fmt, path, dtype):
    # an FP8 NaN code (0x7f, 0xff) or an MXFP4 NaN scale (255) makes the dot products that read it NaN, as the
    # dequantised weight does: here one row of the gate projection of token 0's first expert, in the tokens routed
    # to that expert
    case = make_case(fmt, *SHAPES[fmt, path], dtype=dtype)
    up, e = case["gate_up_proj"], int(case["experts"][0, 0])
    if fmt == "fp8":
        up.data.view(torch.uint8)[e, 3, 17] = 0xff
    else:
        up.scale[e, 3, 1] = 255
    out = run_native(case)
    routed = (case["experts"] == e).any(1)
    assert bool(routed.any()) and bool(torch.isnan(out[routed]).all()) and not bool(torch.isnan(out[~routed]).any())
    check(out, case)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("block", [(40, 48), (64, 192)], ids=["40x48", "64x192"])
@pytest.mark.parametrize("path", PATHS)
def test_native_fp8_subnormal_codes_and_block_shapes(path, block, dtype):
    # e4m3's subnormal codes (magnitudes m * 2^-9 of the block's scale) next to its largest ones, blocks that do not
    # divide the kernels' steps (bk = 48 < 64 columns a step, bn = 40) or hold several (bk = 192), and a partial last
    # block
    T, D, H, E, k = (4, 1000, 72, 16, 4) if path == "decode" else (96, 200, 72, 5, 3)
    case = make_case("fp8", T, D, H, E, k, dtype=dtype, block=block)
    for w in (case["gate_up_proj"], case["down_proj"]):
        codes = w.data.view(torch.uint8)
        codes[..., ::7] = torch.randint(0, 8, codes[..., ::7].shape, dtype=torch.uint8) | (codes[..., ::7] & 0x80)
    assert bool((case["gate_up_proj"].data.view(torch.uint8) & 0x78 == 0).any())
    check(run_native(case), case)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(F64, id="fp64")])
@pytest.mark.parametrize("path", PATHS)
def test_native_mxfp4_extreme_scales(path, dtype):
    # e8m0's ends: 2^-127 (s = 0, a float32 subnormal) and 2^-126, 2^0 and 2^10, in rows of their own and next to
    # ordinary ones (the kernels take a row's scales as float32 bits unless it holds a 0 or 255)
    T, D, H, E, k = (4, 256, 64, 16, 4) if path == "decode" else (96, 256, 64, 5, 3)
    case = make_case("mxfp4", T, D, H, E, k, dtype=dtype)
    for w in (case["gate_up_proj"], case["down_proj"]):
        w.scale[:, 0, :] = 0
        w.scale[:, 1, 0] = 0
        w.scale[:, 2, :] = 1
        w.scale[:, 3, 1] = 127
        w.scale[:, 4, -1] = 137
    check(run_native(case), case)


@pytest.mark.parametrize("path", PATHS)
def test_native_fp8_table_path(path):
    # the FP8 rows go through a table of the codes' values where the bit conversion would not be exact: a scale of
    # 2^8 or more in the weight (here one block of each projection scaled by 2^12), or denormals read as zero
    T, D, H, E, k = (4, 256, 64, 16, 4) if path == "decode" else (96, 256, 64, 5, 3)
    case = make_case("fp8", T, D, H, E, k)
    for w in (case["gate_up_proj"], case["down_proj"]):
        w.scale[0, 0, 0] = 512.0
        codes = w.data.view(torch.uint8)
        codes[..., ::5] = torch.randint(1, 8, codes[..., ::5].shape, dtype=torch.uint8)  # subnormal codes
    assert float(case["gate_up_proj"].scale.max()) >= 256
    check(run_native(case), case, name="large scale")


@pytest.mark.parametrize("path", PATHS)
def test_native_fp8_with_denormals_as_zero(path):
    # under torch.set_flush_denormal(True) (MXCSR's DAZ and FTZ), e4m3's subnormal codes are not read as float32
    # subnormals: the table path keeps them (the reference runs in float64, where no value here is subnormal)
    T, D, H, E, k = (4, 256, 64, 16, 4) if path == "decode" else (96, 256, 64, 5, 3)
    case = make_case("fp8", T, D, H, E, k, dtype=F64)
    for w in (case["gate_up_proj"], case["down_proj"]):
        codes = w.data.view(torch.uint8)
        codes[..., ::3] = torch.randint(1, 8, codes[..., ::3].shape, dtype=torch.uint8) | 0x80
    case32 = dict(case, x=case["x"].float(), weights=case["weights"].float())
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-denormal mode on this CPU")
    try:
        out = run_native(case32)
    finally:
        torch.set_flush_denormal(False)
    check(out, case32, name="denormals as zero")
    check(run_native(case32), case32)


# --- activations -------------------------------------------------------------------------------------------------
SPECS = [pytest.param("silu", True, id="silu"), pytest.param("gelu", True, id="gelu"),
         pytest.param("gelu_tanh", False, id="gelu_tanh-plain"), pytest.param("relu2", False, id="relu2-plain"),
         pytest.param("silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", True, id="gpt-oss"),
         pytest.param("silu[limit=7.0,clamp_after]", True, id="clamp_after"),
         pytest.param("silu[gate_softcap=2.0,up_softcap=3.0]", True, id="softcaps")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec,gated", SPECS)
def test_native_activation_specs(spec, gated, path, fmt):
    T, D, H, E, k = (4, 256, 64, 16, 4) if path == "decode" else (96, 128, 64, 5, 3)
    case = make_case(fmt, T, D, H, E, k, dtype=F64, gated=gated, bias=True, scale=3.0)  # units: the clamps engage
    check(call_direct(case, spec, gated), case, spec, gated, name="direct")
    case32 = dict(case, x=case["x"].float(), weights=case["weights"].float(),
                  gate_up_bias=case["gate_up_bias"].float(), down_bias=case["down_bias"].float())
    check(run_native(case32, spec, gated), case32, spec, gated, name="float32")


# --- outputs written, determinism -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_outputs_never_garbage(fmt):
    # the op's buffers (the per-thread kept slots, the expert-ordered scratch, the output) come from memory that
    # held NaN just before; a run with a larger shape first leaves its own values in the kept buffers. Every run
    # must match the reference and the runs must agree bit for bit.
    big = make_case(fmt, 200, 256, 128, 4, 2)
    small = make_case(fmt, 50, 128, 64, 4, 2, bias=True)
    small["experts"][3] = torch.tensor([-1, 4])  # a token routed nowhere: its row is written as zeros
    outs = []
    for _ in range(3):
        for _ in range(4):
            garbage = torch.full((1 << 20,), math.nan)
            del garbage
        run_native(big)
        garbage = [torch.full((n,), math.nan) for n in (4096, 65536, 1 << 18)]
        del garbage
        outs.append(run_native(small))
        check(outs[-1], small)
        assert bool((outs[-1][3] == 0).all())
    assert all(same_bits(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_native_same_bits_across_thread_counts(fmt, path):
    # decode: every expert's dot products in a fixed order, whatever runs beside it (the GEMM path's BLAS may
    # split its sums by thread count, so only reruns are compared there)
    case = make_case(fmt, *SHAPES[fmt, path])
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_native(case)
        torch.set_num_threads(2)
        two, again = run_native(case), run_native(case)
    finally:
        torch.set_num_threads(prev)
    assert same_bits(two, again)
    if path == "decode":
        assert same_bits(one, two)


# --- opcheck, refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_native_opcheck(fmt, path):
    case = make_case(fmt, *SHAPES[fmt, path], bias=True)
    up, down = case["gate_up_proj"], case["down_proj"]
    args = (case["x"], case["experts"], case["weights"], fmt, up.data, up.scale, down.data, down.scale, up.block[0],
            up.block[1], case["gate_up_bias"], case["down_bias"], "silu", True, -1)
    # opcheck's schema test compares the inputs before and after with arithmetic that float8 lacks on CPU: for FP8
    # it runs on the rest (the fake tensor, autograd registration and AOT dispatch tests)
    tests = [t for t in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if fmt == "mxfp4" or t != "test_schema"]
    with moe_kernels.use_backend("native"):
        torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_quantized.default, args, test_utils=tests)
    if fmt == "mxfp4":
        torch.library.opcheck(native_op(), args, test_utils=("test_schema",))


def test_native_refuses_bad_quantized_inputs():
    case = make_case("fp8", 4, 64, 32, 2, 2)
    up, down = case["gate_up_proj"], case["down_proj"]
    base = [case["x"], case["experts"], case["weights"], "fp8", up.data, up.scale, down.data, down.scale, 128, 128,
            None, None, "silu", True, -1]
    bad = [(3, "fp4", "format must be 'fp8' or 'mxfp4'"),
           (5, up.scale[:, :, :0], "gate_up_proj scale must be float32"),
           (4, up.data.view(torch.uint8), "gate_up_proj data must be float8_e4m3fn"),
           (8, 0, "block_n and block_k must be >= 1"),
           (0, case["x"][:, :10], r"x must be \[T, D = 64\]"),
           (12, "swish", "activation must be")]
    for i, value, message in bad:
        args = list(base)
        args[i] = value
        with pytest.raises(RuntimeError, match=message):
            native_op()(*args)
    mx = make_case("mxfp4", 4, 64, 32, 2, 2)
    args = [mx["x"], mx["experts"], mx["weights"], "mxfp4", mx["gate_up_proj"].data, mx["gate_up_proj"].scale[..., :1],
            mx["down_proj"].data, mx["down_proj"].scale, 128, 128, None, None, "silu", True, -1]
    with pytest.raises(RuntimeError, match=r"gate_up_proj scale must be uint8 \(e8m0\)"):
        native_op()(*args)


# --- every ISA level -------------------------------------------------------------------------------------------
ISAS = ["baseline", "avx2", "avx512"]


def test_native_runs_at_the_capped_isa_level():
    # in the processes of test_native_quantized_at_every_isa_level: the kernels run at the level asked for, or at
    # the widest the CPU has below it
    cap = os.environ.get("MOE_KERNELS_CPU_ISA")
    if not cap:
        pytest.skip("MOE_KERNELS_CPU_ISA is not set")
    assert _backend.native_cpu_isa() in ISAS[:ISAS.index(cap) + 1]


def cpu_flags():
    """The CPU's feature flags (Linux), or an empty set."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def test_native_amx_as_configured():
    # the decode kernels take AMX tiles only at the avx512 level, on a CPU that has AMX-BF16, unless turned off
    amx = _backend.native_cpu_amx()
    assert isinstance(amx, bool)
    if os.environ.get("MOE_KERNELS_CPU_AMX") == "0" or _backend.native_cpu_isa() != "avx512":
        assert not amx
    if amx:
        assert {"amx_bf16", "amx_tile"} <= cpu_flags() and moe_kernels.backends()["cpu_amx"] is True


@pytest.mark.skipif(not _backend.native_available() or not _backend.native_cpu_amx(),
                    reason="the decode kernels do not use AMX here: this process's run covers their other path")
def test_native_quantized_without_amx():
    # on a CPU with AMX the decode groups run on tiles: this file's tests again with MOE_KERNELS_CPU_AMX=0 cover the
    # bfloat16 dot products that CPUs without AMX run
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__, "-k",
                           "not every_isa_level and not without_amx and not opcheck and not refuses"],
                          env={**os.environ, "MOE_KERNELS_CPU_AMX": "0"}, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout, done.stdout[-3000:]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="not x86-64")
@pytest.mark.parametrize("isa", ISAS)
def test_native_quantized_at_every_isa_level(isa):
    # the streaming and dequantising kernels are built per ISA level and picked once per process: this file's tests
    # in a process capped at each level
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__, "-k",
                           "not every_isa_level and not without_amx and not opcheck and not refuses"],
                          env={**os.environ, "MOE_KERNELS_CPU_ISA": isa}, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]
