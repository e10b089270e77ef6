"""moe_kernels.convert on the zoo of MoE layers as people write them (tests/zoo).

Each zoo layer gets random weights, is deep-copied, and the copy converted. In float64 the outputs and the
gradients of the input and of every parameter, matched by role (expert e's Linear weights are row e of the stacked
expert tensors, a SwiGLU expert's w1 and w3 the gate and up halves of its row; SwitchMoE's and the Mixtral block's
`gate`, LSTMMoE's `gating_network` and the GShard gate's `wg` become `router`), agree up to summation order; in
float32 within the earned tolerance against the float64 original. The auxiliary loss agrees where the original has
one, and no zoo layer is left. Also: every built-in recogniser has a zoo layer, a user's class of the same
structure, nesting, a shared layer, near misses, the strict error, the recogniser registry and the lazy loading of
integrations.
"""
import copy
import re
import sys
import textwrap
import types
import warnings

import pytest
import torch
from torch import nn

import moe_kernels
from moe_kernels import DenseMoE, SparseMoE
from moe_kernels.convert import INTEGRATIONS, GShardSparseMoE, converters, register_converter, unregister_converter

from . import zoo
from .helpers import assert_earned_max, reordered_sum_atol

F64 = torch.float64
# float64 end to end: the fused modules sum in another order than the loops of the originals; the errors seen are
# ~1e-16 on values and gradients of magnitude ~1, so 1e-12 leaves a wide margin and still catches any real error
TOL = dict(rtol=1e-12, atol=1e-12)

LAYERS = zoo.ZOO


def zoo_left(model):
    """The zoo classes that convert() should have replaced, still in `model`."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, zoo.LAYER_TYPES)})


def as_dtype(inputs, dtype):
    cast = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return tuple({k: cast(v) for k, v in a.items()} if isinstance(a, dict) else cast(a) for a in inputs)


def leaves(inputs):
    return [t for a in inputs for t in (a.values() if isinstance(a, dict) else [a])]


# --- matching parameters by role ------------------------------------------------------------------------------
MLP_ROLES = {("0", "weight"): "gate_up_proj", ("0", "bias"): "gate_up_bias", ("2", "weight"): "down_proj",
             ("2", "bias"): "down_bias"}
SWIGLU_ROLES = {"weight": ("gate_up_proj", "down_proj"), "bias": ("gate_up_bias", "down_bias")}


def role(name, param):
    """The converted model's parameter holding the original parameter `name` (of a layer, or of a model around
    layers), and the index of the original in it (None: all of it)."""
    mlp = re.fullmatch(r"((?:.*\.)?)experts\.(\d+)\.(?:network\.)?([02])\.(weight|bias)", name)  # Linear-act-Linear
    if mlp:
        return f"{mlp[1]}experts.{MLP_ROLES[mlp[3], mlp[4]]}", (int(mlp[2]),)
    swiglu = re.fullmatch(r"((?:.*\.)?)experts\.(\d+)\.(w[123])\.(weight|bias)", name)  # w2(silu(w1 x) * w3 x)
    if swiglu:
        up, down = SWIGLU_ROLES[swiglu[4]]
        e, H = int(swiglu[2]), param.shape[0]
        index = {"w1": (e, slice(0, H)), "w3": (e, slice(H, 2 * H)), "w2": (e,)}[swiglu[3]]
        return f"{swiglu[1]}experts.{down if swiglu[3] == 'w2' else up}", index
    linear = re.fullmatch(r"((?:.*\.)?)experts\.(\d+)\.(weight|bias)", name)  # one Linear per expert
    if linear:
        return f"{linear[1]}experts.{linear[3]}", (int(linear[2]),)
    renamed = re.fullmatch(r"((?:.*\.)?)(?:gate\.wg|gate|gating_network)\.(.*)", name)  # routers under other names
    if renamed:
        return f"{renamed[1]}router.{renamed[2]}", None
    return name, None


def at(tensors, name, index):
    t = tensors[name]
    return t if index is None else t[index]


def aux_loss(module):
    """The auxiliary loss a layer keeps after its forward: `aux_loss`, or DeepSpeed's `l_aux` (None: none)."""
    aux = getattr(module, "aux_loss", None)
    return getattr(module, "l_aux", None) if aux is None else aux


