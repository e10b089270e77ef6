"""The two-launch decode step (moe_kernels.triton.expert_mlp_decode) against the float64 reference, with float and
quantized (FP8 block-scaled, MXFP4) weights.

Under the Triton interpreter (CPU) the persistent kernel runs as one program (its grid barriers pass at once: the
interpreter runs programs one after another) and as one launch per phase over three programs (the items striding
over programs); fp32 and fp16 activations (the interpreter's tl.dot on bf16 returns garbage). The GPU-only tests
(skipped here) run bf16 at real sizes with the persistent grid and its barriers, count the kernels of a step and
capture it in a CUDA graph. That every configuration compiles for sm_80 / sm_90 without spills is aot_check's
(python -m moe_kernels.tools.aot_check --filter moe_decode).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

import moe_kernels  # noqa: E402
from moe_kernels import _backend, ops  # noqa: E402
from moe_kernels.reference import expert_mlp as ref_mlp  # noqa: E402
from moe_kernels.reference import quantized as ref_q  # noqa: E402
from moe_kernels.reference.activations import glu  # noqa: E402
from moe_kernels.triton import expert_mlp_decode as dec  # noqa: E402
from tests.helpers import GLU_SPECS, assert_earned_max, poisoned_empty, rand_experts, reordered_sum_atol  # noqa: E402
from tests.triton.test_expert_mlp import _ids_sentinel, _ids_two_experts  # noqa: E402

F64 = torch.float64
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 tl.dot, the persistent grid)")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
MODES = [pytest.param(dict(), id="one-program"), pytest.param(dict(phases=True, programs=3), id="phases-3-programs")]


def _ids_one_expert(T, k, E):
    """Every token's first choice is expert E - 1, the rest random and distinct."""
    ids = rand_experts(T, k, E)
    first = ids[:, :1].clone()
    ids[ids == E - 1] = first.expand_as(ids)[ids == E - 1]
    ids[:, 0] = E - 1
    return ids


def _ids_repeated(T, k, E):
    """Ids repeated within tokens (all pairs on expert 1): an expert with T * k rows, more than one row tile."""
    return torch.ones(T, k, dtype=torch.int64)


