"""moe_kernels.convert on the seed documents' reference layers (shared/seeds/reference_layers.py).

Each layer gets random weights, is deep-copied, and the copy converted. In float64 the outputs and the gradients of
the input and of every parameter, matched by role (expert e's Linear weights are row e of the stacked expert
tensors; SwitchMoE's `gate` and LSTMMoE's `gating_network` become `router`), agree up to summation order; in
float32 within the earned tolerance against the float64 original. aux_loss agrees where the original has one, and
no reference layer is left. Also: a user's class of the same structure, nesting, a shared layer, near misses, the
strict error, the recogniser registry and the lazy loading of integrations.
"""
import copy
import importlib.util
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import moe_kernels
from moe_kernels import DenseMoE, SparseMoE
from moe_kernels.convert import INTEGRATIONS, converters, register_converter, unregister_converter
from moe_kernels.nn import HybridMoE

from .helpers import assert_earned_max, reordered_sum_atol

F64 = torch.float64
# float64 end to end: the fused modules sum in another order than the loops of the originals; the errors seen are
# ~1e-16 on values and gradients of magnitude ~1, so 1e-12 leaves a wide margin and still catches any real error
TOL = dict(rtol=1e-12, atol=1e-12)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "reference_layers.py"
REFERENCE_LAYERS = {"MoELayer", "Expert", "AdvancedMoELayer", "SwitchMoE", "LSTMMoE", "HybridRouterMoE"}


@pytest.fixture(scope="module")
def R():
    """The reference layers, imported by path (they are not part of the package)."""
    if not REFERENCE.exists():
        pytest.skip(f"the seed reference layers are not at {REFERENCE} (the shared/ folder beside the repository)")
    spec = importlib.util.spec_from_file_location("reference_layers", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the layers and their inputs ----------------------------------------------------------------------------
def hybrid(R, dims=8, num_experts=5, k=2, memory_size=16):
    m = R.HybridRouterMoE(dims, num_experts, 5, k, memory_size)
    m.alpha_moe.uniform_(0.1, 0.9)  # not the 0.5 it starts at: a swapped alpha would show
    m.alpha_fusion.uniform_(0.1, 0.9)
    return m


def hybrid_inputs(T=11, dims=8):
    # two of the five modalities given; the others default to x
    return torch.randn(T, dims), {"pitch": torch.randn(T, dims), "phase": torch.randn(T, dims)}


# id: (build the layer from the reference module, make the inputs, the fused type)
LAYERS = {
    # output width 5 != input width 8
    "MoELayer-D8-O5-E4-H12": (lambda R: R.MoELayer(8, 5, 4, 12), lambda: (torch.randn(13, 8),), DenseMoE),
    "MoELayer-E1": (lambda R: R.MoELayer(6, 6, 1, 10), lambda: (torch.randn(7, 6),), DenseMoE),
    "AdvancedMoELayer-E5-k2": (lambda R: R.AdvancedMoELayer(8, 8, 5, 12, k=2), lambda: (torch.randn(17, 8),),
                               SparseMoE),
    # k = E: every expert, weights renormalised over all
    "AdvancedMoELayer-k=E=3": (lambda R: R.AdvancedMoELayer(6, 6, 3, 10, k=3), lambda: (torch.randn(9, 6),),
                               SparseMoE),
    "SwitchMoE-D8-O6-E4": (lambda R: R.SwitchMoE(8, 12, 6, 4), lambda: (torch.randn(3, 5, 8),), SparseMoE),
    "SwitchMoE-E7": (lambda R: R.SwitchMoE(8, 10, 8, 7), lambda: (torch.randn(2, 9, 8),), SparseMoE),
    "LSTMMoE-D8-O5-E4": (lambda R: R.LSTMMoE(8, 7, 5, 4), lambda: (torch.randn(3, 6, 8),), DenseMoE),
    "HybridRouterMoE-E5-k2": (hybrid, hybrid_inputs, HybridMoE),
    "HybridRouterMoE-E3-k1": (lambda R: hybrid(R, 6, 3, 1, 9), lambda: hybrid_inputs(5, 6), HybridMoE),
}


def as_dtype(inputs, dtype):
    cast = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return tuple({k: cast(v) for k, v in a.items()} if isinstance(a, dict) else cast(a) for a in inputs)


def leaves(inputs):
    return [t for a in inputs for t in (a.values() if isinstance(a, dict) else [a])]


# --- matching parameters by role ------------------------------------------------------------------------------
MLP_ROLES = {("0", "weight"): "gate_up_proj", ("0", "bias"): "gate_up_bias", ("2", "weight"): "down_proj",
             ("2", "bias"): "down_bias"}


def role(name):
    """The converted model's parameter holding the original parameter `name` (of a layer, or of a model around
    layers), and the row (expert) in it, or None."""
    mlp = re.fullmatch(r"((?:.*\.)?)experts\.(\d+)\.(?:network\.)?([02])\.(weight|bias)", name)  # Linear-act-Linear
    if mlp:
        return f"{mlp[1]}experts.{MLP_ROLES[mlp[3], mlp[4]]}", int(mlp[2])
    linear = re.fullmatch(r"((?:.*\.)?)experts\.(\d+)\.(weight|bias)", name)  # one Linear per expert
    if linear:
        return f"{linear[1]}experts.{linear[3]}", int(linear[2])
    renamed = re.fullmatch(r"((?:.*\.)?)(?:gate|gating_network)\.(.*)", name)  # SwitchMoE's and LSTMMoE's routers
    if renamed:
        return f"{renamed[1]}router.{renamed[2]}", None
    return name, None


def run(module, inputs):
    """(output, aux_loss or None, {name: gradient} of the inputs and parameters) for a random output gradient
    (drawn from a fixed generator so that both modules get the same one)."""
    out = module(*inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    aux = getattr(module, "aux_loss", None)
    loss = (out * g).sum() + (aux if isinstance(aux, torch.Tensor) else 0)
    named = [(f"input{i}", t) for i, t in enumerate(leaves(inputs))] + list(module.named_parameters())
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return out, aux, {n: (torch.zeros_like(t) if gr is None else gr) for (n, t), gr in zip(named, grads)}


def compare(orig, conv, got, want, check):
    """Every original parameter sits unchanged in the converted module, whose parameters hold nothing else;
    `check(actual, expected, name)` compares each gradient."""
    conv_params = dict(conv.named_parameters())
    for name, p in orig.named_parameters():
        cname, row = role(name)
        assert cname in conv_params, f"{name}: no {cname} in the converted {type(conv).__name__}"
        q = conv_params[cname] if row is None else conv_params[cname][row]
        assert torch.equal(q, p), f"{name}: the weights changed on the way to {cname}[{row}]"
        gq = got[cname] if row is None else got[cname][row]
        check(gq, want[name], f"grad {name}")
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in orig.parameters())
    for name in (n for n in want if n.startswith("input")):
        check(got[name], want[name], f"grad {name}")


def assert_close(actual, expected, name):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda s: f"{name}: {s}")