def run(module, inputs):
    """(output, aux_loss or None, {name: gradient} of the inputs and parameters) for a random output gradient
    (drawn from a fixed generator so that both modules get the same one)."""
    out = module(*inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    aux = aux_loss(module)
    loss = (out * g).sum() + (aux if isinstance(aux, torch.Tensor) else 0)
    named = [(f"input{i}", t) for i, t in enumerate(leaves(inputs))] + list(module.named_parameters())
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return out, aux, {n: (torch.zeros_like(t) if gr is None else gr) for (n, t), gr in zip(named, grads)}


def compare(orig, conv, got, want, check):
    """Every original parameter sits unchanged in the converted module, whose parameters hold nothing else;
    `check(actual, expected, name)` compares each gradient."""
    conv_params = dict(conv.named_parameters())
    for name, p in orig.named_parameters():
        cname, index = role(name, p)
        assert cname in conv_params, f"{name}: no {cname} in the converted {type(conv).__name__}"
        assert torch.equal(at(conv_params, cname, index), p), f"{name}: the weights changed on the way to {cname}"
        check(at(got, cname, index), want[name], f"grad {name}")
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in orig.parameters())
    for name in (n for n in want if n.startswith("input")):
        check(got[name], want[name], f"grad {name}")


def assert_close(actual, expected, name):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda s: f"{name}: {s}")


# --- the zoo --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", list(LAYERS))
def test_converted_layer_matches_float64(layer, backend):
    entry = LAYERS[layer]
    orig = entry.build().double().train()
    conv = moe_kernels.convert(copy.deepcopy(orig), strict=True)
    assert type(conv) is entry.converts_to and conv.training
    assert not zoo_left(conv)
    x = as_dtype(entry.inputs(), F64)
    out_o, aux_o, want = run(orig, x)
    out_c, aux_c, got = run(conv, x)
    assert out_c.shape == out_o.shape and out_c.dtype == F64
    assert_close(out_c, out_o, "output")
    if isinstance(aux_o, torch.Tensor):  # AdvancedMoELayer's entropy term, GShard's first-choice balance loss
        assert_close(aux_c, aux_o, "aux_loss")
    else:
        assert aux_c is None
    compare(orig, conv, got, want, assert_close)
    if entry.style == "SwitchMoE":  # the output is not scaled by the gate: the router learns nothing, in both
        assert not want["gate.weight"].any() and not got["router.weight"].any()


@pytest.mark.parametrize("layer", list(LAYERS))
def test_converted_layer_float32_within_earned_tolerance(layer, backend):
    """float32 original and converted vs the float64 original: max error within twice the original's (+ sqrt(n)
    ulps of the largest element, for outputs of few elements)."""
    entry = LAYERS[layer]
    orig = entry.build().train()
    conv = moe_kernels.convert(copy.deepcopy(orig))
    ref = copy.deepcopy(orig).double()
    x = entry.inputs()
    out_r, aux_r, ref_grads = run(ref, as_dtype(x, F64))
    out_o, aux_o, same = run(orig, as_dtype(x, torch.float32))
    out_c, aux_c, got = run(conv, as_dtype(x, torch.float32))

    def check(fast, ref64, same_dtype, name):
        assert fast.dtype == torch.float32
        assert_earned_max(fast, ref64, same_dtype, atol=reordered_sum_atol(ref64, torch.float32, 64), name=name)

    check(out_c, out_r, out_o, "output")
    if isinstance(aux_r, torch.Tensor):
        check(aux_c, aux_r, aux_o, "aux_loss")
    conv_params = dict(conv.named_parameters())
    for name, p in orig.named_parameters():
        cname, index = role(name, p)
        check(at(got, cname, index), ref_grads[name], same[name], f"grad {name}")
    for name in (n for n in ref_grads if n.startswith("input")):
        check(got[name], ref_grads[name], same[name], f"grad {name}")
    assert set(conv_params) <= {role(n, p)[0] for n, p in orig.named_parameters()}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_eval_mode_is_kept(layer):
    orig = LAYERS[layer].build().eval()
    assert not moe_kernels.convert(orig).training


