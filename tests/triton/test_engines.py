"""The expert MLP's GEMM engines: each engine (torch's grouped_mm, our TMA kernels, our pointer kernels) composed
into ops.moe_mlp forward and backward against the float64 reference, on shapes where it applies (16-byte rows),
with the edge cases of the routing; the fused activation passes; the choice of engine per role."""
import json

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels  # noqa: E402
from moe_kernels import ops  # noqa: E402
from moe_kernels.triton import engines  # noqa: E402
from moe_kernels.triton import grouped_gemm_tma as gt  # noqa: E402
from tests.helpers import (GLU_SPECS, assert_earned_max, assert_moe_mlp_earned, poisoned_empty, rand_experts,  # noqa: E402
                           reordered_sum_atol, run_moe_mlp)

F64 = torch.float64
def _ids_one_expert(T, k, E):
    ids = rand_experts(T, k, E)
    ids[:, 0] = E - 1
    return ids


def _ids_sentinel(T, k, E):
    ids = rand_experts(T, k, E)
    ids[::3, 0] = -1
    ids[1::4, -1] = E
    return ids


def _ids_two_experts(T, k, E):
    return torch.stack([torch.zeros(T, dtype=torch.int64), torch.full((T,), 3, dtype=torch.int64)], 1)[:, :k]


# T, D, H, E, k, activation, gated, bias, capacity, ids: 16-byte rows (D, H multiples of 8) so every engine applies
CASES = [
    pytest.param(37, 32, 16, 7, 3, "silu", True, False, None, rand_experts, id="T37-prime-E7-k3"),  # T*k not a tile multiple
    pytest.param(1, 16, 8, 4, 1, "silu", True, True, None, rand_experts, id="T1-k1-bias"),
    pytest.param(9, 16, 24, 4, 4, "gelu", True, False, None, rand_experts, id="k=E"),
    pytest.param(11, 24, 16, 1, 1, "relu", False, True, None, rand_experts, id="E1-relu-plain-bias"),
    pytest.param(21, 16, 16, 6, 2, "silu", True, False, None, _ids_one_expert, id="all-to-one"),
    pytest.param(13, 16, 8, 8, 2, "gelu_tanh", True, False, None, _ids_two_experts, id="empty-experts"),
    pytest.param(29, 16, 16, 5, 2, "silu", True, False, 3, rand_experts, id="capacity3-drops"),
    pytest.param(23, 16, 8, 6, 3, "gelu", False, False, None, _ids_sentinel, id="sentinels-plain"),
]


def _inputs(T, D, H, E, k, gated, bias, make, dtype):
    up = 2 * H if gated else H
    return dict(x=torch.randn(T, D, dtype=dtype), experts=make(T, k, E), weights=torch.rand(T, k) + 0.1,
                gate_up_proj=torch.randn(E, up, D, dtype=dtype) / D**0.5,
                down_proj=torch.randn(E, D, H, dtype=dtype) / H**0.5,
                gate_up_bias=torch.randn(E, up, dtype=dtype) if bias else None,
                down_bias=torch.randn(E, D, dtype=dtype) if bias else None)


_run = run_moe_mlp


def _expected_engine(engine, role, dtype, bias):
    """What a forced engine gives each role: the engine where it applies, else the pointer kernels."""
    if engine == "tma" and dtype == torch.float32:
        return "triton"
    if engine == "torch" and role == "down" and bias:
        return "triton"     # torch's grouped_mm takes no bias per group
    return engine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("T,D,H,E,k,activation,gated,bias,capacity,make", CASES)
def test_engine_matches_reference(monkeypatch, engine, T, D, H, E, k, activation, gated, bias, capacity, make, dtype):
    monkeypatch.setenv(engines.ENGINE_ENV, engine)
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, "16,16,16,4,2,1")
    monkeypatch.setenv(gt.TN_TMA_CONFIG_ENV, "16,16,16,4,2,1")
    inputs = _inputs(T, D, H, E, k, gated, bias, make, dtype)
    grad = torch.randn(T, D, dtype=dtype)
    kw = dict(activation=activation, gated=gated, capacity=capacity)
    engines.LAST.clear()
    with poisoned_empty():
        out, grads = _run("triton", inputs, grad, **kw)
    for role in engines.ROLES:
        assert engines.LAST[role][0] == _expected_engine(engine, role, dtype, bias), (role, engines.LAST[role])
    assert_moe_mlp_earned(_run, inputs, grad, (out, grads), dtype, D + H, **kw)


