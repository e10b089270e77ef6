"""PEFT LoRA adapters on transformers experts (`LoraConfig(target_parameters=[...])`) on "moe_kernels": the same
logits and LoRA gradients as PEFT on transformers' eager experts (float64, and float32 within the earned
tolerance), the adapter run as its own grouped GEMM pair (PEFT's merged weight never formed, the frozen base
weights without gradient), a training step, disabled and merged adapters, and other parametrizations read as
their value. Families: Mixtral (gate_up [E, 2H, D]), OLMoE, GPT-OSS (transposed [E, D, 2H] weights, biases, the
clamped interleaved SwiGLU)."""
import copy

import pytest
import torch
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora import layer as lora_layer  # noqa: E402

from moe_kernels.integrations.transformers import NAME, register  # noqa: E402
from moe_kernels.ops import expert_mlp as ops_expert_mlp  # noqa: E402
from tests.helpers import assert_earned_max, reordered_sum_atol  # noqa: E402

from .test_transformers import tiny_model  # noqa: E402
from .test_transformers_compile import _gpt_oss  # noqa: E402

F64 = torch.float64
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MODELS = {"mixtral": lambda: tiny_model("mixtral"), "olmoe": lambda: tiny_model("olmoe-no-norm"),
          "gpt_oss": _gpt_oss}


def _peft_model(family, dtype=F64, r=4, targets=TARGETS):
    """(the base model, its PEFT model) in `dtype`: LoRA of rank r on the experts' projections, A and B random
    (init_lora_weights=False: the adapter changes the output)."""
    register()
    base = MODELS[family]().to(dtype).eval()
    base.set_experts_implementation("eager")      # transformers' default, grouped_mm, takes no float64
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=targets,
                             init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    return base, model


def _run(model, implementation, ids, cotangent):
    """logits and the gradients of sum(logits * cotangent) by parameter name, on `implementation`."""
    model.base_model.model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits * cotangent.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def merged_weights_formed(monkeypatch):
    """The shapes of the merged weights (W + scaling * lhs @ rhs) PEFT's LoRA parametrizations form when the
    parameter is read. torch's register_parametrization also evaluates one once, to check its shape, each time PEFT
    registers it (every forward, outside the experts' computation, no gradient flows through it): not counted."""
    calls, registering = [], []
    real_register = parametrize.register_parametrization

    def register(*args, **kwargs):
        registering.append(True)
        try:
            return real_register(*args, **kwargs)
        finally:
            registering.pop()
    monkeypatch.setattr(parametrize, "register_parametrization", register)
    for cls in (lora_layer._LoraFactorsProxy, lora_layer._LoraParameterProxy):
        real = cls.forward

        def spy(self, W, real=real):
            if not registering:
                calls.append(tuple(W.shape))
            return real(self, W)
        monkeypatch.setattr(cls, "forward", spy)
    return calls


@pytest.mark.parametrize("family", sorted(MODELS))
def test_lora_logits_and_gradients_equal_peft_eager(family, merged_weights_formed, monkeypatch):
    base, model = _peft_model(family)
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    cotangent = torch.randn(2, 9, base.config.vocab_size, dtype=F64)
    adapters = []
    real_project = ops_expert_mlp.project

    def project(a, w, offsets, bias=None, lora=None, **kw):
        adapters.append(lora is not None)
        return real_project(a, w, offsets, bias, lora, **kw)
    monkeypatch.setattr(ops_expert_mlp, "project", project)

    want, want_grads = _run(model, "eager", ids, cotangent)
    assert merged_weights_formed, "PEFT's eager experts did not form the merged weight: the oracle is not LoRA"
    merged_weights_formed.clear()
    got, grads = _run(model, NAME, ids, cotangent)
    assert not merged_weights_formed, f"merged weights formed on {NAME}: {merged_weights_formed}"
    assert adapters and all(adapters), adapters
    layers = base.config.num_hidden_layers
    assert len(adapters) == 2 * layers        # both projections of every layer carried their adapter
    lora_names = {n for n in grads if "lora_" in n}
    assert len(lora_names) == 4 * layers and set(grads) == set(want_grads)
    assert not (want - base(ids).logits).abs().max() < 1e-3, "the adapter leaves the logits as they were"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    for name, p in model.named_parameters():     # the base stays frozen
        assert p.requires_grad == ("lora_" in name) and (p.grad is None) == ("lora_" not in name), name


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_lora_float32_within_the_earned_tolerance(family):
    # float32 moe_kernels against float64 eager on the same weights, within twice the error of float32 eager
    base, model64 = _peft_model(family)
    model32 = copy.deepcopy(model64).float()
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    cotangent = torch.randn(2, 9, base.config.vocab_size, dtype=F64)
    ref64 = _run(model64, "eager", ids, cotangent)
    same = _run(model32, "eager", ids, cotangent)
    fast = _run(model32, NAME, ids, cotangent)
    # the longest sums: a logit's over D hidden units (each of 4D-wide pieces), a LoRA gradient's over the 18 tokens'
    # rows as well
    D = base.config.hidden_size
    assert_earned_max(fast[0], ref64[0], same[0], atol=reordered_sum_atol(ref64[0], torch.float32, 4 * D))
    for name in fast[1]:
        assert_earned_max(fast[1][name], ref64[1][name], same[1][name],
                          atol=reordered_sum_atol(ref64[1][name], torch.float32, 4 * D * 18), name=name)