@pytest.mark.parametrize("layer", [n for n, e in LAYERS.items() if e.style in ("AdvancedMoELayer", "GShardMoE")])
def test_aux_loss_only_in_training(layer):
    """AdvancedMoELayer and the GShard layer set their loss in every forward; the fused SparseMoE, like every
    SparseMoE, only in training (None in eval)."""
    entry = LAYERS[layer]
    conv = moe_kernels.convert(entry.build()).eval()
    conv(*entry.inputs())
    assert conv.aux_loss is None


@pytest.mark.parametrize("layer", [n for n, e in LAYERS.items() if e.style == "GShardMoE"])
def test_gshard_capacity(layer, backend):
    """The converted GShard layer keeps C = max(ceil(capacity_factor * 2 T / E), min_capacity) pairs per expert
    and drops the same pairs as the original: a token whose two choices were both dropped gives zeros in both;
    `l_aux` reads the converted layer's loss."""
    entry = LAYERS[layer]
    orig = entry.build().double()
    conv = moe_kernels.convert(copy.deepcopy(orig), strict=True)
    (x,) = as_dtype(entry.inputs(), F64)
    T, E = x.shape[0], len(orig.experts)
    gate = orig.gate
    assert conv.capacity(T) == max(-(-gate.capacity_factor * 2 * T // E), gate.min_capacity) == gate.capacity(T, E)
    out_o, out_c = orig(x), conv(x)
    dropped = int(conv.dropped)
    _, combine, _ = gate(x)
    assert dropped == 2 * T - int(combine.count_nonzero())   # the pairs the original's combine tensor leaves out
    if "drops" in layer:
        assert dropped > 0
    if "no-drop" in layer:
        assert dropped == 0
    both = combine.sum(dim=(1, 2)) == 0
    assert torch.equal(out_c[both], torch.zeros_like(out_c[both])) and torch.equal(out_o[both], out_c[both])
    assert conv.l_aux is conv.aux_loss


def test_every_recogniser_has_a_zoo_layer():
    """Each built-in recogniser converts at least one zoo layer, and each zoo layer exactly one recogniser
    matches (integrations included)."""
    built_in = {c.name for c in converters() if c.build.__module__ == "moe_kernels.convert"}
    seen = set()
    for name, entry in LAYERS.items():
        layer = entry.build()
        matched = [c.name for c in converters() if c.match(layer)]
        assert len(matched) == 1, f"{name}: matched by {matched}"
        seen.update(matched)
    assert built_in <= seen, f"no zoo layer for {sorted(built_in - seen)}"


def test_zoo_styles_say_where_they_come_from():
    for name, style in zoo.STYLES.items():
        assert style.source and style.layer.__doc__ and sys.modules[style.layer.__module__].__doc__, name
    assert {e.style for e in LAYERS.values()} == set(zoo.STYLES)


# --- structure, not class names ---------------------------------------------------------------------------------
class MyTop1(nn.Module):
    """Someone's own Switch layer: SwitchMoE's attributes (GELU experts), another class name and forward."""

    def __init__(self, dim, hidden, out, num_experts):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
                                     for _ in range(num_experts))

    def forward(self, x):
        idx = self.gate(x).argmax(-1)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [..., E, O]
        return outs.gather(-2, idx[..., None, None].expand(*idx.shape, 1, outs.shape[-1])).squeeze(-2)


class MyDense(nn.Module):
    """A dense softmax layer of MoELayer's structure with tanh-approximate GELU experts, written as one einsum."""

    def __init__(self, dim, hidden, out, num_experts):
        super().__init__()
        self.router = nn.Linear(dim, num_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                                   nn.Linear(hidden, out)) for _ in range(num_experts))

    def forward(self, x):
        outs = torch.stack([e(x) for e in self.experts], dim=-1)
        return torch.einsum("...oe,...e->...o", outs, self.router(x).softmax(-1))


