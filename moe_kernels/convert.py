"""`convert(model)`: find Mixture-of-Experts layers in a model by their structure and replace each with a fused
module holding the same weights.

A recogniser is a `Converter(name, match, build)`: `match(module) -> bool` looks only at structure (child names,
module types, shapes, attributes; never the class name, so a user's own class of the same shape converts too);
`build(module) -> nn.Module` returns the replacement, which takes over the module's parameters (routers and other
submodules move as they are, per-expert weights are stacked into the fused layout). `convert` walks the model,
tries the recognisers in order on each module, swaps in the first build, and does not descend into what it
replaced.

Recognisers register with `register_converter`. The ones here cover MoE layers as people write them: a MoE
guide's MoELayer and AdvancedMoELayer, a notebook's LSTMMoE and SwitchMoE, a hybrid soft/sparse/memory-router layer,
GShard / DeepSpeed-MoE's top-2 layer with capacity, Mixtral's block as mistral-src writes it, and a V-MoE-style
top-k softmax-router layer (tests/zoo holds one of each, written as its source writes it).
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

from . import ops
from .nn import DenseMoE, Experts, HybridMoE, LinearExperts, SparseMoE
from .nn.hybrid import MODALITIES
from .nn.source_layout import Piece, keep_source_layout, source_layout


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

    # recognisers warn about look-alikes they leave as they are, saying why; the warnings pass on to the caller,
    # and a strict conversion that converts nothing names them
    with warnings.catch_warnings(record=True) as seen_warnings:
        warnings.simplefilter("always")
        new_root = replacement(model)
    for w in seen_warnings:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if strict and all(new is None for _, new in done.values()):
        seen = sorted({type(m).__name__ for m in model.modules()})
        why = [str(w.message) for w in seen_warnings if str(w.message).startswith("moe_kernels.convert:")]
        raise ValueError(f"convert(strict=True): no MoE layer recognised in {type(model).__name__}; "
                         + (f"left as they are: {'; '.join(why)}; " if why else "")
                         + f"module types seen: {', '.join(seen)}; recognisers tried: "
                           f"{', '.join(c.name for c in convs) or 'none'}")
    return model if new_root is None else new_root


def _built(conv: Converter, module: nn.Module) -> nn.Module:
    _STACKED.clear()
    try:
        new = conv.build(module)
        if not isinstance(new, nn.Module):
            raise TypeError(f"converter {conv.name!r} built a {type(new).__name__}, not an nn.Module")
        meta = [n for n, t in (*new.named_parameters(), *new.named_buffers()) if t.is_meta]
        if meta:
            raise RuntimeError(f"converter {conv.name!r} left tensors without data in {type(new).__name__}: {meta}")
        if source_layout(new) is None:
            pieces = _layout_pieces(module, new)
            if pieces is not None:
                keep_source_layout(new, pieces)
    finally:
        _STACKED.clear()
    return new.train(module.training)


# --- checkpoints in the original layout ---------------------------------------------------------------------------
# id(stacked tensor) -> (the tensor, per expert [(source tensor, (start, stop) rows or None)]), recorded while a
# converter builds, so that the built module can save and load the original layer's state dict
_STACKED: dict = {}


def _record(stacked: torch.Tensor, parts: list) -> torch.Tensor:
    _STACKED[id(stacked)] = (stacked, parts)
    return stacked


def _layout_pieces(original: nn.Module, new: nn.Module) -> Optional[list]:
    """The pieces (nn.source_layout) that map every tensor of the original's state dict to where the built module
    holds it: the same tensor moved over (a router, a gating network, buffers), or an expert's slice of a stacked
    one. None when some tensor of either side has no counterpart (the module then keeps its own layout)."""
    source = {}
    for name, t in original.state_dict(keep_vars=True).items():
        source.setdefault(id(t), name)
    pieces, covered = [], set()
    for target, t in new.state_dict(keep_vars=True).items():
        if id(t) in source:
            pieces.append(Piece(source[id(t)], target))
            covered.add(source[id(t)])
        elif id(t) in _STACKED:
            for e, expert_parts in enumerate(_STACKED[id(t)][1]):
                for part, rows in expert_parts:
                    if id(part) not in source:
                        return None
                    pieces.append(Piece(source[id(part)], target, e, rows))
                    covered.add(source[id(part)])
        else:
            return None
    return pieces if covered == set(original.state_dict(keep_vars=True)) else None


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
    stacked = nn.Parameter(torch.stack([t.detach() for t in tensors]), requires_grad=tensors[0].requires_grad)
    return _record(stacked, [[(t, None)] for t in tensors])


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


def _top_k_renormalised(k: int) -> dict:
    """SparseMoE's arguments for the top-k weights renormalised to sum to one: for k = 1 that weight is exactly 1
    (and the router gets no gradient from the output), which scale_by_gate=False gives exactly."""
    return dict(renormalize=True) if k > 1 else dict(scale_by_gate=False)


def _no_attrs(module, *names) -> bool:
    return not any(hasattr(module, n) for n in names)


def _int_attr(module, name) -> Optional[int]:
    v = getattr(module, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


# attributes that declare a number of experts per token (mistral-src keeps it in `args.num_experts_per_tok`)
_TOP_K_ATTRS = ("k", "top_k", "num_experts_per_tok")


def _declares_top_k(m: nn.Module) -> bool:
    return not _no_attrs(m, *_TOP_K_ATTRS) or hasattr(getattr(m, "args", None), "num_experts_per_tok")


# --- a MoE guide's, a notebook's and a hybrid-router layer ------------------------------------------------------
def _linear_router_parts(m: nn.Module, router: str) -> Optional[tuple]:
    """A router nn.Linear(D, E) named `router`, `experts` E MLPs (Linear(D, H) -> act -> Linear(H, O)), nothing
    else, no attribute declaring a top-k and no aux_loss; -> (router, expert layers) or None."""
    kids = _children(m)
    if set(kids) != {router, "experts"} or _has_own_state(m) or _declares_top_k(m) or hasattr(m, "aux_loss"):
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
    """A MoE guide's MoELayer: `router` nn.Linear(D, E) and MLP `experts`:
    out = sum_e softmax(router(x))_e * expert_e(x)."""
    return _linear_router_parts(m, "router")


def _build_dense_softmax(m: nn.Module) -> DenseMoE:
    router, layers = _dense_softmax_parts(m)
    return _with_mlp_experts(DenseMoE, layers, router=router)


def _topk_mlp_router_parts(m: nn.Module) -> Optional[tuple]:
    """A MoE guide's AdvancedMoELayer: `router` (an MLP ending in E logits), `experts` E MLPs, an int `k` and an
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
    return _with_mlp_experts(SparseMoE, layers, k, router=router, aux_loss_type="entropy", aux_loss_coef=1.0,
                             **_top_k_renormalised(k))


