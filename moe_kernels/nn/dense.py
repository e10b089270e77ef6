"""DenseMoE: every expert on every token, weighted by a dense gate (two dense GEMMs)."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from .experts import Experts


class DenseMoE(nn.Module):
    """x: [..., D] -> [..., D] = sum_e gate_e(x) * expert_e(x), gate = softmax over experts of router(x).

    router: a module mapping [T, D] to logits [T, E] (an nn.Linear(D, E) by default). forward(x, gates=...)
    takes the gates [..., E] from the caller instead.
    """

    def __init__(self, dim, hidden_dim, num_experts, *, activation="silu", gated=True, router=None, bias=False,
                 device=None, dtype=None):
        super().__init__()
        self.experts = Experts(dim, hidden_dim, num_experts, activation=activation, gated=gated, bias=bias,
                               device=device, dtype=dtype)
        self.router = router if router is not None else nn.Linear(dim, num_experts, device=device, dtype=dtype)
        self.dim, self.num_experts = dim, num_experts

    def forward(self, x: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., D] with D = {self.dim}, got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.dim)
        if gates is None:
            gates = self.router(x).softmax(-1)
        else:
            if gates.shape[:-1] != shape[:-1] or gates.shape[-1] != self.num_experts:
                raise ValueError(f"gates must be [..., E] = {(*shape[:-1], self.num_experts)} for x {tuple(shape)}, "
                                 f"got {tuple(gates.shape)}")
            gates = gates.reshape(-1, self.num_experts)
        out = ops.dense_moe(x, gates, self.experts.gate_up_proj, self.experts.down_proj, **self.experts.kwargs())
        return out.view(shape)
