"""SparseMoE: top-k routed experts (Switch, Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3 routing), with shared experts,
capacity, routing statistics and expert resizing."""
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import _backend, ops
from ..ops import distributed
from ..ops import _checks
from ..ops.routing import check_routing
from . import dtensor
from .dense import router_output
from .experts import Experts, reindexed
from .lora import unwrap_lora

AUX_LOSSES = ("switch", "entropy", None)


class ExpertStats(NamedTuple):
    """Routing statistics of one forward, as tensors (recorded without a host sync)."""
    # under expert parallelism: this rank's tokens (the capacity counts every rank's)
    routed: torch.Tensor                # [E] int: (token, slot) pairs routed to each expert, before capacity
    usage: torch.Tensor                 # [E] int: pairs each expert processed (routed, capped at the capacity)
    importance: torch.Tensor            # [E]: sum over tokens of each expert's routing probability
    capacity: Optional[torch.Tensor]    # 0-d int: pairs an expert could take; None without a capacity
    dropped: torch.Tensor               # 0-d int: pairs dropped by the capacity


class SparseMoE(nn.Module):
    """x: [..., D] -> [..., O] (O = out_dim, D by default). Each token goes to its top-k experts, weighted by
    the routing weights; shared experts, if any, see every token.

    Parameters: router.weight [E, D], experts.gate_up_proj [E, 2H, D], experts.down_proj [E, O, H] (transformers
    v5 layout; `self.gate_up_proj` / `self.down_proj` alias them).

    Routing. score: "softmax" | "sigmoid"; renormalize: the k weights sum to one; correction_bias: a DeepSeek-V3
    `e_score_correction_bias` buffer [E] that shifts only the choice; num_groups / topk_groups: group-limited
    choice; routed_scale: multiplies the weights; scale_by_gate=False: each chosen expert's output is added
    unscaled (weight 1, as Switch-style layers written by hand do), so the output gives the router no gradient.
    router: any module mapping x [..., D] (called in x's own shape, so an LSTM over [B, S, D] works) to logits
    [..., E], in place of nn.Linear(D, E, bias=router_bias).
    In training only: noisy_gating adds Shazeer et al.'s trainable Gaussian noise to the logits
    (std = softplus(x @ noise.weight^T)); router_jitter=eps multiplies the router's input by U(1-eps, 1+eps)
    (Switch Transformer).

    Capacity. capacity_factor: each expert keeps at most C = ceil(capacity_factor * T * k / E) (token, slot) pairs,
    first choices first, clamped to [min_capacity, max_capacity] when given; `dropped` counts the rest.

    Shared experts (DeepSeek / Qwen-MoE). num_shared_experts > 0 adds one MLP of width shared_hidden_dim (default
    num_shared_experts * hidden_dim) on every token; shared_gate=True scales it by sigmoid(x @ shared_gate.weight^T)
    (Qwen2-MoE's shared_expert_gate).

    Losses. After a training forward, `aux_loss` = aux_loss_coef * balance loss + z_loss_coef * router z-loss
    (None after an eval forward, or when neither is configured). aux_loss_type: "switch" (E * sum_e (count_e / T)
    * mean_t p_te), "entropy" (sum_e mean_p_e * log(mean_p_e + 1e-10), the MoE guide's AdvancedMoELayer) or None.

    checkpoint_experts=True recomputes the expert MLPs in the backward (torch.utils.checkpoint) in training.
    `expert_stats()` reports the last forward's routing; `add_experts`, `remove_experts` and `prune_experts`
    resize the layer keeping the other experts as they are.

    Expert parallelism. process_group (a torch.distributed group): this rank holds only its block of E / W experts
    (`moe_kernels.distributed`), token rows go to the experts' ranks by all-to-all, and the capacity counts the
    tokens of every rank; `shard_experts(group)` does the same to a built layer. Every rank calls forward.
    """

    def __init__(self, dim, hidden_dim, num_experts, top_k=2, *, out_dim=None, activation="silu", gated=True,
                 score="softmax", renormalize=True, scale_by_gate=True, capacity_factor=None, min_capacity=None,
                 max_capacity=None, bias=False, router=None, router_bias=False, correction_bias=False,
                 num_groups=None, topk_groups=None, routed_scale=1.0, noisy_gating=False, router_jitter=0.0,
                 num_shared_experts=0, shared_hidden_dim=None, shared_gate=False, aux_loss_type="switch",
                 aux_loss_coef=0.01, z_loss_coef=0.0, checkpoint_experts=False, process_group=None, device=None,
                 dtype=None):
        super().__init__()
        _check_capacity(capacity_factor, min_capacity, max_capacity)
        if not 0 <= router_jitter < 1:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter!r}")
        _checks.choice("aux_loss_type", aux_loss_type, AUX_LOSSES)
        if router is not None and router_bias:
            raise ValueError("router_bias applies to the default nn.Linear router; pass a router with the bias it "
                             f"needs instead (got router={type(router).__name__} and router_bias=True)")
        f = dict(device=device, dtype=dtype)
        # sharded: the experts are this rank's block, run by all-to-all over process_group (None there: the default
        # group, looked up at each call, so that the layer does not keep it alive past destroy_process_group)
        self.process_group, self.sharded = None, False
        local = num_experts
        if process_group is not None:
            local = len(distributed.local_block(num_experts, process_group))
            self.process_group, self.sharded = process_group, True
        self.experts = Experts(dim, hidden_dim, local, out_dim=out_dim, activation=activation, gated=gated,
                               bias=bias, **f)
        self.router = router if router is not None else nn.Linear(dim, num_experts, bias=router_bias, **f)
        self.noise = nn.Linear(dim, num_experts, bias=False, **f) if noisy_gating else None
        if noisy_gating:
            nn.init.zeros_(self.noise.weight)
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.shared_experts, self.shared_gate = _shared_experts(dim, hidden_dim, self.experts.out_dim,
                                                                num_shared_experts, shared_hidden_dim, shared_gate,
                                                                activation, gated, bias, f)
        self.dim, self.out_dim, self.num_experts, self.top_k = dim, self.experts.out_dim, num_experts, top_k
        self.score, self.renormalize, self.scale_by_gate = score, renormalize, scale_by_gate
        self.capacity_factor, self.min_capacity, self.max_capacity = capacity_factor, min_capacity, max_capacity
        self.num_groups, self.topk_groups, self.routed_scale = num_groups, topk_groups, routed_scale
        self.router_jitter, self.checkpoint_experts = router_jitter, checkpoint_experts
        self.aux_loss_type, self.aux_loss_coef, self.z_loss_coef = aux_loss_type, aux_loss_coef, z_loss_coef
        self.aux_loss = None
        self._stats: Optional[ExpertStats] = None
        self._usage_total: Optional[torch.Tensor] = None
        _checks.top_k(top_k, num_experts, name="top_k")
        check_routing(num_experts, top_k, score, num_groups, topk_groups)

    @property
    def gate_up_proj(self):
        return self.experts.projections()[0]

    @property
    def down_proj(self):
        return self.experts.projections()[1]

    def quantize(self, format: str, block=(128, 128)) -> "SparseMoE":
        """The routed experts' projections quantized in place for inference ("fp8" or "mxfp4", see
        Experts.quantize); the router and any shared experts stay as they are. Returns self."""
        if self.sharded:
            raise ValueError(f"{type(self).__name__}: quantize the experts before sharding them")
        self.experts.quantize(format, block)
        return self

    def shard_experts(self, process_group=None) -> "SparseMoE":
        """Keeps only this rank's block of E / W experts (in place) and runs them by all-to-all from now on (see
        moe_kernels.distributed); the router and shared experts stay whole. ValueError unless W divides E."""
        if self.sharded:
            raise RuntimeError("the experts are already sharded over a process group")
        block = distributed.local_block(self.num_experts, process_group)
        self.experts.reindex_(list(block))
        self.process_group, self.sharded = process_group, True
        return self

    # --- forward --------------------------------------------------------------------------------------------
    def capacity(self, num_tokens: int) -> Optional[int]:
        """(token, slot) pairs an expert keeps for a batch of num_tokens tokens; None: no limit."""
        if self.capacity_factor is None:
            return None
        c = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        if self.min_capacity is not None:
            c = max(c, self.min_capacity)
        return c if self.max_capacity is None else min(c, self.max_capacity)

    def route(self, x: torch.Tensor) -> ops.Routing:
        """x: [..., D] -> the Routing of its T tokens (weights and experts [T, k])."""
        if self.training and self.router_jitter:
            x = x * torch.empty_like(x).uniform_(1 - self.router_jitter, 1 + self.router_jitter)
        logits = router_output(self.router, x, self.num_experts)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x.reshape(-1, self.dim)))
        return ops.topk_route(logits, self.top_k, score=self.score, renormalize=self.renormalize,
                              bias=self.e_score_correction_bias, num_groups=self.num_groups,
                              topk_groups=self.topk_groups, scale=self.routed_scale)

    def _routed_experts(self, x, experts, weights, capacity):
        """The routed experts on x [T, D] -> [T, O]: this rank's experts and an all-to-all under expert
        parallelism (capacity already applied to `experts` there), else all of them here; DTensor expert weights
        through moe_kernels.nn.dtensor."""
        e, loras = unwrap_lora(self.experts)       # PEFT LoRA adapters on the experts' weights, if any
        if loras and (e.has_dtensor_weights() or self.sharded):
            raise ValueError(f"{type(self).__name__}: LoRA adapters on sharded or DTensor experts do not run on "
                             "moe_kernels yet; merge them or run the experts unsharded")
        if e.has_dtensor_weights():
            if self.sharded:
                raise ValueError(f"{type(self).__name__}: its experts are sharded over a process group "
                                 "(shard_experts / expert_parallel) and are DTensors too: use one or the other")
            return dtensor.moe_mlp(f"{type(self).__name__}.experts", x, experts, weights, e.named_weights(),
                                   capacity=capacity, activation=e.activation, gated=e.gated)
        up, down = e.projections()
        if self.sharded:
            return distributed.moe_mlp(x, experts, weights, up, down, process_group=self.process_group, **e.kwargs())
        return ops.moe_mlp(x, experts, weights, up, down, capacity=capacity, gate_up_lora=loras.get("gate_up_proj"),
                           down_lora=loras.get("down_proj"), **e.kwargs())

    def _experts_forward(self, x, experts, weights, capacity):
        """The routed experts (and the shared ones) on x [T, D] -> [T, O]."""
        out = self._routed_experts(x, experts, weights, capacity)
        if self.shared_experts is not None:
            gate = torch.sigmoid(self.shared_gate(x)) if self.shared_gate is not None else x.new_ones(x.shape[0], 1)
            out = out + self.shared_experts.mix(x, gate)
        return out

    def _apply_capacity(self, r: ops.Routing, num_tokens: int):
        """-> (expert ids to run, the capacity for ops.moe_mlp (int or None), pairs kept per expert [E], the capacity
        as a 0-d tensor or None). Under expert parallelism the capacity counts every rank's tokens, and the pairs
        beyond it are dropped here (id -1)."""
        routed = r.counts.detach()
        if self.capacity_factor is None:
            return r.experts, None, routed, None
        if not self.sharded:
            capacity = self.capacity(num_tokens)
            cap = torch.full((), capacity, dtype=torch.int64, device=routed.device)
            return r.experts, capacity, routed.clamp(max=capacity), cap
        experts, cap = distributed.capacity_keep(r.experts, self.num_experts, self.capacity_factor, self.min_capacity,
                                                 self.max_capacity, self.process_group)
        kept = experts.reshape(-1).long()
        usage = torch.zeros_like(routed).index_add_(0, kept.clamp(min=0), (kept >= 0).to(routed.dtype))
        return experts, None, usage, cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., D] with D = {self.dim}, got {tuple(x.shape)}")
        up = unwrap_lora(self.experts)[0].projections()[0]
        float_weights = isinstance(up, torch.Tensor)
        _checks.module_input(self, x, up if float_weights else up.data, dtype=float_weights)
        lead = x.shape[:-1]
        r = self.route(x)
        flat = x.reshape(-1, self.dim)
        weights = r.weights if self.scale_by_gate else torch.ones_like(r.weights)
        experts, capacity, usage, cap = self._apply_capacity(r, flat.shape[0])
        if self.checkpoint_experts and self.training and torch.is_grad_enabled():
            # the recomputation runs in autograd's thread: under the backend this forward chose
            out = checkpoint(self._experts_under, _backend.current(), flat, experts, weights, capacity,
                             use_reentrant=False)
        else:
            out = self._experts_forward(flat, experts, weights, capacity)
        self._record_stats(r, usage, cap)
        self.aux_loss = self._aux_loss(r) if self.training else None
        return out.view(*lead, self.out_dim)

    def _experts_under(self, backend, *args):
        if backend is None or backend == _backend.current():
            return self._experts_forward(*args)
        with _backend.use_backend(backend):
            return self._experts_forward(*args)

    def _aux_loss(self, r: ops.Routing) -> Optional[torch.Tensor]:
        terms = []
        if self.aux_loss_type == "switch":
            terms.append(self.aux_loss_coef * ops.load_balancing_loss(r))
        elif self.aux_loss_type == "entropy":
            terms.append(self.aux_loss_coef * ops.entropy_loss(r))
        if self.z_loss_coef:
            terms.append(self.z_loss_coef * ops.router_z_loss(r))
        return sum(terms[1:], terms[0]) if terms else None

    # --- routing statistics -----------------------------------------------------------------------------------
    def _record_stats(self, r: ops.Routing, usage: torch.Tensor, cap: Optional[torch.Tensor]) -> None:
        routed = r.counts.detach()
        self._stats = ExpertStats(routed, usage, r.prob_sum.detach(), cap, (routed - usage).sum())
        total = self._usage_total
        self._usage_total = usage.long() if total is None else total.to(usage.device) + usage

    @property
    def dropped(self) -> Optional[torch.Tensor]:
        """(token, slot) pairs the capacity dropped in the last forward, a 0-d tensor (None before any)."""
        return None if self._stats is None else self._stats.dropped

    def expert_stats(self) -> dict:
        """The last forward's routing, as tensors: routed, usage, importance [E], capacity (0-d or None), dropped
        (see ExpertStats), and total_usage [E] (usage summed over the forwards since construction, reset_stats()
        or the last resize, which resets the statistics; what prune_experts reads)."""
        if self._stats is None:
            raise RuntimeError("expert_stats() needs a forward first: no routing has been recorded")
        return dict(self._stats._asdict(), total_usage=self._usage_total)

    def reset_stats(self) -> None:
        self._stats, self._usage_total = None, None

    # --- resizing --------------------------------------------------------------------------------------------
    def remove_experts(self, ids: Sequence[int]) -> None:
        """Removes the experts `ids`; the others keep their weights, router, noise and correction-bias rows. A
        token none of whose top-k choices was removed keeps its choice (with a correction bias, for sigmoid scores
        only: softmax probabilities are rescaled against the unscaled bias) and, with sigmoid scores or
        renormalize, its output. The parameters are new tensors: rebuild the optimizer."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.num_experts]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"ids must be distinct expert indices in [0, num_experts={self.num_experts}), got {ids}")
        removed = set(ids)
        self._reindex([e for e in range(self.num_experts) if e not in removed], 0)

    def add_experts(self, n: int) -> None:
        """Appends n experts (indices E..E+n-1) initialised as the constructor would: new router rows like
        nn.Linear's, zero noise rows and correction bias. The parameters are new tensors: rebuild the optimizer."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self._reindex(list(range(self.num_experts)), n)

    def prune_experts(self, threshold: float) -> list:
        """Removes the experts whose share of total_usage (see expert_stats) is below threshold; returns their
        indices (before removal)."""
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a usage fraction in [0, 1], got {threshold!r}")
        if self._usage_total is None:
            raise RuntimeError("prune_experts needs tracked usage: run forward on some batches first")
        total = self._usage_total.double()
        ids = torch.nonzero(total / total.sum().clamp(min=1) < threshold).flatten().tolist()
        if ids:
            self.remove_experts(ids)
        return ids

    def _router_linear(self) -> nn.Linear:
        """The nn.Linear that produces the logits: the router itself, or the last module with parameters of an
        nn.Sequential router (modules after it, e.g. Dropout, have none)."""
        r = self.router
        if isinstance(r, nn.Sequential):
            with_params = [m for m in r if any(True for _ in m.parameters())]
            r = with_params[-1] if with_params else None
        if not isinstance(r, nn.Linear) or r.out_features != self.num_experts:
            raise TypeError(f"cannot resize a router of type {type(self.router).__name__}: adding or removing experts "
                            f"resizes an nn.Linear(D, E={self.num_experts}) router or an nn.Sequential ending in one")
        return r

    def _reindex(self, keep: list, add: int) -> None:
        if self.sharded:
            raise RuntimeError("cannot resize a layer whose experts are sharded over a process group: resize it "
                               "before expert_parallel / shard_experts")
        if unwrap_lora(self.experts)[0].quantized is not None:    # refused before anything changes
            raise ValueError(f"{type(self).__name__}: quantized experts cannot be resized; resize, then quantize")
        E = len(keep) + add
        if E < self.top_k:
            raise ValueError(f"top_k={self.top_k} needs at least {self.top_k} experts, but {E} would remain")
        try:
            check_routing(E, self.top_k, self.score, self.num_groups, self.topk_groups)
        except ValueError as exc:
            raise ValueError(f"{E} experts do not fit the routing: {exc}") from None
        linear = self._router_linear()
        fresh = nn.Linear(linear.in_features, add, bias=linear.bias is not None, dtype=linear.weight.dtype) if add \
            else None
        linear.weight = reindexed(linear.weight, keep, fresh.weight if add else None)
        if linear.bias is not None:
            linear.bias = reindexed(linear.bias, keep, fresh.bias if add else None)
        linear.out_features = E
        if self.noise is not None:
            self.noise.weight = reindexed(self.noise.weight, keep, self.noise.weight.new_zeros(add, self.dim))
            self.noise.out_features = E
        if self.e_score_correction_bias is not None:
            b = self.e_score_correction_bias
            self.e_score_correction_bias = reindexed(b, keep, b.new_zeros(add))
        self.experts.reindex_(keep, add)
        self.num_experts = E
        self.reset_stats()  # recorded under the old expert indices

    def extra_repr(self):
        return (f"top_k={self.top_k}, score={self.score!r}, renormalize={self.renormalize}, "
                f"scale_by_gate={self.scale_by_gate}, capacity_factor={self.capacity_factor}, "
                f"aux_loss_type={self.aux_loss_type!r}")


