"""transformers MoE blocks that run their experts without transformers' experts interface, on moe_kernels' fused ops.

transformers 5.x runs most MoE models' experts through `@use_experts_implementation` (see
`moe_kernels.integrations.transformers`); these blocks do not, so `experts_implementation="moe_kernels"` leaves them
alone. Recognised by structure (child names, parameter shapes, attributes; never class names):

- DBRX's FFN: `router` (`layer` nn.Linear(D, E), `moe_jitter_eps`) and `experts.mlp` holding w1, v1, w2 [E*H, D]:
  softmax over the E logits in their dtype, top-k, the k weights divided by their p-norm
  (p = moe_normalize_expert_weights, none when None), experts down(act(x w1_e^T) * x v1_e^T) with down = w2_e.
  -> `FusedDbrxFFN`.
- JetMoE's MoE: `router` (top-k gating: softmax over the k largest logits), `input_linear` [E, 2H, D] (gate rows
  first), `output_linear` [E, D, H], `activation`, an output `bias` [D]. -> `FusedJetMoeMoE`.
- JetMoE's MoA (mixture of attention heads): the same router, `input_linear` [E, Hq, D] and `output_linear`
  [E, D, Hq], `map` (per-slot query projections) and `reduce` (per-slot output projections, weighted sum, bias),
  called by the attention around it. -> `FusedJetMoeMoA` (the grouped GEMM ops; no MLP inside).
- Llama 4's text MoE: `router` (an nn.Linear(D, E) with `top_k`: sigmoid of the top-k logits), `experts` holding
  gate_up_proj [E, D, 2H] and down_proj [E, H, D], `shared_expert`: each chosen expert runs on the input *scaled by
  its score* (expert_e(s x), not s expert_e(x)), plus the shared expert. -> `FusedLlama4TextMoe`.
- SwitchTransformers' sparse MLP: `router` (`classifier` nn.Linear(D, E), `expert_capacity`, `jitter_noise`, a
  router `dtype`: argmax of the softmax, each expert keeping the first `expert_capacity` tokens of each sequence,
  the chosen probability as the weight) and `experts` expert_0..expert_{E-1}, each wi -> act -> dropout -> wo.
  -> `FusedSwitchSparseMLP`.

Each fused module keeps the block's router module and calls it as the block does, so whatever the router does
(jitter, capacity, dtype casts) and the output hooks transformers installs on router classes (`output_router_logits`)
stay as they are; the experts are stacked into `moe_kernels.nn.Experts` (gate_up_proj [E, 2H|H, D], down_proj
[E, D, H]) and run by `ops.moe_mlp`. Each returns what the block returns, and saves and loads the block's state dict
(moe_kernels.nn.source_layout).

Left as they are, with a warning:
- NLLB-MoE's sparse MLP (`router` with `second_expert_policy`, `experts` expert_0..: fc1 -> act -> dropout -> fc2 and
  a `token_dropout`): transformers 5.x's experts module dispatches `one_hot(top_1_mask)`, a one-hot of the router's
  already one-hot [T, E] mask, so expert_1 runs each token's kept first choice and expert_0 its kept second choice,
  whichever experts the router chose (experts 2..E-1 never run). A top-2 module would run the router's choices and
  change the outputs; a module reproducing that dispatch would stay wrong for a transformers whose dispatch follows
  the router, which structure cannot tell apart.

`convert_blocks(model)` (called by `convert_transformers`) replaces the blocks of a model; `moe_kernels.convert()`
finds them through the recognisers registered here (`transformers.py` imports this module).
"""
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import dtensor
from ..nn.experts import Experts, LinearExperts, mlp_with_dropout
from ..nn.source_layout import Piece, keep_source_layout
from .transformers import experts_activation, is_experts_module


# --- layout helpers -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AcrossExperts(Piece):
    """A source tensor that holds every expert's part at once ([E, ...]): rows `span` of each expert's slice of the
    stacked target (all of them when None), each expert's slice transposed when `swap`. Built with transpose=True,
    which tells keep_source_layout that it is a part of the target (a view), not the whole tensor."""
    span: Optional[tuple] = None
    swap: bool = False

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.span is not None:
            t = t[:, self.span[0]:self.span[1]]
        return t.transpose(1, 2) if self.swap else t


