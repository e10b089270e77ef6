"""Two layers of a teaching notebook on Mixture-of-Experts ("Sparse-Gated Mixture of Experts in LSTM" after
Shazeer et al. 2017, and "Switch Transformers" after Fedus et al. 2021).

- `LSTMMoE`: an LSTM gating network (`gating_network` with `lstm`, batch_first, and `fc` to E scores, softmax)
  gives each time step a dense gate over linear experts (one nn.Linear each): out = sum_e gate_e * expert_e(x).
- `SwitchMoE`: top-1 routing by the argmax of a linear `gate`; a token's output is its chosen expert's output,
  NOT multiplied by the gate probability (the notebook's simplification), so the gate gets no gradient from
  the output. Experts: Linear -> ReLU -> Linear.

Both take x: [batch, seq, dim].
"""
import torch
from torch import nn


class LSTMGatingNetwork(nn.Module):
    """Softmax over E scores of an LSTM's hidden state at each step."""

    def __init__(self, input_dim, hidden_dim, num_experts):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, batch_first=True)
        self.fc = nn.Linear(hidden_dim, num_experts)

    def forward(self, x):
        hidden, _ = self.lstm(x)                 # [B, S, hidden_dim]
        return self.fc(hidden).softmax(dim=-1)   # [B, S, E]


class LSTMMoE(nn.Module):
    """LSTM-gated dense mixture of linear experts (the notebook's Shazeer et al. 2017 example)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_experts):
        super().__init__()
        self.gating_network = LSTMGatingNetwork(input_dim, hidden_dim, num_experts)
        self.experts = nn.ModuleList(nn.Linear(input_dim, output_dim) for _ in range(num_experts))

    def forward(self, x):
        gates = self.gating_network(x)                                     # [B, S, E]
        outs = torch.stack([expert(x) for expert in self.experts], dim=-1)  # [B, S, O, E]
        return (outs * gates.unsqueeze(-2)).sum(dim=-1)


class SwitchMoE(nn.Module):
    """Switch-style top-1 layer (the notebook's Fedus et al. 2021 example): argmax routing, the chosen expert's
    output unscaled, experts looped over with a boolean mask."""

    def __init__(self, input_dim, expert_hidden_dim, output_dim, num_experts):
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(input_dim, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(input_dim, expert_hidden_dim), nn.ReLU(), nn.Linear(expert_hidden_dim, output_dim))
            for _ in range(num_experts))

    def forward(self, x):
        batch, seq, dim = x.shape
        choice = self.gate(x).argmax(dim=-1).reshape(-1)   # [B*S]
        tokens = x.reshape(-1, dim)
        out = tokens.new_zeros(tokens.shape[0], self.experts[0][-1].out_features)
        for e, expert in enumerate(self.experts):
            mask = choice == e
            if mask.any():
                out[mask] = expert(tokens[mask])
        return out.view(batch, seq, -1)