def test_engines_mixed_per_role(monkeypatch):
    # every role on another engine: the compositions meet in the materialised / gathered rows
    monkeypatch.setenv(engines.ENGINE_ENV, "up=tma,down=torch,dh=triton,dx=tma,dw_up=torch,dw_down=tma")
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, "16,16,16,4,2,1")
    monkeypatch.setenv(gt.TN_TMA_CONFIG_ENV, "16,16,16,4,2,1")
    T, D, H, E, k = 30, 16, 16, 5, 2
    inputs = _inputs(T, D, H, E, k, True, False, rand_experts, torch.float16)
    grad = torch.randn(T, D, dtype=torch.float16)
    out, grads = _run("triton", inputs, grad)
    assert {r: engines.LAST[r][0] for r in engines.ROLES} == {"up": "tma", "down": "torch", "dh": "triton",
                                                              "dx": "tma", "dw_up": "torch", "dw_down": "tma"}
    assert_moe_mlp_earned(_run, inputs, grad, (out, grads), torch.float16, D + H)


def test_unaligned_rows_fall_back_to_the_pointer_kernels(monkeypatch):
    # D = 12 halves is 24 bytes: neither grouped_mm nor TMA takes such rows
    monkeypatch.setenv(engines.ENGINE_ENV, "tma")
    engines.LAST.clear()
    inputs = _inputs(8, 12, 8, 3, 2, True, False, rand_experts, torch.float16)
    _run("triton", inputs, torch.randn(8, 12, dtype=torch.float16))
    assert engines.LAST["up"][0] == "triton" and engines.LAST["dw_up"][0] == "triton"


# --- the choice --------------------------------------------------------------------------------------------------
def test_engine_env_is_parsed_and_checked(monkeypatch):
    monkeypatch.setenv(engines.ENGINE_ENV, "dh=tma, dx=torch")
    assert engines._forced() == {"dh": "tma", "dx": "torch"}
    monkeypatch.setenv(engines.ENGINE_ENV, "triton")
    assert set(engines._forced().values()) == {"triton"} and set(engines._forced()) == set(engines.ROLES)
    for bad in ("cutlass", "dh=cutlass", "dgrad=tma"):
        monkeypatch.setenv(engines.ENGINE_ENV, bad)
        with pytest.raises(ValueError, match=engines.ENGINE_ENV):
            engines._forced()


def test_tuned_engine_file_is_read(monkeypatch, tmp_path):
    monkeypatch.delenv(engines.ENGINE_ENV, raising=False)
    monkeypatch.setattr(engines, "CONFIG_DIR", str(tmp_path))
    engines._load_engines.cache_clear()
    path = engines.engine_file("cpu", torch.float16)
    with open(path, "w") as f:
        json.dump({"E4-D16-H8": {"up": {"64": "tma", "4096": "torch"}, "dh": {"64": "tma"}}}, f)
    cpu = torch.device("cpu")
    try:
        assert engines.choose("up", cpu, torch.float16, (4, 16, 8), 100, (16, 16, 8)) == "tma"    # nearest: 64
        assert engines.choose("up", cpu, torch.float16, (4, 16, 8), 3000, (16, 16, 8)) == "torch"
        assert engines.choose("up", cpu, torch.float16, (4, 16, 8), 600, (16, 16, 8)) == "torch"  # log scale
        # a tuned engine that does not apply to these operands is not taken
        assert engines.choose("dh", cpu, torch.float16, (4, 16, 8), 64, (16, 12)) == "triton"
        assert engines.choose("dx", cpu, torch.float16, (4, 16, 8), 64, (16, 16)) == "triton"  # no entry: default
        assert engines.choose("up", cpu, torch.float16, (5, 16, 8), 64, (16, 16, 8)) == "triton"  # other shape
        assert "gemm_engines-cpu-float16.json" in engines.report()["tuned_files"]
    finally:
        engines._load_engines.cache_clear()


def test_default_on_cpu_is_the_pointer_kernels(monkeypatch):
    # torch's grouped_mm is the default on GPUs only (on CPU it is a per-group loop)
    monkeypatch.delenv(engines.ENGINE_ENV, raising=False)
    for role in engines.ROLES:
        assert engines.choose(role, torch.device("cpu"), torch.bfloat16, (8, 64, 64), 1 << 16, (64, 64)) == "triton"


def test_applicability():
    cpu = torch.device("cpu")
    assert engines.applies("torch", cpu, torch.bfloat16, (16, 8))
    assert not engines.applies("torch", cpu, torch.bfloat16, (16, 8), bias=True)
    assert not engines.applies("torch", cpu, torch.bfloat16, (16, 12))
    assert engines.applies("torch", cpu, torch.float32, (16, 12))      # 48 bytes
    assert not engines.applies("tma", cpu, torch.float32, (16, 16))
    assert engines.applies("triton", cpu, torch.float32, (3, 5), bias=True)