def _ids_int32_strided(T, k, E):
    """int32 ids in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.stack([rand_experts(T, k, E), rand_experts(T, k, E)], 2).reshape(T, 2 * k)
    return wide.to(torch.int32)[:, ::2]


# --- the schedule ----------------------------------------------------------------------------------------------
SCHEDULES = [      # T, k, E, capacity, make
    (1, 1, 1, None, rand_experts), (1, 2, 5, None, rand_experts), (7, 3, 3, None, rand_experts),     # k = E
    (13, 2, 8, None, _ids_two_experts), (23, 3, 6, None, _ids_sentinel), (29, 2, 5, 3, rand_experts),
    (64, 8, 61, None, rand_experts), (64, 4, 300, 2, rand_experts), (17, 2, 7, 4, _ids_one_expert),
    (12, 3, 4, None, _ids_repeated), (9, 2, 11, 1, _ids_int32_strided), (40, 2, 5, 0, rand_experts),
]


@pytest.mark.parametrize("T,k,E,capacity,make", SCHEDULES,
                         ids=[f"T{t}-k{k}-E{e}-cap{c}-{m.__name__.strip('_')}" for t, k, e, c, m in SCHEDULES])
def test_schedule_is_sort_by_experts(T, k, E, capacity, make):
    ids = make(T, k, E)
    want = ops.sort_by_expert(ids, E, capacity)
    x = torch.randn(T, 16)
    up, down = torch.randn(E, 32, 16), torch.randn(E, 16, 16)
    seen = {}
    with poisoned_empty():
        _, order, inverse, offsets = dec.moe_mlp_decode(x, ids, torch.rand(T, k), up, None, down, None,
                                                        capacity=capacity, schedule=seen)
    assert torch.equal(order, want.order) and torch.equal(inverse, want.inverse)
    assert torch.equal(offsets, want.offsets)
    counts = offsets.diff()
    live = torch.nonzero(counts > 0).flatten()
    active = seen["active"]
    amax = min(E, T * k)
    n = int(active[3 * amax])
    assert n == live.numel()
    assert torch.equal(active[:n].long(), live)
    assert torch.equal(active[amax:amax + n], offsets[live]) and torch.equal(active[2 * amax:2 * amax + n],
                                                                             offsets[live + 1])


# --- the expert MLP --------------------------------------------------------------------------------------------
def _inputs(T, D, H, E, k, dtype, fmt=None, *, gated=True, bias=False, make=rand_experts, block=ref_q.FP8_BLOCK):
    if fmt == "mxfp4":
        D, H = -(-D // 32) * 32, -(-H // 32) * 32
    MW = 2 * H if gated else H
    up, down = torch.randn(E, MW, D) / D ** 0.5, torch.randn(E, D, H) / H ** 0.5
    if fmt is None:
        up, down = up.to(dtype), down.to(dtype)
    else:
        up, down = (ops.QuantizedWeight.quantize(w, fmt, block) for w in (up, down))
    return dict(x=torch.randn(T, D).to(dtype), experts=make(T, k, E), weights=torch.rand(T, k) + 0.1,
                gate_up_proj=up, down_proj=down, gate_up_bias=torch.randn(E, MW).to(dtype) if bias else None,
                down_bias=torch.randn(E, D).to(dtype) if bias else None)


def _weights(i, dtype):
    w = [i["gate_up_proj"], i["down_proj"]]
    return [v.dequantize(dtype) if isinstance(v, ops.QuantizedWeight) else v.to(dtype) for v in w]


def _reference(i, dtype, **kw):
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    up, down = _weights(i, dtype)
    return ref_mlp.moe_mlp(cast(i["x"]), i["experts"], cast(i["weights"]), up, down,
                           gate_up_bias=cast(i["gate_up_bias"]), down_bias=cast(i["down_bias"]), **kw)


def _decode(i, mode=None, **kw):
    up, down = i["gate_up_proj"], i["down_proj"]
    q = isinstance(up, ops.QuantizedWeight)
    with poisoned_empty():           # the scratch rows and the output start as NaN: every value read was written
        return dec.moe_mlp_decode(i["x"], i["experts"], i["weights"], up.data if q else up,
                                  up.scale if q else None, down.data if q else down, down.scale if q else None,
                                  format=up.format if q else None, block=up.block if q else (128, 128),
                                  gate_up_bias=i["gate_up_bias"], down_bias=i["down_bias"], **(mode or {}), **kw)[0]


def _check(i, out, dtype, **kw):
    assert out.dtype == dtype and out.shape == (i["x"].shape[0], i["down_proj"].shape[1])
    want = _reference(i, F64, **kw)
    same = _reference(i, dtype, **kw)
    n = i["gate_up_proj"].shape[2] + i["down_proj"].shape[2]
    finite = torch.where(want.isfinite(), want, 0.0)
    assert_earned_max(out, want, same, atol=1e-6 + reordered_sum_atol(finite, dtype, n))


# T, D, H, E, k, activation, gated, bias, capacity, make
CASES = [
    pytest.param(4, 64, 96, 6, 2, "silu", True, False, None, rand_experts, id="T4"),
    pytest.param(1, 32, 64, 4, 1, "silu", True, True, None, rand_experts, id="T1-k1-bias"),
    pytest.param(5, 48, 40, 5, 5, "gelu", True, False, None, rand_experts, id="k=E"),
    pytest.param(11, 40, 24, 1, 1, "relu2", False, False, None, rand_experts, id="E1-relu2-plain"),
    pytest.param(13, 32, 48, 8, 2, "gelu_tanh", True, False, None, _ids_two_experts, id="empty-experts"),
    pytest.param(23, 32, 40, 7, 3, "gelu", False, True, None, _ids_sentinel, id="prime-E-sentinels-plain-bias"),
    pytest.param(29, 32, 32, 5, 2, "silu", True, True, 3, rand_experts, id="capacity3"),
    pytest.param(17, 32, 32, 6, 2, "silu", True, False, None, _ids_one_expert, id="all-to-one-expert"),
    pytest.param(12, 32, 32, 3, 3, "silu", True, True, None, _ids_repeated, id="repeated-ids-36-rows"),
    pytest.param(3, 200, 136, 3, 2, "silu", True, True, None, rand_experts, id="D-H-not-multiples-of-blocks"),
    pytest.param(64, 32, 48, 9, 2, "silu", True, False, None, _ids_int32_strided, id="T64-int32-strided-ids"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,E,k,activation,gated,bias,capacity,make", CASES)
def test_float_weights_match_reference(T, D, H, E, k, activation, gated, bias, capacity, make, dtype, mode):
    i = _inputs(T, D, H, E, k, dtype, gated=gated, bias=bias, make=make)
    kw = dict(activation=activation, gated=gated, capacity=capacity)
    _check(i, _decode(i, mode, **kw), dtype, **kw)


QCASES = [c for c in CASES if c.id in ("T4", "T1-k1-bias", "empty-experts", "prime-E-sentinels-plain-bias",
                                       "capacity3", "repeated-ids-36-rows", "D-H-not-multiples-of-blocks")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("T,D,H,E,k,activation,gated,bias,capacity,make", QCASES)
def test_quantized_weights_match_reference(T, D, H, E, k, activation, gated, bias, capacity, make, fmt, dtype, mode):
    i = _inputs(T, D, H, E, k, dtype, fmt, gated=gated, bias=bias, make=make)
    kw = dict(activation=activation, gated=gated, capacity=capacity)
    _check(i, _decode(i, mode, **kw), dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(48, 40), (16, 96), (128, 256)], ids=["scale-per-element", "bk96", "bk256"])
def test_fp8_blocks_other_than_128(block, dtype):
    i = _inputs(7, 120, 88, 3, 2, dtype, "fp8", bias=True, block=block)
    _check(i, _decode(i), dtype)


@pytest.mark.parametrize("fmt", [None, "mxfp4"])
@pytest.mark.parametrize("spec", GLU_SPECS)
def test_glu_specs(spec, fmt):
    i = _inputs(9, 64, 64, 4, 2, torch.float32, fmt, bias=True)
    _check(i, _decode(i, activation=spec), torch.float32, activation=spec)


def test_no_tokens_no_pairs_and_no_kept_pair():
    i = _inputs(0, 32, 32, 3, 2, torch.float32)
    assert _decode(i).shape == (0, 32)
    i = _inputs(4, 32, 32, 3, 0, torch.float16)
    assert torch.equal(_decode(i), torch.zeros(4, 32, dtype=torch.float16))
    i = _inputs(5, 32, 32, 3, 2, torch.float16, "fp8", bias=True)
    i["experts"][:] = 3                       # every id outside [0, E): zeros, not the bias
    assert torch.equal(_decode(i), torch.zeros(5, 32, dtype=torch.float16))


@pytest.mark.parametrize("fmt", [None, "fp8"])
def test_nan_stays_in_its_token(fmt):
    i = _inputs(9, 32, 32, 3, 2, torch.float32, fmt, make=lambda T, k, E: torch.tensor([[0, 1], [1, 2]] * 4 + [[0, 2]]))
    i["x"][3, 5] = float("nan")               # token 3 shares experts 1 and 2 with others
    out = _decode(i)
    assert out[3].isnan().all() and not out[torch.arange(9) != 3].isnan().any()
    _check(i, out, torch.float32)


def test_interpreter_needs_one_program_for_the_barriers():
    i = _inputs(4, 32, 32, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="programs=1"):
        _decode(i, dict(programs=2))


# --- the op's path -----------------------------------------------------------------------------------------------
def _moe_mlp(i, **kw):
    with moe_kernels.use_backend("triton"), torch.no_grad():
        return ops.moe_mlp(i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"],
                           gate_up_bias=i["gate_up_bias"], down_bias=i["down_bias"], **kw)


class _Ops(TorchDispatchMode):
    """Records the aten ops run outside Triton launches."""

    def __init__(self):
        super().__init__()
        self.ops, self.inside = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


_CREATE_OR_VIEW = {"empty", "new_empty", "empty_strided", "view", "_unsafe_view", "alias", "detach", "select", "slice", "t",
                   "as_strided", "unsqueeze", "expand", "permute", "transpose", "lift_fresh"}


@pytest.mark.parametrize("fmt", [None, "fp8", "mxfp4"])
def test_a_decode_step_is_two_launches_and_nothing_else(fmt, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv(dec.DECODE_ENV, "fused")
    i = _inputs(6, 64, 64, 5, 2, torch.float16, fmt, bias=True)
    launches, mode = [], _Ops()
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        mode.inside += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            mode.inside -= 1

    monkeypatch.setattr(InterpretedFunction, "run", run)
    op = "moe_mlp_quantized" if fmt else "moe_mlp_fused"
    with mode:                  # the layer: its checks, then the custom op (opaque to the mode)
        out = _moe_mlp(i)
    assert set(mode.ops) <= _CREATE_OR_VIEW | {op}, sorted(set(mode.ops) - _CREATE_OR_VIEW)
    assert launches == ["_decode_schedule_kernel", "_decode_kernel"]
    _check(i, out, torch.float16)
    launches.clear()
    mode.ops.clear()
    up, down = i["gate_up_proj"], i["down_proj"]
    if fmt:
        args = (i["x"], i["experts"], i["weights"], fmt, up.data, up.scale, down.data, down.scale, *up.block,
                i["gate_up_bias"], i["down_bias"], "silu", True, None)
    else:
        args = (i["x"], i["experts"], i["weights"], up, down, i["gate_up_bias"], i["down_bias"], "silu", True, None,
                False)
    with mode, torch.no_grad():  # the op's body on the triton backend
        body = _backend.IMPLS[op]["triton"](*args)
    assert set(mode.ops) <= _CREATE_OR_VIEW, f"torch ops besides the two launches: {sorted(set(mode.ops) - _CREATE_OR_VIEW)}"
    assert launches == ["_decode_schedule_kernel", "_decode_kernel"]
    torch.testing.assert_close(body if fmt else body[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [None, "mxfp4"])
def test_which_steps_take_it(fmt, monkeypatch):
    calls = []
    real = dec.moe_mlp_decode
    monkeypatch.setattr(dec, "moe_mlp_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    small, big = _inputs(3, 32, 32, 4, 2, torch.float32, fmt), _inputs(65, 32, 32, 4, 2, torch.float32, fmt)
    monkeypatch.delenv(dec.DECODE_ENV, raising=False)
    _moe_mlp(small)
    assert not calls                                   # the default: the split kernels, until measured on a GPU
    assert moe_kernels.backends()["decode"].startswith("per tuned data file")
    monkeypatch.setenv(dec.DECODE_ENV, "fused")
    assert moe_kernels.backends()["decode"].startswith("two launches")
    _check(small, _moe_mlp(small), torch.float32)
    assert len(calls) == 1
    _check(big, _moe_mlp(big), torch.float32)          # more than DECODE_MAX_TOKENS tokens: the split kernels
    assert len(calls) == 1
    monkeypatch.setenv(dec.DECODE_ENV, "split")
    _moe_mlp(small)
    assert len(calls) == 1
    monkeypatch.setenv(dec.DECODE_ENV, "fast")
    assert moe_kernels.backends()["decode"].startswith("error")
    with pytest.raises(ValueError, match=dec.DECODE_ENV):
        _moe_mlp(small)


def test_training_steps_keep_the_split_kernels(monkeypatch):
    monkeypatch.setenv(dec.DECODE_ENV, "fused")
    calls = []
    real = dec.moe_mlp_decode
    monkeypatch.setattr(dec, "moe_mlp_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    i = _inputs(3, 32, 32, 4, 2, torch.float32)
    up = i["gate_up_proj"].requires_grad_()
    with moe_kernels.use_backend("triton"):
        ops.moe_mlp(i["x"], i["experts"], i["weights"], up, i["down_proj"]).sum().backward()
    assert not calls and up.grad is not None


def test_every_config_is_in_the_compile_list():
    names = {e["name"] for e in dec.AOT_CONFIGS}
    for fmt in (None, "fp8", "mxfp4"):
        for dtype in (torch.float16, torch.bfloat16):
            for bm in (16, 32, 64):
                assert any(n.startswith(f"moe_decode-{fmt or 'float'}-{dec._TL_TYPE[dtype]}-m{bm}") for n in names)
    assert "moe_decode_schedule" in names


# --- on a GPU ----------------------------------------------------------------------------------------------------
def _gpu_inputs(T, fmt, E=8, k=2, D=4096, H=14336):
    """A Mixtral-sized layer in bf16 on the GPU."""
    torch.manual_seed(T)
    i = _inputs(T, D, H, E, k, torch.bfloat16, fmt)
    for key, v in i.items():
        if isinstance(v, torch.Tensor):
            i[key] = v.cuda()
        elif isinstance(v, ops.QuantizedWeight):
            i[key] = v.to("cuda")
    return i


def _expert_weight(w, e):
    """Expert e's weight [N, K] in float64."""
    if isinstance(w, ops.QuantizedWeight):
        return w._replace(data=w.data[e:e + 1], scale=w.scale[e:e + 1]).dequantize(F64)[0]
    return w[e].double()


