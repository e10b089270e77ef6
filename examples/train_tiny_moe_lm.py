"""Replace the MoE layer of a small language model with the fused one and train both: same loss curve, faster.

    python examples/train_tiny_moe_lm.py [--steps 300] [--out examples/tiny_moe_lm.png]

The model is a byte-level language model on this repository's own text: byte embeddings, a causal token-shift
mix, two residual blocks of (LayerNorm -> MoE layer) and a head. Its MoE layer is written the way the MoE
guides write it (`TopKMoE`: an MLP router, a ModuleList of experts, every expert run on every token, the top-k
kept, an entropy auxiliary loss). `moe_kernels.convert()` turns a copy of the model into one whose MoE layers
are `SparseMoE` modules holding the same weights and computing only the k chosen experts. Both models train
on the same batches with the same optimiser; the script prints both loss curves' agreement and the time per
step, and plots the two curves.
"""
import argparse
import copy
import os
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- the user's model ---------------------------------------------------------------------------------------------
class Expert(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.network(x)


class TopKMoE(nn.Module):
    """x: [T, D] -> [T, D]. Top-k of an MLP router's softmax, renormalised; all experts computed, k kept."""

    def __init__(self, dim, hidden, num_experts, k):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.router = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))
        self.experts = nn.ModuleList([Expert(dim, hidden) for _ in range(num_experts)])
        self.aux_loss = 0.0

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        top_w, top_i = torch.topk(probs, self.k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        outs = torch.stack([expert(x) for expert in self.experts], dim=1)       # [T, E, D]
        out = torch.zeros_like(x)
        for j in range(self.k):
            out += top_w[:, j:j + 1] * outs[torch.arange(len(x)), top_i[:, j]]
        mean_p = probs.mean(dim=0)
        self.aux_loss = torch.sum(mean_p * torch.log(mean_p + 1e-10))
        return out


class TinyMoELM(nn.Module):
    """ids: [B, S] bytes -> logits [B, S, 256]."""

    def __init__(self, dim=64, hidden=128, num_experts=16, k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.shift = nn.Linear(2 * dim, dim)                 # mixes each position with the one before it
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        self.moes = nn.ModuleList([TopKMoE(dim, hidden, num_experts, k) for _ in range(layers)])
        self.head = nn.Linear(dim, 256)

    def forward(self, ids):
        h = self.embed(ids)
        prev = F.pad(h, (0, 0, 1, 0))[:, :-1]
        h = h + self.shift(torch.cat([h, prev], -1))
        B, S, D = h.shape
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h).reshape(B * S, D)).view(B, S, D)
        return self.head(h)

    def aux_loss(self):
        return sum(m.aux_loss for m in self.moes)


# --- training -----------------------------------------------------------------------------------------------------
def corpus() -> torch.Tensor:
    """The bytes of this repository's Python and Markdown files."""
    files = sorted(p for ext in ("*.py", "*.md") for p in ROOT.rglob(ext) if ".venv" not in p.parts)
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data, steps, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(model, data, steps, batch, seq, aux_coef=0.01, seed=0):
    """-> (losses per step, seconds per step after the first 5)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, times = [], []
    for ids, target in batches(data, steps, batch, seq, seed):
        t0 = time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1))
        (loss + aux_coef * model.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if len(losses) % 100 == 0:
            print(f"  step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    return losses, sum(times[5:]) / max(len(times) - 5, 1)


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, losses), style in zip(curves.items(), ("-", "--")):
        ax.plot(losses, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("tiny byte-level MoE LM: the user's layer vs moe_kernels.convert()")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_moe_lm.png"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    data = corpus()
    reference = TinyMoELM()
    fused = moe_kernels.convert(copy.deepcopy(reference), strict=True)
    assert not any(isinstance(m, TopKMoE) for m in fused.modules())
    print("reference layer:", flush=True)
    ref_losses, ref_step = train(reference, data, a.steps, a.batch, a.seq)
    print("converted (moe_kernels):", flush=True)
    fused_losses, fused_step = train(fused, data, a.steps, a.batch, a.seq)
    gap = max(abs(r - f) for r, f in zip(ref_losses, fused_losses))
    print(f"{a.steps} steps of {a.batch}x{a.seq} bytes, 2 MoE layers of 16 experts (top-2), {len(data)} bytes of text")
    print(f"loss: first {ref_losses[0]:.4f} (reference) {fused_losses[0]:.4f} (fused); "
          f"last {ref_losses[-1]:.4f} / {fused_losses[-1]:.4f}; largest gap {gap:.2e}")
    print(f"time per step: reference {ref_step * 1e3:.1f} ms, fused {fused_step * 1e3:.1f} ms "
          f"({ref_step / fused_step:.2f}x)")
    plot({"reference layer (all experts, keep k)": ref_losses, "moe_kernels.convert() (k experts)": fused_losses},
         a.out)
    print(f"plot: {a.out}")
    return ref_losses, fused_losses, ref_step, fused_step


if __name__ == "__main__":
    main()
