"""Expert weights in the transformers v5 layout, shared by the MoE modules."""
import math

import torch
from torch import nn

from ..reference.activations import check_activation


class Experts(nn.Module):
    """E expert MLPs: gate_up_proj [E, 2H, D] (gate rows first; [E, H, D] when not gated), down_proj [E, D, H],
    optional gate_up_bias [E, 2H|H] and down_bias [E, D]. Initialised like nn.Linear, expert by expert."""

    def __init__(self, dim, hidden_dim, num_experts, *, activation="silu", gated=True, bias=False, device=None,
                 dtype=None):
        super().__init__()
        check_activation(activation)
        for name, v in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.activation, self.gated = activation, gated
        f = dict(device=device, dtype=dtype)
        up = 2 * hidden_dim if gated else hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, up, dim, **f))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **f))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, up, **f)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, dim, **f)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        for w, b, fan_in in ((self.gate_up_proj, self.gate_up_bias, self.dim), (self.down_proj, self.down_bias, self.hidden_dim)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def kwargs(self):
        return dict(activation=self.activation, gated=self.gated, gate_up_bias=self.gate_up_bias,
                    down_bias=self.down_bias)

    def extra_repr(self):
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"activation={self.activation!r}, gated={self.gated}, bias={self.gate_up_bias is not None}")
