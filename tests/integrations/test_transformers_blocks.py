"""The transformers MoE blocks without an experts interface (moe_kernels.integrations.transformers_blocks): DBRX,
JetMoE (MoE and MoA), Llama 4's text MoE and SwitchTransformers convert; NLLB-MoE stays, with a warning.

Oracle: the tiny real transformers model itself, eager, against its converted copy on the same weights and inputs:
the model's whole output (logits, loss, router logits and the aux / z losses computed from them) and the gradient
of every parameter, in float64 (only summation orders differ) and float32. Checkpoints go both ways in the
original's layout. Skipped without transformers.
"""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moe_kernels  # noqa: E402
from moe_kernels.integrations import transformers_blocks as tb  # noqa: E402
from moe_kernels.integrations.transformers import convert_transformers  # noqa: E402

F64 = torch.float64
TOL64 = 1e-10       # float64, summation order only: ~1e-15 seen

# DBRX's attention reads attn_config.rope_theta (no default) and clamps with clip_qkv (None fails)
DBRX_ATTN = dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=100.0)
FAMILIES = {  # name -> (config class, model class, config arguments, fused class, fused blocks in the model)
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             dict(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=64,
                  attn_config=DBRX_ATTN,
                  ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2)),
             tb.FusedDbrxFFN, 2),
    # an L2 normalisation of the top-3 weights, DBRX's moe_normalize_expert_weights=2
    "dbrx-p2": ("DbrxConfig", "DbrxForCausalLM",
                dict(d_model=32, n_heads=4, n_layers=1, vocab_size=64, max_seq_len=64,
                     attn_config=DBRX_ATTN,
                     ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=3,
                                     moe_normalize_expert_weights=2.0)),
                tb.FusedDbrxFFN, 1),
    # MoE in each MLP and MoA in each attention: 2 layers, 4 blocks
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM",
               dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
                    kv_channels=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
               (tb.FusedJetMoeMoE, tb.FusedJetMoeMoA), 4),
    # Llama 4 routes one expert per token; two checks that the input scale is per slot
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=4,
                    num_experts_per_tok=1),
               tb.FusedLlama4TextMoe, 2),
    "llama4-top2": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(hidden_size=32, num_hidden_layers=1, vocab_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=24, intermediate_size_mlp=40,
                         num_local_experts=4, num_experts_per_tok=2),
                    tb.FusedLlama4TextMoe, 1),
    # the second encoder and decoder layers sparse (with every layer sparse, SwitchTransformers computes no router
    # losses); a capacity of 2 tokens per expert and sequence of 8 drops tokens
    "switch": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
               dict(d_model=32, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
                    vocab_size=64, expert_capacity=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                    dropout_rate=0.0, router_jitter_noise=0.0),
               tb.FusedSwitchSparseMLP, 2),
}
NLLB = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
            encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=64, num_experts=4, expert_capacity=8,
            encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=64, moe_token_dropout=0.0)


def tiny(family, dtype=F64, **kw):
    """The eager tiny model of `family` (random weights: norms near 1, the rest N(0, 0.2^2), router logits of std
    ~1) in `dtype`, in eval mode, routing in `dtype`."""
    cfg_name, model_name, args, _, _ = FAMILIES[family]
    args = {**args, **kw}
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return _route_in(model.to(dtype).eval(), dtype)


def _route_in(model, dtype):
    for m in model.modules():       # SwitchTransformers / NLLB-MoE routers compute in their own dtype
        if isinstance(getattr(m, "dtype", None), torch.dtype) and hasattr(m, "classifier"):
            m.dtype = dtype
    return model


def inputs(family, model, B=2, S=8):
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (B, S))
    kw = dict(input_ids=ids, labels=torch.randint(3, vocab, (B, S)), output_router_logits=True)
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.randint(3, vocab, (B, S - 2))
        kw["labels"] = torch.randint(3, vocab, (B, S - 2))
    return kw