# --- the reference layers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", list(LAYERS))
def test_converted_layer_matches_float64(R, layer, backend):
    make, inputs, fused_type = LAYERS[layer]
    orig = make(R).double().train()
    conv = moe_kernels.convert(copy.deepcopy(orig), strict=True)
    assert type(conv) is fused_type and conv.training
    assert not REFERENCE_LAYERS & {type(m).__name__ for m in conv.modules()}
    x = as_dtype(inputs(), F64)
    out_o, aux_o, want = run(orig, x)
    out_c, aux_c, got = run(conv, x)
    assert out_c.shape == out_o.shape and out_c.dtype == F64
    assert_close(out_c, out_o, "output")
    if isinstance(aux_o, torch.Tensor):  # AdvancedMoELayer: sum_e p_e log(p_e + 1e-10)
        assert_close(aux_c, aux_o, "aux_loss")
    else:
        assert aux_c is None
    compare(orig, conv, got, want, assert_close)
    if "Switch" in layer:  # the output is not scaled by the gate: the router learns nothing, in both
        assert not want["gate.weight"].any() and not got["router.weight"].any()


@pytest.mark.parametrize("layer", list(LAYERS))
def test_converted_layer_float32_within_earned_tolerance(R, layer, backend):
    """float32 original and converted vs the float64 original: max error within twice the original's (+ sqrt(n)
    ulps of the largest element, for outputs of few elements)."""
    make, inputs, _ = LAYERS[layer]
    orig = make(R).train()
    conv = moe_kernels.convert(copy.deepcopy(orig))
    ref = copy.deepcopy(orig).double()
    x = inputs()
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
    for name, _ in orig.named_parameters():
        cname, row = role(name)
        fast = got[cname] if row is None else got[cname][row]
        check(fast, ref_grads[name], same[name], f"grad {name}")
    for name in (n for n in ref_grads if n.startswith("input")):
        check(got[name], ref_grads[name], same[name], f"grad {name}")
    assert set(conv_params) <= {role(n)[0] for n, _ in orig.named_parameters()}


