"""Whole MoE layers, router included, as people write them and as `moe_kernels.convert()` replaces them:
SparseMoE, DenseMoE and HybridMoE, forward and forward+backward.

    python -m benchmarks.bench_modules [--device cpu|cuda] [--quick | --full] [--only SUBSTRING]

Each case starts from a layer of the zoo (tests/zoo: MoE layers written as their sources write them, built with
random weights by zoo.STYLES); ours is `moe_kernels.convert()` of a copy of it (the same weights, stacked into our
layout) under `auto`, and the same converted module under the reference backend. The zoo layer itself is the peer:
- a MoE guide's AdvancedMoELayer: an MLP router, top-k of the softmax, renormalised; it runs every expert on every
  token and keeps the top k (-> SparseMoE);
- a notebook's SwitchMoE: top-1 by argmax, the chosen expert's output unscaled, a masked loop over experts
  (-> SparseMoE with scale_by_gate=False);
- a MoE guide's MoELayer: a dense softmax gate over all experts (-> DenseMoE: two dense GEMMs);
- a notebook's LSTMMoE: an LSTM (hidden width H) gives a dense softmax gate over linear experts, x [batch, seq,
  D] (-> DenseMoE with the LSTM as its router and LinearExperts: one GEMM over all experts);
- the hybrid-router layer: soft, sparse and memory routers mixed into dense weights over SiLU MLP experts of
  width D, plus modality fusion (-> HybridMoE, its experts as one dense mixture);
- GShard / DeepSpeed-MoE's top-2 layer with capacity (factor 1.25): one-hot dispatch into per-expert buffers and
  combine einsums over [T, E, C] (-> SparseMoE with the same capacity);
- Mixtral's block as mistral-src writes it: top-2 of a bias-free router, SwiGLU experts, a loop over experts
  with torch.where (-> SparseMoE, gated SiLU);
- a V-MoE-style layer: softmax router, top-2 not renormalised, GELU MLP experts with biases, gather and index_add
  per expert (-> SparseMoE, renormalize=False).
FLOP model: the useful FLOPs (router, and the k chosen experts per token; every expert for DenseMoE), so a
layer that computes more shows a lower rate.
"""
import copy

import torch
from torch import nn

import moe_kernels

from . import common, peers
from .common import Case, Pass, Provider, Work

FAMILY = "modules"
SHAPES = {  # (style, T, D, H, E, k)
    "cpu": {"quick": [("AdvancedMoELayer", 128, 64, 64, 8, 2), ("SwitchMoE", 128, 64, 64, 8, 1),
                      ("MoELayer", 128, 64, 64, 8, None), ("LSTMMoE", 128, 64, 64, 8, None),
                      ("HybridRouterMoE", 128, 64, 64, 8, 1), ("GShardMoE", 128, 64, 64, 8, 2),
                      ("MixtralMoeLayer", 128, 64, 64, 8, 2), ("SoftmaxTopKMoE", 128, 64, 64, 8, 2)],
            "default": [("AdvancedMoELayer", 2048, 256, 512, 8, 2), ("SwitchMoE", 2048, 256, 512, 8, 1),
                        ("MoELayer", 2048, 256, 256, 8, None), ("LSTMMoE", 2048, 256, 128, 16, None),
                        ("HybridRouterMoE", 2048, 256, 256, 8, 2), ("GShardMoE", 1024, 256, 512, 8, 2),
                        ("MixtralMoeLayer", 1024, 256, 512, 8, 2), ("SoftmaxTopKMoE", 1024, 256, 512, 8, 2)],
            "full": [("AdvancedMoELayer", 4096, 512, 1024, 16, 4), ("SwitchMoE", 8192, 512, 1024, 64, 1),
                     ("GShardMoE", 4096, 512, 1024, 16, 2), ("MixtralMoeLayer", 4096, 512, 1024, 8, 2)]},
    "cuda": {"quick": [("AdvancedMoELayer", 1024, 512, 1024, 8, 2), ("MoELayer", 1024, 512, 512, 8, None),
                       ("MixtralMoeLayer", 1024, 512, 1024, 8, 2)],
             "default": [("AdvancedMoELayer", 16384, 1024, 2048, 8, 2), ("SwitchMoE", 16384, 1024, 4096, 64, 1),
                         ("MoELayer", 16384, 1024, 1024, 8, None), ("GShardMoE", 16384, 1024, 2048, 8, 2),
                         ("MixtralMoeLayer", 16384, 1024, 2048, 8, 2), ("SoftmaxTopKMoE", 16384, 1024, 2048, 8, 2)],
             "full": []},
}
WHAT = {"AdvancedMoELayer": "SparseMoE, MLP router (MoE guide AdvancedMoELayer)",
        "SwitchMoE": "SparseMoE top-1 (notebook SwitchMoE)",
        "MoELayer": "DenseMoE, softmax gate (MoE guide MoELayer)",
        "LSTMMoE": "DenseMoE, LSTM gate, linear experts (notebook LSTMMoE)",
        "HybridRouterMoE": "HybridMoE, soft+sparse+memory routers (hybrid-router MoE)",
        "GShardMoE": "SparseMoE top-2, capacity 1.25 (GShard / DeepSpeed-MoE)",
        "MixtralMoeLayer": "SparseMoE, SwiGLU experts (Mixtral block, mistral-src)",
        "SoftmaxTopKMoE": "SparseMoE, GELU experts, not renormalised (V-MoE style)"}


