"""The expert MLP of a sparse MoE layer, in the transformers v5 experts contract.

The spec of `moe_kernels.ops.moe_mlp`, written the plain way: for each expert, the (token, slot) pairs
routed to it, its MLP, weighted by the routing weight, summed per token.
"""
import torch

from .activations import glu
from .permutation import sort_by_expert


def moe_mlp(x, experts, weights, gate_up_proj, down_proj, *, activation="silu", gated=True, gate_up_bias=None,
            down_bias=None, capacity=None):
    """x: [T, D], experts/weights: [T, k], gate_up_proj: [E, 2H, D] (gate rows first; [E, H, D] when not
    gated), down_proj: [E, D, H] -> [T, D] in x's dtype. Ids outside [0, E) contribute zero."""
    T, k = experts.shape
    E = gate_up_proj.shape[0]
    kept = sort_by_expert(experts, E, capacity)[1] >= 0  # [T, k]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(T, down_proj.shape[1], dtype=acc, device=x.device)
    for e in range(E):
        tok, slot = torch.nonzero((experts == e) & kept, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ gate_up_proj[e].t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        y = glu(h, activation, gated) @ down_proj[e].t()
        if down_bias is not None:
            y = y + down_bias[e]
        out.index_add_(0, tok, y.to(acc) * weights[tok, slot].to(acc).unsqueeze(-1))
    return out.to(x.dtype)
