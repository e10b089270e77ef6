"""SoftMoE and DynamicSlotsSoftMoE (Puigcerver et al. 2023) with soft-moe-pytorch's argument names and math by
default. Slots are dispatched and combined by ops.soft_dispatch / ops.soft_combine (never the [b, n, slots]
logits on the native and triton backends), and the experts run as one batched grouped GEMM over all experts.
`from_soft_moe_pytorch(module)` builds either module from that package's with the same weights."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import _checks
from . import dtensor
from .experts import Experts, mlp_with_dropout


class RMSNorm(nn.Module):
    """soft-moe-pytorch's norm: l2-normalise, times sqrt(D) and a learned gain."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class LayerNorm(nn.Module):
    """soft-moe-pytorch's LayerNorm (use_layernorm=True): a learned gain, a zero bias buffer, eps 1e-5."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.register_buffer("beta", torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


# --- shared by both modules -----------------------------------------------------------------------------------
def _tokens(module: nn.Module, x: torch.Tensor, dim: int, mask):
    """x: [b, n, d], [b, d] (one token) or an image [b, d, h, w] (h*w tokens) -> (tokens [b, n, d], a function
    mapping the output [b, n, d] back to x's layout). Checks mask: [b, n] bool, and x against the module's
    parameters (device, dtype)."""
    shape = x.shape
    if x.dim() == 4:
        tokens = x.flatten(2).transpose(1, 2)          # [b, d, h, w] -> [b, h*w, d]
    elif x.dim() == 2:
        tokens = x.unsqueeze(1)
    else:
        tokens = x
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"x must be [b, n, d], [b, d] or [b, d, h, w] with d = {dim}, got {tuple(shape)}")
    _checks.module_input(module, x, module.experts.gate_up_proj)
    if mask is not None:
        _checks.tensor("mask", mask, shape=tokens.shape[:2], dtypes=(torch.bool,))
        _checks.same_device(x=x, mask=mask)

    def restore(out):
        if len(shape) == 4:
            return out.transpose(1, 2).reshape(shape)
        return out.reshape(shape)

    return tokens, restore


def _expert_hidden(dim, expert_mult, geglu, hidden_dim):
    """soft-moe-pytorch's widths: int(dim * mult) for GELU experts, int(dim * mult * 2 / 3) for GEGLU ones."""
    if hidden_dim is not None:
        return hidden_dim
    return int(dim * expert_mult * 2 / 3) if geglu else int(dim * expert_mult)


def _run_experts(experts: Experts, dropout: nn.Module, slots: torch.Tensor, where: str) -> torch.Tensor:
    """slots: [B, E*S, D] (expert e owns slots e*S .. e*S+S-1) -> [B, E*S, D]: every expert on its S slots of every
    batch element. Without active dropout: the fused expert MLP (ops.moe_mlp, each slot row to its expert with
    weight 1), which keeps only the pre-activation for its backward; with it, two grouped GEMMs with the dropout
    between them. DTensor expert weights (moe_kernels.nn.dtensor; where: the module, for errors) run on the slot
    rows' expert ids either way."""
    E, O = experts.num_experts, experts.down_proj.shape[1]
    B, ES, D = slots.shape
    S = ES // E
    dropping = dropout.training and dropout.p > 0
    if not dropping or experts.has_dtensor_weights():
        ids = (torch.arange(ES, device=slots.device) // S).repeat(B).unsqueeze(1)
        ones = torch.ones(B * ES, 1, device=slots.device, dtype=slots.dtype)
        if experts.has_dtensor_weights():
            kw, rows, named = dict(activation="gelu", gated=experts.gated), slots.reshape(B * ES, D), \
                experts.named_weights()
            if dropping:
                fn = functools.partial(mlp_with_dropout, p=dropout.p, **kw)
                y = dtensor.run_experts(f"{where}.experts", fn, rows, ids, ones, named)
            else:
                y = dtensor.moe_mlp(f"{where}.experts", rows, ids, ones, named, **kw)
            return y.view(B, ES, O)
        y = ops.moe_mlp(slots.reshape(B * ES, D), ids, ones, experts.gate_up_proj, experts.down_proj,
                        activation="gelu", gated=experts.gated, gate_up_bias=experts.gate_up_bias,
                        down_bias=experts.down_bias)
        return y.view(B, ES, O)
    rows = slots.view(B, E, S, D).transpose(0, 1).reshape(E * B * S, D)
    offsets = torch.arange(E + 1, device=slots.device, dtype=torch.int32) * (B * S)
    h = ops.grouped_mm(rows, experts.gate_up_proj, offsets, experts.gate_up_bias, activation="gelu",
                       gated=experts.gated)
    y = ops.grouped_mm(dropout(h), experts.down_proj, offsets, experts.down_bias)
    return y.view(E, B, S, O).transpose(0, 1).reshape(B, E * S, O)


# Up to this many [b, n, slots] logits (32 MiB in fp32) a CPU forward makes them once and both mixes read them
# (ops.soft_logits): 9 logit-sized GEMMs in forward and backward where the flash-style ops take 14. Above it, and on
# GPUs, the flash-style ops keep memory linear in tokens and slots. Per module: `module.shared_logits_max`.
SHARED_LOGITS_MAX = 1 << 23


def _mix(module: nn.Module, xn: torch.Tensor, phi: torch.Tensor, mask, slot_mask) -> torch.Tensor:
    """Dispatch xn: [b, n, d] to the slots of phi: [slots, d] or [b, slots, d], run the module's experts, combine
    back -> [b, n, d]."""
    b, n, _ = xn.shape
    if xn.device.type == "cpu" and b * n * phi.shape[-2] <= module.shared_logits_max:
        logits = ops.soft_logits(xn, phi, mask, slot_mask)
        return ops.soft_combine_logits(logits, module.run_experts(ops.soft_dispatch_logits(logits, xn)))
    slots = ops.soft_dispatch(xn, phi, mask, slot_mask)
    return ops.soft_combine(xn, phi, module.run_experts(slots), mask, slot_mask)


def _soft_moe_pytorch_experts(mlps) -> dict:
    """The expert MLPs of a soft-moe-pytorch module (each Sequential(Linear, GELU | GEGLU, Dropout, Linear)) ->
    the fused module's keyword arguments: hidden_dim, geglu, dropout."""
    first, act, drop, last = mlps[0]
    geglu = first.out_features == 2 * last.in_features
    if not geglu and first.out_features != last.in_features:
        raise ValueError(f"expert MLP widths do not chain: {first} then {last}")
    return dict(hidden_dim=last.in_features, geglu=geglu, dropout=drop.p)


@torch.no_grad()
def _copy_experts_(experts: Experts, mlps) -> None:
    """Stacks soft-moe-pytorch's per-expert Linears into experts' [E, ...] tensors. Its GEGLU is
    `x, gate = h.chunk(2); x * gelu(gate)` (gate second); ours takes the gate first, so the halves swap."""
    if len(mlps) != experts.num_experts:
        raise ValueError(f"expected {experts.num_experts} expert MLPs, got {len(mlps)}")
    for e, (first, _, _, last) in enumerate(mlps):
        w, b = first.weight, first.bias
        if experts.gated:
            w, b = torch.cat(w.chunk(2)[::-1]), torch.cat(b.chunk(2)[::-1])
        experts.gate_up_proj[e].copy_(w)
        experts.gate_up_bias[e].copy_(b)
        experts.down_proj[e].copy_(last.weight)
        experts.down_bias[e].copy_(last.bias)


def _factory(module: nn.Module) -> dict:
    p = next(module.parameters())
    return dict(device=p.device, dtype=p.dtype)


# --- SoftMoE --------------------------------------------------------------------------------------------------
class SoftMoE(nn.Module):
    """x: [b, n, d], [b, d] or images [b, d, h, w]; mask: [b, n] bool (True = token) -> same shape as x.

    Every slot is a softmax-over-tokens mix of the (normalised) tokens; each expert processes its num_slots
    slots; every token is a softmax-over-all-slots mix of the expert outputs. Experts are GELU MLPs of width
    int(dim * expert_mult) (GEGLU of width int(dim * expert_mult * 2 / 3) with geglu=True; hidden_dim sets the
    width directly), dropout after the activation, run as one batched grouped GEMM. normalize="rms":
    soft-moe-pytorch's RMS-normalised tokens and slot embeddings (its LayerNorm with use_layernorm=True);
    normalize="l2": the paper's l2-normalised logits with a learned scale.
    """

    def __init__(self, dim, *, seq_len=None, num_slots=None, num_experts=4, expert_mult=4, dropout=0.0, geglu=False,
                 use_layernorm=False, normalize="rms", hidden_dim=None, device=None, dtype=None):
        super().__init__()
        if (seq_len is None) == (num_slots is None):
            raise ValueError(f"pass exactly one of seq_len and num_slots, got seq_len={seq_len}, num_slots={num_slots}")
        if num_slots is None:
            num_slots = seq_len // num_experts
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1 (seq_len // num_experts), got {num_slots}")
        if normalize not in ("rms", "l2"):
            raise ValueError(f"normalize must be 'rms' or 'l2', got {normalize!r}")
        if use_layernorm and normalize != "rms":
            raise ValueError(f"use_layernorm=True replaces normalize='rms'; got normalize={normalize!r}")
        f = dict(device=device, dtype=dtype)
        hidden = _expert_hidden(dim, expert_mult, geglu, hidden_dim)
        self.experts = Experts(dim, hidden, num_experts, activation="gelu", gated=geglu, bias=True, **f)
        self.slot_embeds = nn.Parameter(torch.randn(num_experts, num_slots, dim, **f))
        self.normalize = normalize
        if normalize == "rms":
            norm = LayerNorm if use_layernorm else RMSNorm
            self.norm, self.slot_norm = norm(dim, **f), norm(dim, **f)
        else:
            self.logit_scale = nn.Parameter(torch.ones((), **f))
        self.dropout = nn.Dropout(dropout)
        self.dim, self.num_experts, self.num_slots = dim, num_experts, num_slots
        self.shared_logits_max = SHARED_LOGITS_MAX

    @classmethod
    def from_soft_moe_pytorch(cls, module: nn.Module) -> "SoftMoE":
        """A SoftMoE with the weights of a soft_moe_pytorch.SoftMoE (copied; same outputs and gradients). Its
        experts run here on every rank, without the package's distribution over ranks."""
        E, S, D = module.slot_embeds.shape
        mlps = list(module.experts.experts)
        use_layernorm = hasattr(module.norm, "beta")   # the package's LayerNorm; its RMSNorm has only gamma
        new = cls(D, num_slots=S, num_experts=E, use_layernorm=use_layernorm, **_soft_moe_pytorch_experts(mlps),
                  **_factory(module))
        with torch.no_grad():
            new.slot_embeds.copy_(module.slot_embeds)
            for ours, theirs in ((new.norm, module.norm), (new.slot_norm, module.slot_norm)):
                ours.load_state_dict(theirs.state_dict())
        _copy_experts_(new.experts, mlps)
        return new.train(module.training)

    def _normed(self, x):
        slots = self.slot_embeds.reshape(-1, self.dim)
        if self.normalize == "rms":
            return self.norm(x), self.slot_norm(slots)
        return F.normalize(x, dim=-1), self.logit_scale * F.normalize(slots, dim=-1)

    def run_experts(self, slots: torch.Tensor) -> torch.Tensor:
        """slots: [B, E*S, D] -> [B, E*S, D], expert e on its S slots of every batch element."""
        return _run_experts(self.experts, self.dropout, slots, type(self).__name__)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, add_noise: bool = False,
                noise_mult: float = 1.0) -> torch.Tensor:
        """add_noise: soft-moe-pytorch's Gumbel noise (times noise_mult) on the logits, drawn like the package
        does (same generator, same order). It needs the [b, n, slots] logits, so that path makes them."""
        tokens, restore = _tokens(self, x, self.dim, mask)
        xn, phi = self._normed(tokens)
        if add_noise:
            return restore(self._noised(xn, phi, mask, noise_mult))
        return restore(_mix(self, xn, phi, mask, None))

    def _noised(self, xn, phi, mask, noise_mult):
        logits = torch.matmul(xn, phi.t())                          # [b, n, E*S]
        u = torch.zeros_like(logits).uniform_(0, 1)
        logits = logits - torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20)) * noise_mult
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(-1), -torch.finfo(logits.dtype).max)
        slots = torch.matmul(logits.softmax(dim=1).transpose(1, 2), xn)
        return torch.matmul(logits.softmax(dim=-1), self.run_experts(slots))