def cases(device: str, size: str) -> list:
    shapes = SHAPES[device]["quick"] if size == "quick" else SHAPES[device]["default"] + (
        SHAPES[device]["full"] if size == "full" else [])
    out = []
    for style, T, D, H, E, k in shapes:
        label = f"{WHAT[style]} T{T}-D{D}-H{H}-E{E}" + (f"-k{k}" if k else "")
        if style == "HybridRouterMoE":
            label = f"{WHAT[style]} T{T}-D{D}-E{E}-k{k}"   # its experts are D wide: H is not a parameter
        out.append(Case(FAMILY, label, ("fwd", "fwd+bwd"),
                        lambda device, dtype, a=(style, T, D, H, E, k): build(device, dtype, *a), tokens=T))
    return out


class _WithFixed(nn.Module):
    """layer(x, *fixed): the hybrid layer's modality features as constants, so that the pass differentiates x."""

    def __init__(self, layer, fixed):
        super().__init__()
        self.layer, self.fixed = layer, fixed

    def forward(self, x):
        return self.layer(x, *self.fixed)


def _gemms(style, T, D, H, E, k, memory):
    """(M, N, K) of the useful GEMMs of one forward."""
    if style == "AdvancedMoELayer":
        return [(T, H, D), (T, E, H), *common.mlp_gemms(T * k, D, H, gated=False)]
    if style == "SwitchMoE":
        return [(T, E, D), *common.mlp_gemms(T, D, H, gated=False)]
    if style in ("GShardMoE", "SoftmaxTopKMoE", "MixtralMoeLayer"):
        return [(T, E, D), *common.mlp_gemms(T * k, D, H, gated=style == "MixtralMoeLayer")]
    if style == "LSTMMoE":   # the LSTM's input and recurrent GEMMs (4 gates), its gate, every linear expert
        return [(T, 4 * H, D), (T, 4 * H, H), (T, E, H), (T, E * D, D)]
    if style == "HybridRouterMoE":   # three routers, memory attention, every expert (D -> D -> D), fusion
        return [(T, 3 * E, D), (T, memory, D), (T, E, memory), (T, E * D, D), (T, D, E * D), (T, 5, D),
                (T, D, 5 * D)]
    return [(T, E, D), (T, E * H, D), (T, D, E * H)]   # MoELayer


def build(device, dtype, style, T, D, H, E, k):
    torch.manual_seed(0)
    s = peers.zoo().STYLES[style]
    peer = (s.make(D, H, E) if k is None else s.make(D, H, E, k)).to(device=device, dtype=dtype)
    ours = moe_kernels.convert(copy.deepcopy(peer), strict=True)
    x, *fixed = s.sample(D, T, dtype=dtype, device=device)
    grad = torch.randn(*x.shape[:-1], D, device=device, dtype=dtype)
    memory = getattr(peer, "memory_size", None)
    gemms = _gemms(style, T, D, H, E, k, memory)

    def pass_of(backward: bool) -> Pass:
        def provider(name, kind, module, backend=None):
            if fixed:
                module = _WithFixed(module, fixed)
            forward = module if backend is None else common.under(backend, module)
            fn = common.pass_fn(forward, (x,), tuple(module.parameters()), backward=backward, grad=grad)
            return Provider(name, fn, kind, dtype)

        op = "moe_mlp_fused" if s.sparse else "dense_moe"
        provs = [provider(name, "ours", ours, backend) for name, backend in common.ours_backends(op, device)]
        provs.append(provider("reference", "reference", ours, "reference"))
        provs.append(provider(f"zoo {style}", "peer", peer))
        return Pass(provs, Work(common.gemm_flops(gemms, backward), gemms))
    return pass_of


def main(argv=None):
    from .__main__ import main as run_suite
    run_suite(argv, families=(FAMILY,))


if __name__ == "__main__":
    main()
