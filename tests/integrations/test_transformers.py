"""moe_kernels in transformers: experts_implementation="moe_kernels" for transformers 5.x models, and the
conversion of transformers v4-style sparse MoE blocks (moe_kernels.integrations.transformers).

Oracles: transformers' own "eager" experts on tiny models with random weights; for the experts function, a
loop over tokens and slots written here from the experts contract, and transformers' own `batched_mm`
experts function (which reads the same module attributes) in float64; for v4 blocks, mirror blocks written
here from the v4 algorithm (router logits -> softmax in fp32 -> top-k -> renormalise -> cast -> per-expert
loop). Skipped without transformers.
"""
import copy
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations import moe as hf_moe  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels.integrations.transformers import (NAME, SparseMoEBlock, check_experts, convert_block,  # noqa: E402
                                                   experts_spec, is_experts_module,
                                                   convert_transformers, experts_activation, experts_forward, register)

from ..helpers import assert_close64, assert_earned_dtype, float64_everywhere, naive_act, rand_experts  # noqa: E402

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]
# fp32 v4 block vs its fused replacement (one layer, outputs of magnitude ~1): they differ in the order of the
# expert sums, errors seen ~1e-7; a wrong weight, gate half or activation moves outputs by O(1)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


# --- tiny transformers 5.x models -------------------------------------------------------------------------
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=2)
FAMILIES = {  # family -> (config class, model class, config arguments); each layer is a sparse MoE layer
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=6)),
    # Qwen3-MoE renormalises the top-k weights, OLMoE does not; Qwen2-MoE adds a sigmoid-gated shared expert
    "qwen3_moe-norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(intermediate_size=64, moe_intermediate_size=48, head_dim=8, num_experts=6,
                            norm_topk_prob=True)),
    "olmoe-no-norm": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=6,
                                                              norm_topk_prob=False)),
    "qwen2_moe-shared": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                         dict(intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40,
                              num_experts=6, norm_topk_prob=False)),
}


def tiny_config(family, **kw):
    """The config of a 2-layer model of `family`, built the way a user writes it."""
    cfg_name, model_name, args = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    return getattr(transformers, cfg_name)(**COMMON, **args, **kw)


