"""A zoo of Mixture-of-Experts layers as people write them, for the tests of `moe_kernels.convert()` and for the
module benchmarks (benchmarks/bench_modules.py), where each layer is the peer its converted copy is timed against.

Each style lives in its own module, written as its source writes it (module and class docstrings say which
style and where it comes from):

    guide      MoELayer (dense softmax gate, MLP experts), AdvancedMoELayer (MLP router, top-k, entropy loss)
    notebook   LSTMMoE (LSTM gate, linear experts), SwitchMoE (top-1 argmax, unscaled)
    hybrid     HybridRouterMoE (soft + sparse + memory routers, modality fusion)
    gshard     GShardMoE (GShard / DeepSpeed-MoE top-2 with capacity)
    mistral    MoeLayer (Mixtral's block as mistral-src writes it: SwiGLU experts w1/w2/w3)
    vmoe       SoftmaxTopKMoE (V-MoE style: softmax router, top-k, GELU MLP experts with biases)

STYLES maps a style name to a `Style`: the layer class, which style it is and where it comes from, what
convert() turns it into, `make(dim, hidden, num_experts, top_k, **options)` (random weights: each layer's own
default initialisation) and `sample(dim, tokens, seq=..., dtype=..., device=...)` (the forward's inputs for
`tokens` tokens). ZOO maps a test id to a `ZooEntry`: one layer of one style at a small size, built by `build()`
(float32), with inputs from `inputs()` (float32, CPU).
"""
import dataclasses
from typing import Callable

import torch
from torch import nn

from moe_kernels import DenseMoE, SparseMoE
from moe_kernels.convert import GShardSparseMoE
from moe_kernels.nn import HybridMoE

from .guide import AdvancedMoELayer, Expert, MoELayer
from .gshard import GShardMoE, Top2Gate
from .hybrid import MODALITIES, HybridRouterMoE
from .mistral import FeedForward, MoeArgs, MoeLayer, mixtral_block
from .notebook import LSTMGatingNetwork, LSTMMoE, SwitchMoE
from .vmoe import SoftmaxTopKMoE

SEQ = 256   # the sequence length of the styles that take [batch, seq, dim]


def _tokens(dim, tokens, seq=None, **like):
    """x [tokens, dim]."""
    return (torch.randn(tokens, dim, **like),)


