"""A hybrid-router MoE layer for audio features, as posted in a small "moe" repository (class
`MoEmoneyMoEproblems` there; `HybridRouterMoE` here).

Three routers are mixed into one dense weight per expert:
- soft: softmax of `soft_router` (Linear(D, E) then Softmax);
- sparse: the softmax over the top-k logits of `sparse_router` (Linear(D, E)), zero for the other experts;
- memory: attention of x over `m_key` [M, D] (scaled by 1/sqrt(D), softmax), applied to `m_val` [M, E], softmax.
weights = (alpha_moe * sparse + (1 - alpha_moe) * soft + memory) / 2, and moe = sum_e weights_e * expert_e(x)
with every expert (Linear(D, D) -> SiLU -> Linear(D, D)) run on every token. A gated fusion of five modality
features (each `enc.get(name, x)`, scaled by its own sigmoid gate of x) is projected back to D, and
out = alpha_fusion * fused + (1 - alpha_fusion) * moe. alpha_moe and alpha_fusion are buffers (0.5).

Kept as posted: `direct_gate` and `threshold` exist but the forward does not use them; the original defines
`reset_parameters` twice and the second (a no-op) wins, so the weights keep PyTorch's default initialisation
(m_key and m_val are standard normal). x is [tokens, D].
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("spectrogram", "waveform", "pitch", "envelope", "phase")


class HybridRouterMoE(nn.Module):
    """Soft + sparse + memory routers mixed into dense expert weights, with modality fusion gates."""

    def __init__(self, dims, num_experts=5, num_modalities=5, k=1, memory_size=64, threshold=0.8):
        super().__init__()
        self.dims, self.num_experts, self.num_modalities = dims, num_experts, num_modalities
        self.k, self.memory_size, self.threshold = k, memory_size, threshold
        self.soft_router = nn.Sequential(nn.Linear(dims, num_experts), nn.Softmax(dim=-1))
        self.sparse_router = nn.Linear(dims, num_experts)
        self.m_key = nn.Parameter(torch.randn(memory_size, dims))
        self.m_val = nn.Parameter(torch.randn(memory_size, num_experts))
        self.direct_gate = nn.Sequential(nn.Linear(dims, num_experts), nn.Sigmoid())
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dims, dims), nn.SiLU(), nn.Linear(dims, dims))
                                     for _ in range(num_experts))
        self.fusion_gates = nn.ModuleList(nn.Sequential(nn.Linear(dims, 1), nn.Sigmoid())
                                          for _ in range(num_modalities))
        self.fusion_projection = nn.Linear(dims * num_modalities, dims)
        self.register_buffer("alpha_moe", torch.tensor(0.5))
        self.register_buffer("alpha_fusion", torch.tensor(0.5))

    def forward(self, x, enc):
        soft = self.soft_router(x)
        logits = self.sparse_router(x)
        top_logits, top_idx = logits.topk(self.k, dim=-1)
        sparse = torch.zeros_like(logits).scatter(-1, top_idx, F.softmax(top_logits, dim=-1))
        attention = F.softmax(x @ self.m_key.t() / math.sqrt(self.dims), dim=-1)   # [T, M]
        memory = F.softmax(attention @ self.m_val, dim=-1)                          # [T, E]
        weights = (self.alpha_moe * sparse + (1 - self.alpha_moe) * soft + memory) / 2
        every = torch.stack([expert(x) for expert in self.experts], dim=-1)         # [T, D, E]
        moe = (every * weights.unsqueeze(1)).sum(dim=-1)
        features = [enc.get(name, x) for name in MODALITIES]
        fused = self.fusion_projection(torch.cat([gate(x) * f for gate, f in zip(self.fusion_gates, features)], -1))
        return self.alpha_fusion * fused + (1 - self.alpha_fusion) * moe