def test_a_training_step_equals_peft_eager():
    _, model = _peft_model("mixtral")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    for m, impl in ((model, "eager"), (twin, NAME)):
        m.base_model.model.set_experts_implementation(impl)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_disabled_and_merged_adapters():
    base, model = _peft_model("mixtral")
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    base.set_experts_implementation("eager")
    model.base_model.model.set_experts_implementation(NAME)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-10, atol=1e-10)
        adapted = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-10, atol=1e-10)


def test_only_one_projection_adapted():
    base, model = _peft_model("olmoe", targets=["mlp.experts.down_proj"])
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    cotangent = torch.randn(2, 9, base.config.vocab_size, dtype=F64)
    want, want_grads = _run(model, "eager", ids, cotangent)
    got, grads = _run(model, NAME, ids, cotangent)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(want_grads) and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-10)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_other_parametrizations_are_read_as_their_value():
    register()
    model = tiny_model("mixtral").double()
    experts = model.model.layers[0].mlp.experts
    parametrize.register_parametrization(experts, "gate_up_proj", _Doubled())
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    cotangent = torch.randn(2, 9, model.config.vocab_size, dtype=F64)
    results = {}
    for impl in ("eager", NAME):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits * cotangent).sum().backward()
        results[impl] = logits.detach(), experts.parametrizations.gate_up_proj.original.grad.clone()
    torch.testing.assert_close(results[NAME][0], results["eager"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[NAME][1], results["eager"][1], rtol=1e-10, atol=1e-10)


# --- PEFT on moe_kernels' own modules ---------------------------------------------------------------------------
def test_lora_on_sparse_moe_equals_its_merged_weights():
    # SparseMoE (convert()'s result) with PEFT adapters on its experts: the adapters as grouped GEMM pairs equal the
    # layer computing with W + scaling * B @ A (PEFT's get_delta_weight, differentiable in A and B), forward and the
    # gradients of the input and every adapter; the base frozen
    from moe_kernels import SparseMoE
    torch.manual_seed(0)
    layer = SparseMoE(32, 48, 6, 2).double()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=[], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    adapted = peft.inject_adapter_in_model(config, copy.deepcopy(layer))
    for name, p in adapted.named_parameters():
        p.requires_grad_("lora_" in name)
    lora = [p for p in adapted.parameters() if p.requires_grad]
    assert len(lora) == 4
    x = torch.randn(2, 7, 32, dtype=F64, requires_grad=True)
    cot = torch.randn(2, 7, 32, dtype=F64)
    out = adapted(x)
    got = torch.autograd.grad(out, [x, *lora], cot)

    merged = {f"experts.{w.parameter_name}": w.get_param() + w.get_delta_weight("default")
              for w in (adapted.experts, adapted.experts.base_layer)}
    want = torch.func.functional_call(layer, merged, (x,))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, torch.autograd.grad(want, [x, *lora], cot)):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_lora_on_sparse_moe_disabled_and_two_adapters():
    from moe_kernels import SparseMoE
    torch.manual_seed(0)
    layer = SparseMoE(32, 48, 6, 2).double().eval()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=[], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    adapted = peft.inject_adapter_in_model(config, copy.deepcopy(layer))
    x = torch.randn(5, 32, dtype=F64)
    with torch.no_grad():
        for wrapper in (adapted.experts, adapted.experts.base_layer):
            wrapper.enable_adapters(False)
        torch.testing.assert_close(adapted(x), layer(x), rtol=0, atol=0)
        for wrapper in (adapted.experts, adapted.experts.base_layer):
            wrapper.enable_adapters(True)
            wrapper.update_layer("second", 2, lora_alpha=2, config=config)
            wrapper.set_adapter(["default", "second"])
        with pytest.raises(ValueError, match="2 active LoRA adapters"):
            adapted(x)