def _sequences(dim, tokens, seq=SEQ, **like):
    """x [tokens // seq, seq, dim] (seq shortened to `tokens` when there are fewer)."""
    seq = min(seq, tokens)
    return (torch.randn(tokens // seq, seq, dim, **like),)


def _hybrid_inputs(dim, tokens, seq=None, **like):
    """x [tokens, dim] and the features of two of the five modalities (x stands in for the other three)."""
    return torch.randn(tokens, dim, **like), {name: torch.randn(tokens, dim, **like) for name in ("pitch", "phase")}


def _hybrid(dim, hidden, num_experts, top_k, memory_size=64):
    """hidden is not a parameter of this layer (its experts are dim wide). The mixing buffers alpha_moe and
    alpha_fusion are drawn from U(0.1, 0.9) instead of 0.5, so that an exchange of the two would show."""
    layer = HybridRouterMoE(dim, num_experts, len(MODALITIES), top_k, memory_size)
    layer.alpha_moe.uniform_(0.1, 0.9)
    layer.alpha_fusion.uniform_(0.1, 0.9)
    return layer


@dataclasses.dataclass(frozen=True)
class Style:
    layer: type                          # the layer's class
    source: str                          # which style, and where it comes from
    converts_to: type                    # what moe_kernels.convert() makes of it
    make: Callable[..., nn.Module]       # (dim, hidden, num_experts, top_k, **options) -> a layer, random weights
    sample: Callable[..., tuple]         # (dim, tokens, seq=..., dtype=..., device=...) -> the forward's inputs
    sparse: bool = True                  # each token runs only its chosen experts (after conversion)


STYLES = {
    "MoELayer": Style(MoELayer, "dense softmax gate over MLP experts (MoE guide, simple implementation)", DenseMoE,
                      lambda D, H, E, k=None, out=None: MoELayer(D, out or D, E, H), _tokens, sparse=False),
    "AdvancedMoELayer": Style(AdvancedMoELayer, "MLP router, top-k renormalised, entropy balance loss, every expert "
                              "computed (MoE guide, advanced implementation)", SparseMoE,
                              lambda D, H, E, k: AdvancedMoELayer(D, D, E, H, k=k), _tokens),
    "SwitchMoE": Style(SwitchMoE, "Switch-style top-1 by argmax, output unscaled (Switch Transformer notebook)",
                       SparseMoE, lambda D, H, E, k=1, out=None: SwitchMoE(D, H, out or D, E), _sequences),
    "LSTMMoE": Style(LSTMMoE, "LSTM gate over linear experts, dense (Shazeer et al. 2017 notebook)", DenseMoE,
                     lambda D, H, E, k=None, out=None: LSTMMoE(D, H, out or D, E), _sequences, sparse=False),
    "HybridRouterMoE": Style(HybridRouterMoE, "soft + sparse + memory routers, modality fusion gates (hybrid-router "
                             "MoE)", HybridMoE, _hybrid, _hybrid_inputs, sparse=False),
    "GShardMoE": Style(GShardMoE, "top-2 with capacity, first choices first (GShard / DeepSpeed-MoE)",
                       GShardSparseMoE,
                       lambda D, H, E, k=2, capacity_factor=1.25, min_capacity=4, activation=nn.ReLU:
                       GShardMoE(D, H, E, capacity_factor, min_capacity, activation), _tokens),
    "MixtralMoeLayer": Style(MoeLayer, "Mixtral block by hand: bias-free router, softmax of the top-k logits, "
                             "SwiGLU experts w1/w2/w3 (mistral-src)", SparseMoE,
                             lambda D, H, E, k=2: mixtral_block(D, H, E, k), _tokens),
    "SoftmaxTopKMoE": Style(SoftmaxTopKMoE, "softmax router, top-k, GELU MLP experts with biases (V-MoE)",
                            SparseMoE, lambda D, H, E, k=2, norm_topk_prob=False:
                            SoftmaxTopKMoE(D, H, E, k, norm_topk_prob), _tokens),
}


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    style: str                           # a key of STYLES
    build: Callable[[], nn.Module]       # the layer, random weights, float32
    inputs: Callable[[], tuple]          # its forward's inputs, float32

    @property
    def converts_to(self) -> type:
        return STYLES[self.style].converts_to


def _entry(style, D, H, E, k=None, *, tokens, seq=SEQ, **options):
    s = STYLES[style]
    args = (D, H, E) if k is None else (D, H, E, k)
    return ZooEntry(style, lambda: s.make(*args, **options), lambda: s.sample(D, tokens, seq=seq))


# test id -> one layer at a small size (the ids name what differs between the entries of a style)
ZOO = {
    "MoELayer-D8-O5-E4-H12": _entry("MoELayer", 8, 12, 4, out=5, tokens=13),   # output width 5 != input width 8
    "MoELayer-E1": _entry("MoELayer", 6, 10, 1, tokens=7),
    "AdvancedMoELayer-E5-k2": _entry("AdvancedMoELayer", 8, 12, 5, 2, tokens=17),
    "AdvancedMoELayer-k=E=3": _entry("AdvancedMoELayer", 6, 10, 3, 3, tokens=9),   # every expert, renormalised
    "SwitchMoE-D8-O6-E4": _entry("SwitchMoE", 8, 12, 4, out=6, tokens=15, seq=5),
    "SwitchMoE-E7": _entry("SwitchMoE", 8, 10, 7, tokens=18, seq=9),
    "LSTMMoE-D8-O5-E4": _entry("LSTMMoE", 8, 7, 4, out=5, tokens=18, seq=6),
    "HybridRouterMoE-E5-k2": _entry("HybridRouterMoE", 8, None, 5, 2, memory_size=16, tokens=11),
    "HybridRouterMoE-E3-k1": _entry("HybridRouterMoE", 6, None, 3, 1, memory_size=9, tokens=5),
    # C = ceil(0.5 * 24 * 2 / 4) = 6 of the 12 pairs an expert gets on average: many pairs dropped
    "GShardMoE-E4-cf0.5-drops": _entry("GShardMoE", 8, 12, 4, capacity_factor=0.5, min_capacity=2, tokens=24),
    # C = max(ceil(0.25 * 10 * 2 / 5), 3) = 3: min_capacity binds; GELU experts
    "GShardMoE-E5-min_capacity-gelu": _entry("GShardMoE", 8, 10, 5, capacity_factor=0.25, min_capacity=3,
                                             activation=nn.GELU, tokens=10),
    # C = ceil(4 * 9 * 2 / 3) = 24, more than any expert can get: nothing dropped
    "GShardMoE-E3-cf4-no-drop": _entry("GShardMoE", 6, 8, 3, capacity_factor=4.0, min_capacity=0, tokens=9),
    "MixtralMoeLayer-E8-k2": _entry("MixtralMoeLayer", 8, 14, 8, 2, tokens=19),
    "MixtralMoeLayer-E4-k1": _entry("MixtralMoeLayer", 6, 9, 4, 1, tokens=7),
    "SoftmaxTopKMoE-E6-k2": _entry("SoftmaxTopKMoE", 8, 12, 6, 2, tokens=16),   # V-MoE: not renormalised
    "SoftmaxTopKMoE-E5-k3-norm": _entry("SoftmaxTopKMoE", 8, 10, 5, 3, norm_topk_prob=True, tokens=12),
}

# the classes convert() replaces (none of them may be left in a converted model); LSTMGatingNetwork is not one:
# the converted LSTMMoE keeps it as its router
LAYER_TYPES = (MoELayer, Expert, AdvancedMoELayer, SwitchMoE, LSTMMoE, HybridRouterMoE, GShardMoE, Top2Gate,
               MoeLayer, FeedForward, SoftmaxTopKMoE)

__all__ = ["AdvancedMoELayer", "Expert", "FeedForward", "GShardMoE", "HybridRouterMoE", "LAYER_TYPES",
           "LSTMGatingNetwork", "LSTMMoE", "MODALITIES", "MoELayer", "MoeArgs", "MoeLayer", "SEQ", "STYLES",
           "SoftmaxTopKMoE", "Style", "SwitchMoE", "Top2Gate", "ZOO", "ZooEntry", "mixtral_block"]
