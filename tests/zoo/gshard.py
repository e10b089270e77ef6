"""A GShard top-2 MoE layer with expert capacity, written the way DeepSpeed-MoE and fairseq write it (a
`gate` module holding the router `wg`, one-hot dispatch and combine tensors [tokens, E, capacity], einsums).

Routing (Lepikhin et al. 2020, "GShard", Algorithm 1): gates = softmax(wg(x)) over E experts; each token's first
choice is its argmax, its second the argmax of the others; the two gates are renormalised to sum to one. Each
expert takes at most C = max(ceil(capacity_factor * 2 * tokens / E), min_capacity) (token, choice) pairs: all first
choices in token order, then the second choices; the pairs beyond C are dropped (a token with both dropped gives
zeros). The balance loss, `l_aux` = E * sum_e mean_t(gates_te) * (first choices of e / tokens), is DeepSpeed's
(E^2 times the mean over experts).

Variants this layer does not have: DeepSpeed's default renormalises the two gates after the capacity drop (a
token whose second choice was dropped then weighs its first by 1; fairseq's normalize_gate_prob_before_dropping=True
and GShard's Algorithm 1 normalise before, as here), and samples the second expert with Gumbel noise
(top2_2nd_expert_sampling) where GShard dispatches it with probability 2 * its gate; both are random or dropped
here. x: [..., D].
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Top2Gate(nn.Module):
    """GShard's top-2 gate with capacity (DeepSpeed-MoE's TopKGate for k=2, without noise):
    forward(x [S, D]) -> (l_aux, combine_weights [S, E, C], dispatch_mask [S, E, C])."""

    def __init__(self, model_dim, num_experts, capacity_factor=1.0, min_capacity=4):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.k = 2
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity

    def capacity(self, num_tokens, num_experts):
        return max(math.ceil(self.capacity_factor * num_tokens * self.k / num_experts), self.min_capacity)

    def forward(self, x):
        logits = self.wg(x)
        gates = F.softmax(logits, dim=1)
        S, E = gates.shape
        C = self.capacity(S, E)
        mask1 = F.one_hot(gates.argmax(dim=1), E)
        mask2 = F.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1), E)
        # slot of each pair in its expert's buffer: every first choice, then every second choice
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
        me = gates.mean(dim=0)
        ce = mask1.to(gates.dtype).mean(dim=0)
        l_aux = torch.mean(me * ce) * E * E
        g1 = (gates * mask1).sum(dim=1)
        g2 = (gates * mask2).sum(dim=1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        mask1 = mask1 * (loc1 < C)
        mask2 = mask2 * (loc2 < C)
        slot1 = F.one_hot((loc1 * mask1).sum(dim=1), C).to(gates.dtype)   # [S, C]
        slot2 = F.one_hot((loc2 * mask2).sum(dim=1), C).to(gates.dtype)
        combine = (torch.einsum("se,sc->sec", g1[:, None] * mask1, slot1)
                   + torch.einsum("se,sc->sec", g2[:, None] * mask2, slot2))
        return l_aux, combine, combine.bool()


class GShardMoE(nn.Module):
    """GShard / DeepSpeed-MoE top-2 layer with capacity: dispatch into per-expert buffers of C slots, run each
    expert (Linear -> activation -> Linear) on its buffer, combine with the gate weights."""

    def __init__(self, model_dim, hidden_dim, num_experts, capacity_factor=1.0, min_capacity=4, activation=nn.ReLU):
        super().__init__()
        self.gate = Top2Gate(model_dim, num_experts, capacity_factor, min_capacity)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(model_dim, hidden_dim), activation(), nn.Linear(hidden_dim, model_dim))
            for _ in range(num_experts))
        self.l_aux = None

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        self.l_aux, combine, dispatch = self.gate(tokens)
        buffers = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), tokens)           # [E, C, D]
        outs = torch.stack([expert(buffers[e]) for e, expert in enumerate(self.experts)])  # [E, C, D]
        out = torch.einsum("sec,ecm->sm", combine.to(x.dtype), outs)
        return out.reshape(*x.shape[:-1], out.shape[-1])
