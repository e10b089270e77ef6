"""Expert weights in the transformers v5 layout, shared by the MoE modules.

Two banks of E experts, each stored as stacked tensors (never a ModuleList), so a layer runs all of them as a
few GEMMs:
- Experts: MLPs, gate_up_proj [E, 2H|H, D] and down_proj [E, O, H] (+ optional biases);
- LinearExperts: one affine map each, weight [E, O, D] (+ optional bias [E, O]) (Shazeer et al. 2017).
Both can `mix` tokens with a dense gate [T, E], and be resized (`reindex_`) keeping the chosen experts' weights.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import _checks
from ..ops.expert_mlp import check_experts_weights
from ..ops.quantized import QuantizedWeight, check_quantized
from ..reference.activations import check_activation
from . import dtensor
from .dtensor import is_dtensor


def _positive_ints(**values):
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _uniform_(t: Optional[Tensor], fan_in: int) -> None:
    """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases."""
    if t is not None:
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(t, -bound, bound)


def _take(module: nn.Module, **tensors: Optional[Tensor]) -> None:
    """Sets the given tensors (not None) as the module's parameters, wrapping plain tensors in nn.Parameter."""
    for name, t in tensors.items():
        if t is not None:
            setattr(module, name, t if isinstance(t, nn.Parameter) else nn.Parameter(t))


def reindexed(t: Tensor, keep: Sequence[int], fresh: Optional[Tensor] = None) -> Tensor:
    """The rows `keep` of t, then the rows of `fresh` (None: none), as a new tensor (a new Parameter with the same
    requires_grad when t is one). Resizes any per-expert tensor: weights, router rows, biases, buffers."""
    rows = t.detach()[torch.as_tensor(list(keep), dtype=torch.long, device=t.device)]
    if fresh is not None:
        rows = torch.cat([rows, fresh.detach().to(device=t.device, dtype=t.dtype)])
    rows = rows.contiguous()
    return nn.Parameter(rows, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else rows


def mlp_with_dropout(x: Tensor, ids: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                     gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], *, activation: str, gated: bool,
                     p: float) -> Tensor:
    """The expert MLP with dropout p (training) on its hidden activations: x [T, D], ids [T, k] (outside [0, E):
    nothing), weights [T, k] -> [T, O], as two grouped GEMMs over the (token, slot) pairs sorted by expert."""
    s = ops.sort_by_expert(ids, gate_up_proj.shape[0])
    h = ops.grouped_mm(ops.permute(x, s), gate_up_proj, s.offsets, gate_up_bias, activation=activation, gated=gated)
    y = ops.grouped_mm(F.dropout(h, p, training=True), down_proj, s.offsets, down_bias)
    return ops.unpermute(y, s, weights)


class _ExpertBank(nn.Module):
    """What both banks share: per-expert parameters stacked along dim 0 (named in PARAMS), resizing."""

    PARAMS: tuple = ()

    def _fresh(self, n: int) -> "_ExpertBank":
        """n new experts of the same shapes, initialised as the constructor would."""
        raise NotImplementedError

    def reindex_(self, keep: Sequence[int], add: int = 0) -> "_ExpertBank":
        """Keeps the experts `keep` (in that order), then appends `add` freshly initialised ones. The parameters
        are new tensors: an optimizer holding the old ones must be rebuilt."""
        if len(keep) + add < 1:
            raise ValueError(f"at least one expert must remain, got keep={list(keep)} and add={add}")
        if getattr(self, "quantized", None) is not None:
            raise ValueError(f"{type(self).__name__}: quantized experts cannot be resized; resize, then quantize")
        fresh = self._fresh(add) if add else None
        for name in self.PARAMS:
            old = getattr(self, name)
            if old is not None:
                setattr(self, name, reindexed(old, keep, getattr(fresh, name) if fresh is not None else None))
        self.num_experts = len(keep) + add
        return self