def tensors(out):
    """{name: tensor} of a model output: every tensor field, tuples of tensors (router logits) entry by entry."""
    found = {}
    for key, value in out.items():
        if key in ("past_key_values", "cache"):
            continue
        items = value if isinstance(value, tuple) else (value,)
        for i, t in enumerate(items):
            if isinstance(t, torch.Tensor):
                found[f"{key}[{i}]" if isinstance(value, tuple) else key] = t.detach()
    return found


def grads_in_source_layout(model):
    """{state-dict key: gradient of that tensor}: the model's parameters swapped with their gradients while its
    state_dict() runs, so a converted model gives its original's keys and layouts."""
    params = list(model.parameters())
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        return {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        for p, d in zip(params, saved):
            p.data = d


def run(model, kw, cotangent):
    """(output tensors, gradients by source key) of loss + sum(logits * cotangent)."""
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    (out.loss + (out.logits * cotangent).sum()).backward()
    return tensors(out), grads_in_source_layout(model)


def assert_same(got: dict, want: dict, tol, what):
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())}"
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {name}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if w.is_floating_point():
            err = (g - w).abs().max().item() if w.numel() else 0.0
            assert err <= tol * max(1.0, w.abs().max().item()), f"{what} {name}: max error {err:.3g}"
        else:
            assert torch.equal(g, w), f"{what} {name}"


def converted_copy(family, eager):
    model = copy.deepcopy(eager)
    _, _, _, fused, count = FAMILIES[family]
    assert convert_transformers(model) == count
    assert sum(isinstance(m, fused) for m in model.modules()) == count
    return model


# --- eager vs converted -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float64_outputs_and_gradients_match_eager(family, backend):
    eager = tiny(family)
    fused = converted_copy(family, eager)
    kw = inputs(family, eager)
    cot = torch.randn_like(eager(**kw).logits)
    out_e, grads_e = run(eager, kw, cot)
    out_f, grads_f = run(fused, kw, cot)
    assert any("router_logits" in k for k in out_e), "the router logits are recorded from the router"
    assert any("aux_loss" in k for k in out_e) or family.startswith("llama4")
    assert_same(out_f, out_e, TOL64, "output")
    assert_same(grads_f, grads_e, TOL64, "gradient")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_outputs_and_gradients_as_close_as_eager(family):
    # against the eager model in float64, the converted float32 model is held to twice the error of the eager
    # float32 model, model-wide (max over tensors of max|x - x64| / max|x64|), plus 1e-6: both differ from float64
    # only by rounding (~1e-6 here), a wrong weight or gradient by O(1). One fixed draw: with random ones a token's
    # top-k scores now and then lie within float32's rounding of each other, and a float32 run, ours or eager's,
    # picks another expert than float64 there (a discrete change no tolerance of rounding covers); the float64
    # test above draws fresh inputs every run
    torch.manual_seed(0)
    eager = tiny(family, torch.float32)
    fused = converted_copy(family, eager)
    ref = _route_in(copy.deepcopy(eager).double(), F64)
    kw = inputs(family, eager)
    cot = torch.randn_like(eager(**kw).logits)
    results = [run(m, kw, c) for m, c in ((fused, cot), (eager, cot), (ref, cot.double()))]
    (out_f, grads_f), (out_e, grads_e), (out_r, grads_r) = results
    want = {**out_r, **{f"grad {k}": v for k, v in grads_r.items() if v.is_floating_point()}}

    def worst(out, grads):
        got = {**out, **{f"grad {k}": v for k, v in grads.items()}}
        assert got.keys() >= want.keys()
        errs = {k: ((got[k].double() - w).abs().max() / w.abs().max().clamp(min=1e-30)).item()
                for k, w in want.items() if w.numel()}
        name = max(errs, key=errs.get)
        return errs[name], name

    (err_f, name), (err_e, _) = worst(out_f, grads_f), worst(out_e, grads_e)
    assert err_f <= 2 * err_e + 1e-6, f"{name}: relative error {err_f:.3g}, eager float32's worst {err_e:.3g}"


