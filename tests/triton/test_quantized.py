"""ops.moe_mlp with quantized expert weights (FP8 block-scaled, MXFP4) on the triton backend
(moe_kernels.triton.quantized) against the float64 reference of the dequantised weights, within the earned tolerance.

Under the Triton interpreter (CPU, no GPU) these run:
- w8a16 / w4a16 with fp32 and fp16 activations: the e4m3 / e2m1 / e8m0 decoders (every code, bit for bit), both
  scale layouts, the tile schedule, gathered rows, bias and every activation spec in the epilogue, edge shapes.
- FP8 x FP8 with fp16 and bf16 activations: the interpreter's tl.dot on e4m3 operands is exact (it widens them) and
  the path has no 16-bit dot; its activation quantisation encodes e4m3 by integer arithmetic, bit for bit torch's
  rounding (the interpreter's own fp32 -> fp8 cast rounds wrongly, so the kernels do not use it).
The interpreter cannot run bf16 activations on the w8a16 / w4a16 path: its tl.dot on bf16 operands returns garbage.
Those run in the GPU-only tests (skipped here), at real model sizes, as do the FP8 x FP8 path at real sizes and a CUDA
graph capture. That the kernels compile for sm_80 / sm_90 without spills, and the FP8 x FP8 dot to an fp8 wgmma
(QGMMA), is aot_check's (python -m moe_kernels.tools.aot_check --filter quant_)."""
import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import _backend, ops  # noqa: E402
from moe_kernels.reference import expert_mlp as ref_mlp  # noqa: E402
from moe_kernels.reference import quantized as ref_q  # noqa: E402
from moe_kernels.reference.activations import glu  # noqa: E402
from moe_kernels.triton import quantized as tq  # noqa: E402
from moe_kernels.triton.quantized import _weight_tile  # noqa: E402
from tests.helpers import GLU_SPECS, assert_earned_max, rand_experts, reordered_sum_atol  # noqa: E402
from tests.triton.test_expert_mlp import _ids_sentinel, _ids_two_experts  # noqa: E402

F64 = torch.float64
FORMATS = ["fp8", "mxfp4"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 tl.dot, real sizes)")


# --- the decoders -----------------------------------------------------------------------------------------------
@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, out_ptr, N, K, SK, BN_S, BK_S, FORMAT: tl.constexpr,
                    SCALE_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    s_rows = (rows // BN_S).to(tl.int64) * SK
    for k0 in range(0, K, BLOCK_K):
        w = _weight_tile(w_ptr, ws_ptr, rows, ok, s_rows, k0, K, BK_S, FORMAT, SCALE_PER_TILE, BLOCK_N, BLOCK_K)
        k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + k[None, :], w, mask=ok[:, None] & (k < K)[None, :])


def _dequant_tiles(fmt, data, scale, block, block_k):
    """One expert's weight [N, K] as the GEMM's tiles dequantise it (fp32)."""
    N = data.shape[0]
    K = data.shape[1] * (2 if fmt == "mxfp4" else 1)
    out = torch.full((N, K), 12345.0)
    bn, bk = block
    _dequant_kernel[(triton.cdiv(N, 16),)](data.view(torch.uint8), scale, out, N, K, scale.shape[-1], bn, bk,
                                           FORMAT=tq._FMT_CODE[fmt], SCALE_PER_TILE=bk % block_k == 0, BLOCK_N=16,
                                           BLOCK_K=block_k)
    return out