def _check_capacity(capacity_factor, min_capacity, max_capacity):
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be None or > 0, got {capacity_factor!r}")
    for name, v in (("min_capacity", min_capacity), ("max_capacity", max_capacity)):
        if v is None:
            continue
        if capacity_factor is None:
            raise ValueError(f"{name} clamps the capacity of capacity_factor, which is None (got {name}={v!r})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be None or an int >= 0, got {v!r}")
    if min_capacity is not None and max_capacity is not None and min_capacity > max_capacity:
        raise ValueError(f"min_capacity={min_capacity} exceeds max_capacity={max_capacity}")


def _shared_experts(dim, hidden_dim, out_dim, num_shared, shared_hidden_dim, shared_gate, activation, gated, bias, f):
    """(shared experts as a one-expert Experts bank or None, the shared gate nn.Linear(D, 1) or None)."""
    if isinstance(num_shared, bool) or not isinstance(num_shared, int) or num_shared < 0:
        raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared!r}")
    if num_shared == 0:
        for name, v in (("shared_hidden_dim", shared_hidden_dim), ("shared_gate", shared_gate)):
            if v not in (None, False):
                raise ValueError(f"{name}={v!r} needs num_shared_experts >= 1, got num_shared_experts=0")
        return None, None
    width = num_shared * hidden_dim if shared_hidden_dim is None else shared_hidden_dim
    experts = Experts(dim, width, 1, out_dim=out_dim, activation=activation, gated=gated, bias=bias, **f)
    return experts, (nn.Linear(dim, 1, bias=False, **f) if shared_gate else None)