def test_switch_capacity_drops_tokens_as_switch_does(backend):
    # the capacity of 2 tokens per expert in each sequence of 8 leaves some tokens without an expert (output 0);
    # per sequence, first come first served
    eager = tiny("switch")
    fused = converted_copy("switch", eager)
    x = torch.randn(3, 8, 32, dtype=F64)
    sparse_e = eager.encoder.block[1].layer[1].mlp
    sparse_f = fused.encoder.block[1].layer[1].mlp
    mask = sparse_e.router(x)[0]
    assert (mask.sum(-1) == 0).any() and (mask.sum(1) <= 2).all()
    dropped = mask.sum(-1) == 0
    out = sparse_f(x)
    torch.testing.assert_close(out, sparse_e(x), rtol=TOL64, atol=TOL64)
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))


def test_training_jitter_is_the_routers():
    # DBRX's router scales its input in place (the experts see it); SwitchTransformers' scales its own copy: the
    # fused blocks call the routers, so with the same seed the draws and results are the same
    for family, kw in (("dbrx", dict(ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2,
                                                     moe_jitter_eps=0.3))),
                       ("switch", dict(router_jitter_noise=0.3))):
        eager = tiny(family, **kw).train()
        fused = converted_copy(family, eager)
        batch = inputs(family, eager)
        outs = []
        for m in (eager, fused):
            torch.manual_seed(1)
            outs.append(tensors(m(**batch)))
        assert_same(outs[1], outs[0], TOL64, f"{family} in training")
        torch.manual_seed(2)
        assert not torch.allclose(tensors(fused(**batch))["logits"], outs[0]["logits"]), "no jitter"


def test_switch_expert_dropout_in_training(monkeypatch):
    # SwitchTransformers drops expert activations between wi and wo; the fused block does the same on its grouped
    # GEMM path. Random draws differ by construction (per expert vs all at once), so every dropout here is made
    # deterministic (a uniform scale): the place and the gradients are then checked exactly
    eager = tiny("switch", dropout_rate=0.25).train()
    fused = converted_copy("switch", eager)
    assert fused.encoder.block[1].layer[1].mlp.dropout == 0.25
    calls = []

    def scale(x, p=0.5, training=True, inplace=False):
        calls.append(p)
        return x * (1 - p) if training else x

    monkeypatch.setattr(torch.nn.functional, "dropout", scale)
    kw = inputs("switch", eager)
    cot = torch.randn_like(eager(**kw).logits)
    out_e, grads_e = run(eager, kw, cot)
    n = len(calls)
    out_f, grads_f = run(fused, kw, cot)
    assert len(calls) - n < n - 2 * 2, "the fused experts drop once per block, not once per expert"
    assert_same(out_f, out_e, TOL64, "output")
    assert_same(grads_f, grads_e, TOL64, "gradient")


def test_convert_finds_the_same_blocks():
    for family, (_, _, _, fused, count) in FAMILIES.items():
        eager = tiny(family)
        model = moe_kernels.convert(copy.deepcopy(eager), strict=True)
        assert sum(isinstance(m, fused) for m in model.modules()) == count, family
        kw = inputs(family, eager)
        assert_same(tensors(model(**kw)), tensors(eager(**kw)), TOL64, family)


def test_frozen_experts_stay_frozen():
    eager = tiny("dbrx")
    eager.transformer.blocks[0].ffn.experts.mlp.w2.requires_grad_(False)
    fused = converted_copy("dbrx", eager)
    block0, block1 = (b.ffn for b in fused.transformer.blocks)
    assert not block0.down_proj.requires_grad and block0.gate_up_proj.requires_grad
    assert block1.down_proj.requires_grad


# --- checkpoints in the original's layout -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dbrx", "jetmoe", "llama4", "switch"])
def test_checkpoints_round_trip(family, tmp_path):
    # original -> torch.save -> a converted model (other weights) loads it; converted -> save_pretrained -> the
    # original class's from_pretrained: the original's keys, shapes and values, the same outputs
    original = tiny(family)
    kw = inputs(family, original)
    want = tensors(original(**kw))
    torch.save(original.state_dict(), tmp_path / "original.pt")
    converted = converted_copy(family, tiny(family))
    converted.load_state_dict(torch.load(tmp_path / "original.pt", weights_only=True), strict=True)
    assert_same(tensors(converted(**kw)), want, TOL64, "converted, loaded")
    assert_same(converted.state_dict(), original.state_dict(), 0.0, "saved state dict")
    converted.save_pretrained(tmp_path / "converted")
    fresh = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "converted", dtype=F64)
    assert_same(tensors(_route_in(fresh.eval(), F64)(**kw)), want, 0.0, "original class, from_pretrained")


