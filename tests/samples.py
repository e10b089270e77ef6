"""Sample inputs for every op of the public API, shared by the property tests and the opcheck sweep.

A program is a short use of the public API (`moe_kernels.ops`) with its inputs: `make(p, gen)` builds float64
leaves and integer tensors from a parameter dict `p` (what the property tests draw), and `run(**inputs)` returns
the differentiable outputs and the exact (integer) outputs. Running a program under a backend, in any dtype,
and recording the custom-op calls it makes (`record_op_calls`) gives each `torch.ops.moe_kernels` op,
forward and backward, its sample inputs.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_kernels import ops

F64 = torch.float64
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, dtype=F64, generator=gen) * scale


def _routing(gen, T, E, k, layout):
    """Expert ids [T, k] (distinct per token): random, every token on expert 0 first ("one"), or with ids outside
    [0, E) in some slots ("sentinel": the transformers contract, they contribute zero)."""
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    if layout == "one" and T:
        ids = torch.where(ids == 0, ids[:, :1], ids)
        ids[:, 0] = 0
    if layout == "sentinel" and T:
        drop = torch.rand(T, k, generator=gen) < 0.25
        ids = torch.where(drop, torch.where(torch.rand(T, k, generator=gen) < 0.5, -1, E), ids)
    return ids


@dataclass
class Program:
    name: str
    make: Callable  # (p, gen) -> {name: tensor or value}; floating tensors are float64 leaves
    run: Callable  # (**inputs) -> (tuple of differentiable outputs, tuple of exact outputs)
    reduction: Callable  # p -> the longest sum an output element takes: sets the reordering allowance
    triton: bool = True  # whether the triton backend implements the ops it calls


# --- routing ------------------------------------------------------------------------------------------------
def _make_route(p, gen):
    T, E, k = p["T"], p["E"], p["k"]
    inputs = dict(logits=_randn(gen, T, E, scale=2.0), k=k, score=p["score"], renormalize=p["renormalize"])
    if p["score"] == "sigmoid":
        inputs["bias"] = _randn(gen, E, scale=0.5)
    groups = p.get("groups")
    if groups and E % groups == 0 and k <= (E // groups) * max(1, groups // 2):
        inputs["num_groups"], inputs["topk_groups"] = groups, max(1, groups // 2)
    return inputs


def _run_route(**inputs):
    r = ops.topk_route(**inputs)
    losses = (ops.load_balancing_loss(r), ops.router_z_loss(r), ops.entropy_loss(r))
    return (r.weights, *losses), (r.experts, r.counts)


# --- permutation --------------------------------------------------------------------------------------------
def _make_permute(p, gen):
    T, E, k, D = p["T"], p["E"], p["k"], p["D"]
    return dict(x=_randn(gen, T, D), experts=_routing(gen, T, E, k, p["layout"]),
                weights=torch.rand(T, k, dtype=F64, generator=gen) + 0.05, scale=_randn(gen, T * k, D),
                num_experts=E, capacity=p["capacity"])


def _run_permute(x, experts, weights, scale, num_experts, capacity):
    s = ops.sort_by_expert(experts.clamp(0, num_experts - 1), num_experts, capacity)
    y = ops.permute(x, s)
    out = ops.unpermute(y * scale.to(y.dtype), s, weights)  # a per-row factor, so that y's gradient is not uniform
    return (y, out), (s.order, s.inverse, s.offsets)


# --- grouped GEMM -------------------------------------------------------------------------------------------
def _make_grouped_mm(p, gen):
    N, E, D, H = p["T"], p["E"], p["D"], p["H"]
    gated = p["gated"]
    M = 2 * H if gated else H
    counts = torch.multinomial(torch.ones(E), N, replacement=True, generator=gen).bincount(minlength=E) if N else \
        torch.zeros(E, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    inputs = dict(a=_randn(gen, N, D), w=_randn(gen, E, M, D, scale=D**-0.5), offsets=offsets,
                  activation=p["activation"], gated=gated)
    if p["bias"]:
        inputs["bias"] = _randn(gen, E, M, scale=0.5)
    return inputs


def _run_grouped_mm(a, w, offsets, activation, gated, bias=None):
    return (ops.grouped_mm(a, w, offsets, bias, activation=activation, gated=gated),), ()


# --- expert MLP ---------------------------------------------------------------------------------------------
def _make_moe_mlp(p, gen):
    T, E, k, D, H = p["T"], p["E"], p["k"], p["D"], p["H"]
    gated = p["gated"]
    inputs = dict(x=_randn(gen, T, D), experts=_routing(gen, T, E, k, p["layout"]),
                  weights=torch.rand(T, k, dtype=F64, generator=gen) + 0.05,
                  gate_up_proj=_randn(gen, E, 2 * H if gated else H, D, scale=D**-0.5),
                  down_proj=_randn(gen, E, D, H, scale=H**-0.5), activation=p["activation"], gated=gated,
                  capacity=p["capacity"])
    if p["bias"]:
        inputs["gate_up_bias"] = _randn(gen, E, 2 * H if gated else H, scale=0.5)
        inputs["down_bias"] = _randn(gen, E, D, scale=0.5)
    return inputs


def _run_moe_mlp(x, experts, weights, gate_up_proj, down_proj, **kw):
    return (ops.moe_mlp(x, experts, weights, gate_up_proj, down_proj, **kw),), ()


# --- dense mixture ------------------------------------------------------------------------------------------
def _make_dense(p, gen):
    inputs = _make_moe_mlp(dict(p, capacity=None, layout="random"), gen)
    for name in ("experts", "weights", "capacity"):
        del inputs[name]
    inputs["gates"] = _randn(gen, p["T"], p["E"]).softmax(-1)
    return inputs


def _run_dense(x, gates, gate_up_proj, down_proj, **kw):
    return (ops.dense_moe(x, gates, gate_up_proj, down_proj, **kw),), ()


# --- Soft MoE -----------------------------------------------------------------------------------------------
def _make_soft(p, gen):
    B, N, D, S = p["B"], p["T"], p["D"], p["E"] * p["slots"]
    inputs = dict(x=_randn(gen, B, N, D), phi=_randn(gen, S, D, scale=D**-0.5), y=_randn(gen, B, S, D))
    if p["mask"] and N:
        mask = torch.rand(B, N, generator=gen) < 0.8
        mask[:, 0] = True
        inputs["mask"] = mask
    return inputs


def _run_soft(x, phi, y, mask=None):
    """Both forms: the flash-style pair, and the shared logits read by both mixes."""
    slots = ops.soft_dispatch(x, phi, mask)
    logits = ops.soft_logits(x, phi, mask)
    return (slots, ops.soft_combine(x, phi, y, mask), ops.soft_dispatch_logits(logits, x),
            ops.soft_combine_logits(logits, y)), ()


PROGRAMS = {
    "topk_route": Program("topk_route", _make_route, _run_route, lambda p: p["E"]),
    "permute": Program("permute", _make_permute, _run_permute, lambda p: p["k"]),
    "grouped_mm": Program("grouped_mm", _make_grouped_mm, _run_grouped_mm, lambda p: max(p["D"], p["T"], 2 * p["H"])),
    "moe_mlp": Program("moe_mlp", _make_moe_mlp, _run_moe_mlp, lambda p: max(p["D"], p["H"], p["T"]) * p["k"]),
    "dense_moe": Program("dense_moe", _make_dense, _run_dense, lambda p: max(p["D"], p["H"], p["T"]) * p["E"],
                         triton=False),
    "soft_moe": Program("soft_moe", _make_soft, _run_soft,
                        lambda p: max(p["D"], p["B"] * p["T"], p["E"] * p["slots"])),
}

# one parameter set per program at which every option is on (the opcheck sweep's samples)
OPCHECK_PARAMS = {
    "topk_route": [dict(T=11, E=8, k=3, score="softmax", renormalize=True, groups=None),
                   dict(T=11, E=8, k=2, score="sigmoid", renormalize=True, groups=4)],
    "permute": [dict(T=13, E=5, k=2, D=6, layout="one", capacity=4), dict(T=9, E=4, k=4, D=3, layout="random",
                                                                          capacity=None)],
    "grouped_mm": [dict(T=14, E=5, D=6, H=4, gated=True, bias=True, activation="gelu"),
                   dict(T=9, E=3, D=5, H=3, gated=False, bias=False, activation="identity")],
    "moe_mlp": [dict(T=13, E=5, k=2, D=8, H=6, gated=True, bias=True, activation="silu", layout="sentinel",
                     capacity=4),
                dict(T=7, E=3, k=1, D=5, H=3, gated=False, bias=False, activation="relu", layout="random",
                     capacity=None)],
    "dense_moe": [dict(T=9, E=3, k=1, D=6, H=4, gated=True, bias=True, activation="gelu_tanh")],
    "soft_moe": [dict(B=2, T=9, D=6, E=3, slots=2, mask=True), dict(B=1, T=5, D=4, E=2, slots=1, mask=False)],
}


def materialise(inputs, dtype, requires_grad=True, device=None):
    """The program's inputs with floating tensors cast to dtype (fresh leaves), integer ones as they are."""
    out = {}
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device) if device is not None else v
            if v.is_floating_point():
                v = v.detach().to(dtype).requires_grad_(requires_grad)
        out[name] = v
    return out


