"""Every experts class the installed transformers decorates with @use_experts_implementation runs on "moe_kernels"
with eager's outputs and gradients. The classes are found by walking transformers.models, each built from its
config class's defaults scaled down (hidden 16, expert width 8, 4 experts, top-2); eager and "moe_kernels" run on
the same weights and inputs, in float64 (equal up to summation order) and float32 (the earned tolerance), forward
and the gradients of the input, the routing weights and every parameter. The count of families run and refused
(with the reason) is printed: a newly released family that breaks shows up here."""
import importlib
import inspect
import os
import pkgutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

from moe_kernels.integrations.transformers import NAME, experts_spec, register  # noqa: E402

from ..helpers import assert_earned_max, reordered_sum_atol  # noqa: E402

F64 = torch.float64
T, D, H, E, K = 7, 16, 8, 4, 2
SIZES = {"hidden_size": D, "num_experts": E, "num_local_experts": E, "n_routed_experts": E, "moe_num_experts": E,
         "num_routed_experts": E, "num_experts_per_tok": K, "moe_topk": K, "top_k": K}


def _decorated(cls) -> bool:
    """Whether cls's forward is the dispatching forward of transformers' experts decorator."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and code.co_filename.endswith(os.path.join("integrations", "moe.py"))


def experts_classes() -> list:
    """(family, class) of every decorated experts class of the installed transformers."""
    import transformers.models as models

    out = []
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        try:
            mod = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:  # noqa: BLE001 -- a model whose optional dependencies are missing
            continue
        for name, cls in sorted(vars(mod).items()):
            if (isinstance(cls, type) and cls.__module__ == mod.__name__ and issubclass(cls, nn.Module)
                    and _decorated(cls)):
                out.append((info.name, cls))
    return out


CLASSES = experts_classes()


def _config_classes(cls) -> list:
    """The config classes cls may take: the annotation of its __init__'s config, else every config class its
    modeling module holds (text configs first, as the experts of multimodal models take those)."""
    ann = inspect.signature(inspect.unwrap(cls.__init__)).parameters["config"].annotation
    mod = vars(importlib.import_module(cls.__module__))
    if isinstance(ann, str):
        ann = mod.get(ann.split("|")[0].strip().strip("'\""))
    found = [v for v in mod.values() if isinstance(v, type) and issubclass(v, transformers.PretrainedConfig)
             and v.__module__.startswith("transformers.models.")]
    first = [ann] if isinstance(ann, type) and issubclass(ann, transformers.PretrainedConfig) else []
    return first + sorted(set(found) - set(first), key=lambda c: ("Text" not in c.__name__, c.__name__))


def _scaled(config_cls):
    config = config_cls()
    if hasattr(config, "allow_global_per_layer_attribute_access"):
        config.allow_global_per_layer_attribute_access = True     # per-layer configs: their global values
    for key, value in list(vars(config).items()):
        size = SIZES.get(key, H if "intermediate_size" in key else None)
        if size is None or isinstance(value, bool):
            continue
        if value is None or isinstance(value, int):    # None: a model with dense layers by default (Gemma 4)
            setattr(config, key, size)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            setattr(config, key, type(value)(size for _ in value))
    return config


def _extra_args(cls) -> dict:
    """The arguments besides config an experts class's __init__ takes: a layer index, an expert width (ERNIE 4.5
    VL's experts take their width from the block that builds them)."""
    params = inspect.signature(inspect.unwrap(cls.__init__)).parameters
    return {name: value for name, value in (("layer_idx", 0), ("intermediate_size", H)) if name in params}


def tiny_experts(cls):
    """cls built from its config class's defaults scaled down, random weights (float64), or None and why."""
    errors = []
    for config_cls in _config_classes(cls):
        try:
            torch.manual_seed(0)
            experts = cls(_scaled(config_cls), **_extra_args(cls)).double()
        except Exception as exc:  # noqa: BLE001 -- the next config class, or the reason
            errors.append(f"{config_cls.__name__}: {type(exc).__name__}: {exc}")
            continue
        with torch.no_grad():
            for name, p in experts.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
        return experts, None
    return None, "; ".join(errors) or "no config class found"


def _eager_in_float32(experts) -> bool:
    """Whether the family's eager code computes parts in float32 whatever the input (Beam's and Inkling2's gates,
    MuseSpark's norm, ...): its float64 run is then not a float64 oracle, only float32-accurate."""
    sources = []
    for cls in {type(m) for m in experts.modules()} | {type(getattr(experts, "act_fn", None))}:
        try:
            sources.append(inspect.getsource(cls))
        except (OSError, TypeError):
            pass
    return any(".float()" in src or "torch.float32" in src for src in sources)