# --- DynamicSlotsSoftMoE --------------------------------------------------------------------------------------
class DynamicSlotsSoftMoE(nn.Module):
    """soft-moe-pytorch's DynamicSlotsSoftMoE: about as many slots as tokens. x: [b, n, d], [b, d] or images
    [b, d, h, w]; mask: [b, n] bool -> same shape as x.

    The (RMS-normalised) tokens are padded with zeros to a multiple of num_experts; each group of num_experts
    consecutive tokens is averaged (a masked mean with a mask; padding is masked) and projected to one slot
    embedding per expert: phi [b, E * n/E, d], slot e*(n/E) + g from group g. A group with no real token gives
    masked slots. Then dispatch, experts and combine as in SoftMoE; the padded outputs are dropped.
    """

    def __init__(self, dim, *, num_experts=4, expert_mult=4, dropout=0.0, geglu=False, hidden_dim=None, device=None,
                 dtype=None):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.norm = RMSNorm(dim, **f)
        self.to_slot_embeds = nn.Linear(dim, dim * num_experts, bias=False, **f)
        self.slot_norm = RMSNorm(dim, **f)
        hidden = _expert_hidden(dim, expert_mult, geglu, hidden_dim)
        self.experts = Experts(dim, hidden, num_experts, activation="gelu", gated=geglu, bias=True, **f)
        self.dropout = nn.Dropout(dropout)
        self.dim, self.num_experts = dim, num_experts
        self.shared_logits_max = SHARED_LOGITS_MAX

    @classmethod
    def from_soft_moe_pytorch(cls, module: nn.Module) -> "DynamicSlotsSoftMoE":
        """A DynamicSlotsSoftMoE with the weights of a soft_moe_pytorch.DynamicSlotsSoftMoE (copied)."""
        proj, _, slot_norm = module.to_slot_embeds
        mlps = list(module.experts)
        new = cls(proj.in_features, num_experts=module.num_experts, **_soft_moe_pytorch_experts(mlps),
                  **_factory(module))
        with torch.no_grad():
            new.norm.gamma.copy_(module.norm.gamma)
            new.to_slot_embeds.weight.copy_(proj.weight)
            new.slot_norm.gamma.copy_(slot_norm.gamma)
        _copy_experts_(new.experts, mlps)
        return new.train(module.training)

    def slot_embeddings(self, xn: torch.Tensor, mask: torch.Tensor | None):
        """xn: [b, n, d] normalised tokens, n a multiple of E; mask: [b, n] or None -> (phi [b, E*(n/E), d],
        slot_mask [b, E*(n/E)] or None)."""
        b, n, d = xn.shape
        E, G = self.num_experts, n // self.num_experts
        groups = xn.view(b, G, E, d)
        if mask is None:
            means, slot_mask = groups.mean(2), None
        else:
            m = mask.view(b, G, E)
            count = m.sum(-1, keepdim=True).to(xn.dtype).clamp(min=1e-5)
            means = groups.masked_fill(~m.unsqueeze(-1), 0).sum(2) / count
            slot_mask = m.any(-1).repeat(1, E)                        # group g's slot of every expert
        phi = self.to_slot_embeds(means).view(b, G, E, d).transpose(1, 2)   # [b, E, G, d]
        return self.slot_norm(phi).reshape(b, E * G, d), slot_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, restore = _tokens(self, x, self.dim, mask)
        b, n, _ = tokens.shape
        xn = self.norm(tokens)
        pad = -n % self.num_experts
        if pad:
            xn = F.pad(xn, (0, 0, 0, pad))
            if mask is None:
                mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
            mask = F.pad(mask, (0, pad), value=False)
        phi, slot_mask = self.slot_embeddings(xn, mask)
        return restore(_mix(self, xn, phi, mask, slot_mask)[:, :n])

    def run_experts(self, slots: torch.Tensor) -> torch.Tensor:
        """slots: [B, E*G, D] -> [B, E*G, D], expert e on its G slots of every batch element."""
        return _run_experts(self.experts, self.dropout, slots, type(self).__name__)