def _assert_same_values(got, want):
    """Equal values, signs of zeros and NaN places."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], want[~nan]) and torch.equal(got[~nan].signbit(), want[~nan].signbit())


@pytest.mark.parametrize("block, block_k", [((8, 128), 128), ((8, 128), 32), ((5, 48), 32)],
                         ids=["scale-per-tile", "4-tiles-a-block", "scale-per-element"])
def test_fp8_tiles_decode_every_code(block, block_k):
    N, K = 16, 256                          # each row holds every byte once (NaN codes 0x7F / 0xFF included)
    data = torch.stack([torch.randperm(256) for _ in range(N)]).to(torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.rand(ref_q.fp8_scale_shape(1, N, K, block)[1:], dtype=torch.float32) * 4 + 0.01
    got = _dequant_tiles("fp8", data, scale, block, block_k)
    _assert_same_values(got, ref_q.dequantize_fp8(data, scale, block).float())


@pytest.mark.filterwarnings("ignore:overflow encountered")     # 6 * 2^127 in the interpreter
def test_mxfp4_tiles_decode_every_code_and_exponent():
    N, K = 256, 64                          # row r: scale exponent r (0 a subnormal 2^-127, 255 NaN, 254 overflows)
    data = ((torch.arange(K // 2)[None, :] * 8 + torch.arange(N)[:, None]) % 256).to(torch.uint8)
    scale = torch.arange(N)[:, None].repeat(1, K // 32).to(torch.uint8)
    for block_k in (32, 64):
        got = _dequant_tiles("mxfp4", data, scale, ref_q.FP8_BLOCK, block_k)   # (block unused)
        _assert_same_values(got, ref_q.dequantize_mxfp4(data, scale).float())


def test_activation_quantisation_matches_torchs_rounding():
    # per row and 128 columns: s = amax / 448 (1 for zeros), q = e4m3(x / s), torch's round to nearest even; every
    # e4m3 value, the midpoints between them (ties) and their neighbours, at the scale 1 that 448 gives
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    v = v[~v.isnan()].unique()
    mids = (v[1:] + v[:-1]) / 2
    vals = torch.cat([v, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1), -0.0 * v[:1]])
    vals = torch.cat([vals, torch.randn(3 * 127 * 4 - vals.numel() % 127) * 50])[: (vals.numel() // 127 + 1) * 127]
    x = torch.cat([vals.view(-1, 127), torch.full((vals.numel() // 127, 1), 448.0)], 1)
    q, s = tq.quantize_rows(x)
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    # scaled groups, a partial last group, an all-zero group
    x = torch.randn(9, 300) * torch.logspace(-5, 3, 9)[:, None]
    x[2, :128] = 0
    q, s = tq.quantize_rows(x.half())
    want_q, want_s = _quantize_rows_ref(x.half().double())
    assert torch.equal(s, want_s.float()) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def _quantize_rows_ref(x):
    """(e4m3 codes, scales) per row and 128 columns, as the reference quantises FP8 weights (quantize_fp8)."""
    T, K = x.shape
    G = -(-K // 128)
    padded = torch.zeros(T, G * 128, dtype=x.dtype)
    padded[:, :K] = x
    groups = padded.view(T, G, 128)          # G named: an expert without rows has T = 0
    amax = groups.abs().amax(-1).float()
    s = torch.where(amax > 0, amax / ref_q.FP8_MAX, torch.ones_like(amax))
    q = (groups.float() / s[..., None]).clamp(-ref_q.FP8_MAX, ref_q.FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(T, G * 128)[:, :K], s


def _fake_quant(x):
    """x as the FP8 x FP8 path sees it (float64): e4m3 per row and 128 columns, times the scales."""
    q, s = _quantize_rows_ref(x)
    return q.double() * s.double().repeat_interleave(128, 1)[:, :x.shape[1]]


# --- ops.moe_mlp on the triton backend --------------------------------------------------------------------------
def _inputs(T, D, H, E, k, fmt, dtype, *, gated=True, bias=False, make=rand_experts, block=ref_q.FP8_BLOCK):
    if fmt == "mxfp4":         # K a multiple of 32 by the layout
        D, H = -(-D // 32) * 32, -(-H // 32) * 32
    MW = 2 * H if gated else H
    quant = lambda w: ops.QuantizedWeight.quantize(w, fmt, block)  # noqa: E731
    return dict(x=torch.randn(T, D).to(dtype), experts=make(T, k, E), weights=torch.rand(T, k) + 0.1,
                gate_up_proj=quant(torch.randn(E, MW, D) / D ** 0.5), down_proj=quant(torch.randn(E, D, H) / H ** 0.5),
                gate_up_bias=torch.randn(E, MW).to(dtype) if bias else None,
                down_bias=torch.randn(E, D).to(dtype) if bias else None)


def _reference(i, dtype, fake_quant=False, **kw):
    """ref_mlp.moe_mlp on the weights dequantised to `dtype` (float64: the oracle); fake_quant: with x and h rounded
    to e4m3 per row and 128 columns (the FP8 x FP8 path's own rounding) and h to x's dtype, in float64."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    up, down = i["gate_up_proj"].dequantize(dtype), i["down_proj"].dequantize(dtype)
    if not fake_quant:
        return ref_mlp.moe_mlp(cast(i["x"]), i["experts"], cast(i["weights"]), up, down, gate_up_bias=cast(
            i["gate_up_bias"]), down_bias=cast(i["down_bias"]), **kw)
    act, gated = kw.get("activation", "silu"), kw.get("gated", True)
    kept = ops.sort_by_expert(i["experts"], up.shape[0], kw.get("capacity")).inverse >= 0
    x = _fake_quant(i["x"].double())
    out = torch.zeros(x.shape[0], down.shape[1], dtype=F64)
    for e in range(up.shape[0]):
        tok, slot = torch.nonzero((i["experts"] == e) & kept, as_tuple=True)
        h = x[tok] @ up[e].t() + (0 if i["gate_up_bias"] is None else i["gate_up_bias"][e].double())
        h = _fake_quant(glu(h, act, gated).to(i["x"].dtype).double())
        y = h @ down[e].t() + (0 if i["down_bias"] is None else i["down_bias"][e].double())
        out.index_add_(0, tok, y * i["weights"][tok, slot].double()[:, None])
    return out


def _run_triton(i, monkeypatch, **kw):
    """ops.moe_mlp under the triton backend, asserting that its moe_mlp_quantized implementation ran."""
    calls = []
    impl = _backend.IMPLS["moe_mlp_quantized"]["triton"]
    monkeypatch.setitem(_backend.IMPLS["moe_mlp_quantized"], "triton", lambda *a: calls.append(1) or impl(*a))
    with moe_kernels.use_backend("triton"), torch.no_grad():
        out = ops.moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"],
                          gate_up_bias=i["gate_up_bias"], down_bias=i["down_bias"], **kw)
    assert calls, "the triton backend did not run moe_mlp_quantized"
    return out


