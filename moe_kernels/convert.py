"""`convert(model)`: find Mixture-of-Experts layers in a model by their structure and replace each with a fused
module holding the same weights.

A recogniser is a `Converter(name, match, build)`: `match(module) -> bool` looks only at structure (child names,
module types, shapes, attributes; never the class name, so a user's own class of the same shape converts too);
`build(module) -> nn.Module` returns the replacement, which takes over the module's parameters (routers and other
submodules move as they are, per-expert weights are stacked into the fused layout). `convert` walks the model,
tries the recognisers in order on each module, swaps in the first build, and does not descend into what it
replaced.

Recognisers register with `register_converter`. The ones here cover the MoE layers of the seed documents (the
MoE guide's MoELayer and AdvancedMoELayer, the notebook's LSTMMoE and SwitchMoE, hybrid_router_moe.md's layer).
Integrations for other libraries live in `moe_kernels.integrations.<name>` and register theirs when imported;
`convert` imports each one lazily, only when its library is installed (see INTEGRATIONS).
"""
import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .nn import DenseMoE, Experts, HybridMoE, LinearExperts, SparseMoE
from .nn.hybrid import MODALITIES


@dataclass(frozen=True)
class Converter:
    name: str
    match: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]


_CONVERTERS: list = []

# library (its import name) -> the integration module that registers its recognisers when imported
INTEGRATIONS = {
    "transformers": "moe_kernels.integrations.transformers",
    "soft_moe_pytorch": "moe_kernels.integrations.soft_moe_pytorch",
}


def register_converter(name: str, match: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module], *,
                       first: bool = False) -> Converter:
    """Adds a recogniser (replacing one of the same name in place). Recognisers are tried in registration order;
    first=True puts this one ahead of all others."""
    if not callable(match) or not callable(build):
        raise TypeError(f"match and build must be callables, got {type(match).__name__} and {type(build).__name__}")
    conv = Converter(name, match, build)
    names = [c.name for c in _CONVERTERS]
    if name in names and not first:
        _CONVERTERS[names.index(name)] = conv
    else:
        unregister_converter(name)
        _CONVERTERS.insert(0 if first else len(_CONVERTERS), conv)
    return conv


def unregister_converter(name: str) -> None:
    """Removes the recogniser `name` (nothing if there is none)."""
    _CONVERTERS[:] = [c for c in _CONVERTERS if c.name != name]


def converters() -> list:
    """The recognisers convert() tries, in order (integrations of installed libraries loaded first)."""
    _load_integrations()
    return list(_CONVERTERS)


_FAILED: set = set()  # integration modules that failed to import (warned about once)