def tiny_model(family, **kw):
    """A 2-layer model of `family` with random fp32 weights (norm weights near 1, everything else N(0, 0.2^2),
    about 1/sqrt(hidden): router logits of std ~1, spread enough that no two top-k scores tie)."""
    model = getattr(transformers, FAMILIES[family][1])(tiny_config(family, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def logits_and_grads(model, ids, cotangent):
    """logits [B, S, V] and the gradient of sum(logits * cotangent) w.r.t. every parameter, by name."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits * cotangent).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def count_moe_mlp_calls(monkeypatch):
    """Counts the calls of ops.moe_mlp (the experts function calls it through moe_kernels.ops)."""
    calls = []
    real = moe_kernels.ops.moe_mlp

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_kernels.ops, "moe_mlp", spy)
    return calls


def assert_model_results_earned(fused, eager, ids, cotangent):
    """Logits and every parameter gradient of the fp32 `fused` model against the eager model run in float64
    throughout (its fp32 upcasts made float64 too), held to twice the error of the fp32 `eager` model, model-wide:
    max over tensors of max|fused - ref64| / max|ref64| <= 2 * (the same for eager) + 1e-6. Model-wide, because
    per tensor the maximum over a handful of elements (an 8-wide q_norm weight) is noise: fp32 runs that differ
    only in summation order land up to ~2.3x apart there, but within 1.7x model-wide (300 seeded runs of every
    family and backend); a wrong weight, gate or gradient is off by O(1) in its tensor, far beyond both."""
    results = [logits_and_grads(m, ids, cotangent) for m in (fused, eager)]
    with float64_everywhere():
        results.append(logits_and_grads(copy.deepcopy(eager).double(), ids, cotangent.double()))
    (logits, grads), (logits32, grads32), (logits64, grads64) = results
    assert logits.dtype == torch.float32 and logits64.dtype == F64
    assert grads.keys() == grads32.keys() == grads64.keys()
    grads, grads32, grads64 = ({"logits": lg, **g} for lg, g in zip((logits, logits32, logits64),
                                                                    (grads, grads32, grads64)))

    def rel_errors(results):
        errs = {}
        for name, ref in grads64.items():
            got = results[name]
            assert got is not None and ref is not None, name
            assert torch.equal(got.isnan(), ref.isnan()), f"{name}: NaN where the reference has none, or the reverse"
            errs[name] = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        return errs

    errs, errs32 = rel_errors(grads), rel_errors(grads32)
    worst = max(errs, key=errs.get)
    bound = 2 * max(errs32.values()) + 1e-6
    assert errs[worst] <= bound, (f"{worst}: relative error {errs[worst]:.3g} exceeds the earned {bound:.3g} "
                                  f"(fp32 eager's worst: {max(errs32.values()):.3g})")


# --- registration and transformers' validation ---------------------------------------------------------------
def test_register_makes_the_name_valid_where_transformers_checks_it(monkeypatch):
    # without registration transformers refuses the name when the model is built; monkeypatch restores the entry
    monkeypatch.delitem(hf_moe.ExpertsInterface._global_mapping, NAME, raising=False)
    # transformers accepts a name either interface knows: register() also adds it to the FP8 experts interface
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    monkeypatch.delitem(fp8.FP8ExpertsInterface._global_mapping, NAME, raising=False)
    config = tiny_config("mixtral", experts_implementation=NAME)
    with pytest.raises(ValueError, match='experts_implementation="moe_kernels"` is not supported'):
        transformers.MixtralForCausalLM(config)
    register()
    register()  # idempotent
    assert hf_moe.ALL_EXPERTS_FUNCTIONS[NAME] is experts_forward
    assert hf_moe.ExpertsInterface()[NAME] is experts_forward  # every instance sees it
    model = transformers.MixtralForCausalLM(config)
    assert model.config._experts_implementation == NAME
    with pytest.raises(ValueError, match="bogus"):
        model.set_experts_implementation("bogus")


def test_register_refuses_a_transformers_that_checks_a_fixed_list(monkeypatch):
    # transformers 5.0-5.6 accept only their own experts implementations, whatever is registered
    # sys.modules' entry, not the module imported above: transformers re-imports itself on some paths
    # (processing_utils' direct_transformers_import), replacing the entry
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.6.2")
    with pytest.raises(ImportError, match=r"needs transformers>=5\.7.*found transformers 5\.6\.2"):
        register()


def test_importing_moe_kernels_does_not_import_transformers_and_register_says_it_is_missing():
    code = (
        "import sys\n"
        "import moe_kernels, moe_kernels.integrations.transformers as mt\n"
        "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if 'transformers' in m)\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "try:\n"
        "    mt.register()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('register() without transformers raised nothing')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "needs transformers>=5.7" in proc.stdout and "not installed" in proc.stdout, proc.stdout


# --- whole models: moe_kernels vs eager ---------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_model_logits_and_grads_match_eager(family, backend, monkeypatch):
    register()
    eager = tiny_model(family, experts_implementation="eager")
    fused = copy.deepcopy(eager)
    fused.set_experts_implementation(NAME)
    assert fused.config._experts_implementation == NAME and eager.config._experts_implementation == "eager"
    ids = torch.randint(0, 64, (2, 7))
    cotangent = torch.randn(2, 7, 64)
    calls = count_moe_mlp_calls(monkeypatch)
    assert_model_results_earned(fused, eager, ids, cotangent)
    assert calls == [torch.Size([14, 32])] * 2, "each layer's experts must run on moe_kernels"
    # and back: set_experts_implementation("eager") undoes it
    fused.set_experts_implementation("eager")
    calls.clear()
    torch.testing.assert_close(fused(ids).logits, eager(ids).logits, rtol=0, atol=0)
    assert calls == []


@pytest.mark.parametrize("way", ["config", "set_experts_implementation", "from_pretrained", "convert_transformers",
                                 "moe_kernels.convert"])
def test_every_way_of_choosing_moe_kernels(way, tmp_path, monkeypatch):
    register()
    eager = tiny_model("mixtral", experts_implementation="eager")
    if way == "config":
        fused = type(eager)(tiny_config("mixtral", experts_implementation=NAME))
        fused.load_state_dict(eager.state_dict())
    elif way == "set_experts_implementation":
        fused = copy.deepcopy(eager)
        fused.set_experts_implementation(NAME)
    elif way == "from_pretrained":
        eager.save_pretrained(tmp_path)
        fused = type(eager).from_pretrained(tmp_path, experts_implementation=NAME)
        assert next(fused.parameters()).dtype == torch.float32
    elif way == "convert_transformers":
        fused = copy.deepcopy(eager)
        assert convert_transformers(fused) == 2  # two layers of experts
    else:
        fused = moe_kernels.convert(copy.deepcopy(eager), strict=True)
    assert fused.config._experts_implementation == NAME
    assert eager.config._experts_implementation == "eager"
    ids = torch.randint(0, 64, (3, 5))
    cotangent = torch.randn(3, 5, 64)
    calls = count_moe_mlp_calls(monkeypatch)
    assert_model_results_earned(fused, eager, ids, cotangent)
    assert len(calls) == 2


# --- the experts function on its own ------------------------------------------------------------------------
ORACLE_ACT = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": None}
# transformers >= 5.11 (or so) knows post-expert norms
HAS_POST_NORM = "has_post_expert_norm" in inspect.signature(hf_moe.use_experts_implementation).parameters


def make_experts(E, D, H, *, gated=True, transposed=False, bias=False, act="silu", post_norm=False, dtype=F64):
    """An experts module built with transformers' own decorator, in any of its layouts, random weights;
    `oracle_act` names its activation for tests/helpers.naive_act."""

    flags = dict(has_gate=gated, is_transposed=transposed, has_bias=bias)
    if HAS_POST_NORM:
        flags["has_post_expert_norm"] = post_norm

    @hf_moe.use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            up = 2 * H if gated else H
            shapes = {"up": (E, D, up) if transposed else (E, up, D), "down": (E, H, D) if transposed else (E, D, H)}
            up_name = "gate_up_proj" if gated else "up_proj"
            setattr(self, up_name, nn.Parameter(torch.randn(shapes["up"], dtype=dtype) / math.sqrt(D)))
            self.down_proj = nn.Parameter(torch.randn(shapes["down"], dtype=dtype) / math.sqrt(H))
            if bias:
                setattr(self, up_name + "_bias", nn.Parameter(0.5 * torch.randn(E, up, dtype=dtype)))
                self.down_proj_bias = nn.Parameter(0.5 * torch.randn(E, D, dtype=dtype))
            if post_norm:
                self.post_expert_norm = nn.LayerNorm(D, dtype=dtype)
            self.act_fn = ACT2FN[act]
            self.oracle_act = ORACLE_ACT[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the tests call the experts functions directly")

    return Experts(transformers.PretrainedConfig())


def contract_loop(m, x, top_k_index, top_k_weights):
    """The experts contract, token by token and slot by slot: out[t] = sum over slots j with e = index[t, j] in
    [0, E) of weights[t, j] * down_e(act(gate_e x_t) * up_e x_t) (+ biases), gate rows first; float64."""
    gated = m.has_gate
    up = m.gate_up_proj if gated else m.up_proj
    down = m.down_proj
    if m.is_transposed:
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    up_b = (m.gate_up_proj_bias if gated else m.up_proj_bias) if m.has_bias else None
    down_b = m.down_proj_bias if m.has_bias else None
    E, rows = up.shape[0], []
    for t in range(x.shape[0]):
        acc = torch.zeros(down.shape[1], dtype=F64)
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            if not 0 <= e < E:
                continue
            h = up[e] @ x[t] + (up_b[e] if up_b is not None else 0)
            half = h.shape[0] // 2
            a = naive_act(h[:half], m.oracle_act) * h[half:] if gated else naive_act(h, m.oracle_act)
            y = down[e] @ a + (down_b[e] if down_b is not None else 0)
            acc = acc + top_k_weights[t, j] * y
        rows.append(acc)
    return torch.stack(rows)


def routing(T, k, E, dtype=F64):
    """top-k-like ids [T, k] and positive weights [T, k] (a softmax's)."""
    return rand_experts(T, k, E), torch.rand(T, k, dtype=dtype) + 0.05


def leaves(m, x, w):
    return [x, w] + [p for p in m.parameters()]


LAYOUTS = [  # (gated, transposed, bias, act): the layouts of the contract, named by the models that use them
    pytest.param(True, False, False, "silu", id="mixtral-gated"),
    pytest.param(True, True, False, "silu", id="aria-transposed"),
    pytest.param(True, False, True, "gelu_pytorch_tanh", id="gated-bias-geglu"),
    pytest.param(True, True, True, "silu", id="transposed-bias"),
    pytest.param(False, False, False, "relu", id="nemotron-h-not-gated-relu"),
    pytest.param(False, True, True, "gelu", id="not-gated-transposed-bias-gelu"),
]


@pytest.mark.parametrize("gated, transposed, bias, act", LAYOUTS)
def test_experts_function_every_layout_matches_loop_and_transformers(gated, transposed, bias, act, backend):
    E, D, H, T, k = 5, 12, 7, 19, 2  # odd H, prime E
    m = make_experts(E, D, H, gated=gated, transposed=transposed, bias=bias, act=act)
    x = torch.randn(T, D, dtype=F64, requires_grad=True)
    idx, w = routing(T, k, E)
    w.requires_grad_()
    out = experts_forward(m, x, idx, w)
    assert out.dtype == F64 and out.shape == (T, D)
    assert_close64(out, contract_loop(m, x, idx, w), "vs the contract loop")
    # transformers' own batched_mm experts function reads the same attributes the same way
    assert_close64(out, hf_moe.batched_mm_experts_forward(m, x, idx, w), "vs transformers' batched_mm")
    cotangent = torch.randn(T, D, dtype=F64)
    got = torch.autograd.grad((out * cotangent).sum(), leaves(m, x, w))
    want = torch.autograd.grad((contract_loop(m, x, idx, w) * cotangent).sum(), leaves(m, x, w))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close64(a, b, f"gradient {i}")


def test_expert_parallel_sentinels_contribute_zero(backend):
    E, D, H, T, k = 4, 10, 6, 12, 3
    m = make_experts(E, D, H)
    x = torch.randn(T, D, dtype=F64, requires_grad=True)
    idx, w = routing(T, k, E)  # weights > 0 everywhere, the sentinels' too: they must still contribute nothing
    idx[0] = torch.tensor([-1, E, -1])  # a token whose every slot is a sentinel
    idx[3, 1], idx[5, 0], idx[7, 2] = -1, E, E
    w.requires_grad_()
    out = experts_forward(m, x, idx, w)
    assert bool((out[0] == 0).all())
    assert_close64(out, contract_loop(m, x, idx, w), "vs the contract loop")
    cotangent = torch.randn(T, D, dtype=F64)
    got = torch.autograd.grad((out * cotangent).sum(), leaves(m, x, w))
    want = torch.autograd.grad((contract_loop(m, x, idx, w) * cotangent).sum(), leaves(m, x, w))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close64(a, b, f"gradient {i}")
    sentinel = (idx < 0) | (idx >= E)
    assert bool((got[1][sentinel] == 0).all()), "a sentinel slot's routing weight gets no gradient"
    assert bool((got[0][0] == 0).all()), "a token routed only to sentinels gets no gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_experts_function_low_precision_keeps_the_dtype_earned(dtype, backend):
    # T*D = 4096 outputs, enough for a stable tensor-wide maximum error in 16 bits (tests/helpers)
    E, D, H, T, k = 6, 32, 24, 128, 2
    m = make_experts(E, D, H).to(dtype)
    idx, w = routing(T, k, E, dtype=torch.float32)  # the router's fp32 weights, as Mixtral passes them
    x = torch.randn(T, D, dtype=dtype)
    out = experts_forward(m, x, idx, w)
    assert out.dtype == dtype
    ref64 = contract_loop(copy.deepcopy(m).double(), x.double(), idx, w.double())  # the same inputs, in float64
    # the same-dtype baseline: transformers' batched_mm experts in `dtype`
    assert_earned_dtype(out, ref64, hf_moe.batched_mm_experts_forward(m, x, idx, w), name="vs batched_mm")
    # fp32 hidden states with 16-bit weights (autocast): computed in the weights' dtype, returned in fp32
    out32 = experts_forward(m, x.float(), idx, w)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out.float(), rtol=0, atol=0)


def _with_post_norm_loop(m, x, top_k_index, top_k_weights):
    """The contract with a post-expert norm: out[t] = sum_j w[t, j] * norm(expert_e(x_t)); float64."""
    out = torch.zeros(x.shape[0], m.down_proj.shape[1], dtype=F64)
    for t in range(x.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            if 0 <= e < m.num_experts:
                h = F.silu(m.gate_up_proj[e, :m.down_proj.shape[2]] @ x[t]) * (m.gate_up_proj[e, m.down_proj.shape[2]:] @ x[t])
                out[t] += top_k_weights[t, j] * m.post_expert_norm(m.down_proj[e] @ h)
    return out


@pytest.mark.skipif(not HAS_POST_NORM, reason="this transformers has no has_post_expert_norm")
def test_post_expert_norm_runs_between_the_expert_mlp_and_the_weights():
    m = make_experts(4, 8, 6, post_norm=True)
    with torch.no_grad():
        m.post_expert_norm.weight.uniform_(0.5, 1.5)
        m.post_expert_norm.bias.normal_()
    x = torch.randn(5, 8, dtype=F64)
    idx, w = routing(5, 2, 4)
    idx[0, 1] = 4                                    # the expert-parallel sentinel: contributes nothing
    torch.testing.assert_close(experts_forward(m, x, idx, w), _with_post_norm_loop(m, x, idx, w))


def test_relu2_experts_run():
    # Nemotron-H's relu^2, not gated
    m = make_experts(4, 8, 6, gated=False, act="relu2")
    assert experts_spec(m) == "relu2"
    x = torch.randn(5, 8, dtype=F64)
    idx, w = routing(5, 2, 4)
    want = sum(w[:, j, None] * torch.stack([m.down_proj[e] @ F.relu(m.up_proj[e] @ x[t]).square()
                                             for t, e in enumerate(idx[:, j].tolist())]) for j in range(2))
    torch.testing.assert_close(experts_forward(m, x, idx, w), want)


def test_a_gate_nothing_computes_is_refused_naming_the_class():
    m = make_experts(4, 8, 6)
    type(m)._apply_gate = lambda self, h: torch.tanh(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] ** 2
    with pytest.raises(ValueError, match="Experts: its _apply_gate computes an activation no moe_kernels epilogue"):
        experts_forward(m, torch.randn(3, 8, dtype=F64), *routing(3, 2, 4))


def test_a_family_that_cannot_run_is_refused_when_it_is_set():
    # refused by set_experts_implementation (the model keeps its implementation) and when the model is built
    register()
    model = tiny_model("mixtral", experts_implementation="eager")
    experts = next(m for m in model.modules() if is_experts_module(m))
    type(experts)._apply_gate_saved = getattr(type(experts), "_apply_gate")
    try:
        type(experts)._apply_gate = lambda self, h: torch.tanh(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] ** 2
        with pytest.raises(ValueError, match="MixtralExperts: its _apply_gate computes"):
            model.set_experts_implementation(NAME)
        assert model.get_experts_implementation()[""] == "eager"
        with pytest.raises(ValueError, match="MixtralExperts: its _apply_gate computes"):
            tiny_model("mixtral", experts_implementation=NAME)
    finally:
        type(experts)._apply_gate = type(experts)._apply_gate_saved
        del type(experts)._apply_gate_saved


def test_check_experts_names_the_module_and_the_shapes():
    m = make_experts(4, 8, 6, transposed=True)
    check_experts(m)
    m.down_proj = nn.Parameter(torch.randn(4, 5, 8, dtype=F64))  # H = 5, not 6
    with pytest.raises(ValueError, match=r"Experts: gate_up_proj and down_proj must be .*\(4, 12, 8\) and \(4, 8, 5\) "
                                         r"\(transposed from its is_transposed layout\)"):
        check_experts(m)


def test_convert_transformers_on_a_submodule_switches_the_config_its_experts_read():
    register()
    model = tiny_model("mixtral", experts_implementation="eager")
    assert convert_transformers(model.model.layers[0]) == 1
    assert model.config._experts_implementation == NAME  # one config for the model and its layers


def test_gpt_oss_runs_with_the_same_logits_and_gradients():
    # GPT-OSS: interleaved gate/up rows, gate <= 7, -7 <= up <= 7, gate * sigmoid(1.702 gate) * (up + 1), biases
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip("no GPT-OSS in this transformers")
    register()
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, experts_implementation="eager")
    model = transformers.GptOssForCausalLM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(3.0 * torch.randn_like(p))        # pre-activations well past the clamps
    ids, cot = torch.randint(0, 64, (2, 6)), torch.randn(2, 6, 64, dtype=F64)
    with float64_everywhere():
        want, want_grads = logits_and_grads(model, ids, cot)
        assert convert_transformers(model) == 1
        experts = next(m for m in model.modules() if is_experts_module(m))
        assert experts_spec(experts) == "silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]"
        got, got_grads = logits_and_grads(model, ids, cot)
    assert_close64(got, want, "logits")
    for name in want_grads:
        assert_close64(got_grads[name], want_grads[name], f"grad of {name}")


# --- activations --------------------------------------------------------------------------------------------
SUPPORTED = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
             "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_python_tanh": "gelu_tanh", "relu": "relu", "linear": "identity", "relu2": "relu2"}


@pytest.mark.parametrize("hf_name", sorted(ACT2FN))
def test_every_transformers_activation_maps_right_or_raises(hf_name):
    act = ACT2FN[hf_name]
    v = torch.linspace(-6, 6, 1001, dtype=F64)
    try:
        ours = experts_activation(act)
    except ValueError as exc:
        assert hf_name not in SUPPORTED, f"{hf_name}: {exc}"
        assert type(act).__name__ in str(exc) and "no moe_kernels equivalent" in str(exc)
        return
    assert ours == SUPPORTED.get(hf_name), f"{hf_name} maps to {ours!r}, not {SUPPORTED.get(hf_name)!r}"
    # same function, not just a name: gelu_fast rounds sqrt(2/pi) to 10 digits, ~1e-11 here
    torch.testing.assert_close(act(v), naive_act(v, ours), rtol=0, atol=1e-9)


def test_torch_activations_map():
    assert experts_activation(nn.SiLU()) == "silu" and experts_activation(F.silu) == "silu"
    assert experts_activation(nn.GELU()) == "gelu" and experts_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert experts_activation(nn.ReLU()) == "relu" and experts_activation(nn.Identity()) == "identity"
    with pytest.raises(ValueError, match="Tanh"):
        experts_activation(nn.Tanh())
    with pytest.raises(ValueError, match="no moe_kernels equivalent"):
        experts_activation(lambda h: h * torch.sigmoid(1.702 * h))


# --- transformers v4-style blocks -----------------------------------------------------------------------------
def softmax_dtype(logits):
    # v4 writes F.softmax(router_logits, dim=1, dtype=torch.float): the same for the fp32 and 16-bit models v4
    # runs; float64 stays float64 here so that the float64 comparisons can be tight (the fused router takes
    # scores in at least fp32, as v4 does)
    return torch.promote_types(logits.dtype, torch.float32)


class V4MixtralExpert(nn.Module):
    """transformers 4.x MixtralBlockSparseTop2MLP: w2(act(w1 x) * w3 x)."""

    def __init__(self, D, H, act):
        super().__init__()
        self.w1, self.w2 = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)
        self.w3 = nn.Linear(D, H, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class V4QwenExpert(nn.Module):
    """transformers 4.x Qwen2MoeMLP / OlmoeMLP / Qwen3MoeMLP: down(act(gate x) * up x)."""

    def __init__(self, D, H, act):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class V4Block(nn.Module):
    """transformers 4.x MixtralSparseMoeBlock (mixtral=True: w1/w2/w3 experts, always renormalised, jitter noise)
    or Qwen2MoeSparseMoeBlock / OlmoeSparseMoeBlock / Qwen3MoeSparseMoeBlock (gate_proj/up_proj/down_proj,
    norm_topk_prob, Qwen2-MoE's shared expert): hidden_states [B, S, D] -> (out [B, S, D], router_logits [B*S, E])."""

    def __init__(self, D, H, E, k, *, mixtral=True, act=None, norm_topk_prob=True, jitter_noise=0.0, shared=None):
        super().__init__()
        act = act if act is not None else ACT2FN["silu"]
        self.hidden_dim, self.ffn_dim, self.num_experts, self.top_k = D, H, E, k
        self.gate = nn.Linear(D, E, bias=False)
        expert = V4MixtralExpert if mixtral else V4QwenExpert
        self.experts = nn.ModuleList([expert(D, H, act) for _ in range(E)])
        if mixtral:
            self.jitter_noise = jitter_noise
        else:
            self.norm_topk_prob = norm_topk_prob
        if shared:
            self.shared_expert = V4QwenExpert(D, shared, act)
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and getattr(self, "jitter_noise", 0) > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=softmax_dtype(router_logits))
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        if hasattr(self, "shared_expert"):
            final = final + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return final.reshape(batch_size, sequence_length, hidden_dim), router_logits