def _flat_rows(names: list, num_experts: int) -> Callable:
    """Load pre-hook for checkpoints that hold per-expert blocks of rows flat ([E*H, D], DBRX): views them as
    [E, H, D] for the pieces. Register before keep_source_layout, whose hook then reads them."""
    def hook(module, state_dict, prefix, *_):
        for n in names:
            t = state_dict.get(prefix + n)
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] % num_experts == 0:
                state_dict[prefix + n] = t.reshape(num_experts, t.shape[0] // num_experts, t.shape[1])
    return hook


def _flatten_rows(names: list) -> Callable:
    """state_dict post-hook, the reverse of _flat_rows: [E, H, D] pieces saved as [E*H, D]. Register after
    keep_source_layout, whose hook writes them."""
    def hook(module, state_dict, prefix, local_metadata):
        for n in names:
            t = state_dict.get(prefix + n)
            if isinstance(t, torch.Tensor) and t.dim() == 3:
                state_dict[prefix + n] = t.reshape(-1, t.shape[-1])
    return hook


def _param(data: torch.Tensor, *like: torch.Tensor) -> nn.Parameter:
    """A Parameter of `data`, trained when any of the tensors it was made from is."""
    return nn.Parameter(data, requires_grad=any(t.requires_grad for t in like))


def _own_state(module: nn.Module) -> dict:
    return dict(list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)))


def _kids(module: nn.Module) -> dict:
    return {n: m for n, m in module._modules.items() if m is not None}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _activation(act) -> tuple:
    """(our activation name, None) or (None, why)."""
    try:
        return experts_activation(act), None
    except ValueError as exc:
        return None, str(exc)