def test_backends_reports_the_engine_of_each_role(monkeypatch):
    monkeypatch.setenv(engines.ENGINE_ENV, "torch")
    inputs = _inputs(8, 16, 8, 3, 2, True, False, rand_experts, torch.float32)
    _run("triton", inputs, torch.randn(8, 16))
    report = moe_kernels.backends()["gemm_engines"]
    assert set(report["roles"]) == set(engines.ROLES)
    assert report["roles"]["dw_up"].startswith("torch (last run: E3-D16-H8")
    assert report["override"] == "torch" and "grouped_mm" in report["default"]


def test_torch_gemm_tn_zeroes_empty_experts(monkeypatch):
    # more elements per expert than the zeroing programs cover in one step: they stride
    monkeypatch.setattr(engines, "ZERO_PROGRAMS", 3)
    offsets = torch.tensor([0, 3, 3, 7, 7], dtype=torch.int32)
    x, dy = torch.randn(9, 1040), torch.randn(9, 24)
    dw = engines.torch_gemm_tn(x, dy, offsets, 4)
    assert not dw[1].any() and not dw[3].any()
    torch.testing.assert_close(dw[2], dy[3:7].t() @ x[3:7])
    dw[1].fill_(float("nan"))
    engines._zero_empty_experts_kernel[(4, 3)](dw, offsets, 24 * 1040, BLOCK=engines.ZERO_BLOCK)
    assert not dw[1].any() and not dw[2].isnan().any()


def test_weights_off_16_bytes_are_not_given_to_grouped_mm_or_tma(monkeypatch):
    # a weight that is a view starting 2 bytes into its storage: TMA and grouped_mm need 16-byte aligned bases
    monkeypatch.setenv(engines.ENGINE_ENV, "torch")
    engines.LAST.clear()
    i = _inputs(8, 16, 8, 3, 2, True, False, rand_experts, torch.float16)
    up = i["gate_up_proj"]
    shifted = torch.empty(up.numel() + 1, dtype=up.dtype)[1:].view(up.shape).copy_(up).requires_grad_()
    assert shifted.data_ptr() % 16
    with moe_kernels.use_backend("triton"):
        out = ops.moe_mlp(i["x"], i["experts"], i["weights"], shifted, i["down_proj"])
        grad_up, = torch.autograd.grad(out, shifted, torch.randn_like(out))
    assert engines.LAST["up"][0] == "triton" and engines.LAST["dx"][0] == "triton"
    assert engines.LAST["down"][0] == "torch" and engines.LAST["dw_up"][0] == "torch"
    with moe_kernels.use_backend("reference"):
        want = ops.moe_mlp(i["x"].double(), i["experts"], i["weights"], up.double(), i["down_proj"].double())
        same = ops.moe_mlp(i["x"], i["experts"], i["weights"], up, i["down_proj"])
    assert_earned_max(out, want, same, atol=reordered_sum_atol(want, torch.float16, 24))


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_inference_forward_on_each_engine(monkeypatch, engine):
    # no gradient wanted: the forward saves nothing and fuses the activation where the engine can
    monkeypatch.setenv(engines.ENGINE_ENV, engine)
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, "16,16,16,4,2,1")
    inputs = _inputs(19, 16, 16, 5, 2, True, True, rand_experts, torch.float16)

    def run(backend, tensors):
        with torch.no_grad(), moe_kernels.use_backend(backend):
            t = dict(tensors)
            return ops.moe_mlp(t.pop("x"), t.pop("experts"), t.pop("weights"), t.pop("gate_up_proj"),
                               t.pop("down_proj"), **t)
    with poisoned_empty():
        out = run("triton", inputs)
    assert engines.LAST["up"][0] == engine
    as64 = {n: (t.to(F64) if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
    want = run("reference", as64)
    assert_earned_max(out, want, run("reference", inputs), atol=reordered_sum_atol(want, torch.float16, 32))


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_no_tokens_on_each_engine(monkeypatch, engine):
    # T = 0: empty outputs and gradients, zero weight gradients, on every engine
    monkeypatch.setenv(engines.ENGINE_ENV, engine)
    inputs = _inputs(0, 16, 16, 4, 2, True, False, rand_experts, torch.float16)
    out, grads = _run("triton", inputs, torch.randn(0, 16, dtype=torch.float16))
    assert out.shape == (0, 16) and grads["x"].shape == (0, 16) and grads["weights"].shape == (0, 2)
    assert not grads["gate_up_proj"].any() and not grads["down_proj"].any()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "tma"])
