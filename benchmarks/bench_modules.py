"""Whole MoE layers, router included, as the seed documents write them and as `moe_kernels.convert()` replaces
them: SparseMoE and DenseMoE, forward and forward+backward.

    python -m benchmarks.bench_modules [--device cpu|cuda] [--quick | --full] [--only SUBSTRING]

Each case starts from a seed reference layer (/work/shared/seeds/reference_layers.py); ours is
`moe_kernels.convert()` of a copy of it (the same weights, stacked into our layout) under `auto`, and the same
converted module under the reference backend. The seed layer itself is the peer:
- moe_guide's AdvancedMoELayer: an MLP router, top-k of the softmax, renormalised; it runs every expert on every
  token and keeps the top k (-> SparseMoE);
- the notebook's SwitchMoE: top-1 by argmax, the chosen expert's output unscaled, a masked loop over experts
  (-> SparseMoE with scale_by_gate=False);
- moe_guide's MoELayer: a dense softmax gate over all experts (-> DenseMoE: two dense GEMMs);
- the notebook's LSTMMoE: an LSTM (hidden width H) gives a dense softmax gate over linear experts, x [batch, seq,
  D] (-> DenseMoE with the LSTM as its router and LinearExperts: one GEMM over all experts);
- hybrid_router_moe.md's layer: soft, sparse and memory routers mixed into dense weights over SiLU MLP experts of
  width D, plus modality fusion (-> HybridMoE, its experts as one dense mixture).
Without the seeds, ours is built directly with the same settings and the peer is skipped (the LSTM and hybrid
cases need the seeds).
FLOP model: the useful FLOPs (router, and the k chosen experts per token; every expert for DenseMoE), so a
layer that computes more shows a lower rate.
"""
import copy

import torch
from torch import nn

import moe_kernels
from moe_kernels import DenseMoE, SparseMoE

from . import common, peers
from .common import Case, Pass, Provider, Work

FAMILY = "modules"
SHAPES = {  # (layer, T, D, H, E, k)
    "cpu": {"quick": [("AdvancedMoELayer", 128, 64, 64, 8, 2), ("SwitchMoE", 128, 64, 64, 8, 1),
                      ("MoELayer", 128, 64, 64, 8, None), ("LSTMMoE", 128, 64, 64, 8, None),
                      ("HybridRouterMoE", 128, 64, 64, 8, 1)],
            "default": [("AdvancedMoELayer", 2048, 256, 512, 8, 2), ("SwitchMoE", 2048, 256, 512, 8, 1),
                        ("MoELayer", 2048, 256, 256, 8, None), ("LSTMMoE", 2048, 256, 128, 16, None),
                        ("HybridRouterMoE", 2048, 256, 256, 8, 2)],
            "full": [("AdvancedMoELayer", 4096, 512, 1024, 16, 4), ("SwitchMoE", 8192, 512, 1024, 64, 1)]},
    "cuda": {"quick": [("AdvancedMoELayer", 1024, 512, 1024, 8, 2), ("MoELayer", 1024, 512, 512, 8, None)],
             "default": [("AdvancedMoELayer", 16384, 1024, 2048, 8, 2), ("SwitchMoE", 16384, 1024, 4096, 64, 1),
                         ("MoELayer", 16384, 1024, 1024, 8, None)],
             "full": []},
}
WHAT = {"AdvancedMoELayer": "SparseMoE, MLP router (moe_guide AdvancedMoELayer)",
        "SwitchMoE": "SparseMoE top-1 (notebook SwitchMoE)",
        "MoELayer": "DenseMoE, softmax gate (moe_guide MoELayer)",
        "LSTMMoE": "DenseMoE, LSTM gate, linear experts (notebook LSTMMoE)",
        "HybridRouterMoE": "HybridMoE, soft+sparse+memory routers (hybrid_router_moe)"}
SEEDS_ONLY = ("LSTMMoE", "HybridRouterMoE")   # built from the seed layer only
MEMORY = 64                                   # the hybrid layer's memory slots (its default)
SEQ = 256  # SwitchMoE and LSTMMoE take [batch, seq, dim]