def _check(i, out, dtype, fake_quant=False, **kw):
    assert out.dtype == dtype and out.shape == (i["x"].shape[0], i["down_proj"].shape[1])
    want = _reference(i, F64, **kw)
    same = _reference(i, F64 if fake_quant else dtype, fake_quant, **kw)
    n = i["gate_up_proj"].shape[2] + i["down_proj"].shape[2]
    finite = torch.where(want.isfinite(), want, 0.0)
    assert_earned_max(out, want, same, atol=1e-6 + reordered_sum_atol(finite, dtype, n))


# T, D, H, E, k, activation, gated, bias, capacity, make ids
CASES = [
    pytest.param(4, 64, 96, 6, 2, "silu", True, False, None, rand_experts, id="decode-T4"),
    pytest.param(1, 32, 64, 4, 1, "silu", True, True, None, rand_experts, id="T1-k1-bias"),
    pytest.param(11, 40, 24, 1, 1, "relu2", False, False, None, rand_experts, id="E1-relu2-plain"),
    pytest.param(13, 32, 48, 8, 2, "gelu_tanh", True, False, None, _ids_two_experts, id="empty-experts"),
    pytest.param(23, 32, 40, 6, 3, "gelu", False, True, None, _ids_sentinel, id="ids-outside-plain-bias"),
    pytest.param(29, 32, 32, 5, 2, "silu", True, True, 3, rand_experts, id="capacity3"),
    pytest.param(3, 200, 136, 3, 2, "silu", True, True, None, rand_experts, id="K-N-not-multiples-of-128"),
    pytest.param(80, 48, 40, 2, 1, "silu", True, False, None, rand_experts, id="prefill-mid-tiles"),
    pytest.param(300, 40, 24, 1, 1, "gelu", False, True, None, rand_experts, id="prefill-large-tiles"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,D,H,E,k,activation,gated,bias,capacity,make", CASES)
def test_moe_mlp_matches_reference(T, D, H, E, k, activation, gated, bias, capacity, make, fmt, dtype, monkeypatch):
    i = _inputs(T, D, H, E, k, fmt, dtype, gated=gated, bias=bias, make=make)
    kw = dict(activation=activation, gated=gated, capacity=capacity)
    _check(i, _run_triton(i, monkeypatch, **kw), dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spec", GLU_SPECS)
def test_glu_specs_in_the_epilogue(spec, fmt, dtype, monkeypatch):
    i = _inputs(9, 64, 64, 4, 2, fmt, dtype, bias=True)
    _check(i, _run_triton(i, monkeypatch, activation=spec), dtype, activation=spec)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(48, 40), (64, 96), (128, 256), (16, 16)])
def test_fp8_blocks_other_than_128(block, dtype, monkeypatch):
    # bk 40: scales per element (SCALE_PER_TILE off); 96: a 32-wide tile; 256: two tiles a block; 16: many blocks
    i = _inputs(7, 120, 88, 3, 2, "fp8", dtype, bias=True, block=block)
    _check(i, _run_triton(i, monkeypatch), dtype)


def test_no_tokens_and_no_kept_pair(monkeypatch):
    i = _inputs(0, 32, 32, 3, 2, "mxfp4", torch.float32)
    assert _run_triton(i, monkeypatch).shape == (0, 32)
    i = _inputs(5, 32, 32, 3, 2, "fp8", torch.float16, bias=True)
    i["experts"][:] = 3                       # every id outside [0, E)
    assert torch.equal(_run_triton(i, monkeypatch), torch.zeros(5, 32, dtype=torch.float16))


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_weights_reach_only_their_experts_tokens(fmt, monkeypatch):
    i = _inputs(12, 64, 64, 4, 1, fmt, torch.float32)
    q = i["gate_up_proj"]
    if fmt == "mxfp4":
        q.scale[1, 5, 1] = 255                 # e8m0 NaN
    else:
        q.data.view(torch.uint8)[1, 5, 40] = 0x7F   # e4m3 NaN
    out = _run_triton(i, monkeypatch)
    hit = (i["experts"][:, 0] == 1)
    assert out[hit].isnan().all() and not out[~hit].isnan().any()
    _check(i, out, torch.float32)


def test_float64_runs_the_reference(monkeypatch):
    i = _inputs(6, 32, 32, 3, 2, "fp8", F64)
    torch.testing.assert_close(_run_triton(i, monkeypatch), _reference(i, F64), rtol=1e-12, atol=1e-12)


# --- FP8 x FP8 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("T,D,H,E,k,activation,bias", [
    pytest.param(4, 200, 136, 3, 2, "silu", True, id="decode-K-not-multiple-of-128"),
    pytest.param(70, 128, 128, 2, 1, "silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", False, id="prefill-glu"),
])
def test_fp8_activations(T, D, H, E, k, activation, bias, dtype, monkeypatch):
    monkeypatch.setenv(tq.FP8_ENV, "1")
    quantised = []
    real = tq.quantize_rows
    monkeypatch.setattr(tq, "quantize_rows", lambda x: quantised.append(x.shape) or real(x))
    i = _inputs(T, D, H, E, k, "fp8", dtype, bias=bias)
    out = _run_triton(i, monkeypatch, activation=activation)
    assert quantised == [(T, D), (T * k, H)]       # the tokens' rows, then the expert rows' h
    _check(i, out, dtype, fake_quant=True, activation=activation)