def _switch_parts(m: nn.Module) -> Optional[tuple]:
    """A notebook's SwitchMoE: `gate` nn.Linear(D, E) and MLP `experts`: each token's output is the output of
    its argmax expert, not scaled by the gate (which therefore gets no gradient)."""
    return _linear_router_parts(m, "gate")


def _build_switch(m: nn.Module) -> SparseMoE:
    gate, layers = _switch_parts(m)
    return _with_mlp_experts(SparseMoE, layers, 1, router=gate, scale_by_gate=False, aux_loss_type=None)


def _lstm_parts(m: nn.Module) -> Optional[tuple]:
    """A notebook's LSTMMoE: `gating_network` with `lstm` (nn.LSTM over D, batch_first) and `fc` (nn.Linear to E)
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
    """The hybrid-router layer: soft_router (Linear(D, E), Softmax), sparse_router Linear(D, E), memory
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


# --- GShard / DeepSpeed-MoE, Mixtral by hand (mistral-src), V-MoE ---------------------------------------------
class GShardSparseMoE(SparseMoE):
    """SparseMoE whose balance loss counts each token's first choice only, as GShard and DeepSpeed-MoE's top-2
    gate do: aux_loss = aux_loss_coef * E * sum_e mean_t(p_te) * (first choices of e / T) (DeepSpeed's `l_aux`,
    which `l_aux` also reads). Everything else is SparseMoE's."""

    def _aux_loss(self, r: ops.Routing) -> Optional[torch.Tensor]:
        first = torch.bincount(r.experts[:, 0], minlength=self.num_experts).to(r.counts.dtype)
        loss = self.aux_loss_coef * ops.load_balancing_loss(r._replace(counts=first))
        return loss + self.z_loss_coef * ops.router_z_loss(r) if self.z_loss_coef else loss

    @property
    def l_aux(self) -> Optional[torch.Tensor]:
        return self.aux_loss

    def extra_repr(self):
        return super().extra_repr() + ", balance loss over first choices"