class MyTopK(nn.Module):
    """Someone's own V-MoE-style layer: SoftmaxTopKMoE's attributes (SiLU experts without biases, renormalised),
    another class name and forward (every expert, then a gather)."""

    def __init__(self, dim, hidden, out, num_experts):
        super().__init__()
        self.top_k, self.norm_topk_prob = 3, True
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.SiLU(),
                                                   nn.Linear(hidden, out, bias=False)) for _ in range(num_experts))

    def forward(self, x):
        w, idx = self.router(x).softmax(-1).topk(self.top_k, -1)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [..., E, O]
        chosen = outs.gather(-2, idx[..., None].expand(*idx.shape, outs.shape[-1]))
        return (chosen * (w / w.sum(-1, keepdim=True))[..., None]).sum(-2)


class MySwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MyMixtral(nn.Module):
    """Someone's own Mixtral block of mistral-src's structure (experts with biases, k in a namespace), with
    another forward: the top-k of the softmax, renormalised, over every expert."""

    def __init__(self, dim, hidden, out, num_experts):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(MySwiGLU(dim, hidden) for _ in range(num_experts))
        self.args = types.SimpleNamespace(num_experts_per_tok=2)

    def forward(self, x):
        w, idx = self.gate(x).softmax(-1).topk(self.args.num_experts_per_tok, -1)
        w = w / w.sum(-1, keepdim=True)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)
        return (outs.gather(-2, idx[..., None].expand(*idx.shape, outs.shape[-1])) * w[..., None]).sum(-2)


@pytest.mark.parametrize("cls, fused, activation", [
    pytest.param(MyTop1, SparseMoE, "gelu", id="switch-like-gelu"),
    pytest.param(MyDense, DenseMoE, "gelu_tanh", id="dense-like-gelu_tanh"),
    pytest.param(MyTopK, SparseMoE, "silu", id="vmoe-like-silu-renormalised"),
    pytest.param(MyMixtral, SparseMoE, "silu", id="mixtral-like-biases"),
])
def test_user_class_of_the_same_structure(cls, fused, activation, backend):
    orig = cls(8, 12, 8 if cls is MyMixtral else 6, 5).double()
    conv = moe_kernels.convert(copy.deepcopy(orig), strict=True)
    assert type(conv) is fused and conv.experts.activation == activation
    x = as_dtype((torch.randn(2, 7, 8),), F64)
    out_o, _, want = run(orig, x)
    out_c, _, got = run(conv, x)
    assert_close(out_c, out_o, "output")
    compare(orig, conv, got, want, assert_close)


class LayerNormExperts(nn.Module):
    """SwitchMoE's attributes, but experts with a LayerNorm inside: not a two-Linear MLP, not converted."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 3)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
                                     for _ in range(3))


class TopKWithLinearRouter(nn.Module):
    """MoELayer's children plus a `k`: a top-k layer, which a dense conversion would get wrong: not converted."""

    def __init__(self):
        super().__init__()
        self.k = 2
        self.router = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8)) for _ in range(4))


class TopKWithoutNormFlag(TopKWithLinearRouter):
    """SoftmaxTopKMoE's attributes without norm_topk_prob: whether the k weights are renormalised is unknown, so
    neither renormalising nor not would be sure to be right: not converted."""

    def __init__(self):
        super().__init__()
        del self.k
        self.top_k = 2


class MixedExperts(nn.Module):
    """MoELayer's structure with experts of two widths: they do not stack, not converted."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8)),
                                      nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 8))])


class ArgsTopKMLPExperts(nn.Module):
    """SwitchMoE's children, but a top-2 declared in args.num_experts_per_tok (mistral-src's MoeLayer with MLP
    experts): neither a top-1 Switch layer nor SwiGLU experts, not converted."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 6), nn.SiLU(), nn.Linear(6, 8)) for _ in range(4))
        self.args = types.SimpleNamespace(num_experts=4, num_experts_per_tok=2)