class V4Layer(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.norm = nn.LayerNorm(block.hidden_dim)
        self.mlp = block

    def forward(self, x):
        h, logits = self.mlp(self.norm(x))
        return x + h, logits


class V4Model(nn.Module):
    """Two residual layers around v4 blocks: x [B, S, D] -> (x, (router_logits of each layer))."""

    def __init__(self, make_block):
        super().__init__()
        self.layers = nn.ModuleList([V4Layer(make_block()), V4Layer(make_block())])

    def forward(self, x):
        all_logits = []
        for layer in self.layers:
            x, logits = layer(x)
            all_logits.append(logits)
        return x, tuple(all_logits)


def randomize_(module, scale=0.4):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
    return module


def expected_block_grads(block):
    """A v4 block's gradients, named and laid out as its SparseMoEBlock's parameters."""
    names = ("w1", "w3", "w2") if hasattr(block.experts[0], "w1") else ("gate_proj", "up_proj", "down_proj")
    stack = lambda n: torch.stack([getattr(e, n).weight.grad for e in block.experts])  # noqa: E731
    want = {"router.weight": block.gate.weight.grad,
            "experts.gate_up_proj": torch.cat([stack(names[0]), stack(names[1])], 1),
            "experts.down_proj": stack(names[2])}
    if hasattr(block, "shared_expert"):
        for n, p in block.named_parameters():
            if n.startswith("shared_expert"):
                want[n] = p.grad
    return want


V4_BLOCKS = [  # (D, H, E, k, block arguments)
    pytest.param(16, 12, 8, 2, dict(mixtral=True), id="mixtral-E8-k2"),
    pytest.param(13, 9, 5, 3, dict(mixtral=True, act=ACT2FN["gelu_new"]), id="mixtral-geglu-tanh-E5-k3-odd"),
    pytest.param(16, 12, 6, 2, dict(mixtral=False, norm_topk_prob=True), id="qwen3-olmoe-norm"),
    pytest.param(16, 12, 6, 2, dict(mixtral=False, norm_topk_prob=False), id="olmoe-no-norm"),
    pytest.param(16, 12, 6, 1, dict(mixtral=False, norm_topk_prob=False, shared=10), id="qwen2-shared-k1"),
]


@pytest.mark.parametrize("D, H, E, k, kw", V4_BLOCKS)
def test_v4_blocks_convert_with_same_outputs_and_grads(D, H, E, k, kw, backend):
    model = randomize_(V4Model(lambda: V4Block(D, H, E, k, **kw)).double())
    fused = copy.deepcopy(model)
    router_weight = fused.layers[0].mlp.gate.weight
    if kw.get("shared"):
        moe_kernels.convert(fused, strict=True)  # the generic entry point finds v4 blocks too
    else:
        assert convert_transformers(fused) == 2
    assert not any(isinstance(m, (V4Block, V4MixtralExpert)) for m in fused.modules()), "a v4 block is left"
    blocks = [layer.mlp for layer in fused.layers]
    assert all(isinstance(b, SparseMoEBlock) and isinstance(b, moe_kernels.SparseMoE) for b in blocks)
    assert blocks[0].router.weight is router_weight  # the router keeps its parameter
    x = torch.randn(3, 5, D, dtype=F64, requires_grad=True)
    out, logits = model(x * 1)  # the v4 block scales its input in place in training: never a leaf
    out_f, logits_f = fused(x * 1)
    assert_close64(out_f, out, "hidden states")
    for i, (a, b) in enumerate(zip(logits_f, logits)):
        assert a.shape == (15, E)
        assert_close64(a, b, f"router logits of layer {i}")
    cotangent = torch.randn_like(out)
    # the router logits carry gradient too (a v4 model's load-balancing loss)
    loss = lambda o, lg: (o * cotangent).sum() + sum((g ** 2).sum() for g in lg)  # noqa: E731
    gx = torch.autograd.grad(loss(out, logits), x, retain_graph=True)[0]
    gx_f = torch.autograd.grad(loss(out_f, logits_f), x, retain_graph=True)[0]
    assert_close64(gx_f, gx, "grad of x")
    loss(out, logits).backward()
    loss(out_f, logits_f).backward()
    for i, (layer, layer_f) in enumerate(zip(model.layers, fused.layers)):
        assert_close64(layer_f.norm.weight.grad, layer.norm.weight.grad, f"layer {i} norm")
        want = expected_block_grads(layer.mlp)
        got = {n: p.grad for n, p in layer_f.mlp.named_parameters()}
        assert got.keys() == want.keys()
        for n in want:
            assert_close64(got[n], want[n], f"layer {i} {n}")


def test_v4_block_in_float32_matches_the_v4_algorithm(backend):
    # fp32: the mirror is v4's code exactly (softmax in fp32); the fused block sums in another order
    model = randomize_(V4Model(lambda: V4Block(16, 12, 8, 2)))
    fused = copy.deepcopy(model)
    convert_transformers(fused)
    x = torch.randn(2, 9, 16)
    (out, logits), (out_f, logits_f) = model(x.clone()), fused(x.clone())
    torch.testing.assert_close(out_f, out, **FP32_TOL)
    torch.testing.assert_close(logits_f[0], logits[0], rtol=0, atol=0)  # the same gate on the same input
    torch.testing.assert_close(logits_f[1], logits[1], **FP32_TOL)


def test_v4_mixtral_jitter_noise_in_training(backend, fresh_seed):
    model = randomize_(V4Model(lambda: V4Block(16, 12, 6, 2, jitter_noise=0.2)).double()).train()
    fused = copy.deepcopy(model)
    assert convert_transformers(fused) == 2
    assert fused.training and fused.layers[1].mlp.jitter_noise == 0.2
    x = torch.randn(2, 7, 16, dtype=F64)
    torch.manual_seed(fresh_seed + 1)
    out, _ = model(x.clone())
    torch.manual_seed(fresh_seed + 1)  # the same noise: both draw it first, with the same call
    out_f, _ = fused(x.clone())
    assert_close64(out_f, out, "with jitter")
    out_eval, _ = fused.eval()(x.clone())
    assert not torch.allclose(out_eval, out_f), "the noise must change the training output"
    assert_close64(out_eval, model.eval()(x.clone())[0], "eval: no jitter")


def test_v4_conversion_keeps_frozen_experts_frozen():
    model = V4Model(lambda: V4Block(8, 6, 4, 2))
    for p in model.layers[0].mlp.experts.parameters():
        p.requires_grad_(False)
    convert_transformers(model)
    block0, block1 = model.layers[0].mlp, model.layers[1].mlp
    assert not block0.experts.gate_up_proj.requires_grad and not block0.experts.down_proj.requires_grad
    assert block1.experts.gate_up_proj.requires_grad and block0.router.weight.requires_grad


def test_v4_look_alikes_stay_with_a_warning():
    phimoe_like = V4Block(8, 6, 4, 2)
    phimoe_like.router_jitter_noise = 0.01  # PhiMoE routes with sparsemixer
    tanh_experts = V4Block(8, 6, 4, 2, act=nn.Tanh())
    no_norm_flag = V4Block(8, 6, 4, 2, mixtral=False)
    del no_norm_flag.norm_topk_prob  # Qwen-style naming and no norm_topk_prob: renormalised or not is unknown
    model = nn.ModuleDict(dict(phi=phimoe_like, tanh=tanh_experts, noflag=no_norm_flag, ok=V4Block(8, 6, 4, 2)))
    with pytest.warns(UserWarning) as record:
        assert convert_transformers(model) == 1
    messages = "\n".join(str(r.message) for r in record)
    assert "phi (V4Block) stays as it is: it has ['router_jitter_noise']" in messages
    assert "tanh (V4Block) stays as it is: expert 0: act_fn Tanh()" in messages
    assert "noflag (V4Block) stays as it is: it has no norm_topk_prob" in messages
    assert model["phi"] is phimoe_like and model["tanh"] is tanh_experts and model["noflag"] is no_norm_flag
    assert isinstance(model["ok"], SparseMoEBlock)
    with pytest.raises(ValueError, match="V4Block is not a v4 sparse MoE block moe_kernels can run: it has no norm"):
        convert_block(no_norm_flag)
    with pytest.raises(ValueError, match="convert_block"):
        convert_transformers(V4Block(8, 6, 4, 2))  # a block cannot replace itself


# --- checkpoints: a converted model keeps its original's state-dict layout both ways ----------------------------------
# float64 end to end, another summation order: ~1e-16 seen on outputs of magnitude ~1
ROUND_TRIP_TOL = dict(rtol=1e-12, atol=1e-12)


def _save_load(state, fmt, path):
    """state through a file in `fmt` ("torch" or "safetensors") and back."""
    if fmt == "torch":
        torch.save(state, path)
        return torch.load(path, weights_only=True)
    from safetensors.torch import load_file, save_file
    save_file(state, str(path))
    return load_file(str(path))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("D, H, E, k, kw", V4_BLOCKS)
def test_v4_checkpoints_round_trip(D, H, E, k, kw, fmt, tmp_path):
    # original -> save -> a converted model loads it; converted -> save -> a fresh original loads it; same outputs
    torch.manual_seed(0)
    make = lambda: V4Model(lambda: V4Block(D, H, E, k, **kw))  # noqa: E731
    original = randomize_(make()).double().eval()
    x = torch.randn(2, 7, D, dtype=F64)
    want = original(x)[0]
    state = _save_load(original.state_dict(), fmt, tmp_path / "original.ckpt")
    converted = moe_kernels.convert(randomize_(make()).double().eval(), strict=True)   # other weights, then loaded
    converted.load_state_dict(state, strict=True)
    torch.testing.assert_close(converted(x)[0], want, **ROUND_TRIP_TOL)
    saved = converted.state_dict()
    assert set(saved) == set(original.state_dict()), "the converted model saves the original's keys"
    fresh = randomize_(make()).double().eval()
    fresh.load_state_dict(_save_load(saved, fmt, tmp_path / "converted.ckpt"), strict=True)
    torch.testing.assert_close(fresh(x)[0], want, **ROUND_TRIP_TOL)
    # a converted model also takes its own fused layout (a checkpoint of a SparseMoEBlock built directly)
    block = converted.layers[0].mlp
    fused = {n: t.clone() for n, t in list(block.named_parameters()) + list(block.named_buffers())}
    block.load_state_dict(fused, strict=True)
    torch.testing.assert_close(converted(x)[0], want, **ROUND_TRIP_TOL)