def test_eval_mode_is_kept(R):
    orig = R.SwitchMoE(8, 12, 8, 4).eval()
    assert not moe_kernels.convert(orig).training


def test_advanced_aux_loss_only_in_training(R):
    """AdvancedMoELayer sets aux_loss in every forward; the fused SparseMoE, like every SparseMoE, only in
    training (None in eval)."""
    conv = moe_kernels.convert(R.AdvancedMoELayer(8, 8, 4, 12, k=2)).eval()
    conv(torch.randn(5, 8))
    assert conv.aux_loss is None


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


@pytest.mark.parametrize("cls, fused", [pytest.param(MyTop1, SparseMoE, id="switch-like-gelu"),
                                        pytest.param(MyDense, DenseMoE, id="dense-like-gelu_tanh")])
def test_user_class_of_the_same_structure(cls, fused, backend):
    orig = cls(8, 12, 6, 5).double()
    conv = moe_kernels.convert(copy.deepcopy(orig), strict=True)
    assert type(conv) is fused and conv.experts.activation == ("gelu" if cls is MyTop1 else "gelu_tanh")
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


class MixedExperts(nn.Module):
    """MoELayer's structure with experts of two widths: they do not stack, not converted."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8)),
                                      nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 8))])


@pytest.mark.parametrize("cls", [LayerNormExperts, TopKWithLinearRouter, MixedExperts])
def test_near_misses_are_left_alone(cls):
    model = nn.Sequential(cls())
    inner = model[0]
    assert moe_kernels.convert(model) is model and model[0] is inner
    want = rf"no MoE layer recognised in Sequential; module types seen: .*{cls.__name__}"
    with pytest.raises(ValueError, match=want):
        moe_kernels.convert(model, strict=True)


# --- models -----------------------------------------------------------------------------------------------------
def test_nested_layers_convert_in_place(R, backend):
    """Layers inside Sequentials convert; the rest of the model stays the same objects (nothing copied)."""
    model = nn.Sequential(nn.Linear(8, 8), R.SwitchMoE(8, 12, 8, 4),
                          nn.Sequential(nn.Tanh(), R.LSTMMoE(8, 6, 8, 3)), nn.LayerNorm(8)).double()
    orig = copy.deepcopy(model)
    keep = [model[0], model[2], model[2][0], model[3]]
    assert moe_kernels.convert(model) is model
    assert [model[0], model[2], model[2][0], model[3]] == keep
    assert type(model[1]) is SparseMoE and type(model[2][1]) is DenseMoE
    assert not REFERENCE_LAYERS & {type(m).__name__ for m in model.modules()}
    assert type(model[2][1].router).__name__ == "LSTMGatingNetwork"  # the gate is kept as it is
    x = as_dtype((torch.randn(2, 5, 8),), F64)
    out_o, _, want = run(orig, x)
    out_c, _, got = run(model, x)
    assert_close(out_c, out_o, "output")
    compare(orig, model, got, want, assert_close)


def test_shared_layer_converts_once(R):
    layer = R.MoELayer(8, 8, 3, 10)
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


def test_register_converter(R, registry):
    n = len(converters())
    match = lambda m: isinstance(m, Scale)  # noqa: E731
    register_converter("scale", match, Doubled)
    assert len(converters()) == n + 1 and converters()[-1].name == "scale"
    model = nn.Sequential(Scale(), R.MoELayer(4, 4, 2, 6))
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
    assert type(moe_kernels.convert(R.MoELayer(4, 4, 2, 6))) is nn.Identity
    unregister_converter("takes everything with experts")
    assert type(moe_kernels.convert(R.MoELayer(4, 4, 2, 6))) is DenseMoE


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