def _gshard_parts(m: nn.Module) -> Optional[tuple]:
    """GShard / DeepSpeed-MoE's top-2 layer with capacity: `gate` whose only part is `wg` nn.Linear(D, E) and
    whose k is 2, with capacity_factor > 0 and an int min_capacity >= 0 (an eval_capacity_factor, if any, the
    same; tokens dropped: drop_tokens not False; no noise: noisy_gate_policy None, top2_2nd_expert_sampling
    false), `experts` E >= 2 MLPs (Linear(D, H) -> act -> Linear(H, O)), an `l_aux` attribute, nothing else.
    Softmax gates, first choice the argmax, second the argmax of the rest, the two renormalised; an expert keeps
    C = max(ceil(capacity_factor * 2 T / E), min_capacity) pairs, first choices first; -> (gate, layers) or None."""
    kids = _children(m)
    if set(kids) != {"gate", "experts"} or _has_own_state(m) or not hasattr(m, "l_aux") or _declares_top_k(m):
        return None
    gate = kids["gate"]
    if set(_children(gate)) != {"wg"} or _has_own_state(gate) or _int_attr(gate, "k") != 2:
        return None
    cf, min_capacity = getattr(gate, "capacity_factor", None), _int_attr(gate, "min_capacity")
    if not _positive_number(cf) or min_capacity is None or min_capacity < 0:
        return None
    if (getattr(gate, "eval_capacity_factor", cf) != cf or getattr(gate, "drop_tokens", True) is not True
            or getattr(gate, "noisy_gate_policy", None) is not None
            or getattr(gate, "top2_2nd_expert_sampling", False)):
        return None
    layers = _mlp_experts(kids["experts"])
    if layers is None or len(layers) < 2 or not _is_linear(gate.wg, _dims(layers)[0], len(layers)):
        return None
    return gate, layers


def _build_gshard(m: nn.Module) -> GShardSparseMoE:
    gate, layers = _gshard_parts(m)
    return _with_mlp_experts(GShardSparseMoE, layers, 2, router=gate.wg, capacity_factor=float(gate.capacity_factor),
                             min_capacity=gate.min_capacity, aux_loss_type="switch", aux_loss_coef=1.0)


_SWIGLU = ("w1", "w3", "w2")  # gate, up, down


def _swiglu(expert: nn.Module) -> Optional[tuple]:
    """(w1, w3, w2) of an expert made of exactly three nn.Linear, w1 and w3 (D -> H) and w2 (H -> D), all with a
    bias or none: Mistral / Llama's FeedForward, w2(silu(w1 x) * w3 x); else None."""
    kids = _children(expert)
    if set(kids) != set(_SWIGLU) or _has_own_state(expert):
        return None
    w1, w3, w2 = (kids[n] for n in _SWIGLU)
    if type(w1) is not nn.Linear:
        return None
    D, H = w1.in_features, w1.out_features
    if not (_is_linear(w3, D, H) and _is_linear(w2, H, D)):
        return None
    if len({w.bias is None for w in (w1, w3, w2)}) != 1:
        return None
    return w1, w3, w2


def _mistral_parts(m: nn.Module) -> Optional[tuple]:
    """Mixtral's sparse block as mistral-src writes it (its MoeLayer): `gate` nn.Linear(D, E), `experts` E SwiGLU
    FeedForwards (w1, w2, w3), k in `args.num_experts_per_tok` (and args.num_experts, if any, = E), nothing else.
    The top-k logits, softmax over them (= the top-k of the softmax, renormalised); -> (gate, experts, k) or None."""
    kids = _children(m)
    if set(kids) != {"gate", "experts"} or _has_own_state(m) or not _no_attrs(m, *_TOP_K_ATTRS, "aux_loss"):
        return None
    args = getattr(m, "args", None)
    k = _int_attr(args, "num_experts_per_tok")
    experts = kids["experts"]
    if k is None or not isinstance(experts, nn.ModuleList) or len(experts) == 0 or _has_own_state(experts):
        return None
    layers = [_swiglu(e) for e in experts]
    if any(layer is None for layer in layers) or not _same(
            layers, lambda l: (l[0].weight.shape, l[0].bias is None, l[0].weight.dtype, l[0].weight.device)):
        return None
    E, D = len(layers), layers[0][0].in_features
    if not 1 <= k <= E or getattr(args, "num_experts", E) != E or not _is_linear(kids["gate"], D, E):
        return None
    return kids["gate"], layers, k