def gshard(**gate_attrs):
    """A zoo GShard layer whose gate has other attributes."""
    layer = zoo.GShardMoE(8, 6, 4)
    for name, value in gate_attrs.items():
        setattr(layer.gate, name, value)
    return layer


@pytest.mark.parametrize("make", [
    pytest.param(LayerNormExperts, id="LayerNormExperts"),
    pytest.param(TopKWithLinearRouter, id="TopKWithLinearRouter"),
    pytest.param(TopKWithoutNormFlag, id="TopKWithoutNormFlag"),
    pytest.param(MixedExperts, id="MixedExperts"),
    pytest.param(ArgsTopKMLPExperts, id="ArgsTopKMLPExperts"),
    # DeepSpeed's top-1 gate (random token selection), a different capacity in eval, tokens never dropped,
    # Gumbel-sampled second choices: none of them is this recogniser's top-2
    pytest.param(lambda: gshard(k=1), id="GShard-top1"),
    pytest.param(lambda: gshard(eval_capacity_factor=2.0), id="GShard-eval_capacity_factor"),
    pytest.param(lambda: gshard(drop_tokens=False), id="GShard-drop_tokens-False"),
    pytest.param(lambda: gshard(top2_2nd_expert_sampling=True), id="GShard-2nd-expert-sampling"),
    pytest.param(lambda: gshard(capacity_factor=0.0), id="GShard-capacity_factor-0"),
])
def test_near_misses_are_left_alone(make):
    model = nn.Sequential(make())
    inner = model[0]
    assert moe_kernels.convert(model) is model and model[0] is inner
    want = rf"no MoE layer recognised in Sequential; module types seen: .*{type(inner).__name__}"
    with pytest.raises(ValueError, match=want):
        moe_kernels.convert(model, strict=True)


# --- models -----------------------------------------------------------------------------------------------------
def test_nested_layers_convert_in_place(backend):
    """Layers inside Sequentials convert; the rest of the model stays the same objects (nothing copied)."""
    model = nn.Sequential(nn.Linear(8, 8), zoo.SwitchMoE(8, 12, 8, 4),
                          nn.Sequential(nn.Tanh(), zoo.LSTMMoE(8, 6, 8, 3)), nn.LayerNorm(8),
                          zoo.SoftmaxTopKMoE(8, 6, 5, top_k=2),
                          # last: the tokens it drops come out as zeros, on which a bias-free router ties
                          zoo.GShardMoE(8, 10, 4, capacity_factor=0.75, min_capacity=1)).double()
    orig = copy.deepcopy(model)
    keep = [model[0], model[2], model[2][0], model[3]]
    assert moe_kernels.convert(model) is model
    assert [model[0], model[2], model[2][0], model[3]] == keep
    assert [type(model[i]) for i in (1, 4, 5)] == [SparseMoE, SparseMoE, GShardSparseMoE]
    assert type(model[2][1]) is DenseMoE
    assert not zoo_left(model)
    assert type(model[2][1].router) is zoo.LSTMGatingNetwork  # the gate is kept as it is
    x = as_dtype((torch.randn(2, 5, 8),), F64)
    out_o, _, want = run(orig, x)
    out_c, _, got = run(model, x)
    assert_close(out_c, out_o, "output")
    compare(orig, model, got, want, assert_close)


def test_shared_layer_converts_once():
    layer = zoo.MoELayer(8, 8, 3, 10)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    x = torch.randn(6, 8)
    want = model(x)
    moe_kernels.convert(model)
    assert type(model[0]) is DenseMoE and model[0] is model[2]
    torch.testing.assert_close(model(x), want)


def test_strict_error_names_the_types_seen():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Tanh()))
    assert moe_kernels.convert(model) is model  # not strict: nothing to do, no error
    with pytest.raises(ValueError) as err:
        moe_kernels.convert(model, strict=True)
    msg = str(err.value)
    assert "no MoE layer recognised in Sequential" in msg and "Linear, ReLU, Sequential, Tanh" in msg
    assert "switch top-1 MoE" in msg  # the recognisers tried


