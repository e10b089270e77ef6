"""A top-k softmax-router layer over ViT MLP experts (Linear(D, H) -> GELU -> Linear(H, D), with biases), as in
V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts"): softmax over all E experts, the k
largest kept and NOT renormalised. `norm_topk_prob=True` renormalises the k weights to sum to one, the flag
transformers' OLMoE and Qwen-MoE blocks carry under that name. Each expert runs on the tokens that chose it
(gather, expert, weighted index_add).

Not kept from V-MoE: its training-time router noise, batch-prioritised routing and capacity. x: [..., D].
"""
import torch
from torch import nn


class SoftmaxTopKMoE(nn.Module):
    """Token-choice top-k MoE with a softmax router and GELU MLP experts (V-MoE style)."""

    def __init__(self, dim, hidden_dim, num_experts, top_k=2, norm_topk_prob=False, router_bias=False):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.router = nn.Linear(dim, num_experts, bias=router_bias)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden_dim, bias=True), nn.GELU(), nn.Linear(hidden_dim, dim, bias=True))
            for _ in range(num_experts))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        probs = self.router(tokens).softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = tokens.new_zeros(tokens.shape[0], self.experts[0][-1].out_features)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out = out.index_add(0, rows, weights[rows, slot, None] * expert(tokens[rows]))
        return out.reshape(*x.shape[:-1], out.shape[-1])