def test_fp8_activations_only_where_they_apply(monkeypatch):
    x = torch.randn(2, 256, dtype=torch.float16)
    assert not tq.fp8_activations(x, "fp8", 128)            # not asked for
    monkeypatch.setenv(tq.FP8_ENV, "1")
    assert tq.fp8_activations(x, "fp8", 128) and tq.fp8_activations(x, "fp8", 256)
    assert not tq.fp8_activations(x, "mxfp4", 128) and not tq.fp8_activations(x, "fp8", 64)
    assert not tq.fp8_activations(x.float(), "fp8", 128)


# --- launch rules and compile list ---------------------------------------------------------------------------------
def test_decode_tiles_hold_every_row_of_an_expert():
    # T <= 64 tokens: an expert holds at most T rows (distinct experts per token), and one row tile holds them, so
    # each active expert's weights are read once
    for T in range(1, 65):
        for gated in (False, True):
            BM = tq.QUANT_CONFIGS[tq.quant_config_name(T, T * 8, 256, torch.bfloat16, gated)][0]
            assert T <= BM <= max(16, 2 * T)
            assert tq.QUANT_CONFIGS[tq.quant_config_name(T, T * 8, 256, torch.bfloat16, gated, a_fp8=True)][0] >= T


def test_every_config_is_in_the_compile_list():
    names = [e["name"] for e in tq.AOT_CONFIGS]
    assert len(names) == len(set(names))
    for cfg in tq.QUANT_CONFIGS:
        for fmt in (["fp8"] if cfg.startswith("fp8x8") or cfg == "k32" else FORMATS):
            for ty in ("bf16", "fp16") if cfg != "fp32" else ("fp32",):
                prefix = f"quant_gemm-{fmt}xfp8-" if cfg.startswith("fp8x8") else f"quant_gemm-{fmt}-"
                assert any(n.startswith(f"{prefix}{ty}-{cfg}-") for n in names), (fmt, ty, cfg)
    fp8x8 = [e for e in tq.AOT_CONFIGS if e["constexprs"].get("A_FP8")]
    assert fp8x8 and all(e["archs"] == (90,) for e in fp8x8)
    assert any(e.get("qgmma") for e in fp8x8)


