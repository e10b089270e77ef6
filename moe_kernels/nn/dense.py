"""DenseMoE: every expert on every token, weighted by a dense gate (two dense GEMMs, or one for linear experts)."""
import math
from typing import Optional

import torch
from torch import nn

from ..ops import _checks
from .experts import Experts, LinearExperts

SCORES = ("softmax", "sigmoid", None)


def router_output(router: nn.Module, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Runs `router` on x [..., D] in its own shape (a sequence model such as an LSTM needs [B, S, D]) and
    returns its output, [..., E] or already flat [T, E], as [T, E]; a clear error for any other shape."""
    out = router(x)
    lead = (*x.shape[:-1], num_experts)
    flat = (math.prod(x.shape[:-1]), num_experts)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) not in (lead, flat):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"router ({type(router).__name__}) must map x {tuple(x.shape)} to [..., E] = {lead} "
                         f"or [T, E] = {flat}, got {got}")
    return out.reshape(-1, num_experts)


class DenseMoE(nn.Module):
    """x: [..., D] -> [..., O] = sum_e gate_e(x) * expert_e(x) (O = out_dim, D by default).

    Experts: MLPs of width hidden_dim (activation, gated, bias as in Experts), or, with hidden_dim=None, one
    affine map Linear(D, O) each (LinearExperts; activation and gated do not apply).
    router: a module mapping x [..., D] (called in x's own shape) to [..., E] (an nn.Linear(D, E) by default).
    score: what turns the router's output into gates: "softmax" over experts (default), "sigmoid", or None when
    the router already returns the gates (e.g. an LSTM gating network ending in a softmax).
    forward(x, gates=...) takes the gates [..., E] from the caller instead.
    """

    def __init__(self, dim, hidden_dim, num_experts, *, out_dim=None, activation="silu", gated=True, router=None,
                 score="softmax", bias=False, device=None, dtype=None):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        f = dict(device=device, dtype=dtype)
        if hidden_dim is None:
            self.experts = LinearExperts(dim, num_experts, out_dim=out_dim, bias=bias, **f)
        else:
            self.experts = Experts(dim, hidden_dim, num_experts, out_dim=out_dim, activation=activation, gated=gated,
                                   bias=bias, **f)
        self.router = router if router is not None else nn.Linear(dim, num_experts, **f)
        self.dim, self.out_dim, self.num_experts, self.score = dim, self.experts.out_dim, num_experts, score

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> the router's gates [T, E]."""
        g = router_output(self.router, x, self.num_experts)
        if self.score == "softmax":
            return g.softmax(-1)
        return g.sigmoid() if self.score == "sigmoid" else g

    def forward(self, x: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., D] with D = {self.dim}, got {tuple(x.shape)}")
        _checks.module_input(self, x, next(self.experts.parameters()))
        lead = x.shape[:-1]
        if gates is None:
            gates = self.gates(x)
        else:
            if gates.shape[:-1] != lead or gates.shape[-1] != self.num_experts:
                raise ValueError(f"gates must be [..., E] = {(*lead, self.num_experts)} for x {tuple(x.shape)}, "
                                 f"got {tuple(gates.shape)}")
            gates = gates.reshape(-1, self.num_experts)
        out = self.experts.mix(x.reshape(-1, self.dim), gates)
        return out.view(*lead, self.out_dim)

    def extra_repr(self):
        return f"score={self.score!r}"