def _close64(got, want, float32_eager, what):
    """float64 against eager's float64 run: equal up to summation order, or to float32's rounding where eager
    computes in float32 (scaled by the largest magnitude, as a sum's rounding is)."""
    scale = want.abs().max().item() if want.numel() else 0.0
    tol = dict(rtol=1e-5, atol=1e-6 * scale) if float32_eager else dict(rtol=1e-9, atol=1e-12 + 1e-12 * scale)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def _routes(experts, g, E_, D_):
    """Inputs of the contract: top-2 routes, or one route per row for an experts class whose eager forward takes
    only that; unit weights for one whose eager forward ignores them (Ergo's projections, whose block passes ones
    and applies the weights after a per-route norm)."""
    x = torch.randn(T, D_, generator=g, dtype=F64)
    for k in (K, 1):
        idx = torch.rand(T, E_, generator=g).argsort(1)[:, :min(k, E_)]
        w = torch.rand(idx.shape, generator=g, dtype=F64) + 0.1
        try:
            once, twice = run(experts, "eager", x, idx, w, F64)[0], run(experts, "eager", x, idx, 2 * w, F64)[0]
        except (IndexError, RuntimeError):
            continue
        ignored = torch.equal(once, twice)
        return x, idx, torch.ones_like(w) if ignored else w, not ignored
    raise AssertionError(f"{type(experts).__name__}: its eager forward takes neither top-{K} nor top-1 routes")


def run(experts, implementation, x, idx, w, dtype):
    """(out, grads of x, w and every parameter) of the experts module in `dtype` under `implementation`."""
    m = experts.to(dtype)
    m.config._experts_implementation = implementation
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = m(xs, idx, ws)
    leaves = [xs, ws] + list(m.parameters())
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) / out.numel() ** 0.5, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("family,cls", [pytest.param(f, c, id=f"{f}.{c.__name__}") for f, c in CLASSES])
def test_every_decorated_experts_class_runs_like_eager(family, cls):
    register()
    experts, why = tiny_experts(cls)
    assert experts is not None, f"{family}.{cls.__name__} could not be built for the test: {why}"
    spec = experts_spec(experts)      # ValueError naming the class if moe_kernels refuses it
    g = torch.Generator().manual_seed(1)
    dim = next(p for n, p in experts.named_parameters() if "down_proj" in n and "bias" not in n)
    E_ = dim.shape[0]
    D_ = dim.shape[1] if not getattr(experts, "is_transposed", False) else dim.shape[2]
    x, idx, w, weighted = _routes(experts, g, E_, D_)
    want, want_g = run(experts, "eager", x, idx, w, F64)
    got, got_g = run(experts, NAME, x, idx, w, F64)
    names = ["x", "weights" if weighted else None] + [n for n, _ in experts.named_parameters()]
    in32 = _eager_in_float32(experts)
    _close64(got, want, in32, f"{spec}: output")
    for name, a, b in zip(names, got_g, want_g):
        if name is not None:        # the weights' gradient, where eager reads the weights
            _close64(a, b, in32, f"{spec}: grad {name}")
    same, same_g = run(experts, "eager", x, idx, w, torch.float32)
    fast, fast_g = run(experts, NAME, x, idx, w, torch.float32)
    n = D_ + 2 * H
    assert_earned_max(fast, want, same, atol=reordered_sum_atol(want, torch.float32, n), name="fp32 output")
    for name, a, b, c in zip(names, fast_g, want_g, same_g):
        if name is not None:
            assert_earned_max(a, b, c, atol=reordered_sum_atol(b, torch.float32, n), name=f"fp32 grad {name}")


def test_the_count_of_families():
    # every decorated class is found, builds at test size and runs: the count goes into the README
    register()
    run_, refused = [], []
    for family, cls in CLASSES:
        experts, why = tiny_experts(cls)
        try:
            if experts is None:
                raise ValueError(why)
            experts_spec(experts)
            run_.append(f"{family}.{cls.__name__}")
        except ValueError as exc:
            refused.append(f"{family}.{cls.__name__}: {exc}")
    print(f"\ntransformers {transformers.__version__}: {len(run_)} experts classes run on moe_kernels, "
          f"{len(refused)} refused" + "".join(f"\n  refused {r}" for r in refused))
    assert len(CLASSES) >= 60, f"only {len(CLASSES)} decorated experts classes found: the walk misses some"
    assert not refused