def test_aot_check_names_a_missing_qgmma():
    from moe_kernels.tools.aot_check import findings
    usage = {"reg": 166, "stack": 0, "local": 0, "smem": 73728, "target": "sm_90a", "wgmma": True, "hgmma": False,
             "qgmma": True, "tma_load": False, "tma_store": False, "setmaxnreg": False}
    entry = {"archs": (90,), "qgmma": True}
    assert findings(entry, 90, usage) == []
    assert findings(entry, 90, dict(usage, qgmma=False)) == ["no QGMMA (fp8 wgmma) in the SASS"]
    assert findings(entry, 90, dict(usage, target="sm_90")) == ["target sm_90, not sm_90a"]


def test_compiles_fullgraph(monkeypatch):
    i = _inputs(5, 32, 32, 3, 2, "mxfp4", torch.float32)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, e, w: ops.moe_mlp(x, e, w, i["gate_up_proj"], i["down_proj"]), fullgraph=True,
                       backend="aot_eager")
    with moe_kernels.use_backend("triton"), torch.no_grad():
        got = fn(i["x"], i["experts"], i["weights"])
    torch.testing.assert_close(got, _run_triton(i, monkeypatch), rtol=0, atol=0)


# --- GPU only -------------------------------------------------------------------------------------------------------
def _gpu_inputs(T, fmt, dtype=torch.bfloat16, E=32, k=8, D=2048, H=768):
    """Qwen3-30B-A3B's expert widths (D 2048, H 768, top-8), 32 of its 128 experts (the float64 reference of the
    dequantised weights runs on the CPU)."""
    i = _inputs(T, D, H, E, k, fmt, dtype)
    return {n: (v.to("cuda") if isinstance(v, (torch.Tensor, ops.QuantizedWeight)) else v) for n, v in i.items()}


def _check_on_cpu(i, out, dtype, fake_quant=False):
    cpu = {n: (v.to("cpu") if isinstance(v, (torch.Tensor, ops.QuantizedWeight)) else v) for n, v in i.items()}
    _check(cpu, out.cpu(), dtype, fake_quant=fake_quant)


@GPU
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 16, 64, 512, 2048])
def test_bf16_at_real_sizes(T, fmt, monkeypatch):
    # decode (m16 / m64 tiles) to prefill (mid, then large tiles)
    i = _gpu_inputs(T, fmt)
    _check_on_cpu(i, _run_triton(i, monkeypatch), torch.bfloat16)


@GPU
@pytest.mark.parametrize("T", [4, 512])
def test_fp8_activations_at_real_sizes(T, monkeypatch):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89+")
    monkeypatch.setenv(tq.FP8_ENV, "1")
    i = _gpu_inputs(T, "fp8")
    _check_on_cpu(i, _run_triton(i, monkeypatch), torch.bfloat16, fake_quant=True)


@GPU
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_capture_of_a_decode_step(fmt):
    i = _gpu_inputs(4, fmt)
    run = lambda: ops.moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"])  # noqa: E731
    with moe_kernels.use_backend("triton"), torch.no_grad():
        run()                                  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        i["x"].copy_(torch.randn_like(i["x"]))
        i["experts"].copy_(rand_experts(4, 8, 32).cuda())
        g.replay()
        torch.testing.assert_close(out, run(), rtol=0, atol=0)
    assert not math.isnan(out.float().sum().item())


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_on_triton(fmt):
    # the op on the triton backend: schema, fake tensor, autograd registration, AOT dispatch (FP8's schema check
    # compares float8 inputs with a multiply CPU lacks: see tests/ops/test_quantized.py)
    up = ops.QuantizedWeight.quantize(torch.randn(3, 128, 64) / 8, fmt)
    down = ops.QuantizedWeight.quantize(torch.randn(3, 64, 64) / 8, fmt)
    x, ids, w = torch.randn(6, 64), rand_experts(6, 2, 3), torch.rand(6, 2)
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic") + (
        ("test_schema",) if fmt == "mxfp4" else ())
    with moe_kernels.use_backend("triton"):
        torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_quantized,
                              (x, ids, w, fmt, up.data, up.scale, down.data, down.scale, 128, 128, None, None, "silu",
                               True, -1), test_utils=utils)
