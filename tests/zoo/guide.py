"""Two layers of a widely copied MoE guide ("Mixture of Experts (MoE)": a simple and an advanced implementation).

- `MoELayer`: a dense softmax gate over MLP experts (`Expert`: Linear -> ReLU -> Linear held as `network`);
  every expert runs on every token.
- `AdvancedMoELayer`: an MLP router (Linear -> ReLU -> Linear), top-k of the softmax probabilities renormalised
  to sum to one, and a load-balancing term kept in `aux_loss`: sum_e p_e log(p_e + 1e-10) of the mean routing
  probabilities p (the negative entropy of the mean routing). As the guide writes it, it computes every expert
  on every token and then keeps the k chosen outputs, and its output starts as zeros_like(x), so the output
  width must equal the input width.

Both take x: [tokens, input_size].
"""
import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """The guide's expert: one hidden layer with ReLU, wrapped in `network`."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(input_size, hidden_size), nn.ReLU(),
                                     nn.Linear(hidden_size, output_size))

    def forward(self, x):
        return self.network(x)


class MoELayer(nn.Module):
    """Dense softmax-gated mixture of MLP experts (the MoE guide's simple implementation):
    out = sum_e softmax(router(x))_e * expert_e(x)."""

    def __init__(self, input_size, output_size, num_experts, hidden_size):
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(input_size, num_experts)
        self.experts = nn.ModuleList(Expert(input_size, hidden_size, output_size) for _ in range(num_experts))

    def forward(self, x):
        gates = F.softmax(self.router(x), dim=-1)                       # [T, E]
        every = torch.stack([expert(x) for expert in self.experts], 1)  # [T, E, O]
        return (every * gates[..., None]).sum(dim=1)


class AdvancedMoELayer(nn.Module):
    """Top-k layer with an MLP router and an entropy-style balance loss (the MoE guide's advanced
    implementation): all experts computed, the k most probable kept with renormalised weights."""

    def __init__(self, input_size, output_size, num_experts, hidden_size, k=2):
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.router = nn.Sequential(nn.Linear(input_size, hidden_size), nn.ReLU(),
                                    nn.Linear(hidden_size, num_experts))
        self.experts = nn.ModuleList(Expert(input_size, hidden_size, output_size) for _ in range(num_experts))
        self.aux_loss = 0.0

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)                       # [T, E]
        top_w, top_i = torch.topk(probs, self.k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        every = torch.stack([expert(x) for expert in self.experts], 1)  # [T, E, O]
        rows = torch.arange(x.shape[0], device=x.device)
        out = torch.zeros_like(x)
        for slot in range(self.k):
            out = out + top_w[:, slot, None] * every[rows, top_i[:, slot]]
        mean = probs.mean(dim=0)
        self.aux_loss = (mean * torch.log(mean + 1e-10)).sum()
        return out