def test_not_a_module():
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        moe_kernels.convert({})


# --- the registry -----------------------------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return x * self.factor


class Doubled(nn.Module):
    def __init__(self, src):
        super().__init__()
        self.factor = src.factor  # the same parameter, moved

    def forward(self, x):
        return 2 * x * self.factor


@pytest.fixture
def registry():
    """Restores the recogniser list after a test that registers its own."""
    saved = converters()
    yield
    for c in converters():
        unregister_converter(c.name)
    for c in saved:
        register_converter(c.name, c.match, c.build)


def test_register_converter(registry):
    n = len(converters())
    match = lambda m: isinstance(m, Scale)  # noqa: E731
    register_converter("scale", match, Doubled)
    assert len(converters()) == n + 1 and converters()[-1].name == "scale"
    model = nn.Sequential(Scale(), zoo.MoELayer(4, 4, 2, 6))
    factor = model[0].factor
    moe_kernels.convert(model, strict=True)
    assert type(model[0]) is Doubled and model[0].factor is factor and type(model[1]) is DenseMoE
    # the same name again replaces it in place
    register_converter("scale", match, lambda m: nn.Identity())
    assert len(converters()) == n + 1 and type(moe_kernels.convert(Scale())) is nn.Identity
    # first=True puts a recogniser ahead of the built-in ones: here it takes MoELayer first
    register_converter("takes everything with experts", lambda m: hasattr(m, "experts"), lambda m: nn.Identity(),
                       first=True)
    assert converters()[0].name == "takes everything with experts"
    assert type(moe_kernels.convert(zoo.MoELayer(4, 4, 2, 6))) is nn.Identity
    unregister_converter("takes everything with experts")
    assert type(moe_kernels.convert(zoo.MoELayer(4, 4, 2, 6))) is DenseMoE


def test_register_converter_errors(registry):
    with pytest.raises(TypeError, match="match and build must be callables"):
        register_converter("bad", None, Doubled)
    register_converter("not a module", lambda m: isinstance(m, Scale), lambda m: 3)
    with pytest.raises(TypeError, match=r"converter 'not a module' built a int, not an nn.Module"):
        moe_kernels.convert(Scale())


def test_integrations_load_lazily(tmp_path, monkeypatch, registry):
    """An integration is imported by convert() only when its library is installed; a library without an
    integration module is skipped quietly; a broken integration warns and the rest converts."""
    for lib in ("fake_moe_lib", "fake_broken_lib"):
        (tmp_path / lib).mkdir()
        (tmp_path / lib / "__init__.py").write_text("")
    (tmp_path / "fake_moe_integration.py").write_text(textwrap.dedent("""
        from torch import nn
        from moe_kernels.convert import register_converter

        register_converter("fake", lambda m: type(m).__name__ == "Softsign", lambda m: nn.Identity())
    """))
    (tmp_path / "never_imported_integration.py").write_text("raise AssertionError('imported')\n")
    (tmp_path / "broken_integration.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(INTEGRATIONS, "fake_moe_lib", "fake_moe_integration")
    monkeypatch.setitem(INTEGRATIONS, "library_that_is_not_installed", "never_imported_integration")
    monkeypatch.setitem(INTEGRATIONS, "json", "moe_kernels.integrations.no_such_module")  # installed, no module
    monkeypatch.setitem(INTEGRATIONS, "fake_broken_lib", "broken_integration")
    for name in ("fake_moe_integration", "broken_integration"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(UserWarning, match=r"broken_integration\) failed to import \(RuntimeError: broken on purpose"):
        model = moe_kernels.convert(nn.Sequential(nn.Softsign()), strict=True)
    assert type(model[0]) is nn.Identity
    assert "fake_moe_integration" in sys.modules and "never_imported_integration" not in sys.modules
    with warnings.catch_warnings():  # the broken one warned once, not at every call
        warnings.simplefilter("error")
        moe_kernels.convert(nn.Softsign())
    monkeypatch.delitem(sys.modules, "fake_moe_integration")
