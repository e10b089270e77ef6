"""FP8 experts of transformers on "moe_kernels" (its FP8 experts interface): a tiny Qwen3-MoE-like model whose
experts are FP8 block-scaled (e4m3 + 128x128 fp32 scales, made here by quantising random float weights and saved
to a safetensors file), built as transformers' FP8 quantizer builds it (`replace_with_fp8_linear`: FP8Experts
modules dispatching through ALL_FP8_EXPERTS_FUNCTIONS) and loaded from the file, runs through the registry with
the e4m3 weights as they are, equal to the eager model on the dequantised weights within the earned tolerance.
(transformers' own loader dequantises FP8 checkpoints to bf16 on a machine without a GPU, so the test builds the
FP8 modules itself.)"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
fp8_integration = pytest.importorskip("transformers.integrations.finegrained_fp8")

from moe_kernels import ops  # noqa: E402
from moe_kernels.integrations.transformers import NAME, check_model, fp8_weights, register  # noqa: E402
from tests.helpers import assert_earned_max, reordered_sum_atol  # noqa: E402

D, H, E, LAYERS = 128, 256, 4, 2


def _config(**kw):
    return transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=D, intermediate_size=2 * H, moe_intermediate_size=H,
                                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=32, num_experts=E, num_experts_per_tok=2, decoder_sparse_step=1,
                                       norm_topk_prob=True, **kw)


def _models(tmp_path, dtype=torch.float32):
    """(the FP8 model on moe_kernels, the float model holding the dequantised expert weights, on eager)."""
    register()
    torch.manual_seed(0)
    reference = transformers.Qwen3MoeForCausalLM(_config(experts_implementation="eager")).to(dtype).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    state = dict(reference.state_dict())
    with torch.no_grad():
        for name in list(state):
            if ".mlp.experts." in name:
                q = ops.QuantizedWeight.quantize(state[name], "fp8")
                state[name], state[f"{name}_scale_inv"] = q.data, q.scale
                reference.get_parameter(name).copy_(q.dequantize(dtype))
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({n: t.contiguous() for n, t in state.items()}, str(path))

    quant = transformers.FineGrainedFP8Config(weight_block_size=[128, 128], modules_to_not_convert=["self_attn",
                                                                                                    "lm_head"])
    model = transformers.Qwen3MoeForCausalLM(_config(experts_implementation=NAME)).to(dtype)
    fp8_integration.replace_with_fp8_linear(model, modules_to_not_convert=quant.modules_to_not_convert,
                                            quantization_config=quant)
    loaded = safetensors_torch.load_file(str(path))
    missing, unexpected = model.load_state_dict(loaded, strict=False, assign=True)
    assert not unexpected and not [m for m in missing if "experts" in m], (missing, unexpected)
    model.tie_weights()
    return model.eval(), reference


def test_fp8_experts_run_through_the_registry(tmp_path, monkeypatch):
    model, reference = _models(tmp_path)
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "FP8Experts" and experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert check_model(model) == LAYERS
    calls = []
    real = ops.moe_mlp

    def spy(x, ids, w, up, down, **kw):
        calls.append((up.format, up.data.data_ptr()))
        return real(x, ids, w, up, down, **kw)
    monkeypatch.setattr(ops, "moe_mlp", spy)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        got = model(ids).logits
        want = reference(ids).logits
        same = reference.to(torch.float32)(ids).logits
    # each layer's FP8 weights as they are (no copy), through the quantized path
    assert [c[0] for c in calls] == ["fp8"] * LAYERS
    assert calls[0][1] == experts.gate_up_proj.data_ptr()
    ref64 = reference.double()(ids).logits
    assert_earned_max(got.double(), ref64, same, atol=1e-6 + reordered_sum_atol(ref64, torch.float32, 2 * H + D),
                      name="logits")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_what_is_refused_is_named(tmp_path):
    model, _ = _models(tmp_path)
    experts = model.model.layers[0].mlp.experts
    experts.activation_scheme = "static"
    with pytest.raises(ValueError, match="FP8Experts: static activation scales"):
        fp8_weights(experts)
    experts.activation_scheme = "dynamic"
    experts.gate_up_proj_scale_inv = torch.nn.Parameter(experts.gate_up_proj_scale_inv[:, :1].clone())
    with pytest.raises(ValueError, match=r"FP8Experts: weight.scale must have shape \(4, 4, 1\)"):
        fp8_weights(experts)
    with pytest.raises(ValueError, match="FP8Experts"):
        check_model(model)


def test_training_through_fp8_experts_is_refused(tmp_path):
    model, _ = _models(tmp_path)
    with pytest.raises(NotImplementedError, match="inference only"):
        model(torch.randint(0, 64, (1, 5)), output_hidden_states=False).logits.sum().backward()
