"""SparseMoE: top-k routed experts (Switch, Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3 routing)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import _checks
from ..ops.routing import check_routing
from .experts import Experts


class SparseMoE(nn.Module):
    """x: [..., D] -> [..., D]. Each token goes to its top-k experts, weighted by the routing weights.

    Parameters: router.weight [E, D], experts.gate_up_proj [E, 2H, D], experts.down_proj [E, D, H]
    (transformers v5 layout; `self.gate_up_proj` / `self.down_proj` alias them).
    score: "softmax" | "sigmoid"; renormalize: the k weights sum to one; correction_bias: a DeepSeek-V3
    `e_score_correction_bias` buffer [E] that shifts only the choice; num_groups / topk_groups: group-limited
    choice; routed_scale: multiplies the weights; capacity_factor: each expert keeps at most
    ceil(capacity_factor * T * k / E) (token, slot) pairs, first choices first; noisy_gating: Shazeer et al.'s
    trainable Gaussian noise on the logits in training (std = softplus(x @ noise.weight^T)).
    After a training forward, `aux_loss` = aux_loss_coef * load-balancing loss + z_loss_coef * router z-loss
    (None after an eval forward).
    """

    def __init__(self, dim, hidden_dim, num_experts, top_k=2, *, activation="silu", gated=True, score="softmax",
                 renormalize=True, capacity_factor=None, bias=False, router_bias=False, correction_bias=False,
                 num_groups=None, topk_groups=None, routed_scale=1.0, noisy_gating=False, aux_loss_coef=0.01,
                 z_loss_coef=0.0, device=None, dtype=None):
        super().__init__()
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or > 0, got {capacity_factor!r}")
        f = dict(device=device, dtype=dtype)
        self.experts = Experts(dim, hidden_dim, num_experts, activation=activation, gated=gated, bias=bias, **f)
        self.router = nn.Linear(dim, num_experts, bias=router_bias, **f)
        self.noise = nn.Linear(dim, num_experts, bias=False, **f) if noisy_gating else None
        if noisy_gating:
            nn.init.zeros_(self.noise.weight)
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.score, self.renormalize, self.capacity_factor = score, renormalize, capacity_factor
        self.num_groups, self.topk_groups, self.routed_scale = num_groups, topk_groups, routed_scale
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.aux_loss = None
        _checks.top_k(top_k, num_experts, name="top_k")
        check_routing(num_experts, top_k, score, num_groups, topk_groups)

    @property
    def gate_up_proj(self):
        return self.experts.gate_up_proj

    @property
    def down_proj(self):
        return self.experts.down_proj

    def capacity(self, num_tokens: int) -> Optional[int]:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, x: torch.Tensor) -> ops.Routing:
        """x: [T, D] -> the Routing of its tokens."""
        logits = self.router(x)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        return ops.topk_route(logits, self.top_k, score=self.score, renormalize=self.renormalize,
                              bias=self.e_score_correction_bias, num_groups=self.num_groups,
                              topk_groups=self.topk_groups, scale=self.routed_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., D] with D = {self.dim}, got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.dim)
        r = self.route(x)
        out = ops.moe_mlp(x, r.experts, r.weights, self.experts.gate_up_proj, self.experts.down_proj,
                          capacity=self.capacity(x.shape[0]), **self.experts.kwargs())
        if not self.training:
            self.aux_loss = None
        else:
            self.aux_loss = (self.aux_loss_coef * ops.load_balancing_loss(r)
                             + self.z_loss_coef * ops.router_z_loss(r))
        return out.view(shape)

    def extra_repr(self):
        return (f"top_k={self.top_k}, score={self.score!r}, renormalize={self.renormalize}, "
                f"capacity_factor={self.capacity_factor}")
