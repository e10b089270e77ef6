"""SoftMoE (Puigcerver et al. 2023) with soft-moe-pytorch's argument names and math by default."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .experts import Experts


class RMSNorm(nn.Module):
    """soft-moe-pytorch's norm: l2-normalise, times sqrt(D) and a learned gain."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class SoftMoE(nn.Module):
    """x: [b, n, d], [b, d] or images [b, d, h, w]; mask: [b, n] bool -> same shape as x.

    Every slot is a softmax-over-tokens mix of the (normalised) tokens; each expert processes its num_slots
    slots; every token is a softmax-over-all-slots mix of the expert outputs. Experts are GELU MLPs of width
    dim * expert_mult (GEGLU of width int(dim * expert_mult * 2 / 3) with geglu=True) run as one batched
    grouped GEMM. normalize="rms": soft-moe-pytorch's RMS-normalised tokens and slot embeddings;
    normalize="l2": the paper's l2-normalised logits with a learned scale.
    """

    def __init__(self, dim, *, seq_len=None, num_slots=None, num_experts=4, expert_mult=4, dropout=0.0, geglu=False,
                 normalize="rms", device=None, dtype=None):
        super().__init__()
        if (seq_len is None) == (num_slots is None):
            raise ValueError(f"pass exactly one of seq_len and num_slots, got seq_len={seq_len}, num_slots={num_slots}")
        if num_slots is None:
            num_slots = seq_len // num_experts
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1 (seq_len // num_experts), got {num_slots}")
        if normalize not in ("rms", "l2"):
            raise ValueError(f"normalize must be 'rms' or 'l2', got {normalize!r}")
        f = dict(device=device, dtype=dtype)
        hidden = int(dim * expert_mult * 2 / 3) if geglu else int(dim * expert_mult)
        self.experts = Experts(dim, hidden, num_experts, activation="gelu", gated=geglu, bias=True, **f)
        self.slot_embeds = nn.Parameter(torch.randn(num_experts, num_slots, dim, **f))
        self.normalize = normalize
        if normalize == "rms":
            self.norm, self.slot_norm = RMSNorm(dim, **f), RMSNorm(dim, **f)
        else:
            self.logit_scale = nn.Parameter(torch.ones((), **f))
        self.dropout = nn.Dropout(dropout)
        self.dim, self.num_experts, self.num_slots = dim, num_experts, num_slots

    def _normed(self, x):
        slots = self.slot_embeds.reshape(-1, self.dim)
        if self.normalize == "rms":
            return self.norm(x), self.slot_norm(slots)
        return F.normalize(x, dim=-1), self.logit_scale * F.normalize(slots, dim=-1)

    def run_experts(self, slots: torch.Tensor) -> torch.Tensor:
        """slots: [B, E*S, D] -> [B, E*S, D], expert e on its S slots of every batch element."""
        B, E, S, D = slots.shape[0], self.num_experts, self.num_slots, self.dim
        rows = slots.view(B, E, S, D).transpose(0, 1).reshape(E * B * S, D)
        offsets = torch.arange(E + 1, device=slots.device, dtype=torch.int32) * (B * S)
        ex = self.experts
        h = ops.grouped_mm(rows, ex.gate_up_proj, offsets, ex.gate_up_bias, activation="gelu", gated=ex.gated)
        y = ops.grouped_mm(self.dropout(h), ex.down_proj, offsets, ex.down_bias)
        return y.view(E, B, S, D).transpose(0, 1).reshape(B, E * S, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)          # [b, d, h, w] -> [b, h*w, d]
        elif x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [b, n, d], [b, d] or [b, d, h, w] with d = {self.dim}, got {tuple(shape)}")
        xn, phi = self._normed(x)
        slots = ops.soft_dispatch(xn, phi, mask)
        out = ops.soft_combine(xn, phi, self.run_experts(slots), mask)
        if len(shape) == 4:
            return out.transpose(1, 2).reshape(shape)
        return out.view(shape)