def _check_on_gpu(i, out):
    """Against float64 on the GPU, per active expert (the whole float64 weights would not fit)."""
    x, ids, w = i["x"].double(), i["experts"], i["weights"].double()
    want = torch.zeros(x.shape[0], i["down_proj"].shape[1], dtype=F64, device=x.device)
    same = torch.zeros_like(want)
    for e in ids.unique().tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        up, down = (_expert_weight(i[key], e) for key in ("gate_up_proj", "down_proj"))
        for dt, acc in ((F64, want), (torch.bfloat16, same)):
            h = glu(x[tok].to(dt) @ up.to(dt).t(), "silu", True)
            acc.index_add_(0, tok, ((h @ down.to(dt).t()).double() * w[tok, slot][:, None]))
    n = i["gate_up_proj"].shape[2] + i["down_proj"].shape[2]
    assert_earned_max(out, want, same, atol=1e-6 + reordered_sum_atol(want, torch.bfloat16, n))


@GPU
@pytest.mark.parametrize("fmt", [None, "fp8", "mxfp4"])
@pytest.mark.parametrize("T", [1, 8, 64])
def test_bf16_at_real_sizes_on_gpu(T, fmt, monkeypatch):
    monkeypatch.setenv(dec.DECODE_ENV, "fused")
    i = _gpu_inputs(T, fmt)
    _check_on_gpu(i, _moe_mlp(i))


@GPU
@pytest.mark.parametrize("fmt", [None, "mxfp4"])
def test_two_kernels_and_a_cuda_graph_on_gpu(fmt, monkeypatch):
    monkeypatch.setenv(dec.DECODE_ENV, "fused")
    i = _gpu_inputs(4, fmt, E=8, k=2, D=1024, H=2048)
    _moe_mlp(i)                                       # compiles outside the profile and the capture
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _moe_mlp(i)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sorted(kernels) == ["_decode_kernel", "_decode_schedule_kernel"], kernels
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _moe_mlp(i)
    for _ in range(3):                               # replays see new tokens and routes, and no stale barrier state
        i["x"].copy_(torch.randn_like(i["x"]))
        i["experts"].copy_(rand_experts(4, 2, 8).cuda())
        g.replay()
        torch.testing.assert_close(out, _moe_mlp(i), rtol=0, atol=0)
        _check_on_gpu(i, out)
