"""Dense mixture: every expert on every token, weighted by a dense gate.

The spec of `moe_kernels.ops.dense_moe`: out[t] = sum_e gates[t, e] * down_e(glu(gate_up_e x[t])).
"""
import torch

from .activations import glu


def dense_moe(x, gates, gate_up_proj, down_proj, *, activation="silu", gated=True, gate_up_bias=None,
              down_bias=None):
    """x: [T, D], gates: [T, E], gate_up_proj: [E, 2H|H, D], down_proj: [E, O, H] -> [T, O]."""
    out = torch.zeros(x.shape[0], down_proj.shape[1], dtype=x.dtype, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        h = x @ gate_up_proj[e].t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        y = glu(h, activation, gated) @ down_proj[e].t()
        if down_bias is not None:
            y = y + down_bias[e]
        out = out + gates[:, e : e + 1].to(x.dtype) * y
    return out