def cases(device: str, size: str) -> list:
    shapes = SHAPES[device]["quick"] if size == "quick" else SHAPES[device]["default"] + (
        SHAPES[device]["full"] if size == "full" else [])
    out = []
    have_seeds = peers.seed_layers() is not None
    for layer, T, D, H, E, k in shapes:
        if layer in SEEDS_ONLY and not have_seeds:
            continue
        label = f"{WHAT[layer]} T{T}-D{D}-H{H}-E{E}" + (f"-k{k}" if k else "")
        if layer == "HybridRouterMoE":
            label = f"{WHAT[layer]} T{T}-D{D}-E{E}-k{k}"   # its experts are D wide: H is not a parameter
        out.append(Case(FAMILY, label, ("fwd", "fwd+bwd"),
                        lambda device, dtype, a=(layer, T, D, H, E, k): build(device, dtype, *a), tokens=T))
    return out


def _seed_and_ours(layer, D, H, E, k, device, dtype):
    """(the seed layer or None, ours with the same weights)."""
    seeds = peers.seed_layers()
    if seeds is not None:
        seed = {"AdvancedMoELayer": lambda: seeds.AdvancedMoELayer(D, D, E, H, k=k),
                "SwitchMoE": lambda: seeds.SwitchMoE(D, H, D, E),
                "MoELayer": lambda: seeds.MoELayer(D, D, E, H),
                "LSTMMoE": lambda: seeds.LSTMMoE(D, H, D, E),
                "HybridRouterMoE": lambda: seeds.HybridRouterMoE(D, E, k=k, memory_size=MEMORY),
                }[layer]().to(device=device, dtype=dtype)
        ours = moe_kernels.convert(copy.deepcopy(seed), strict=True)
        return seed, ours
    f = dict(device=device, dtype=dtype)
    relu_mlp = dict(activation="relu", gated=False, bias=True)
    if layer == "AdvancedMoELayer":
        router = nn.Sequential(nn.Linear(D, H, **f), nn.ReLU(), nn.Linear(H, E, **f))
        return None, SparseMoE(D, H, E, k, router=router, aux_loss_type="entropy", aux_loss_coef=1.0, **relu_mlp, **f)
    if layer == "SwitchMoE":
        return None, SparseMoE(D, H, E, 1, router_bias=True, scale_by_gate=False, aux_loss_type=None, **relu_mlp, **f)
    return None, DenseMoE(D, H, E, **relu_mlp, **f)


class _NoModalities(nn.Module):
    """The hybrid layers take forward(x, enc); with no modality features given, x stands in for each."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, {})


def build(device, dtype, layer, T, D, H, E, k):
    torch.manual_seed(0)
    seed, ours = _seed_and_ours(layer, D, H, E, k, device, dtype)
    seq = min(SEQ, T)
    shape = (T // seq, seq, D) if layer in ("SwitchMoE", "LSTMMoE") else (T, D)
    x = torch.randn(*shape, device=device, dtype=dtype)
    grad = torch.randn(*shape, device=device, dtype=dtype)
    if layer == "AdvancedMoELayer":
        gemms = [(T, H, D), (T, E, H), *common.mlp_gemms(T * k, D, H, gated=False)]
    elif layer == "SwitchMoE":
        gemms = [(T, E, D), *common.mlp_gemms(T, D, H, gated=False)]
    elif layer == "LSTMMoE":   # the LSTM's input and recurrent GEMMs (4 gates), its gate, every linear expert
        gemms = [(T, 4 * H, D), (T, 4 * H, H), (T, E, H), (T, E * D, D)]
    elif layer == "HybridRouterMoE":   # three routers, memory attention, every expert (D -> D -> D), fusion
        gemms = [(T, 3 * E, D), (T, MEMORY, D), (T, E, MEMORY), (T, E * D, D), (T, D, E * D), (T, 5, D),
                 (T, D, 5 * D)]
    else:
        gemms = [(T, E, D), (T, E * H, D), (T, D, E * H)]

    def pass_of(backward: bool) -> Pass:
        def provider(name, kind, module, backend=None):
            if layer == "HybridRouterMoE":
                module = _NoModalities(module)
            forward = module if backend is None else common.under(backend, module)
            fn = common.pass_fn(forward, (x,), tuple(module.parameters()), backward=backward, grad=grad)
            return Provider(name, fn, kind, dtype)

        op = "moe_mlp_fused" if layer in ("AdvancedMoELayer", "SwitchMoE") else "dense_moe"
        provs = [provider(name, "ours", ours, backend) for name, backend in common.ours_backends(op, device)]
        provs.append(provider("reference", "reference", ours, "reference"))
        if seed is not None:
            provs.append(provider(f"seed {layer}", "peer", seed))
        return Pass(provs, Work(common.gemm_flops(gemms, backward), gemms))
    return pass_of


def main(argv=None):
    from .__main__ import main as run_suite
    run_suite(argv, families=(FAMILY,))


if __name__ == "__main__":
    main()