def run_with_grads(program, inputs, cotangents):
    """(differentiable outputs, exact outputs, {input name: gradient}) of one run, gradients for the cotangents
    (float64, cast to each output's dtype)."""
    outs, exact = program.run(**inputs)
    leaves = {n: v for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    pairs = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
    grads = {}
    if pairs and leaves:
        gs = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()),
                                 [c.to(o.dtype) for o, c in pairs], allow_unused=True)
        grads = {n: g for n, g in zip(leaves, gs) if g is not None}
    return tuple(o.detach() for o in outs), exact, grads


def eps_allowance(scale, n):
    """sqrt(n) fp32 ulps of `scale`: what summing n terms of magnitude up to `scale` in another order may add when
    the sum is kept in fp32 (every fast path accumulates in fp32, whatever the storage dtype). `scale` is the
    largest magnitude in the computation, not of the result: a gradient that cancels to a small value (Soft MoE's
    softmax over two tokens) carries the rounding of its large terms."""
    return torch.finfo(torch.float32).eps * math.sqrt(max(n, 1)) * scale


def largest_magnitude(*groups):
    """max |v| over every floating tensor in the given tuples / dicts (0 when all are empty)."""
    tensors = [t for g in groups for t in (g.values() if isinstance(g, dict) else g)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    return max((t.abs().max().item() for t in tensors), default=0.0)


class record_op_calls(TorchDispatchMode):
    """Records every torch.ops.moe_kernels op called in the block: [(op overload, args, kwargs)]."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "moe_kernels":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)