# --- the fused modules ----------------------------------------------------------------------------------------
class _FusedBlock(nn.Module):
    """What the fused blocks share: the block's router module, moved over as it is, and the experts stacked into
    `experts` (moe_kernels.nn.Experts), run by ops.moe_mlp."""

    def __init__(self, router: nn.Module, experts: Experts):
        super().__init__()
        self.router, self.experts = router, experts
        self.num_experts = experts.num_experts

    @property
    def gate_up_proj(self):
        return self.experts.gate_up_proj

    @property
    def down_proj(self):
        return self.experts.down_proj

    def _run_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, k] (outside [0, E): nothing), weights [T, k] -> [T, D] in x's dtype. DTensor expert
        weights through moe_kernels.nn.dtensor."""
        e = self.experts
        if e.has_dtensor_weights():
            out = dtensor.moe_mlp(f"{type(self).__name__}.experts", x.to(e.gate_up_proj.dtype), ids, weights,
                                  e.named_weights(), activation=e.activation, gated=e.gated)
            return out.to(x.dtype)
        out = ops.moe_mlp(x.to(e.gate_up_proj.dtype), ids, weights, e.gate_up_proj, e.down_proj, **e.kwargs())
        return out.to(x.dtype)


class FusedDbrxFFN(_FusedBlock):
    """DBRX's FFN: hidden_states [B, S, D] -> [B, S, D] (as DBRX, [shape[0], -1, D]).

    The router (DBRX's, called as DBRX calls it: in training with moe_jitter_eps it scales its input in place, which
    the experts then see) gives logits [T, E]; softmax in the logits' dtype, top-k, the k weights divided by their
    `normalize_p`-norm (none when None; p = 1 renormalises); the experts are DBRX's GLU experts stacked:
    gate_up_proj[e] = cat(w1_e, v1_e), down_proj[e] = w2_e^T. DBRX records the router logits from its router."""

    def __init__(self, router, experts, top_k, normalize_p):
        super().__init__(router, experts)
        self.top_k, self.normalize_p = top_k, normalize_p

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.router(hidden_states)
        probs = F.softmax(logits, dim=1, dtype=logits.dtype)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_p is not None:
            weights = weights / torch.norm(weights, p=self.normalize_p, dim=-1, keepdim=True)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self._run_experts(x, ids, weights).view(hidden_states.shape[0], -1, x.shape[-1])

    def extra_repr(self):
        return f"top_k={self.top_k}, normalize_p={self.normalize_p}"


def _jetmoe_routing(router: nn.Module, x: torch.Tensor, num_experts: int):
    """Calls JetMoE's top-k gating on x [T, D] (its outputs, router logits included, are what it returns) and lays
    its choice out per token: (experts [T, k], gates [T, k] with the gates' gradient, logits)."""
    order, _, gates, sizes, logits = router(x)
    T, k = x.shape[0], router.top_k
    ids = torch.repeat_interleave(torch.arange(num_experts, device=x.device),
                                  torch.as_tensor(sizes, device=x.device), output_size=order.shape[0])
    experts = torch.empty_like(order).scatter_(0, order, ids).view(T, k)
    weights = gates.new_zeros(order.shape[0]).scatter(0, order, gates).view(T, k)
    return experts, weights, logits


class FusedJetMoeMoE(_FusedBlock):
    """JetMoE's MoE: layer_input [B, S, D] -> [B, S, D]. JetMoE's router (called as JetMoE calls it) chooses k experts
    per token and their gates (softmax over the k largest logits); the experts are JetMoE's input_linear [E, 2H, D]
    (gate rows first) and output_linear [E, D, H] as they are; `bias` [D] is added to the output."""

    def __init__(self, router, experts, bias):
        super().__init__(router, experts)
        self.bias = bias

    def forward(self, layer_input: torch.Tensor) -> torch.Tensor:
        bsz, length, dim = layer_input.size()
        x = layer_input.reshape(-1, dim)
        ids, weights, _ = _jetmoe_routing(self.router, x, self.num_experts)
        return self._run_experts(x, ids, weights).view(bsz, length, dim) + self.bias


class FusedJetMoeMoA(nn.Module):
    """JetMoE's mixture of attention heads, in its calling convention: `map(layer_input [B, S, D])` -> (queries
    [B, S, k, Hq] of each token's k experts, router logits, topology), `reduce(attn [B, S, k, Hq], topology)` ->
    [B, S, D] = sum_j gate_j * output_linear[e_j] attn_j + bias. Both projections run as grouped GEMMs over the
    (token, slot) pairs sorted by expert (ops.sort_by_expert / permute / grouped_mm / unpermute)."""

    def __init__(self, router, input_linear: LinearExperts, output_linear: LinearExperts, bias, top_k):
        super().__init__()
        self.router, self.input_linear, self.output_linear, self.bias = router, input_linear, output_linear, bias
        self.num_experts, self.top_k = input_linear.num_experts, top_k

    @staticmethod
    def _per_pair(s: ops.Sorted) -> ops.Sorted:
        """The sort of pairs seen as tokens of one slot each: permute / unpermute then move single pairs."""
        return s._replace(inverse=s.inverse.reshape(-1, 1))

    def map(self, layer_input: torch.Tensor):
        bsz, length, dim = layer_input.size()
        x = layer_input.reshape(-1, dim)
        ids, gates, logits = _jetmoe_routing(self.router, x, self.num_experts)
        s = ops.sort_by_expert(ids, self.num_experts)
        q = ops.grouped_mm(ops.permute(x, s), self.input_linear.weight, s.offsets)
        q = ops.unpermute(q, self._per_pair(s))                     # [T*k, Hq] in (token, slot) order
        return q.view(bsz, length, ids.shape[1], -1), logits, (s, gates)

    def reduce(self, layer_input: torch.Tensor, topo_info):
        bsz, length, k, hidden = layer_input.size()
        s, gates = topo_info
        rows = ops.permute(layer_input.reshape(-1, hidden), self._per_pair(s))
        out = ops.grouped_mm(rows, self.output_linear.weight, s.offsets)
        return ops.unpermute(out, s, gates).view(bsz, length, -1) + self.bias

    def forward(self, layer_input):
        raise NotImplementedError("JetMoE's mixture of attention runs through map() and reduce(), called by the "
                                  "attention around it")

    def extra_repr(self):
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


class FusedLlama4TextMoe(_FusedBlock):
    """Llama 4's text MoE: hidden_states [..., D] -> (out [T, D], router_logits [T, E]), as Llama 4 returns them.

    Llama 4's router (called as Llama 4 calls it) gives the scores sigmoid(top-k logits) (0 elsewhere); each of a
    token's k experts runs on the token scaled by its score, expert_e(s x) (the scale is inside the nonlinear
    expert), with weight 1; the shared expert (moved over as it is) sees every token. The experts are Llama 4's
    gate_up_proj [E, D, 2H] and down_proj [E, H, D] transposed into the fused layout."""

    def __init__(self, router, experts, shared_expert):
        super().__init__(router, experts)
        self.shared_expert = shared_expert
        self.top_k = router.top_k

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.experts.dim)
        scores, logits = self.router(x)
        ids = torch.topk(logits, self.top_k, dim=1).indices          # the router's own choice (same op, same input)
        scale = scores.gather(1, ids)
        T, k = ids.shape
        pairs = (x.unsqueeze(1) * scale.unsqueeze(-1)).reshape(T * k, -1)
        routed = self._run_experts(pairs, ids.reshape(T * k, 1), pairs.new_ones(T * k, 1))
        out = self.shared_expert(x)
        out.add_(routed.view(T, k, -1).sum(dim=1) if k > 1 else routed)
        return out, logits

    def extra_repr(self):
        return f"top_k={self.top_k}"


