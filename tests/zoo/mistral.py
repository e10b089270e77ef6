"""A Mixtral-style sparse MoE block written by hand, as in Mistral AI's reference implementation (mistral-src,
`moe.py`): a router `gate` = Linear(D, E, bias=False), the top-k logits (k = args.num_experts_per_tok) turned into
weights by a softmax over those k (the top-k of the softmax, renormalised), and SwiGLU experts
w2(silu(w1 x) * w3 x) with no biases (`FeedForward`). Each expert runs on the tokens that chose it.

The softmax runs in float32 at least (float64 stays float64). x: [tokens, D].
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


class FeedForward(nn.Module):
    """The SwiGLU feed-forward of Mistral / Llama: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    """Mixtral's sparse MoE block as mistral-src writes it: top-k routing, softmax over the k logits."""

    def __init__(self, experts, gate, moe_args):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = moe_args

    def forward(self, inputs):
        logits = self.gate(inputs)
        weights, chosen = torch.topk(logits, self.args.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.promote_types(weights.dtype, torch.float32)).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            rows, nth = torch.where(chosen == i)
            results[rows] += weights[rows, nth, None] * expert(inputs[rows])
        return results


def mixtral_block(dim, hidden_dim, num_experts, top_k=2):
    """A MoeLayer of `num_experts` FeedForward experts and a bias-free router, built as mistral-src builds it."""
    return MoeLayer([FeedForward(dim, hidden_dim) for _ in range(num_experts)],
                    nn.Linear(dim, num_experts, bias=False), MoeArgs(num_experts, top_k))