def _load_integrations() -> None:
    for package, module in INTEGRATIONS.items():
        if module in sys.modules or module in _FAILED or not _installed(package):
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            _FAILED.add(module)
            if isinstance(exc, ModuleNotFoundError) and exc.name is not None and module.startswith(exc.name):
                continue  # no integration module for this library (yet)
            # a broken integration must not stop the conversion of the other layers
            warnings.warn(f"moe_kernels.convert: the {package} integration ({module}) failed to import "
                          f"({type(exc).__name__}: {exc}); its layers are not converted", stacklevel=3)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def convert(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """Replaces every recognised MoE layer in `model` (the model itself included) with its fused module, in place;
    returns the model (or the replacement, when the model itself is such a layer). A layer reachable under two
    names is converted once. strict=True raises ValueError when nothing is recognised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    convs = converters()
    # id(module) -> (module, its replacement or None when it is not a recognised layer); holding the module keeps
    # its id from being reused by another while the walk goes on
    done: dict = {}

    def replacement(module: nn.Module) -> Optional[nn.Module]:
        key = id(module)
        if key not in done:
            conv = next((c for c in convs if c.match(module)), None)
            done[key] = (module, None if conv is None else _built(conv, module))
            if conv is None:
                for child_name, child in list(module._modules.items()):
                    new = replacement(child) if child is not None else None
                    if new is not None:
                        setattr(module, child_name, new)
        return done[key][1]

    new_root = replacement(model)
    if strict and all(new is None for _, new in done.values()):
        seen = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"convert(strict=True): no MoE layer recognised in {type(model).__name__}; module types "
                         f"seen: {', '.join(seen)}; recognisers tried: {', '.join(c.name for c in convs) or 'none'}")
    return model if new_root is None else new_root


def _built(conv: Converter, module: nn.Module) -> nn.Module:
    new = conv.build(module)
    if not isinstance(new, nn.Module):
        raise TypeError(f"converter {conv.name!r} built a {type(new).__name__}, not an nn.Module")
    meta = [n for n, t in (*new.named_parameters(), *new.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"converter {conv.name!r} left tensors without data in {type(new).__name__}: {meta}")
    return new.train(module.training)


# --- structure helpers ------------------------------------------------------------------------------------------
def _children(module: nn.Module) -> dict:
    return dict(module._modules.items())


def _has_own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _activation(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}.get(type(module))


def _mlp(expert: nn.Module) -> Optional[tuple]:
    """(Linear, activation name, Linear) of an expert that is nn.Sequential(Linear, activation, Linear), or a
    module with no state of its own whose only child is one (the MoE guide's Expert); else None."""
    seq = expert
    if not isinstance(seq, nn.Sequential):
        kids = list(_children(expert).values())
        if len(kids) != 1 or _has_own_state(expert) or not isinstance(kids[0], nn.Sequential):
            return None
        seq = kids[0]
    if len(seq) != 3:
        return None
    first, act, second = seq
    if not (type(first) is nn.Linear and type(second) is nn.Linear) or first.out_features != second.in_features:
        return None
    name = _activation(act)
    if name is None or (first.bias is None) != (second.bias is None):
        return None
    return first, name, second


def _same(items, key) -> bool:
    return len({key(i) for i in items}) == 1


def _mlp_experts(experts: nn.Module) -> Optional[list]:
    """The (Linear, activation, Linear) of each expert of an nn.ModuleList of identical MLP experts, else None."""
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0 or _has_own_state(experts):
        return None
    layers = [_mlp(e) for e in experts]
    if any(layer is None for layer in layers):
        return None
    return layers if _same(layers, lambda layer: (layer[0].weight.shape, layer[1], layer[2].weight.shape,
                                                  layer[0].bias is None, layer[0].weight.dtype,
                                                  layer[0].weight.device)) else None


def _linear_experts(experts: nn.Module) -> Optional[list]:
    """The nn.Linear experts of an nn.ModuleList of identical ones, else None."""
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0 or _has_own_state(experts):
        return None
    if not all(type(e) is nn.Linear for e in experts):
        return None
    return list(experts) if _same(experts, lambda e: (e.weight.shape, e.bias is None, e.weight.dtype,
                                                       e.weight.device)) else None


def _stack(tensors: list) -> nn.Parameter:
    """One Parameter [E, ...] of E per-expert tensors (keeping whether they are trained)."""
    return nn.Parameter(torch.stack([t.detach() for t in tensors]), requires_grad=tensors[0].requires_grad)


def _fused_mlp(layers: list) -> Experts:
    first = [layer[0] for layer in layers]
    second = [layer[2] for layer in layers]
    bias = first[0].bias is not None
    return Experts.from_weights(_stack([m.weight for m in first]), _stack([m.weight for m in second]),
                                _stack([m.bias for m in first]) if bias else None,
                                _stack([m.bias for m in second]) if bias else None, activation=layers[0][1],
                                gated=False)


def _fused_linear(experts: list) -> LinearExperts:
    bias = experts[0].bias is not None
    return LinearExperts.from_weights(_stack([e.weight for e in experts]),
                                      _stack([e.bias for e in experts]) if bias else None)


def _is_linear(module, in_features, out_features) -> bool:
    return type(module) is nn.Linear and module.in_features == in_features and module.out_features == out_features


def _mlp_router(router: nn.Module, dim: int, num_experts: int) -> bool:
    """nn.Linear(D, E), or an nn.Sequential from an nn.Linear(D, *) to a last parametrised nn.Linear(*, E)."""
    if type(router) is nn.Linear:
        return _is_linear(router, dim, num_experts)
    if not isinstance(router, nn.Sequential) or len(router) == 0:
        return False
    with_params = [m for m in router if any(True for _ in m.parameters())]
    return (len(with_params) >= 1 and type(router[0]) is nn.Linear and router[0].in_features == dim
            and type(with_params[-1]) is nn.Linear and with_params[-1].out_features == num_experts)


def _dims(layers: list) -> tuple:
    """(D, H, O, dtype) of MLP experts."""
    first, _, second = layers[0]
    return first.in_features, first.out_features, second.out_features, first.weight.dtype


def _mlp_kwargs(layers: list) -> dict:
    """The SparseMoE / DenseMoE arguments of MLP experts (the shell they are built in; the weights come after)."""
    first, act, second = layers[0]
    return dict(out_dim=second.out_features, activation=act, gated=False, bias=first.bias is not None,
                device="meta", dtype=first.weight.dtype)


def _no_attrs(module, *names) -> bool:
    return not any(hasattr(module, n) for n in names)


def _int_attr(module, name) -> Optional[int]:
    v = getattr(module, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# --- the seed documents' layers ---------------------------------------------------------------------------------
def _linear_router_parts(m: nn.Module, router: str) -> Optional[tuple]:
    """A router nn.Linear(D, E) named `router`, `experts` E MLPs (Linear(D, H) -> act -> Linear(H, O)), nothing
    else, and no top-k attribute; -> (router, expert layers) or None."""
    kids = _children(m)
    if set(kids) != {router, "experts"} or _has_own_state(m) or not _no_attrs(m, "k", "top_k", "aux_loss"):
        return None
    layers = _mlp_experts(kids["experts"])
    if layers is None or not _is_linear(kids[router], _dims(layers)[0], len(layers)):
        return None
    return kids[router], layers


def _with_mlp_experts(cls, layers: list, *args, **kwargs) -> nn.Module:
    """cls(D, H, E, *args, ...) built as an empty shell, holding the stacked weights of the MLP experts."""
    D, H, _, _ = _dims(layers)
    new = cls(D, H, len(layers), *args, **_mlp_kwargs(layers), **kwargs)
    new.experts = _fused_mlp(layers)
    return new


def _dense_softmax_parts(m: nn.Module) -> Optional[tuple]:
    """The MoE guide's MoELayer: `router` nn.Linear(D, E) and MLP `experts`:
    out = sum_e softmax(router(x))_e * expert_e(x)."""
    return _linear_router_parts(m, "router")


def _build_dense_softmax(m: nn.Module) -> DenseMoE:
    router, layers = _dense_softmax_parts(m)
    return _with_mlp_experts(DenseMoE, layers, router=router)


def _topk_mlp_router_parts(m: nn.Module) -> Optional[tuple]:
    """The MoE guide's AdvancedMoELayer: `router` (an MLP ending in E logits), `experts` E MLPs, an int `k` and an
    `aux_loss` attribute: top-k of the softmax probabilities, renormalised; aux_loss = sum_e p_e log(p_e + 1e-10)
    of the mean probabilities p."""
    kids = _children(m)
    k = _int_attr(m, "k")
    if set(kids) != {"router", "experts"} or _has_own_state(m) or k is None or not hasattr(m, "aux_loss"):
        return None
    layers = _mlp_experts(kids["experts"])
    if layers is None or not 1 <= k <= len(layers) or not _mlp_router(kids["router"], _dims(layers)[0], len(layers)):
        return None
    return kids["router"], layers, k


def _build_topk_mlp_router(m: nn.Module) -> SparseMoE:
    router, layers, k = _topk_mlp_router_parts(m)
    return _with_mlp_experts(SparseMoE, layers, k, router=router, aux_loss_type="entropy", aux_loss_coef=1.0)


def _switch_parts(m: nn.Module) -> Optional[tuple]:
    """The notebook's SwitchMoE: `gate` nn.Linear(D, E) and MLP `experts`: each token's output is the output of
    its argmax expert, not scaled by the gate (which therefore gets no gradient)."""
    return _linear_router_parts(m, "gate")


def _build_switch(m: nn.Module) -> SparseMoE:
    gate, layers = _switch_parts(m)
    return _with_mlp_experts(SparseMoE, layers, 1, router=gate, scale_by_gate=False, aux_loss_type=None)


def _lstm_parts(m: nn.Module) -> Optional[tuple]:
    """The notebook's LSTMMoE: `gating_network` with `lstm` (nn.LSTM over D, batch_first) and `fc` (nn.Linear to E)
    giving the gates, `experts` E nn.Linear(D, O): out = sum_e gate_e * expert_e(x)."""
    kids = _children(m)
    if set(kids) != {"gating_network", "experts"} or _has_own_state(m):
        return None
    gating, experts = kids["gating_network"], _linear_experts(kids["experts"])
    if experts is None or set(_children(gating)) != {"lstm", "fc"} or _has_own_state(gating):
        return None
    lstm, fc = gating.lstm, gating.fc
    D = experts[0].in_features
    ok = (type(lstm) is nn.LSTM and lstm.input_size == D and lstm.batch_first and not lstm.bidirectional
          and lstm.proj_size == 0 and _is_linear(fc, lstm.hidden_size, len(experts)))
    return (gating, experts) if ok else None


def _build_lstm(m: nn.Module) -> DenseMoE:
    gating, experts = _lstm_parts(m)
    first = experts[0]
    new = DenseMoE(first.in_features, None, len(experts), out_dim=first.out_features, router=gating, score=None,
                   bias=first.bias is not None, device="meta", dtype=first.weight.dtype)
    new.experts = _fused_linear(experts)
    return new


_HYBRID_CHILDREN = {"soft_router", "sparse_router", "direct_gate", "experts", "fusion_gates", "fusion_projection"}


def _gate(module, dim, width, act) -> bool:
    """nn.Sequential(nn.Linear(dim, width), act())"""
    return (isinstance(module, nn.Sequential) and len(module) == 2 and _is_linear(module[0], dim, width)
            and type(module[1]) is act)


def _hybrid_parts(m: nn.Module) -> Optional[tuple]:
    """hybrid_router_moe.md's layer: soft_router (Linear(D, E), Softmax), sparse_router Linear(D, E), memory
    m_key [M, D] and m_val [M, E], direct_gate (Linear(D, E), Sigmoid), E MLP experts D -> D -> D, fusion_gates
    (one (Linear(D, 1), Sigmoid) per modality), fusion_projection Linear(5 D, D), buffers alpha_moe and
    alpha_fusion, an int k."""
    kids = _children(m)
    if set(kids) != _HYBRID_CHILDREN or _int_attr(m, "k") is None:
        return None
    own = dict(m.named_parameters(recurse=False))
    bufs = dict(m.named_buffers(recurse=False))
    layers = _mlp_experts(kids["experts"])
    if layers is None or set(own) != {"m_key", "m_val"} or set(bufs) != {"alpha_moe", "alpha_fusion"}:
        return None
    D, H, O, _ = _dims(layers)
    E, M = len(layers), own["m_key"].shape[0]
    fusion = kids["fusion_gates"]
    ok = (H == O == D and own["m_key"].shape == (M, D) and own["m_val"].shape == (M, E)
          and all(b.dim() == 0 for b in bufs.values()) and 1 <= m.k <= E
          and _gate(kids["soft_router"], D, E, nn.Softmax) and kids["soft_router"][1].dim in (-1, 1)
          and _is_linear(kids["sparse_router"], D, E) and _gate(kids["direct_gate"], D, E, nn.Sigmoid)
          and isinstance(fusion, nn.ModuleList) and len(fusion) == len(MODALITIES)
          and all(_gate(g, D, 1, nn.Sigmoid) for g in fusion)
          and _is_linear(kids["fusion_projection"], D * len(MODALITIES), D))
    return (kids, own, bufs, layers) if ok else None


def _build_hybrid(m: nn.Module) -> HybridMoE:
    kids, own, bufs, layers = _hybrid_parts(m)
    D, _, _, dtype = _dims(layers)
    new = HybridMoE(D, len(layers), m.k, own["m_key"].shape[0], getattr(m, "threshold", 0.8),
                    activation=layers[0][1], device="meta", dtype=dtype)
    for name in _HYBRID_CHILDREN - {"experts"}:
        setattr(new, name, kids[name])
    new.experts = _fused_mlp(layers)  # HybridMoE's experts: D -> D -> D, SiLU, with biases, like the layer's
    new.m_key, new.m_val = own["m_key"], own["m_val"]
    new.alpha_moe, new.alpha_fusion = bufs["alpha_moe"], bufs["alpha_fusion"]
    return new


register_converter("dense softmax MoE (moe_guide MoELayer)", lambda m: _dense_softmax_parts(m) is not None,
                   _build_dense_softmax)
register_converter("top-k MLP-router MoE (moe_guide AdvancedMoELayer)", lambda m: _topk_mlp_router_parts(m) is not None,
                   _build_topk_mlp_router)
register_converter("switch top-1 MoE (notebook SwitchMoE)", lambda m: _switch_parts(m) is not None, _build_switch)
register_converter("LSTM-gated MoE (notebook LSTMMoE)", lambda m: _lstm_parts(m) is not None, _build_lstm)
register_converter("hybrid-router MoE (hybrid_router_moe.md)", lambda m: _hybrid_parts(m) is not None, _build_hybrid)
