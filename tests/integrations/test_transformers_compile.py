"""transformers models on "moe_kernels" under torch.compile(fullgraph=True): the forward, a training step and
static-cache greedy generation equal eager, for several families (Mixtral; Qwen2-MoE with its shared expert;
GPT-OSS with its clamped, interleaved SwiGLU and biases). aot_eager: the graph is traced whole (any break
fails fullgraph) without inductor's C++ builds."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_kernels.integrations.transformers import NAME, register  # noqa: E402

from .test_transformers import tiny_model  # noqa: E402

pytestmark = pytest.mark.slow


def _gpt_oss():
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip("no GPT-OSS in this transformers")
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=64, experts_implementation=NAME)
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


MODELS = {"mixtral": lambda: tiny_model("mixtral", experts_implementation=NAME),
          "qwen2_moe-shared": lambda: tiny_model("qwen2_moe-shared", experts_implementation=NAME),
          "gpt_oss": _gpt_oss}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    register()
    torch.manual_seed(0)
    m = MODELS[request.param]().eval()
    torch._dynamo.reset()
    return m


def test_forward_and_training_step_compiled_equal_eager(model):
    ids = torch.randint(0, 64, (2, 9))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # a training step: loss, backward, the same gradients
    for m in (model, compiled_model):
        m.train()
        m.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    compiled(ids, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), compiled_model.named_parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_static_cache_greedy_generation_compiled_equals_eager(model):
    ids = torch.randint(0, 64, (1, 5))
    args = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0)
    want = model.generate(ids, **args)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(model.generate(ids, **args), want)