class Experts(_ExpertBank):
    """E expert MLPs: gate_up_proj [E, 2H, D] (gate rows first; [E, H, D] when not gated), down_proj [E, O, H]
    (O = out_dim, D by default), optional gate_up_bias [E, 2H|H] and down_bias [E, O]. Initialised like
    nn.Linear, expert by expert."""

    PARAMS = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")

    def __init__(self, dim, hidden_dim, num_experts, *, out_dim=None, activation="silu", gated=True, bias=False,
                 device=None, dtype=None):
        super().__init__()
        activation = str(check_activation(activation, gated))     # a spec string, canonical
        out_dim = dim if out_dim is None else out_dim
        _positive_ints(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, out_dim=out_dim)
        self.dim, self.hidden_dim, self.out_dim, self.num_experts = dim, hidden_dim, out_dim, num_experts
        self.activation, self.gated = activation, gated
        f = dict(device=device, dtype=dtype)
        up = 2 * hidden_dim if gated else hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, up, dim, **f))
        self.down_proj = nn.Parameter(torch.empty(num_experts, out_dim, hidden_dim, **f))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, up, **f)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, out_dim, **f)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_weights(cls, gate_up_proj: Tensor, down_proj: Tensor, gate_up_bias: Optional[Tensor] = None,
                     down_bias: Optional[Tensor] = None, *, activation="silu", gated=True) -> "Experts":
        """Experts holding the given tensors (gate_up_proj [E, 2H|H, D], down_proj [E, O, H], biases [E, 2H|H]
        and [E, O]) as its parameters, without initialising any others."""
        E, H, D, O = check_experts_weights(gate_up_proj, down_proj, gated, gate_up_bias, down_bias)
        if (gate_up_bias is None) != (down_bias is None):
            raise ValueError("gate_up_bias and down_bias must both be given or both be None, got "
                             f"{'a tensor' if gate_up_bias is not None else None} and "
                             f"{'a tensor' if down_bias is not None else None}")
        m = cls(D, H, E, out_dim=O, activation=activation, gated=gated, bias=gate_up_bias is not None,
                device="meta", dtype=gate_up_proj.dtype)
        _take(m, gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias)
        return m

    def reset_parameters(self):
        for w, b, fan_in in ((self.gate_up_proj, self.gate_up_bias, self.dim),
                             (self.down_proj, self.down_bias, self.hidden_dim)):
            _uniform_(w, fan_in)
            _uniform_(b, fan_in)

    def _fresh(self, n):
        return Experts(self.dim, self.hidden_dim, n, out_dim=self.out_dim, activation=self.activation,
                       gated=self.gated, bias=self.gate_up_bias is not None, dtype=self.gate_up_proj.dtype)

    def kwargs(self):
        return dict(activation=self.activation, gated=self.gated, gate_up_bias=self.gate_up_bias,
                    down_bias=self.down_bias)

    # --- quantized projections ----------------------------------------------------------------------------------
    # the buffers of each format, named as the checkpoints name them: FP8 (DeepSeek-V3, Qwen3-FP8) keeps the e4m3
    # weight under the projection's own name beside its `_scale_inv`; MXFP4 (GPT-OSS) has `_blocks` and `_scales`
    _QUANT_NAMES = {"fp8": ("", "_scale_inv"), "mxfp4": ("_blocks", "_scales")}
    quantized = None     # (format, block) once quantize()d

    def quantize(self, format: str, block=(128, 128)) -> "Experts":
        """Replaces gate_up_proj and down_proj (in place) by their quantized form for inference, in the
        checkpoints' layouts (ops.QuantizedWeight): "fp8", e4m3 + one fp32 scale per block (buffers gate_up_proj,
        gate_up_proj_scale_inv, down_proj, down_proj_scale_inv); "mxfp4", packed e2m1 + an e8m0 scale per 32
        values along K (buffers gate_up_proj_blocks, gate_up_proj_scales, ...). A checkpoint in that format then
        loads into it as it is (load_state_dict). Biases stay in their dtype. Returns self."""
        if self.quantized is not None:
            raise ValueError(f"{type(self).__name__} is already quantized ({self.quantized[0]})")
        if is_dtensor(self.gate_up_proj, self.down_proj):
            raise ValueError(f"{type(self).__name__}: DTensor weights cannot be quantized; quantize before sharding")
        q = {n: QuantizedWeight.quantize(getattr(self, n).detach(), format, block)
             for n in ("gate_up_proj", "down_proj")}
        data_suffix, scale_suffix = self._QUANT_NAMES[format]
        for name, w in q.items():
            delattr(self, name)
            self.register_buffer(name + data_suffix, w.data)
            self.register_buffer(name + scale_suffix, w.scale)
        self.quantized = (format, tuple(int(b) for b in block))
        return self

    def projections(self) -> tuple:
        """(gate_up_proj, down_proj) as the fused ops take them: the parameters, or QuantizedWeight once
        quantize()d."""
        if self.quantized is None:
            return self.gate_up_proj, self.down_proj
        fmt, block = self.quantized
        data_suffix, scale_suffix = self._QUANT_NAMES[fmt]
        return tuple(QuantizedWeight(fmt, getattr(self, n + data_suffix), getattr(self, n + scale_suffix), block)
                     for n in ("gate_up_proj", "down_proj"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # GPT-OSS stores MXFP4 blocks as [E, N, K/32, 16]: the same bytes as [E, N, K/2]
        if self.quantized is not None and self.quantized[0] == "mxfp4":
            for n in ("gate_up_proj_blocks", "down_proj_blocks"):
                t = state_dict.get(prefix + n)
                if t is not None and t.dim() == 4:
                    state_dict[prefix + n] = t.reshape(*t.shape[:2], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.quantized is not None:
            for name, w in zip(("gate_up_proj", "down_proj"), self.projections()):
                check_quantized(f"{prefix}{name}", w)

    def has_dtensor_weights(self) -> bool:
        """Whether its weights are DTensors (run through moe_kernels.nn.dtensor)."""
        return self.quantized is None and is_dtensor(self.gate_up_proj, self.down_proj, self.gate_up_bias,
                                                     self.down_bias)

    def named_weights(self) -> dict:
        """{"gate_up_proj": ..., "down_proj": ..., "gate_up_bias": ..., "down_bias": ...} (None for absent biases),
        in the order the fused ops take them."""
        return {n: getattr(self, n) for n in self.PARAMS}

    def mix(self, x: Tensor, gates: Tensor) -> Tensor:
        """x: [T, D], gates: [T, E] -> [T, O] = sum_e gates[:, e] * expert_e(x) (two dense GEMMs)."""
        if self.quantized is not None:
            raise ValueError(f"{type(self).__name__}: quantized experts run routed (ops.moe_mlp), not mixed densely")
        if self.has_dtensor_weights():
            return dtensor.dense_moe(type(self).__name__, x, gates, self.named_weights(), activation=self.activation,
                                     gated=self.gated)
        return ops.dense_moe(x, gates, self.gate_up_proj, self.down_proj, **self.kwargs())

    def extra_repr(self):
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, out_dim={self.out_dim}, "
                f"num_experts={self.num_experts}, activation={self.activation!r}, gated={self.gated}, "
                f"bias={self.gate_up_bias is not None}")


class LinearExperts(_ExpertBank):
    """E affine experts x -> W_e x + b_e: weight [E, O, D], optional bias [E, O]. Initialised like nn.Linear."""

    PARAMS = ("weight", "bias")

    def __init__(self, dim, num_experts, *, out_dim=None, bias=True, device=None, dtype=None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        _positive_ints(dim=dim, num_experts=num_experts, out_dim=out_dim)
        self.dim, self.out_dim, self.num_experts = dim, out_dim, num_experts
        f = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, dim, **f))
        self.bias = nn.Parameter(torch.empty(num_experts, out_dim, **f)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_weights(cls, weight: Tensor, bias: Optional[Tensor] = None) -> "LinearExperts":
        """LinearExperts holding weight [E, O, D] and bias [E, O] (or None) as its parameters."""
        _checks.tensor("weight", weight, ndim=3, dtypes=_checks.FLOAT_DTYPES)
        E, O, D = weight.shape
        if bias is not None:
            _checks.tensor("bias", bias, shape=(E, O))
        m = cls(D, E, out_dim=O, bias=bias is not None, device="meta", dtype=weight.dtype)
        _take(m, weight=weight, bias=bias)
        return m

    def reset_parameters(self):
        _uniform_(self.weight, self.dim)
        _uniform_(self.bias, self.dim)

    def _fresh(self, n):
        return LinearExperts(self.dim, n, out_dim=self.out_dim, bias=self.bias is not None, dtype=self.weight.dtype)

    def mix(self, x: Tensor, gates: Tensor) -> Tensor:
        """x: [T, D], gates: [T, E] -> [T, O] = sum_e gates[:, e] * (W_e x + b_e): one GEMM over all experts
        ([T, D] x [D, E*O]), then each token's [E] x [E, O] combination as one batched matmul."""
        T, E, O = x.shape[0], self.num_experts, self.out_dim
        if gates.shape != (T, E):
            raise ValueError(f"gates must be [T, E] = {(T, E)} for x {tuple(x.shape)}, got {tuple(gates.shape)}")
        g = gates.to(x.dtype)
        h = (x @ self.weight.reshape(E * O, self.dim).t()).view(T, E, O)
        out = torch.bmm(g.unsqueeze(1), h).squeeze(1)
        return out + g @ self.bias if self.bias is not None else out

    def extra_repr(self):
        return (f"dim={self.dim}, out_dim={self.out_dim}, num_experts={self.num_experts}, "
                f"bias={self.bias is not None}")
