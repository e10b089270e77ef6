"""The expert MLP of a sparse MoE layer, `moe_mlp`, in the transformers v5 experts contract, composed of
the routing-metadata, permutation and grouped-GEMM ops (each with its own backend and backward).
Spec: moe_kernels.reference.expert_mlp."""
from typing import Optional

from torch import Tensor

from ..reference.activations import ACTIVATIONS
from . import _checks
from .grouped_gemm import grouped_mm
from .permutation import permute, sort_by_expert, unpermute


def check_experts_weights(gate_up_proj: Tensor, down_proj: Tensor, gated: bool, gate_up_bias=None, down_bias=None):
    """gate_up_proj: [E, 2H, D] ([E, H, D] when not gated), down_proj: [E, D, H]; returns (E, H, D)."""
    _checks.tensor("gate_up_proj", gate_up_proj, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("down_proj", down_proj, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    E, H2, D = gate_up_proj.shape
    H = H2 // 2 if gated else H2
    if (gated and H2 % 2) or down_proj.shape != (E, D, H):
        want = "[E, 2H, D] and [E, D, H]" if gated else "[E, H, D] and [E, D, H]"
        raise ValueError(f"gate_up_proj and down_proj must be {want} (gated={gated}), got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    if gate_up_bias is not None:
        _checks.tensor("gate_up_bias", gate_up_bias, shape=(E, H2))
    if down_bias is not None:
        _checks.tensor("down_bias", down_bias, shape=(E, D))
    _checks.same_dtype(gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return E, H, D


def moe_mlp(x: Tensor, experts: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor, *,
            activation: str = "silu", gated: bool = True, gate_up_bias: Optional[Tensor] = None,
            down_bias: Optional[Tensor] = None, capacity: Optional[int] = None) -> Tensor:
    """x: [T, D], experts: [T, k] int, weights: [T, k], gate_up_proj: [E, 2H, D] (gate rows first; [E, H, D]
    when not gated), down_proj: [E, D, H] -> [T, D] in x's dtype.

    out[t] = sum_j weights[t, j] * down_e(act(gate_e x[t]) * up_e x[t]) with e = experts[t, j]; ids outside
    [0, E) contribute zero (the expert-parallel sentinel); pairs beyond `capacity` rows per expert are dropped.
    """
    E, H, D = check_experts_weights(gate_up_proj, down_proj, gated, gate_up_bias, down_bias)
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("experts", experts, ndim=2, dtypes=_checks.INDEX_DTYPES)
    if x.shape[1] != D:
        raise ValueError(f"x: [T, D] must have D = {D} of gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(x.shape)}")
    if experts.shape[0] != x.shape[0]:
        raise ValueError(f"experts must be [T, k] with T = {x.shape[0]} of x {tuple(x.shape)}, got {tuple(experts.shape)}")
    _checks.tensor("weights", weights, shape=tuple(experts.shape), dtypes=_checks.FLOAT_DTYPES)
    _checks.same_dtype(x=x, gate_up_proj=gate_up_proj)
    _checks.same_device(x=x, experts=experts, weights=weights, gate_up_proj=gate_up_proj, down_proj=down_proj)
    _checks.choice("activation", activation, ACTIVATIONS)
    s = sort_by_expert(experts, E, capacity)
    h = grouped_mm(permute(x, s), gate_up_proj, s.offsets, gate_up_bias, activation=activation, gated=gated)
    y = grouped_mm(h, down_proj, s.offsets, down_bias)
    return unpermute(y, s, weights)
