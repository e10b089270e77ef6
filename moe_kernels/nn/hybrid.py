"""HybridMoE: the hybrid-router layer (soft + sparse + memory routers mixed into dense
expert weights, then a gated fusion of modality features), with its experts run as one dense mixture."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .experts import Experts

MODALITIES = ("spectrogram", "waveform", "pitch", "envelope", "phase")


class HybridMoE(nn.Module):
    """forward(x [..., D], enc: {modality name: features [..., D]}) -> [..., D].

    Expert weights [.., E] = (alpha_moe * sparse + (1 - alpha_moe) * soft + memory) / 2, where soft = softmax of
    soft_router's Linear, sparse = the softmax over the top-k logits of sparse_router (zero elsewhere), memory =
    softmax of the attention (over memory_size keys m_key [M, D], scaled by 1/sqrt(D)) applied to m_val [M, E].
    moe = sum_e weight_e * expert_e(x) with SiLU MLP experts Linear(D, D) -> SiLU -> Linear(D, D), computed as two
    dense GEMMs over all experts (Experts, gate_up_proj [E, D, D], down_proj [E, D, D], biases).
    fused = fusion_projection(concat_i sigmoid(fusion_gates[i](x)) * enc.get(modality_i, x)).
    out = alpha_fusion * fused + (1 - alpha_fusion) * moe. alpha_moe and alpha_fusion are buffers (0.5).
    direct_gate and threshold are kept as the source layer defines them; its forward does not use them.
    """

    def __init__(self, dims, num_experts=5, k=1, memory_size=64, threshold=0.8, *, modalities=MODALITIES,
                 activation="silu", device=None, dtype=None):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.dims, self.num_experts, self.k = dims, num_experts, k
        self.memory_size, self.threshold = memory_size, threshold
        self.modalities = tuple(modalities)
        self.num_modalities = len(self.modalities)
        self.soft_router = nn.Sequential(nn.Linear(dims, num_experts, **f), nn.Softmax(dim=-1))
        self.sparse_router = nn.Linear(dims, num_experts, **f)
        self.m_key = nn.Parameter(torch.randn(memory_size, dims, **f))
        self.m_val = nn.Parameter(torch.randn(memory_size, num_experts, **f))
        self.direct_gate = nn.Sequential(nn.Linear(dims, num_experts, **f), nn.Sigmoid())
        self.experts = Experts(dims, dims, num_experts, activation=activation, gated=False, bias=True, **f)
        self.fusion_gates = nn.ModuleList([nn.Sequential(nn.Linear(dims, 1, **f), nn.Sigmoid())
                                           for _ in self.modalities])
        self.fusion_projection = nn.Linear(dims * self.num_modalities, dims, **f)
        self.register_buffer("alpha_moe", torch.tensor(0.5, **f))
        self.register_buffer("alpha_fusion", torch.tensor(0.5, **f))

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> the dense expert weights [..., E] of the three routers."""
        soft = self.soft_router(x)
        logits = self.sparse_router(x)
        top_logits, top_idx = torch.topk(logits, self.k, dim=-1)
        sparse = torch.zeros_like(logits).scatter(-1, top_idx, F.softmax(top_logits, dim=-1))
        attention = F.softmax(torch.matmul(x, self.m_key.transpose(0, 1)) / math.sqrt(self.dims), dim=-1)
        memory = F.softmax(torch.matmul(attention, self.m_val), dim=-1)
        mixed = self.alpha_moe * sparse + (1 - self.alpha_moe) * soft
        return (mixed + memory) / 2

    def forward(self, x: torch.Tensor, enc: dict) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dims:
            raise ValueError(f"x must be [..., D] with D = {self.dims}, got {tuple(x.shape)}")
        weights = self.expert_weights(x).reshape(-1, self.num_experts)
        moe = self.experts.mix(x.reshape(-1, self.dims), weights).view(x.shape)
        features = [enc.get(name, x) for name in self.modalities]
        scaled = [gate(x) * feat for gate, feat in zip(self.fusion_gates, features)]
        fused = self.fusion_projection(torch.cat(scaled, dim=-1))
        return self.alpha_fusion * fused + (1 - self.alpha_fusion) * moe

    def extra_repr(self):
        return f"k={self.k}, modalities={self.modalities}"