def _build_mistral(m: nn.Module) -> SparseMoE:
    gate, layers, k = _mistral_parts(m)
    w1, _, w2 = layers[0]
    bias = w1.bias is not None
    new = SparseMoE(w1.in_features, w1.out_features, len(layers), k, activation="silu", gated=True, bias=bias,
                    router=gate, aux_loss_type=None, device="meta", dtype=w1.weight.dtype, **_top_k_renormalised(k))

    def stacked(attr, *names):  # [E, ...]: per expert, the named layers' tensors concatenated (gate rows first)
        parts = [[getattr(layer[_SWIGLU.index(n)], attr) for n in names] for layer in layers]
        data = torch.stack([torch.cat([t.detach() for t in p]) for p in parts])
        sizes = [t.shape[0] for t in parts[0]]
        rows = [(sum(sizes[:i]), sum(sizes[:i + 1])) if len(sizes) > 1 else None for i in range(len(sizes))]
        return _record(nn.Parameter(data, requires_grad=parts[0][0].requires_grad),
                       [list(zip(p, rows)) for p in parts])

    new.experts = Experts.from_weights(stacked("weight", "w1", "w3"), stacked("weight", "w2"),
                                       stacked("bias", "w1", "w3") if bias else None,
                                       stacked("bias", "w2") if bias else None, activation="silu", gated=True)
    return new


def _topk_softmax_parts(m: nn.Module) -> Optional[tuple]:
    """A V-MoE-style top-k layer: `router` nn.Linear(D, E), `experts` E MLPs (Linear(D, H) -> act -> Linear(H, O)),
    an int `top_k` and a bool `norm_topk_prob` (whether the k softmax probabilities are renormalised; without it
    that is unknown and the layer is left alone), no `k` and no aux_loss, nothing else; -> (router, layers, k,
    renormalise) or None."""
    kids = _children(m)
    k, norm = _int_attr(m, "top_k"), getattr(m, "norm_topk_prob", None)
    if (set(kids) != {"router", "experts"} or _has_own_state(m) or k is None or not isinstance(norm, bool)
            or not _no_attrs(m, "k", "num_experts_per_tok", "aux_loss")):
        return None
    layers = _mlp_experts(kids["experts"])
    if layers is None or not 1 <= k <= len(layers) or not _is_linear(kids["router"], _dims(layers)[0], len(layers)):
        return None
    return kids["router"], layers, k, norm


def _build_topk_softmax(m: nn.Module) -> SparseMoE:
    router, layers, k, norm = _topk_softmax_parts(m)
    options = _top_k_renormalised(k) if norm else dict(renormalize=False)
    return _with_mlp_experts(SparseMoE, layers, k, router=router, aux_loss_type=None, **options)


register_converter("dense softmax MoE (MoE guide MoELayer)", lambda m: _dense_softmax_parts(m) is not None,
                   _build_dense_softmax)
register_converter("top-k MLP-router MoE (MoE guide AdvancedMoELayer)", lambda m: _topk_mlp_router_parts(m) is not None,
                   _build_topk_mlp_router)
register_converter("switch top-1 MoE (notebook SwitchMoE)", lambda m: _switch_parts(m) is not None, _build_switch)
register_converter("LSTM-gated MoE (notebook LSTMMoE)", lambda m: _lstm_parts(m) is not None, _build_lstm)
register_converter("hybrid-router MoE", lambda m: _hybrid_parts(m) is not None, _build_hybrid)
register_converter("GShard top-2 MoE with capacity (DeepSpeed-MoE)", lambda m: _gshard_parts(m) is not None,
                   _build_gshard)
register_converter("Mixtral sparse block by hand (mistral-src MoeLayer)", lambda m: _mistral_parts(m) is not None,
                   _build_mistral)
register_converter("top-k softmax-router MoE (V-MoE, norm_topk_prob)", lambda m: _topk_softmax_parts(m) is not None,
                   _build_topk_softmax)