class FusedSwitchSparseMLP(_FusedBlock):
    """SwitchTransformers' sparse MLP: hidden_states [B, S, D] -> [B, S, D].

    The router (called as SwitchTransformers calls it, on [B, S, D]: jitter in training, its own dtype) gives each
    token its argmax expert, dropped (no expert, output 0) beyond `expert_capacity` tokens per expert in each
    sequence, and the chosen probability as the weight. The experts are wi -> act -> dropout -> wo stacked
    (gate_up_proj[e] = wi_e, down_proj[e] = wo_e). In training with dropout p > 0 the experts run as grouped GEMMs
    with dropout between them (the same distribution as SwitchTransformers' per-expert loop, other random draws)."""

    def __init__(self, router, experts, dropout):
        super().__init__(router, experts)
        self.dropout = float(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, length, dim = hidden_states.shape
        mask, probs, _ = self.router(hidden_states)
        x = hidden_states.reshape(-1, dim)
        mask = mask.reshape(-1, self.num_experts)
        ids = torch.where(mask.any(dim=-1), mask.argmax(dim=-1), -1).unsqueeze(1)
        weights = probs.reshape(-1, 1)
        if self.training and self.dropout > 0:
            out = self._experts_dropout(x, ids, weights)
        else:
            out = self._run_experts(x, ids, weights)
        return out.reshape(bsz, length, dim)

    def _experts_dropout(self, x, ids, weights):
        e = self.experts
        fn = functools.partial(mlp_with_dropout, activation=e.activation, gated=e.gated, p=self.dropout)
        xe = x.to(e.gate_up_proj.dtype)
        if e.has_dtensor_weights():
            return dtensor.run_experts(f"{type(self).__name__}.experts", fn, xe, ids, weights,
                                       e.named_weights()).to(x.dtype)
        return fn(xe, ids, weights, *e.named_weights().values()).to(x.dtype)

    def extra_repr(self):
        return f"expert_capacity={getattr(self.router, 'expert_capacity', None)}, dropout={self.dropout}"


# --- recognisers: (parts, None) to convert, (None, why) for a look-alike left as it is, (None, None) otherwise ---
def _linear(m, d_in, d_out) -> bool:
    return isinstance(m, nn.Linear) and m.in_features == d_in and m.out_features == d_out


def _dbrx_parts(m: nn.Module):
    """DBRX's FFN: children router (only `layer`, an nn.Linear(D, E), and a `moe_jitter_eps`) and experts (only `mlp`,
    holding w1, v1, w2 [E*H, D] and activation_fn), an int top_k and a moe_normalize_expert_weights."""
    kids = _kids(m)
    if set(kids) != {"router", "experts"} or _own_state(m):
        return None, None
    router, experts = kids["router"], kids["experts"]
    if set(_kids(router)) != {"layer"} or not hasattr(router, "moe_jitter_eps") or set(_kids(experts)) != {"mlp"}:
        return None, None
    glu = experts.mlp
    own = _own_state(glu)
    if set(own) != {"w1", "v1", "w2"} or not hasattr(m, "moe_normalize_expert_weights"):
        return None, None
    layer = router.layer
    if not isinstance(layer, nn.Linear) or _own_state(router) or _own_state(experts):
        return None, "its router is not a bare nn.Linear(D, E) in `layer`"
    E, D = layer.out_features, layer.in_features
    shapes = {n: tuple(t.shape) for n, t in own.items()}
    if len(set(shapes.values())) != 1 or len(shapes["w1"]) != 2 or shapes["w1"][1] != D or shapes["w1"][0] % E:
        return None, f"its expert weights w1, v1, w2 must all be [E*H, D] with E = {E}, D = {D}, got {shapes}"
    if len({t.dtype for t in own.values()} | {t.device for t in own.values()}) != 2:
        return None, "its expert weights w1, v1, w2 differ in dtype or device"
    if set(_kids(glu)) - {"activation_fn"}:
        return None, f"its experts have submodules {sorted(set(_kids(glu)) - {'activation_fn'})}"
    act, why = _activation(getattr(glu, "activation_fn", None))
    if act is None:
        return None, why
    k, p = getattr(m, "top_k", None), m.moe_normalize_expert_weights
    if not _int(k) or not 1 <= k <= E:
        return None, f"its top_k must be an int in [1, {E}], got {k!r}"
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))):
        return None, f"its moe_normalize_expert_weights must be None or a number, got {p!r}"
    return dict(E=E, D=D, H=shapes["w1"][0] // E, act=act, top_k=k, p=p), None


def _build_dbrx(m: nn.Module) -> FusedDbrxFFN:
    spec, why = _dbrx_parts(m)
    if spec is None:
        raise ValueError(f"{type(m).__name__} is not a DBRX FFN moe_kernels can run: {why or 'not its structure'}")
    E, D, H = spec["E"], spec["D"], spec["H"]
    glu = m.experts.mlp
    w1, v1, w2 = (t.detach().reshape(E, H, D) for t in (glu.w1, glu.v1, glu.w2))
    experts = Experts.from_weights(_param(torch.cat([w1, v1], 1), glu.w1, glu.v1),
                                   _param(w2.transpose(1, 2).contiguous(), glu.w2), activation=spec["act"], gated=True)
    new = FusedDbrxFFN(m.router, experts, spec["top_k"], spec["p"])
    names = ["experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"]
    new.register_load_state_dict_pre_hook(_flat_rows(names, E))
    keep_source_layout(new, [_AcrossExperts(names[0], "experts.gate_up_proj", transpose=True, span=(0, H)),
                             _AcrossExperts(names[1], "experts.gate_up_proj", transpose=True, span=(H, 2 * H)),
                             _AcrossExperts(names[2], "experts.down_proj", transpose=True, swap=True)])
    new.register_state_dict_post_hook(_flatten_rows(names))
    return new.train(m.training)


def _jetmoe_router(router: nn.Module, D: int, E: int):
    """None when `router` is JetMoE's top-k gating over E experts (only `layer` nn.Linear(D, E), an int top_k),
    else why."""
    if set(_kids(router)) != {"layer"} or _own_state(router) or not _linear(router.layer, D, E):
        return f"its router must hold only `layer`, an nn.Linear({D}, {E})"
    k = getattr(router, "top_k", None)
    if not _int(k) or not 1 <= k <= E:
        return f"its router's top_k must be an int in [1, {E}], got {k!r}"
    if getattr(router, "num_experts", E) != E:
        return f"its router's num_experts is {router.num_experts}, its experts {E}"
    return None


def _jetmoe_common(m: nn.Module):
    """(E, D, in [E, M, D], out [E, D, N]) of a JetMoE MoE or MoA: children router, input_linear, output_linear (each
    holding only `weight`), own parameter `bias` [D]; None when not that structure."""
    kids = _kids(m)
    if not {"router", "input_linear", "output_linear"} <= set(kids) or set(_own_state(m)) != {"bias"}:
        return None
    lin_in, lin_out = kids["input_linear"], kids["output_linear"]
    if any(_kids(lin) or set(_own_state(lin)) != {"weight"} for lin in (lin_in, lin_out)):
        return None
    w_in, w_out = lin_in.weight, lin_out.weight
    if w_in.dim() != 3 or w_out.dim() != 3 or m.bias.dim() != 1:
        return None
    E, D = w_in.shape[0], w_in.shape[2]
    if w_out.shape[:2] != (E, D) or m.bias.shape != (D,):
        return None
    return E, D, w_in, w_out


def _jetmoe_moe_parts(m: nn.Module):
    """JetMoE's MoE: router, input_linear [E, 2H, D], output_linear [E, D, H], `activation`, bias [D]."""
    common = _jetmoe_common(m)
    if common is None or set(_kids(m)) - {"router", "input_linear", "output_linear", "activation"} \
            or not hasattr(m, "activation") or hasattr(m, "map"):
        return None, None
    E, D, w_in, w_out = common
    H = w_out.shape[2]
    if w_in.shape[1] != 2 * H:
        return None, f"its input_linear must be [E, 2H, D] = {(E, 2 * H, D)} for output_linear {tuple(w_out.shape)}"
    why = _jetmoe_router(m.router, D, E)
    if why is not None:
        return None, why
    if w_in.dtype != w_out.dtype or w_in.device != w_out.device:
        return None, "its input_linear and output_linear differ in dtype or device"
    act, why = _activation(m.activation)
    return (dict(act=act), None) if act is not None else (None, why)


def _build_jetmoe_moe(m: nn.Module) -> FusedJetMoeMoE:
    spec, why = _jetmoe_moe_parts(m)
    if spec is None:
        raise ValueError(f"{type(m).__name__} is not a JetMoE MoE moe_kernels can run: {why or 'not its structure'}")
    experts = Experts.from_weights(m.input_linear.weight, m.output_linear.weight, activation=spec["act"], gated=True)
    new = FusedJetMoeMoE(m.router, experts, m.bias)
    keep_source_layout(new, [Piece("input_linear.weight", "experts.gate_up_proj"),
                             Piece("output_linear.weight", "experts.down_proj")])
    return new.train(m.training)


def _jetmoe_moa_parts(m: nn.Module):
    """JetMoE's MoA: router, input_linear [E, Hq, D], output_linear [E, D, Hq], bias [D], an int top_k and the
    map / reduce methods its attention calls."""
    common = _jetmoe_common(m)
    if common is None or set(_kids(m)) != {"router", "input_linear", "output_linear"} \
            or not (callable(getattr(m, "map", None)) and callable(getattr(m, "reduce", None))):
        return None, None
    E, D, w_in, w_out = common
    if w_in.shape[1] != w_out.shape[2]:
        return None, f"its input_linear {tuple(w_in.shape)} and output_linear {tuple(w_out.shape)} differ in width"
    why = _jetmoe_router(m.router, D, E)
    if why is not None:
        return None, why
    if getattr(m, "top_k", m.router.top_k) != m.router.top_k:
        return None, f"its top_k {m.top_k} differs from its router's {m.router.top_k}"
    if w_in.dtype != w_out.dtype or w_in.device != w_out.device:
        return None, "its input_linear and output_linear differ in dtype or device"
    return dict(top_k=m.router.top_k), None


def _build_jetmoe_moa(m: nn.Module) -> FusedJetMoeMoA:
    spec, why = _jetmoe_moa_parts(m)
    if spec is None:
        raise ValueError(f"{type(m).__name__} is not a JetMoE MoA moe_kernels can run: {why or 'not its structure'}")
    new = FusedJetMoeMoA(m.router, LinearExperts.from_weights(m.input_linear.weight),
                         LinearExperts.from_weights(m.output_linear.weight), m.bias, spec["top_k"])
    keep_source_layout(new, [])     # the block's names, as they are
    return new.train(m.training)


def _llama4_parts(m: nn.Module):
    """Llama 4's text MoE: children experts (gate_up_proj [E, D, 2H], down_proj [E, H, D], act_fn), router (an
    nn.Linear(D, E) without bias, with an int top_k) and shared_expert."""
    kids = _kids(m)
    if set(kids) != {"experts", "router", "shared_expert"} or _own_state(m):
        return None, None
    experts, router = kids["experts"], kids["router"]
    own = _own_state(experts)
    if set(own) != {"gate_up_proj", "down_proj"} or not isinstance(router, nn.Linear) or is_experts_module(experts):
        return None, None
    up, down = own["gate_up_proj"], own["down_proj"]
    E, D = router.out_features, router.in_features
    if up.dim() != 3 or down.dim() != 3 or up.shape[:2] != (E, D) or up.shape[2] % 2 \
            or tuple(down.shape) != (E, up.shape[2] // 2, D):
        return None, (f"its experts must hold gate_up_proj [E, D, 2H] and down_proj [E, H, D] with E = {E}, D = {D} "
                      f"of its router, got {tuple(up.shape)} and {tuple(down.shape)}")
    if router.bias is not None or _kids(router):
        return None, "its router must be an nn.Linear without bias"
    if up.dtype != down.dtype or up.device != down.device:
        return None, "its gate_up_proj and down_proj differ in dtype or device"
    k = getattr(router, "top_k", None)
    if not _int(k) or not 1 <= k <= E:
        return None, f"its router's top_k must be an int in [1, {E}], got {k!r}"
    if set(_kids(experts)) - {"act_fn"}:
        return None, f"its experts have submodules {sorted(set(_kids(experts)) - {'act_fn'})}"
    act, why = _activation(getattr(experts, "act_fn", None))
    return (dict(act=act), None) if act is not None else (None, why)


def _build_llama4(m: nn.Module) -> FusedLlama4TextMoe:
    spec, why = _llama4_parts(m)
    if spec is None:
        raise ValueError(f"{type(m).__name__} is not a Llama 4 text MoE moe_kernels can run: "
                         f"{why or 'not its structure'}")
    up, down = m.experts.gate_up_proj, m.experts.down_proj
    experts = Experts.from_weights(_param(up.detach().transpose(1, 2).contiguous(), up),
                                   _param(down.detach().transpose(1, 2).contiguous(), down),
                                   activation=spec["act"], gated=True)
    new = FusedLlama4TextMoe(m.router, experts, m.shared_expert)
    # the fused tensors keep the original's names (in the fused layout): a checkpoint holding them is read as the
    # original's, which is what every checkpoint of this module is (it is never resized)
    keep_source_layout(new, [_AcrossExperts(n, n, transpose=True, swap=True)
                             for n in ("experts.gate_up_proj", "experts.down_proj")])
    return new.train(m.training)


def _numbered_experts(experts: nn.Module, extra: set) -> Optional[list]:
    """expert_0..expert_{E-1} of an nn.ModuleDict holding those (and the names in `extra`), else None."""
    if not isinstance(experts, nn.ModuleDict) or _own_state(experts):
        return None
    names = [n for n in _kids(experts) if n not in extra]
    if not names or set(names) != {f"expert_{i}" for i in range(len(names))}:
        return None
    return [experts[f"expert_{i}"] for i in range(len(names))]


def _dense_act_dense(experts: list, first: str, second: str, D: int):
    """(activation, hidden width, bias, dropout p) of experts that are each first -> act -> dropout -> second
    (nn.Linear(D, F), nn.Linear(F, D)), all alike; or a string saying why not."""
    names = {first, second, "act", "dropout"}
    lin0 = getattr(experts[0], first, None)
    if not isinstance(lin0, nn.Linear):
        return f"expert_0 has no nn.Linear {first}"
    F_, bias = lin0.out_features, lin0.bias is not None
    act_name, p = None, None
    for i, ex in enumerate(experts):
        if set(_kids(ex)) != names or _own_state(ex):
            return f"expert_{i} must hold exactly {sorted(names)}, got {sorted(_kids(ex))}"
        a, b = getattr(ex, first), getattr(ex, second)
        if not (_linear(a, D, F_) and _linear(b, F_, D)) or {a.bias is None, b.bias is None} != {not bias}:
            return f"expert_{i}: {first} / {second} must be nn.Linear({D}, {F_}) / nn.Linear({F_}, {D}) like expert_0's"
        if (a.weight.dtype, a.weight.device, b.weight.dtype) != (lin0.weight.dtype, lin0.weight.device,
                                                                 lin0.weight.dtype):
            return f"expert_{i}: its weights differ in dtype or device from expert_0's"
        name, why = _activation(ex.act)
        if name is None:
            return f"expert_{i}: {why}"
        if not isinstance(ex.dropout, nn.Dropout) or (p is not None and ex.dropout.p != p) \
                or (act_name is not None and name != act_name):
            return f"expert_{i}: its dropout or activation differs from expert_0's"
        act_name, p = name, ex.dropout.p
    return act_name, F_, bias, p


def _switch_parts(m: nn.Module):
    """SwitchTransformers' sparse MLP: router (only `classifier` nn.Linear(D, E); an int expert_capacity, a
    jitter_noise, a torch.dtype `dtype`; no second_expert_policy) and experts expert_0..expert_{E-1}
    (wi -> act -> dropout -> wo)."""
    kids = _kids(m)
    if set(kids) != {"router", "experts"} or _own_state(m):
        return None, None
    router = kids["router"]
    if set(_kids(router)) != {"classifier"} or not hasattr(router, "expert_capacity") \
            or not hasattr(router, "jitter_noise") or hasattr(router, "second_expert_policy"):
        return None, None
    experts = _numbered_experts(kids["experts"], set())
    if experts is None:
        return None, None
    E, cls = len(experts), router.classifier
    if not isinstance(cls, nn.Linear) or cls.out_features != E or _own_state(router):
        return None, f"its router must hold only `classifier`, an nn.Linear(D, {E})"
    if not _int(router.expert_capacity) or router.expert_capacity < 0:
        return None, f"its router's expert_capacity must be an int >= 0, got {router.expert_capacity!r}"
    if not isinstance(getattr(router, "dtype", None), torch.dtype):
        return None, "its router has no torch.dtype `dtype` to route in"
    parts = _dense_act_dense(experts, "wi", "wo", cls.in_features)
    if isinstance(parts, str):
        return None, parts
    act, F_, bias, p = parts
    return dict(act=act, bias=bias, p=p, E=E), None


def _build_switch(m: nn.Module) -> FusedSwitchSparseMLP:
    spec, why = _switch_parts(m)
    if spec is None:
        raise ValueError(f"{type(m).__name__} is not a SwitchTransformers sparse MLP moe_kernels can run: "
                         f"{why or 'not its structure'}")
    ex = [m.experts[f"expert_{e}"] for e in range(spec["E"])]

    def stacked(layer, attr):
        ts = [getattr(getattr(x, layer), attr) for x in ex]
        return _param(torch.stack([t.detach() for t in ts]), *ts)

    bias = spec["bias"]
    experts = Experts.from_weights(stacked("wi", "weight"), stacked("wo", "weight"),
                                   stacked("wi", "bias") if bias else None, stacked("wo", "bias") if bias else None,
                                   activation=spec["act"], gated=False)
    new = FusedSwitchSparseMLP(m.router, experts, spec["p"])
    pieces = []
    for e in range(spec["E"]):
        for attr, up, down in (("weight", "gate_up_proj", "down_proj"),) + ((("bias", "gate_up_bias", "down_bias"),)
                                                                            if bias else ()):
            pieces += [Piece(f"experts.expert_{e}.wi.{attr}", f"experts.{up}", e),
                       Piece(f"experts.expert_{e}.wo.{attr}", f"experts.{down}", e)]
    keep_source_layout(new, pieces)
    return new.train(m.training)


NLLB_WHY = ("transformers 5.x runs its experts with one_hot(top_1_mask), a one-hot of the router's already one-hot "
            "[T, E] mask, so expert_1 runs each token's kept first choice and expert_0 its kept second choice, "
            "whichever experts the router chose (experts 2..E-1 never run); a fused top-2 module would run the "
            "router's choices and change the outputs")


def _nllb_parts(m: nn.Module):
    """NLLB-MoE's sparse MLP: router (`classifier`, a second_expert_policy) and experts expert_0..expert_{E-1}
    (fc1 -> act -> dropout -> fc2) with a token_dropout. Never converted (see NLLB_WHY)."""
    kids = _kids(m)
    if set(kids) != {"router", "experts"} or _own_state(m):
        return None, None
    router = kids["router"]
    if set(_kids(router)) != {"classifier"} or not hasattr(router, "second_expert_policy"):
        return None, None
    if _numbered_experts(kids["experts"], {"token_dropout"}) is None:
        return None, None
    return None, NLLB_WHY


# family, recogniser, build
FAMILIES = (
    ("DBRX FFN", _dbrx_parts, _build_dbrx),
    ("JetMoE MoE", _jetmoe_moe_parts, _build_jetmoe_moe),
    ("JetMoE MoA (attention experts)", _jetmoe_moa_parts, _build_jetmoe_moa),
    ("Llama 4 text MoE", _llama4_parts, _build_llama4),
    ("SwitchTransformers sparse MLP", _switch_parts, _build_switch),
    ("NLLB-MoE sparse MLP", _nllb_parts, None),
)


def inspect_block(module: nn.Module) -> tuple:
    """(build, None) for a block this module converts (`build(module)` returns its fused replacement), (None, why)
    for one of these families left as it is, (None, None) for anything else."""
    for family, parts, build in FAMILIES:
        spec, why = parts(module)
        if spec is not None:
            return build, None
        if why is not None:
            return None, f"{family}: {why}"
    return None, None


def convert_moe_block(block: nn.Module) -> nn.Module:
    """The fused replacement of one block (see the module docstring); ValueError saying why for anything else."""
    build, why = inspect_block(block)
    if build is None:
        raise ValueError(f"{type(block).__name__} is not a transformers MoE block of moe_kernels.integrations."
                         f"transformers_blocks: {why or 'not a DBRX, JetMoE, Llama 4 or SwitchTransformers MoE block'}")
    return build(block)


def convert_blocks(model: nn.Module, *, stacklevel: int = 2) -> int:
    """Replaces the blocks of `model` this module converts with their fused modules, in place (a block reachable
    under two names once); returns how many. A block of these families left as it is gets a warning saying why."""
    build, why = inspect_block(model)
    if build is not None:
        raise ValueError(f"model is itself a MoE block ({type(model).__name__}): convert_moe_block(model) returns its "
                         "replacement")
    if why is not None:
        warnings.warn(f"convert_transformers: the model ({type(model).__name__}) stays as it is: {why}",
                      stacklevel=stacklevel)
    done: dict = {}     # id(block) -> (block, its replacement or None)
    count, queue = 0, [(model, "")]
    while queue:
        module, path = queue.pop(0)
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            where = f"{path}.{name}" if path else name
            if id(child) in done:
                if done[id(child)][1] is not None:
                    setattr(module, name, done[id(child)][1])
                continue
            build, why = inspect_block(child)
            new = build(child) if build is not None else None
            done[id(child)] = (child, new)
            if new is not None:
                setattr(module, name, new)
                count += 1
                continue
            if why is not None:
                warnings.warn(f"convert_transformers: {where} ({type(child).__name__}) stays as it is: {why}",
                              stacklevel=stacklevel)
            queue.append((child, where))
    return count


# --- moe_kernels.convert(): registered when transformers.py imports this module --------------------------------------
def _matcher(family: str, parts: Callable) -> Callable:
    def match(module: nn.Module) -> bool:
        spec, why = parts(module)
        if spec is None and why is not None:
            warnings.warn(f"moe_kernels.convert: {type(module).__name__} stays as it is: {family}: {why}",
                          stacklevel=2)
        return spec is not None
    return match


def _refused(module: nn.Module) -> nn.Module:
    raise ValueError(f"{type(module).__name__} is not converted: {NLLB_WHY}")


def _register_converters() -> None:
    from ..convert import register_converter

    for family, parts, build in FAMILIES:
        register_converter(f"transformers {family}", _matcher(family, parts), build or _refused)


_register_converters()