def test_compile_fullgraph_on_each_engine(monkeypatch, engine):
    # the engine is chosen inside the custom op: torch.compile(fullgraph=True) traces the layer whatever it is
    from moe_kernels.nn import SparseMoE

    monkeypatch.setenv(engines.ENGINE_ENV, engine)
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, "16,16,16,4,2,1")
    monkeypatch.setenv(gt.TN_TMA_CONFIG_ENV, "16,16,16,4,2,1")
    m = SparseMoE(16, 16, 5, 2).half()
    x = torch.randn(11, 16, dtype=torch.float16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with moe_kernels.use_backend("triton"):
        y_c = compiled(x)
        g_c = torch.autograd.grad(y_c.sum(), x)[0]
        engines.LAST.clear()
        y_e = m(x)
        g_e = torch.autograd.grad(y_e.sum(), x)[0]
    assert engines.LAST["up"][0] == engine and engines.LAST["dw_up"][0] == engine
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


@pytest.mark.parametrize("capability,hip,want", [((9, 0), None, "torch"), ((10, 0), None, "torch"),
                                                 ((8, 0), None, "triton"), ((12, 0), None, "triton"),
                                                 ((9, 4), "6.2", "triton")],
                         ids=["sm90", "sm100", "sm80", "sm120", "rocm"])
def test_default_rule_on_gpus(monkeypatch, capability, hip, want):
    # grouped_mm's CUTLASS kernels exist for bf16 on sm_90 / sm_100 only; elsewhere torch loops over the groups and
    # syncs on the offsets, so the pointer kernels run
    monkeypatch.delenv(engines.ENGINE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU without tuned files")
    monkeypatch.setattr(torch.version, "hip", hip)
    cuda = torch.device("cuda")
    shape, widths = (8, 4096, 14336), (4096, 28672, 14336)
    assert engines.choose("up", cuda, torch.bfloat16, shape, 32768, widths) == want
    assert engines.choose("up", cuda, torch.float16, shape, 32768, widths) == "triton"        # not bf16
    assert engines.choose("up", cuda, torch.bfloat16, shape, 8 * 63, widths) == "triton"      # < 64 rows per expert
    assert engines.choose("down", cuda, torch.bfloat16, shape, 32768, widths, bias=True) == "triton"
    assert engines.applies("tma", cuda, torch.bfloat16, (4096,)) == (capability[0] == 9 and hip is None)
    assert not engines.applies("cutlass", cuda, torch.bfloat16, (4096,))


def test_rows_grouped_mm_leaves_unwritten_are_never_read(monkeypatch):
    # rows at or past offsets[E] of grouped_mm's output hold whatever memory held: NaN there must not reach a result
    real = engines.torch_gemm

    def poisoning(a, w, offsets, trans_w=True):
        out = real(a, w, offsets, trans_w)
        out[int(offsets[-1]):] = float("nan")
        return out
    monkeypatch.setattr(engines, "torch_gemm", poisoning)
    monkeypatch.setenv(engines.ENGINE_ENV, "torch")
    inputs = _inputs(29, 16, 16, 5, 2, True, False, rand_experts, torch.float16)
    inputs["experts"][::3, 0] = -1          # dropped pairs: rows past offsets[E]
    grad = torch.randn(29, 16, dtype=torch.float16)
    out, grads = _run("triton", inputs, grad, capacity=4)
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads.values())
    assert_moe_mlp_earned(_run, inputs, grad, (out, grads), torch.float16, 32, capacity=4)


@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("activation", GLU_SPECS + ["relu2"])
def test_glu_options_on_each_engine(monkeypatch, engine, activation):
    # the activations of the transformers families (clamps, alpha, up offset, interleaved gate/up rows; relu^2):
    # forward and every gradient on each engine against float64
    monkeypatch.setenv(engines.ENGINE_ENV, engine)
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, "16,16,16,4,2,1")
    monkeypatch.setenv(gt.TN_TMA_CONFIG_ENV, "16,16,16,4,2,1")
    gated = activation != "relu2"
    inputs = _inputs(19, 16, 16, 5, 2, gated, True, rand_experts, torch.float16)
    inputs["x"] = inputs["x"] * 4         # pre-activations beyond the clamps' limits
    grad = torch.randn(19, 16, dtype=torch.float16)
    kw = dict(activation=activation, gated=gated)
    engines.LAST.clear()
    out, grads = _run("triton", inputs, grad, **kw)
    assert engines.LAST["up"][0] == engine and engines.LAST["dx"][0] == engine
    assert_moe_mlp_earned(_run, inputs, grad, (out, grads), torch.float16, 32, **kw)