# --- NLLB-MoE stays, with the reason ------------------------------------------------------------------------
def tiny_nllb():
    model = transformers.NllbMoeForConditionalGeneration(transformers.NllbMoeConfig(**NLLB))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return _route_in(model.double().eval(), F64)


def test_nllb_dispatch_runs_experts_0_and_1_only():
    # the reason NLLB-MoE is not converted, checked on the installed transformers: whatever the router chooses,
    # changing experts 2.. changes nothing, changing expert 0 does (when this fails, revisit the refusal)
    block = tiny_nllb().model.encoder.layers[1].ffn
    x = torch.randn(2, 6, NLLB["d_model"], dtype=F64)
    chosen = block.router(x.view(-1, NLLB["d_model"]))[1]
    assert (chosen[:, 2:] > 0).any(), "the router chooses experts beyond 0 and 1"
    want = block(x)
    with torch.no_grad():
        for e in (2, 3):
            block.experts[f"expert_{e}"].fc1.weight.mul_(3)
        assert torch.equal(block(x), want)
        block.experts["expert_0"].fc1.weight.mul_(3)
        assert not torch.allclose(block(x), want)


def test_nllb_stays_with_a_warning_and_strict_says_so():
    model = tiny_nllb()
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "NllbMoeSparseMLP"]
    assert blocks == ["model.encoder.layers.1.ffn", "model.decoder.layers.1.ffn"]
    before = {n: m for n, m in model.named_modules()}
    with pytest.warns(UserWarning) as record:
        assert convert_transformers(model) == 0
    messages = [str(r.message) for r in record if "NLLB" in str(r.message)]
    assert len(messages) == 2
    for path, message in zip(blocks, messages):
        assert message.startswith(f"convert_transformers: {path} (NllbMoeSparseMLP) stays as it is: NLLB-MoE sparse "
                                  "MLP: transformers 5.x runs its experts with one_hot(top_1_mask)")
        assert "experts 2..E-1 never run" in message
    assert record[0].filename == __file__, "the warning points at the caller of convert_transformers"
    assert {n: m for n, m in model.named_modules()} == before
    with pytest.warns(UserWarning, match=r"moe_kernels.convert: NllbMoeSparseMLP stays as it is: NLLB-MoE sparse MLP"):
        with pytest.raises(ValueError, match="no MoE layer recognised in NllbMoeForConditionalGeneration; left as "
                                             "they are: moe_kernels.convert: NllbMoeSparseMLP stays as it is: "
                                             "NLLB-MoE sparse MLP: transformers 5.x runs its experts with one_hot"):
            moe_kernels.convert(model, strict=True)
    with pytest.raises(ValueError, match="NllbMoeSparseMLP is not a transformers MoE block.*one_hot"):
        tb.convert_moe_block(model.model.encoder.layers[1].ffn)


# --- recognisers: structure, look-alikes, the block itself ------------------------------------------------------
def test_look_alikes_stay_with_a_warning():
    model = tiny("dbrx")
    model.transformer.blocks[0].ffn.experts.mlp.activation_fn = nn.Tanh()
    with pytest.warns(UserWarning, match=r"transformer.blocks.0.ffn \(DbrxFFN\) stays as it is: DBRX FFN: act_fn Tanh"):
        assert convert_transformers(model) == 1
    assert isinstance(model.transformer.blocks[1].ffn, tb.FusedDbrxFFN)
    assert not isinstance(model.transformer.blocks[0].ffn, tb.FusedDbrxFFN)
    block = tiny("llama4").model.layers[0].feed_forward
    with pytest.raises(ValueError, match="convert_moe_block"):
        convert_transformers(block)
    assert isinstance(tb.convert_moe_block(block), tb.FusedLlama4TextMoe)
    for family, parts, _ in tb.FAMILIES:     # a plain MLP and the zoo-style layers are nobody's
        assert parts(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == (None, None), family
