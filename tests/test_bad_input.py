"""Bad input to the public API, in one table, on every backend that runs CPU tensors here (reference, native when
built, triton under the interpreter for the ops it implements).

- Errors: wrong ranks and shapes, mismatched dtypes and devices (the "meta" device stands in for a second one),
  k outside [1, E], negative capacities, offsets outside the rows, non-tensors. Each must be the exception the
  argument checks raise, before any kernel, with a message that names the argument and shows its shape (or, for a
  scalar argument, its value): every row matches both.
- int32 index overflow: T*k >= 2^31 (token, slot) pairs, or 2^31 rows behind int32 offsets, raise instead of
  wrapping. Tested on expanded tensors (a few bytes of storage) and on meta tensors, under an address-space limit,
  so that a missing check fails the test instead of allocating tens of GiB on a shared machine; the native C++ ops
  are also called directly.
- Legal edge input that must be right, not rejected: expert ids outside [0, E) (moe_mlp's transformers contract:
  they contribute zero; sort_by_expert reports them as dropped), capacity 0 (every pair dropped), empty batches
  (correctly shaped empties, with gradients), non-contiguous and strided inputs (against the reference on
  contiguous float64 copies).
- NaN and inf, in x or in a token's router logits: the bad token's NaN stays in that token (moe_mlp behind
  topk_route, SparseMoE, DenseMoE); the clean tokens' outputs and input gradients equal the reference computed
  without it, and the non-finite values sit where the reference on the whole batch puts them. topk_route's own
  results for NaN, +inf and -inf logits (a -inf logit is a mask) match the reference, NaN for NaN and inf for inf.
  SoftMoE mixes every token of a sequence into every slot of that sequence (softmax over tokens), so there the
  contract is: a non-finite token poisons its whole sequence, masked or not (0 * NaN is NaN in the slot's weighted
  sum), and never another sequence; the fast backends put NaN exactly where the reference does.
"""
import contextlib
import copy
import math
import os
import resource

import pytest
import torch

import moe_kernels
from moe_kernels import _backend, ops
from moe_kernels import triton as _triton
from moe_kernels.nn import DenseMoE, SoftMoE, SparseMoE
from tests.conftest import TEST_DEVICE, cpu_backends
from tests.helpers import assert_close64, assert_earned_max, rand_experts, reordered_sum_atol, same_bits
from tests.ops.test_expert_mlp import naive_moe_mlp

F64 = torch.float64
TRITON = _triton.AVAILABLE and (os.environ.get("TRITON_INTERPRET") == "1" or TEST_DEVICE == "cuda")
BACKENDS = cpu_backends() + (["triton"] if TRITON else [])

# the kernel-level op that decides whether a backend has its own implementation of a public op or module
KERNEL = {"topk_route": "topk_route", "sort_by_expert": "sort_by_expert", "permute": "permute",
          "unpermute": "unpermute", "grouped_mm": "grouped_mm", "moe_mlp": "moe_mlp_fused", "dense_moe": "dense_moe",
          "soft_dispatch": "soft_dispatch", "soft_combine": "soft_combine", "soft_logits": "soft_logits",
          "soft_dispatch_logits": "soft_dispatch_logits", "soft_combine_logits": "soft_combine_logits",
          "losses": "topk_route",
          "SparseMoE": "moe_mlp_fused", "DenseMoE": "dense_moe", "SoftMoE": "soft_dispatch"}


def backends_of(op):
    """The backends that run op with an implementation of their own (one falling back to reference is a duplicate
    of the reference run)."""
    impls = _backend.IMPLS[KERNEL[op]]
    return [b for b in BACKENDS if b == "reference" or b in impls]


def per_backend(cases):
    """pytest.params (op, ...) -> one param per applicable backend, id '<case>-<backend>'."""
    return [pytest.param(b, *c.values, id=f"{c.id}-{b}", marks=c.marks)
            for c in cases for b in backends_of(c.values[0])]


def meta(t):
    return t.to("meta")


# --- good arguments of every op, small; each case below changes one thing ----------------------------------------
T, D, H, E, K = 5, 6, 4, 3, 2


def base(op):
    """The keyword arguments of a call that succeeds."""
    if op == "topk_route":
        return dict(logits=torch.randn(T, E + 1), k=K)
    if op == "sort_by_expert":
        return dict(experts=rand_experts(T, K, E), num_experts=E)
    if op in ("permute", "unpermute"):
        s = ops.sort_by_expert(rand_experts(T, K, E), E)
        if op == "permute":
            return dict(x=torch.randn(T, D), sorted=s)
        return dict(y=torch.randn(T * K, D), sorted=s, weights=torch.rand(T, K))
    if op == "grouped_mm":
        return dict(a=torch.randn(7, D), w=torch.randn(E, 2 * H, D),
                    offsets=torch.tensor([0, 2, 2, 6], dtype=torch.int32),
                    bias=torch.randn(E, 2 * H), activation="silu", gated=True)
    if op in ("moe_mlp", "dense_moe"):
        kw = dict(x=torch.randn(T, D), gate_up_proj=torch.randn(E, 2 * H, D), down_proj=torch.randn(E, D, H),
                  gate_up_bias=torch.randn(E, 2 * H), down_bias=torch.randn(E, D))
        if op == "moe_mlp":
            return dict(kw, experts=rand_experts(T, K, E), weights=torch.rand(T, K), capacity=None)
        return dict(kw, gates=torch.rand(T, E).softmax(-1))
    if op in ("soft_dispatch", "soft_combine"):
        B, N, S = 2, 5, 4
        kw = dict(x=torch.randn(B, N, D), phi=torch.randn(S, D), mask=torch.rand(B, N) > 0.2,
                  slot_mask=torch.ones(B, S, dtype=torch.bool))
        return dict(kw, y=torch.randn(B, S, D)) if op == "soft_combine" else kw
    if op == "soft_logits":
        return dict(x=torch.randn(2, 5, D), phi=torch.randn(4, D), mask=torch.rand(2, 5) > 0.2)
    if op == "soft_dispatch_logits":
        return dict(logits=torch.randn(2, 5, 4), x=torch.randn(2, 5, D))
    if op == "soft_combine_logits":
        return dict(logits=torch.randn(2, 5, 4), y=torch.randn(2, 4, D))
    if op == "losses":
        return dict(routing=ops.topk_route(torch.randn(T, E + 1), K))
    if op == "SparseMoE":
        return dict(module=SparseMoE(D, H, E, K, capacity_factor=1.0), x=torch.randn(2, T, D))
    if op == "DenseMoE":
        return dict(module=DenseMoE(D, H, E), x=torch.randn(2, T, D), gates=None)
    if op == "SoftMoE":
        return dict(module=SoftMoE(D, num_slots=2, num_experts=E, expert_mult=1), x=torch.randn(2, T, D),
                    mask=torch.rand(2, T) > 0.2)
    raise AssertionError(op)


def call(op, kw):
    if op == "permute":
        return ops.permute(kw["x"], kw["sorted"])
    if op == "unpermute":
        return ops.unpermute(kw["y"], kw["sorted"], kw["weights"])
    if op == "losses":
        r = kw["routing"]
        return ops.load_balancing_loss(r), ops.router_z_loss(r), ops.entropy_loss(r)
    if op in ("SparseMoE", "DenseMoE", "SoftMoE"):
        kw = dict(kw)
        m = kw.pop("module")
        return m(**kw)
    return getattr(ops, op)(**kw)


def _set(**changes):
    """A change to the good arguments: each value is a function of the whole dict (or a constant)."""
    def change(kw):
        for name, v in changes.items():
            kw[name] = v(kw) if callable(v) else v
    return change


def bad(id_, op, change, exc, match):
    return pytest.param(op, change, exc, match, id=id_)


# (op, change, exception, message pattern): the pattern names the argument and shows a shape (or a scalar's value)
ERRORS = [
    # --- topk_route
    bad("route-logits-rank1", "topk_route", _set(logits=lambda k: k["logits"].flatten()), ValueError,
        r"^logits must have 2 dimensions, got shape \(20,\)"),
    bad("route-logits-rank3", "topk_route", _set(logits=lambda k: k["logits"][None]), ValueError,
        r"^logits must have 2 dimensions, got shape \(1, 5, 4\)"),
    bad("route-logits-int", "topk_route", _set(logits=lambda k: k["logits"].long()), TypeError,
        r"^logits must have dtype .* got torch\.int64 \(shape \(5, 4\)\)"),
    bad("route-logits-list", "topk_route", _set(logits=[[0.5, 0.5]]), TypeError,
        r"^logits must be a torch\.Tensor, got list"),
    bad("route-k>E", "topk_route", _set(k=5), ValueError,
        r"^k must be in \[1, num_experts=4\] \(logits of shape \(5, 4\)\), got 5"),
    bad("route-k0", "topk_route", _set(k=0), ValueError,
        r"^k must be in \[1, num_experts=4\] \(logits of shape \(5, 4\)\), got 0"),
    bad("route-k-negative", "topk_route", _set(k=-2), ValueError, r"^k must be in .*\(5, 4\).*got -2"),
    bad("route-k-float", "topk_route", _set(k=2.0), TypeError, r"^k must be an int, got float"),
    bad("route-bias-length", "topk_route", _set(bias=torch.randn(5)), ValueError,
        r"^bias must have shape \(4\), got \(5,\)"),
    bad("route-bias-int", "topk_route", _set(bias=torch.arange(4)), TypeError,
        r"^bias must have dtype .*int64 \(shape \(4,\)\)"),
    bad("route-bias-device", "topk_route", _set(bias=meta(torch.randn(4))), ValueError,
        r"one device, got logits \(5, 4\) on cpu, bias \(4,\) on meta"),
    bad("route-groups-not-dividing", "topk_route", _set(num_groups=3, topk_groups=1), ValueError,
        r"num_groups=3 must divide the number of experts E=4"),
    # --- sort_by_expert
    bad("sort-experts-float", "sort_by_expert", _set(experts=lambda k: k["experts"].float()), TypeError,
        r"^experts must have dtype .*float32 \(shape \(5, 2\)\)"),
    bad("sort-experts-rank1", "sort_by_expert", _set(experts=lambda k: k["experts"].flatten()), ValueError,
        r"^experts must have 2 dimensions, got shape \(10,\)"),
    bad("sort-num_experts-0", "sort_by_expert", _set(num_experts=0), ValueError,
        r"^num_experts must be a positive int, got 0"),
    bad("sort-capacity-negative", "sort_by_expert", _set(capacity=-1), ValueError,
        r"^capacity must be None or an int >= 0, got -1"),
    # --- permute / unpermute
    bad("permute-x-tokens", "permute", _set(x=lambda k: k["x"][:-1]), ValueError,
        r"^x has 4 tokens \(shape \(4, 6\)\) but the sort has 5 \(inverse \(5, 2\)\)"),
    bad("permute-x-rank1", "permute", _set(x=lambda k: k["x"].flatten()), ValueError,
        r"^x must have 2 dimensions, got shape \(30,\)"),
    bad("permute-x-device", "permute", _set(x=lambda k: meta(k["x"])), ValueError,
        r"one device, got x \(5, 6\) on meta"),
    bad("unpermute-y-rows", "unpermute", _set(y=lambda k: k["y"][:-1]), ValueError,
        r"^y must have T\*k = 10 rows, got shape \(9, 6\)"),
    bad("unpermute-weights-shape", "unpermute", _set(weights=lambda k: k["weights"].t()), ValueError,
        r"^weights must have shape \(5, 2\), got \(2, 5\)"),
    bad("unpermute-weights-int", "unpermute", _set(weights=lambda k: k["weights"].long()), TypeError,
        r"^weights must have dtype .*int64 \(shape \(5, 2\)\)"),
    bad("unpermute-weights-device", "unpermute", _set(weights=lambda k: meta(k["weights"])), ValueError,
        r"one device, got y \(10, 6\) on cpu, .*weights \(5, 2\) on meta"),
    # --- grouped_mm
    bad("gmm-a-rank3", "grouped_mm", _set(a=lambda k: k["a"][None]), ValueError,
        r"^a must have 2 dimensions, got shape \(1, 7, 6\)"),
    bad("gmm-w-rank2", "grouped_mm", _set(w=lambda k: k["w"][0]), ValueError,
        r"^w must have 3 dimensions, got shape \(8, 6\)"),
    bad("gmm-K-mismatch", "grouped_mm", _set(a=lambda k: k["a"][:, :-1]), ValueError,
        r"a: \[N, K\] and w: \[E, M, K\] must share K, got a \(7, 5\) and w \(3, 8, 6\)"),
    bad("gmm-offsets-length", "grouped_mm", _set(offsets=lambda k: k["offsets"][:-1]), ValueError,
        r"^offsets must have shape \(4\), got \(3,\)"),
    bad("gmm-offsets-int64", "grouped_mm", _set(offsets=lambda k: k["offsets"].long()), TypeError,
        r"^offsets must have dtype in \(int32\), got torch\.int64 \(shape \(4,\)\)"),
    # offsets are indices the caller supplies: outside [0, N], or decreasing, they would read and write past the rows
    bad("gmm-offsets-decreasing", "grouped_mm", _set(offsets=torch.tensor([0, 4, 2, 6], dtype=torch.int32)),
        ValueError, r"^offsets of shape \(4,\) must be non-decreasing in \[0, N = 7\].*\[0, 4, 2, 6\]"),
    bad("gmm-offsets-past-rows", "grouped_mm", _set(offsets=torch.tensor([0, 2, 4, 9], dtype=torch.int32)),
        ValueError, r"^offsets of shape \(4,\) must be non-decreasing in \[0, N = 7\]"),
    bad("gmm-offsets-negative", "grouped_mm", _set(offsets=torch.tensor([-1, 2, 4, 6], dtype=torch.int32)),
        ValueError, r"^offsets of shape \(4,\) must be non-decreasing in \[0, N = 7\]"),
    bad("gmm-bias-shape", "grouped_mm", _set(bias=lambda k: k["bias"][:, :-1]), ValueError,
        r"^bias must have shape \(3, 8\), got \(3, 7\)"),
    bad("gmm-a-dtype", "grouped_mm", _set(a=lambda k: k["a"].double()), TypeError,
        r"share a dtype, got a torch\.float64 \(7, 6\), w torch\.float32 \(3, 8, 6\)"),
    bad("gmm-offsets-device", "grouped_mm", _set(offsets=lambda k: meta(k["offsets"])), ValueError,
        r"one device, got .*offsets \(4,\) on meta"),
    bad("gmm-gated-odd-M", "grouped_mm", _set(w=lambda k: k["w"][:, :-1], bias=None), ValueError,
        r"gated=True needs an even output width .* got w \(3, 7, 6\)"),
    # --- moe_mlp
    bad("mlp-x-rank3", "moe_mlp", _set(x=lambda k: k["x"][None]), ValueError,
        r"^x must have 2 dimensions, got shape \(1, 5, 6\)"),
    bad("mlp-x-D", "moe_mlp", _set(x=lambda k: k["x"][:, :-1]), ValueError,
        r"^x: \[T, D\] must have D = 6 of gate_up_proj \(3, 8, 6\), got \(5, 5\)"),
    bad("mlp-experts-T", "moe_mlp", _set(experts=lambda k: k["experts"][:-1]), ValueError,
        r"^experts must be \[T, k\] with T = 5 of x \(5, 6\), got \(4, 2\)"),
    bad("mlp-experts-float", "moe_mlp", _set(experts=lambda k: k["experts"].float()), TypeError,
        r"^experts must have dtype .*float32 \(shape \(5, 2\)\)"),
    bad("mlp-weights-shape", "moe_mlp", _set(weights=lambda k: k["weights"][:, :1]), ValueError,
        r"^weights must have shape \(5, 2\), got \(5, 1\)"),
    bad("mlp-x-dtype", "moe_mlp", _set(x=lambda k: k["x"].double()), TypeError,
        r"share a dtype, got x torch\.float64 \(5, 6\), gate_up_proj torch\.float32 \(3, 8, 6\)"),
    bad("mlp-down-H", "moe_mlp", _set(down_proj=lambda k: k["down_proj"][..., :-1]), ValueError,
        r"gate_up_proj and down_proj must be .* got \(3, 8, 6\) and \(3, 6, 3\)"),
    bad("mlp-down_bias-dtype", "moe_mlp", _set(down_bias=lambda k: k["down_bias"].half()), TypeError,
        r"share a dtype.*down_bias torch\.float16 \(3, 6\)"),
    bad("mlp-x-device", "moe_mlp", _set(x=lambda k: meta(k["x"])), ValueError,
        r"one device, got x \(5, 6\) on meta"),
    bad("mlp-gate_up_bias-device", "moe_mlp", _set(gate_up_bias=lambda k: meta(k["gate_up_bias"])), ValueError,
        r"one device, got .*gate_up_bias \(3, 8\) on meta"),
    bad("mlp-down_bias-device", "moe_mlp", _set(down_bias=lambda k: meta(k["down_bias"])), ValueError,
        r"one device, got .*down_bias \(3, 6\) on meta"),
    bad("mlp-capacity-negative", "moe_mlp", _set(capacity=-1), ValueError,
        r"^capacity must be None or an int >= 0, got -1"),
    bad("mlp-capacity-float", "moe_mlp", _set(capacity=1.5), ValueError,
        r"^capacity must be None or an int >= 0, got 1\.5"),
    bad("mlp-activation", "moe_mlp", _set(activation="swiglu"), ValueError,
        r"^activation must be one of .* got 'swiglu'"),
    # --- dense_moe
    bad("dense-gates-shape", "dense_moe", _set(gates=lambda k: k["gates"][:, :-1]), ValueError,
        r"^gates must have shape \(5, 3\), got \(5, 2\)"),
    bad("dense-gates-int", "dense_moe", _set(gates=lambda k: k["gates"].long()), TypeError,
        r"^gates must have dtype .*\(shape \(5, 3\)\)"),
    bad("dense-x-dtype", "dense_moe", _set(x=lambda k: k["x"].double()), TypeError,
        r"share a dtype, got x torch\.float64 \(5, 6\)"),
    bad("dense-gates-device", "dense_moe", _set(gates=lambda k: meta(k["gates"])), ValueError,
        r"one device, got .*gates \(5, 3\) on meta"),
    bad("dense-gate_up_bias-device", "dense_moe", _set(gate_up_bias=lambda k: meta(k["gate_up_bias"])), ValueError,
        r"one device, got .*gate_up_bias \(3, 8\) on meta"),
    bad("dense-down_bias-device", "dense_moe", _set(down_bias=lambda k: meta(k["down_bias"])), ValueError,
        r"one device, got .*down_bias \(3, 6\) on meta"),
    # --- soft_dispatch / soft_combine
    bad("dispatch-x-rank2", "soft_dispatch", _set(x=lambda k: k["x"][0]), ValueError,
        r"^x must have 3 dimensions, got shape \(5, 6\)"),
    bad("dispatch-phi-D", "soft_dispatch", _set(phi=lambda k: k["phi"][:, :-1]), ValueError,
        r"^phi must be \[S, D\] or \[B, S, D\] for x \[B, N, D\] = \(2, 5, 6\), got \(4, 5\)"),
    bad("dispatch-phi-batch", "soft_dispatch", _set(phi=lambda k: k["phi"].expand(3, 4, 6)), ValueError,
        r"^phi must be .* = \(2, 5, 6\), got \(3, 4, 6\)"),
    bad("dispatch-mask-shape", "soft_dispatch", _set(mask=lambda k: k["mask"][:, :-1]), ValueError,
        r"^mask must have shape \(2, 5\), got \(2, 4\)"),
    bad("dispatch-mask-float", "soft_dispatch", _set(mask=lambda k: k["mask"].float()), TypeError,
        r"^mask must have dtype in \(bool\), .*\(2, 5\)"),
    bad("dispatch-slot_mask-shape", "soft_dispatch", _set(slot_mask=lambda k: k["slot_mask"][:, :-1]), ValueError,
        r"^slot_mask must have shape \(2, 4\), got \(2, 3\)"),
    bad("dispatch-phi-dtype", "soft_dispatch", _set(phi=lambda k: k["phi"].half()), TypeError,
        r"share a dtype, got x torch\.float32 \(2, 5, 6\), phi torch\.float16 \(4, 6\)"),
    bad("dispatch-mask-device", "soft_dispatch", _set(mask=lambda k: meta(k["mask"])), ValueError,
        r"one device, got .*mask \(2, 5\) on meta"),
    bad("combine-y-slots", "soft_combine", _set(y=lambda k: k["y"][:, :-1]), ValueError,
        r"^y must have shape \(2, 4, \*\), got \(2, 3, 6\)"),
    bad("combine-y-dtype", "soft_combine", _set(y=lambda k: k["y"].double()), TypeError,
        r"share a dtype, got x .*y torch\.float64 \(2, 4, 6\)"),
    bad("combine-y-device", "soft_combine", _set(y=lambda k: meta(k["y"])), ValueError,
        r"one device, got x \(2, 5, 6\) on cpu, y \(2, 4, 6\) on meta"),
    # --- the shared-logits form
    bad("logits-phi-D", "soft_logits", _set(phi=lambda k: k["phi"][:, :-1]), ValueError,
        r"^phi must be \[S, D\] or \[B, S, D\] for x \[B, N, D\] = \(2, 5, 6\), got \(4, 5\)"),
    bad("logits-mask-shape", "soft_logits", _set(mask=lambda k: k["mask"][:, :-1]), ValueError,
        r"^mask must have shape \(2, 5\), got \(2, 4\)"),
    bad("dispatch_logits-x-tokens", "soft_dispatch_logits", _set(x=lambda k: k["x"][:, :-1]), ValueError,
        r"^x must be \[B, N, D\] for logits \[B, N, S\] = \(2, 5, 4\), got \(2, 4, 6\)"),
    bad("dispatch_logits-logits-rank2", "soft_dispatch_logits", _set(logits=lambda k: k["logits"][0]), ValueError,
        r"^logits must have 3 dimensions, got shape \(5, 4\)"),
    bad("dispatch_logits-x-dtype", "soft_dispatch_logits", _set(x=lambda k: k["x"].double()), TypeError,
        r"share a dtype, got logits torch\.float32 \(2, 5, 4\), x torch\.float64 \(2, 5, 6\)"),
    bad("combine_logits-y-slots", "soft_combine_logits", _set(y=lambda k: k["y"][:, :-1]), ValueError,
        r"^y must be \[B, S, D\] for logits \[B, N, S\] = \(2, 5, 4\), got \(2, 3, 6\)"),
    bad("combine_logits-y-batch", "soft_combine_logits", _set(y=lambda k: k["y"][:1]), ValueError,
        r"^y must be \[B, S, D\] for logits \[B, N, S\] = \(2, 5, 4\), got \(1, 4, 6\)"),
    bad("combine_logits-y-device", "soft_combine_logits", _set(y=lambda k: meta(k["y"])), ValueError,
        r"one device, got logits \(2, 5, 4\) on cpu, y \(2, 4, 6\) on meta"),
    # --- the losses take the Routing of topk_route
    bad("losses-routing-tensor", "losses", _set(routing=lambda k: k["routing"].weights), TypeError,
        r"^routing must be the Routing that topk_route returns .* got a tensor of shape \(5, 2\)"),
    bad("losses-routing-counts", "losses",
        _set(routing=lambda k: k["routing"]._replace(counts=k["routing"].counts[:-1])),
        ValueError, r"routing\.counts and routing\.prob_sum must be \[E\] .* got counts \(3,\), prob_sum \(4,\)"),
    # --- modules: forward
    bad("sparse-x-D", "SparseMoE", _set(x=lambda k: k["x"][..., :-1]), ValueError,
        r"^x must be \[\.\.\., D\] with D = 6, got \(2, 5, 5\)"),
    bad("sparse-x-dtype", "SparseMoE", _set(x=lambda k: k["x"].double()), TypeError,
        r"^x of shape \(2, 5, 6\) is torch\.float64 but the SparseMoE's parameters are torch\.float32"),
    bad("sparse-x-device", "SparseMoE", _set(x=lambda k: meta(k["x"])), ValueError,
        r"^x of shape \(2, 5, 6\) is on meta but the SparseMoE's parameters are on cpu"),
    bad("densemod-x-D", "DenseMoE", _set(x=lambda k: k["x"][..., :-1]), ValueError,
        r"^x must be \[\.\.\., D\] with D = 6, got \(2, 5, 5\)"),
    bad("densemod-gates-shape", "DenseMoE", _set(gates=torch.rand(2, 5, 2)), ValueError,
        r"^gates must be \[\.\.\., E\] = \(2, 5, 3\) for x \(2, 5, 6\), got \(2, 5, 2\)"),
    bad("densemod-x-dtype", "DenseMoE", _set(x=lambda k: k["x"].half()), TypeError,
        r"^x of shape \(2, 5, 6\) is torch\.float16 but the DenseMoE's parameters are torch\.float32"),
    bad("densemod-x-device", "DenseMoE", _set(x=lambda k: meta(k["x"])), ValueError,
        r"^x of shape \(2, 5, 6\) is on meta but the DenseMoE's parameters are on cpu"),
    bad("softmod-x-rank1", "SoftMoE", _set(x=lambda k: k["x"][0, 0]), ValueError,
        r"^x must be \[b, n, d\], \[b, d\] or \[b, d, h, w\] with d = 6, got \(6,\)"),
    bad("softmod-x-D", "SoftMoE", _set(x=lambda k: k["x"][..., :-1]), ValueError, r"with d = 6, got \(2, 5, 5\)"),
    bad("softmod-mask-shape", "SoftMoE", _set(mask=lambda k: k["mask"][:, :-1]), ValueError,
        r"^mask must have shape \(2, 5\), got \(2, 4\)"),
    bad("softmod-mask-int", "SoftMoE", _set(mask=lambda k: k["mask"].long()), TypeError,
        r"^mask must have dtype in \(bool\), .*\(2, 5\)"),
    bad("softmod-x-dtype", "SoftMoE", _set(x=lambda k: k["x"].double()), TypeError,
        r"^x of shape \(2, 5, 6\) is torch\.float64 but the SoftMoE's parameters are torch\.float32"),
    bad("softmod-mask-device", "SoftMoE", _set(mask=lambda k: meta(k["mask"])), ValueError,
        r"one device, got x \(2, 5, 6\) on cpu, mask \(2, 5\) on meta"),
]


OPS = [pytest.param(op, id=op) for op in sorted(KERNEL)]


@pytest.mark.parametrize("backend_name, op", per_backend(OPS))
def test_good_arguments_run(backend_name, op):
    # the base call of each op is accepted: a bad-input case fails for its one change, not for the rest
    with moe_kernels.use_backend(backend_name):
        call(op, base(op))


@pytest.mark.parametrize("backend_name, op, change, exc, match", per_backend(ERRORS))
def test_bad_argument_raises_naming_it(backend_name, op, change, exc, match):
    kw = base(op)
    change(kw)
    with moe_kernels.use_backend(backend_name), pytest.raises(exc, match=match):
        call(op, kw)


# the constructors' scalar arguments: the message names the argument and shows the value
CONSTRUCTOR_ERRORS = [
    pytest.param(lambda: SparseMoE(D, H, 4, top_k=5), ValueError, r"^top_k must be in \[1, num_experts=4\], got 5",
                 id="sparse-k>E"),
    pytest.param(lambda: SparseMoE(D, H, 4, top_k=0), ValueError, r"^top_k must be in \[1, num_experts=4\], got 0",
                 id="sparse-k0"),
    pytest.param(lambda: SparseMoE(D, H, 4, capacity_factor=0.0), ValueError,
                 r"^capacity_factor must be None or > 0, got 0\.0", id="sparse-capacity_factor-0"),
    pytest.param(lambda: SparseMoE(D, H, 4, capacity_factor=-1.0), ValueError,
                 r"^capacity_factor must be None or > 0, got -1\.0", id="sparse-capacity_factor-negative"),
    pytest.param(lambda: SparseMoE(D, H, 4, capacity_factor=1.0, min_capacity=-1), ValueError,
                 r"^min_capacity must be None or an int >= 0, got -1", id="sparse-min_capacity-negative"),
    pytest.param(lambda: SoftMoE(D, num_slots=0, num_experts=4), ValueError, r"^num_slots must be >= 1 .* got 0",
                 id="soft-slots-0"),
    pytest.param(lambda: SoftMoE(D, seq_len=3, num_experts=4), ValueError,
                 r"^num_slots must be >= 1 \(seq_len // num_experts\), got 0", id="soft-seq_len<E"),
    pytest.param(lambda: DenseMoE(D, H, 0), ValueError, r"^num_experts must be a positive int, got 0", id="dense-E0"),
]


@pytest.mark.parametrize("make, exc, match", CONSTRUCTOR_ERRORS)
def test_bad_constructor_argument_raises_naming_it(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# --- int32 index overflow ------------------------------------------------------------------------------------
@contextlib.contextmanager
def address_space_headroom(gib=2):
    """The process may map at most `gib` GiB more for the block: a check that has gone missing then fails with an
    allocation error instead of the kernel materialising a 2^31-row tensor on a shared machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    limit = mapped + gib * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


BIG_T, BIG_K = 2**20, 2**11   # T*k = 2^31: one past the last pair int32 indexes
PAIRS = r"T\*k = 1048576\*2048 = 2147483648 \(token, slot\) pairs overflow the int32 indices"


def _huge(shape, dtype, device):
    """A tensor of a huge logical shape on a few bytes of storage (stride 0 in every dimension)."""
    return torch.ones((1,) * len(shape), dtype=dtype, device=device).expand(*shape)


def _overflow_call(op, device):
    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    if op == "topk_route":
        return lambda: ops.topk_route(_huge((BIG_T, BIG_K), f32, device), BIG_K)
    if op == "sort_by_expert":
        return lambda: ops.sort_by_expert(_huge((BIG_T, BIG_K), i64, device), 4)
    if op in ("permute", "unpermute"):
        s = ops.Sorted(_huge((BIG_T * BIG_K,), i32, device), _huge((BIG_T, BIG_K), i32, device),
                       torch.zeros(5, dtype=i32, device=device))
        if op == "permute":
            return lambda: ops.permute(_huge((BIG_T, 3), f32, device), s)
        return lambda: ops.unpermute(_huge((BIG_T * BIG_K, 3), f32, device), s, _huge((BIG_T, BIG_K), f32, device))
    if op == "moe_mlp":
        return lambda: ops.moe_mlp(_huge((BIG_T, 3), f32, device), _huge((BIG_T, BIG_K), i64, device),
                                   _huge((BIG_T, BIG_K), f32, device), torch.randn(4, 4, 3, device=device),
                                   torch.randn(4, 3, 2, device=device))
    if op == "grouped_mm":
        return lambda: ops.grouped_mm(_huge((2**31, 3), f32, device), torch.randn(4, 5, 3, device=device),
                                      torch.zeros(5, dtype=i32, device=device))
    raise AssertionError(op)


OVERFLOW = [
    pytest.param("topk_route", r"^logits of shape \(1048576, 2048\) with k = 2048: " + PAIRS, id="route"),
    pytest.param("sort_by_expert", r"^experts of shape \(1048576, 2048\): " + PAIRS, id="sort"),
    pytest.param("permute", r"^sorted\.inverse of shape \(1048576, 2048\): " + PAIRS, id="permute"),
    pytest.param("unpermute", r"^sorted\.inverse of shape \(1048576, 2048\): " + PAIRS, id="unpermute"),
    pytest.param("moe_mlp", r"^experts of shape \(1048576, 2048\): " + PAIRS, id="moe_mlp"),
    pytest.param("grouped_mm", r"^a of shape \(2147483648, 3\) has more rows than int32 offsets address",
                 id="grouped_mm-rows"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("backend_name, op, match", per_backend(OVERFLOW))
def test_int32_overflow_raises_before_any_kernel(backend_name, op, match, device):
    fn = _overflow_call(op, device)
    with moe_kernels.use_backend(backend_name), address_space_headroom(), pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON else []))
def test_int32_limit_itself_is_accepted(backend_name):
    # T*k = 2^31 - 1 pairs (a prime: T = 2^31 - 1, k = 1) is the last that int32 addresses: on meta tensors the ops
    # run their shape functions without allocating. (native refuses meta tensors: it runs CPU tensors only)
    big = 2**31 - 1
    with moe_kernels.use_backend(backend_name), address_space_headroom():
        out = ops.moe_mlp(_huge((big, 3), torch.float32, "meta"), _huge((big, 1), torch.int64, "meta"),
                          _huge((big, 1), torch.float32, "meta"), torch.randn(4, 4, 3, device="meta"),
                          torch.randn(4, 3, 2, device="meta"))
        assert out.shape == (big, 3) and out.device.type == "meta"
        r = ops.topk_route(_huge((big, 4), torch.float32, "meta"), 1)
        assert r.experts.shape == (big, 1)


NATIVE_OVERFLOW = [
    pytest.param(lambda C: C.topk_route(_huge((BIG_T, BIG_K), torch.float32, "cpu"), BIG_K, "softmax", True, None, 0,
                                        0, 1.0),
                 r"topk_route: logits \[1048576, 2048\] with k = 2048 give T\*k = 2147483648", id="topk_route"),
    pytest.param(lambda C: C.sort_by_expert(_huge((BIG_T, BIG_K), torch.int64, "cpu"), 4, -1),
                 r"sort_by_expert: T\*k = 2147483648 overflows int32 indices", id="sort_by_expert"),
    pytest.param(lambda C: C.moe_mlp_forward(_huge((2**31, 3), torch.float32, "cpu"),
                                             _huge((2**31, 1), torch.int64, "cpu"),
                                             _huge((2**31, 1), torch.float32, "cpu"), torch.randn(4, 4, 3),
                                             torch.randn(4, 3, 2), None, None, "silu", True, -1, False),
                 r"moe_mlp_forward: experts \[2147483648, 1\] give T\*k .* overflow the int32 indices",
                 id="moe_mlp_forward"),
    pytest.param(lambda C: C.grouped_mm(_huge((2**31, 3), torch.float32, "cpu"), torch.randn(4, 5, 3),
                                        torch.zeros(5, dtype=torch.int32), None, "identity", False),
                 r"grouped_mm: a \[2147483648, 3\] has more rows than int32 offsets address", id="grouped_mm"),
]


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("fn, match", NATIVE_OVERFLOW)
def test_native_op_called_directly_refuses_int32_overflow(fn, match):
    # the C++ ops check too (before their contiguous copies): they are reachable without the Python checks
    with address_space_headroom(), pytest.raises(RuntimeError, match=match):
        fn(torch.ops.moe_kernels_C)


# --- expert ids outside [0, E), capacity 0 ---------------------------------------------------------------------
def _mlp_inputs(T_, D_, H_, E_, k_, dtype):
    x = torch.randn(T_, D_, dtype=dtype)
    gate_up = (torch.randn(E_, 2 * H_, D_, dtype=F64) / math.sqrt(D_)).to(dtype)
    down = (torch.randn(E_, D_, H_, dtype=F64) / math.sqrt(H_)).to(dtype)
    return x, torch.rand(T_, k_, dtype=dtype) + 0.1, gate_up, down, torch.randn(E_, 2 * H_, dtype=dtype), \
        torch.randn(E_, D_, dtype=dtype)


def _kernel_dtype(backend_name):
    # triton's kernels run fp32/fp16 (float64 goes to a torch fallback): test them in fp32, the others in float64
    return torch.float32 if backend_name == "triton" else F64


def _assert_matches(fast, ref64, same, n_terms, name):
    """float64 results: rounding only. float32 (triton): the earned tolerance against the same computation in plain
    fp32, over the tensor, plus sqrt(n) ulps for the reordered sums."""
    if fast.dtype == F64:
        assert_close64(fast, ref64, name)
    else:
        assert_earned_max(fast, ref64, same, atol=1e-6 + reordered_sum_atol(ref64, fast.dtype, n_terms), name=name)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("capacity", [None, 3], ids=["nocap", "cap3"])
@pytest.mark.parametrize("backend_name", backends_of("moe_mlp"))
def test_moe_mlp_ids_outside_range_contribute_zero(backend_name, capacity, id_dtype):
    # transformers' expert-parallel contract: ids outside [0, E) contribute zero, take no capacity and get no
    # weight gradient. Large ids that wrap into [0, E) when truncated to 32 bits (2^32 + 1) must stay out.
    T_, D_, H_, E_, k_ = 12, 8, 6, 4, 3
    dtype = _kernel_dtype(backend_name)
    x, weights, gate_up, down, gate_up_bias, down_bias = _mlp_inputs(T_, D_, H_, E_, k_, dtype)
    experts = rand_experts(T_, k_, E_)
    bad = [-1, E_, E_ + 7, -(2**31)] + ([2**32 + 1, -(2**40)] if id_dtype == torch.int64 else [2**31 - 1])
    for i, v in enumerate(bad):
        experts[(3 * i) % T_, i % k_] = v
    experts = experts.to(id_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down, gate_up_bias, down_bias)]
    kw = dict(capacity=capacity)
    with moe_kernels.use_backend(backend_name):
        out = ops.moe_mlp(leaves[0], experts, *leaves[1:4], gate_up_bias=leaves[4], down_bias=leaves[5], **kw)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    # the oracle drops those slots outright: a loop over the kept (token, slot) pairs in float64
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = naive_moe_mlp(ref_leaves[0], experts.long(), *ref_leaves[1:4], ref_leaves[4], ref_leaves[5], **kw)
    want_grads = torch.autograd.grad(want, ref_leaves, grad_out.double())
    same_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with moe_kernels.use_backend("reference"):   # the baseline of the earned tolerance, in the fast run's dtype
        same = ops.moe_mlp(same_leaves[0], experts, *same_leaves[1:4], gate_up_bias=same_leaves[4],
                           down_bias=same_leaves[5], **kw)
    same_grads = torch.autograd.grad(same, same_leaves, grad_out)
    _assert_matches(out.detach(), want.detach(), same.detach(), k_, "out")
    outside = (experts.long() < 0) | (experts.long() >= E_)
    assert bool((grads[1][outside] == 0).all()), "a slot outside [0, E) got a routing-weight gradient"
    for name, g, w, b in zip(("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), grads,
                             want_grads, same_grads):
        _assert_matches(g, w, b, T_ * k_, f"grad of {name}")


@pytest.mark.parametrize("backend_name", backends_of("sort_by_expert"))
def test_sort_by_expert_reports_ids_outside_range_as_dropped(backend_name):
    experts = rand_experts(9, 2, 4)
    experts[0, 0], experts[3, 1], experts[5, 0], experts[8, 1] = -1, 4, 2**32 + 2, -(2**40)
    with moe_kernels.use_backend(backend_name):
        s = ops.sort_by_expert(experts, 4)
    outside = (experts < 0) | (experts >= 4)
    assert int(s.dropped) == 4 and s.offsets[-1].item() == 18 - 4
    assert bool((s.inverse[outside] == -1).all()) and bool((s.inverse[~outside] >= 0).all())


@pytest.mark.parametrize("backend_name", backends_of("moe_mlp"))
def test_moe_mlp_capacity_zero_drops_every_pair(backend_name):
    # capacity 0 is legal: no expert keeps a pair, the output and every gradient are exact zeros
    dtype = _kernel_dtype(backend_name)
    x, weights, gate_up, down, gate_up_bias, down_bias = _mlp_inputs(7, 8, 4, 3, 2, dtype)
    leaves = [t.requires_grad_() for t in (x, weights, gate_up, down, gate_up_bias, down_bias)]
    with moe_kernels.use_backend(backend_name):
        out = ops.moe_mlp(x, rand_experts(7, 2, 3), weights, gate_up, down, gate_up_bias=gate_up_bias,
                          down_bias=down_bias, capacity=0)
    assert out.shape == (7, 8) and bool((out == 0).all())
    for leaf, g in zip(leaves, torch.autograd.grad(out, leaves, torch.randn_like(out))):
        assert g.shape == leaf.shape and bool((g == 0).all())


# --- empty batches -----------------------------------------------------------------------------------------------
def _empty_case(op):
    """(function of the inputs, the inputs, the expected output shape) with T = 0 tokens (B = 0 or N = 0 for the
    soft ops); a module's parameters are differentiated too."""
    r = lambda *s: torch.randn(*s)  # noqa: E731
    if op == "topk_route":
        return (lambda lg: ops.topk_route(lg, 2).weights), [r(0, 4)], (0, 2)
    if op == "losses":
        def losses(lg):
            ro = ops.topk_route(lg, 2)
            return torch.stack([ops.load_balancing_loss(ro), ops.router_z_loss(ro), ops.entropy_loss(ro)])
        return losses, [r(0, 4)], (3,)
    if op == "permute":
        s = ops.sort_by_expert(torch.zeros(0, 2, dtype=torch.int64), 3)
        return (lambda x: ops.permute(x, s)), [r(0, 5)], (0, 5)
    if op == "unpermute":
        s = ops.sort_by_expert(torch.zeros(0, 2, dtype=torch.int64), 3)
        return (lambda y, w: ops.unpermute(y, s, w)), [r(0, 5), r(0, 2)], (0, 5)
    if op == "grouped_mm":
        return (lambda a, w, b: ops.grouped_mm(a, w, torch.zeros(4, dtype=torch.int32), b, activation="gelu",
                                               gated=True)), [r(0, 5), r(3, 8, 5), r(3, 8)], (0, 4)
    if op == "moe_mlp":
        return (lambda x, w, u, d: ops.moe_mlp(x, torch.zeros(0, 2, dtype=torch.int64), w, u, d)), \
            [r(0, 5), r(0, 2), r(3, 8, 5), r(3, 5, 4)], (0, 5)
    if op == "dense_moe":
        return (lambda x, g, u, d: ops.dense_moe(x, g, u, d)), [r(0, 5), r(0, 3), r(3, 8, 5), r(3, 5, 4)], (0, 5)
    if op == "soft_dispatch":
        return (lambda x, p: ops.soft_dispatch(x, p)), [r(2, 0, 5), r(3, 5)], (2, 3, 5)
    if op == "soft_combine":
        return (lambda x, p, y: ops.soft_combine(x, p, y)), [r(0, 4, 5), r(3, 5), r(0, 3, 5)], (0, 4, 5)
    if op == "soft_logits":
        return (lambda x, p: ops.soft_logits(x, p)), [r(2, 0, 5), r(3, 5)], (2, 0, 3)
    if op == "soft_dispatch_logits":
        return (lambda lg, x: ops.soft_dispatch_logits(lg, x)), [r(2, 0, 3), r(2, 0, 5)], (2, 3, 5)
    if op == "soft_combine_logits":
        return (lambda lg, y: ops.soft_combine_logits(lg, y)), [r(0, 4, 3), r(0, 3, 5)], (0, 4, 5)
    if op in ("SparseMoE", "DenseMoE", "SoftMoE"):
        m = base(op)["module"]
        shape = (0, 5, D) if op == "SoftMoE" else (2, 0, D)
        return m, [r(*shape)], shape
    raise AssertionError(op)


@pytest.mark.parametrize("backend_name", backends_of("sort_by_expert"))
def test_empty_batch_sort(backend_name):
    with moe_kernels.use_backend(backend_name):
        s = ops.sort_by_expert(torch.zeros(0, 2, dtype=torch.int64), 3, capacity=2)
    assert s.order.shape == (0,) and s.inverse.shape == (0, 2) and s.offsets.tolist() == [0, 0, 0, 0]
    assert int(s.dropped) == 0


@pytest.mark.parametrize("backend_name, op", per_backend([p for p in OPS if p.id != "sort_by_expert"]))
def test_empty_batch_gives_shaped_empties_and_gradients(backend_name, op):
    fn, inputs, shape = _empty_case(op)
    inputs = [t.detach().requires_grad_() for t in inputs]
    with moe_kernels.use_backend(backend_name):
        out = fn(*inputs)
    leaves = inputs + (list(fn.parameters()) if isinstance(fn, torch.nn.Module) else [])
    assert tuple(out.shape) == shape
    assert bool(torch.isfinite(out).all())
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)
    for leaf, g in zip(leaves, grads):
        # nothing to differentiate through: every gradient is zero (or unused), never NaN, and shaped like its leaf
        assert g is None or (g.shape == leaf.shape and bool((g == 0).all())), f"gradient of a {tuple(leaf.shape)} leaf"


# --- non-contiguous and strided inputs -----------------------------------------------------------------------
# Each case: bases(dtype) -> the leaves (plain contiguous tensors, the ones differentiated), and view(*leaves) ->
# the op's output computed from strided views of them (transposes, slices with a step, expands). The oracle runs the
# same op on contiguous float64 copies of those views on the reference backend; gradients flow back to the leaves
# in both, so they compare too.
def _strided_moe_mlp():
    T_, D_, H_, E_, k_ = 11, 8, 6, 4, 2
    experts = rand_experts(T_, k_, E_).t().contiguous().t()          # transposed ids

    def bases():
        return [torch.randn(D_, T_), torch.rand(T_, 1) + 0.1, torch.randn(E_, D_, 2 * H_) / math.sqrt(D_),
                torch.randn(E_, H_, D_) / math.sqrt(H_), torch.randn(E_, 4 * H_)]

    def view(x, w, gate_up, down, gate_up_bias, contiguous):
        args = [x.t(), w.expand(T_, k_), gate_up.transpose(1, 2), down.transpose(1, 2), gate_up_bias[:, ::2]]
        if contiguous:
            args = [a.contiguous() for a in args]
        x, w, gate_up, down, gate_up_bias = args
        return ops.moe_mlp(x, experts, w, gate_up, down, gate_up_bias=gate_up_bias, capacity=5)
    return bases, view


def _strided_grouped_mm():
    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int32)

    def bases():
        return [torch.randn(18, 5), torch.randn(3, 5, 8), torch.randn(8, 3)]

    def view(a, w, bias, contiguous):
        args = [a[::2], w.transpose(1, 2), bias.t()]
        if contiguous:
            args = [t.contiguous() for t in args]
        return ops.grouped_mm(args[0], args[1], offsets, args[2], activation="gelu", gated=True)
    return bases, view


def _strided_permute_unpermute():
    experts = rand_experts(7, 2, 3)

    def bases():
        return [torch.randn(7, 10), torch.randn(5, 14), torch.rand(7, 1)]

    def view(x, y, w, contiguous):
        args = [x[:, ::2], y.t(), w.expand(7, 2)]
        if contiguous:
            args = [t.contiguous() for t in args]
        s = ops.sort_by_expert(experts, 3, capacity=4)
        return ops.permute(args[0], s).sum() + ops.unpermute(args[1], s, args[2])
    return bases, view


def _strided_topk_route():
    bias = torch.randn(16)[::2]

    def bases():
        return [torch.randn(8, 9)]

    def view(logits, contiguous):
        z = logits.t()
        z = z.contiguous() if contiguous else z
        b = bias.to(z.dtype).contiguous() if contiguous else bias.to(z.dtype)
        r = ops.topk_route(z, 3, score="sigmoid", bias=b, num_groups=4, topk_groups=2)
        return torch.cat([r.weights.flatten(), r.prob_sum, r.lse])
    return bases, view


def _strided_dense_moe():
    def bases():
        return [torch.randn(6, 5), torch.rand(1, 3), torch.randn(3, 6, 8), torch.randn(3, 4, 6)]

    def view(x, gates, gate_up, down, contiguous):
        args = [x.t(), gates.expand(5, 3), gate_up.transpose(1, 2), down.transpose(1, 2)]
        if contiguous:
            args = [t.contiguous() for t in args]
        return ops.dense_moe(*args)
    return bases, view


def _strided_soft():
    mask = (torch.rand(1, 7) > 0.3).expand(2, 7)

    def bases():
        return [torch.randn(2, 6, 7), torch.randn(6, 4), torch.randn(2, 4, 12)]

    def view(x, phi, y, contiguous):
        args = [x.transpose(1, 2), phi.t(), y[:, :, ::2]]
        if contiguous:
            args = [t.contiguous() for t in args]
        m = mask.contiguous() if contiguous else mask
        x, phi, y = args
        return ops.soft_dispatch(x, phi, m).sum() + ops.soft_combine(x, phi, y, m)
    return bases, view


def _strided_module(name):
    def view_of(m):
        def view(x, contiguous):
            xv = x.transpose(-1, -2)                 # [B, D, S] storage read as [B, S, D]
            return m(xv.contiguous() if contiguous else xv)
        return view

    def make():
        if name == "SparseMoE":
            m = SparseMoE(6, 4, 4, 2, capacity_factor=1.5, bias=True)
        elif name == "DenseMoE":
            m = DenseMoE(6, 4, 4)
        else:
            m = SoftMoE(6, num_slots=2, num_experts=3, expert_mult=1)
        with torch.no_grad():   # expert weights as transposed views: non-contiguous parameters
            m.experts.gate_up_proj = torch.nn.Parameter(m.experts.gate_up_proj.transpose(1, 2).contiguous()
                                                        .transpose(1, 2))
            m.experts.down_proj = torch.nn.Parameter(m.experts.down_proj.transpose(1, 2).contiguous().transpose(1, 2))
        assert not m.experts.gate_up_proj.is_contiguous()
        return m
    return make, view_of


STRIDED = [pytest.param("moe_mlp", _strided_moe_mlp, id="moe_mlp"),
           pytest.param("grouped_mm", _strided_grouped_mm, id="grouped_mm"),
           pytest.param("unpermute", _strided_permute_unpermute, id="permute-unpermute"),
           pytest.param("topk_route", _strided_topk_route, id="topk_route"),
           pytest.param("dense_moe", _strided_dense_moe, id="dense_moe"),
           pytest.param("soft_combine", _strided_soft, id="soft_dispatch-soft_combine")]


def _fast_and_oracles(fn_of, bases, backend_name, dtype):
    """(fast run on the backend in dtype on strided views, reference float64 on contiguous copies, reference in dtype
    on contiguous copies): each as (output, gradients of the leaves) for one random output gradient."""
    def run(backend, cast, contiguous, grad=None):
        leaves = [b.detach().to(cast).requires_grad_() for b in bases]
        with moe_kernels.use_backend(backend):
            out = fn_of(cast)(*leaves, contiguous=contiguous)
        grad = torch.randn_like(out) if grad is None else grad.to(out.dtype)
        return out.detach(), torch.autograd.grad(out, leaves, grad, allow_unused=True), grad
    fast, fast_grads, grad = run(backend_name, dtype, False)
    return (fast, fast_grads), run("reference", F64, True, grad)[:2], run("reference", dtype, True, grad)[:2]


def _compare_all(fast, ref64, same, names):
    for name, f, r, s in zip(names, (fast[0], *fast[1]), (ref64[0], *ref64[1]), (same[0], *same[1])):
        if r is None:
            assert f is None, name
            continue
        _assert_matches(f, r, s, 64, name)


@pytest.mark.parametrize("backend_name, op, case", per_backend(STRIDED))
def test_strided_inputs_are_correct_not_rejected(backend_name, op, case):
    bases_fn, view = case()
    bases = bases_fn()
    fast, ref64, same = _fast_and_oracles(lambda cast: view, bases, backend_name, _kernel_dtype(backend_name))
    _compare_all(fast, ref64, same, ["out"] + [f"grad of leaf {i}" for i in range(len(bases))])


@pytest.mark.parametrize("backend_name, name", per_backend([pytest.param(n, id=n) for n in ("SparseMoE", "DenseMoE",
                                                                                             "SoftMoE")]))
def test_strided_module_input_and_weights(backend_name, name):
    make, view_of = _strided_module(name)
    m = make().eval()
    dtype = _kernel_dtype(backend_name)
    fast_m = copy.deepcopy(m).to(dtype)    # keeps the strided parameters
    assert not fast_m.experts.gate_up_proj.is_contiguous()

    def contiguous_copy(cast):
        c = copy.deepcopy(m).to(cast)
        for p in c.parameters():
            p.data = p.data.contiguous()
        return c

    x = torch.randn(2, 6, 5)

    def grads_of(mod, backend, contiguous, grad=None):
        xl = x.to(mod.experts.gate_up_proj.dtype).requires_grad_()
        with moe_kernels.use_backend(backend):
            out = view_of(mod)(xl, contiguous)
        grad = torch.randn_like(out) if grad is None else grad.to(out.dtype)
        params = [p for p in mod.parameters()]
        return out.detach(), torch.autograd.grad(out, [xl] + params, grad, allow_unused=True), grad

    fast_out, fast_grads, grad = grads_of(fast_m, backend_name, False)
    ref_out, ref_grads, _ = grads_of(contiguous_copy(F64), "reference", True, grad)
    same_out, same_grads, _ = grads_of(contiguous_copy(dtype), "reference", True, grad)
    names = ["out", "grad of x"] + [f"grad of {n}" for n, _ in m.named_parameters()]
    _compare_all((fast_out, fast_grads), (ref_out, ref_grads), (same_out, same_grads), names)


# --- NaN and inf ----------------------------------------------------------------------------------------------
# A subject: (fn(*inputs) -> output, its float64 inputs with one bad token or sequence, the bad index along dim 0).
# The clean rows of the output and of the input gradients must equal the reference on the clean rows alone; the
# non-finite values must sit exactly where the reference on the whole batch puts them.
def _subject_moe_mlp(kind, capacity=None):
    T_, D_, H_, E_, k_ = 10, 8, 6, 4, 2
    gate_up = torch.randn(E_, 2 * H_, D_, dtype=F64) / math.sqrt(D_)
    down = torch.randn(E_, D_, H_, dtype=F64) / math.sqrt(H_)
    biases = torch.randn(E_, 2 * H_, dtype=F64), torch.randn(E_, D_, dtype=F64)
    x, logits = torch.randn(T_, D_, dtype=F64), torch.randn(T_, E_, dtype=F64)
    bad = 3
    if kind == "x-nan":
        x[bad, 2] = float("nan")
    elif kind == "x-inf":
        x[bad, 5] = float("inf")
    elif kind == "logit-nan":
        logits[bad, 1] = float("nan")
    elif kind == "logit-inf":
        logits[bad, 2] = float("inf")      # softmax of +inf: inf/inf, NaN weights (as torch's softmax gives)

    def fn(x, logits):
        p = [t.to(x.dtype) for t in (gate_up, down, *biases)]
        r = ops.topk_route(logits, k_)
        return ops.moe_mlp(x, r.experts, r.weights, p[0], p[1], gate_up_bias=p[2], down_bias=p[3], capacity=capacity)
    return fn, [x, logits], bad


class _MarkedRouter(torch.nn.Module):
    """nn.Linear(D, E) whose logits are `value` (one of them for +inf, all for NaN) on the tokens whose first feature
    is the marker MARK: a router that goes non-finite on one token while that token's x stays finite."""

    MARK = 123.0

    def __init__(self, dim, num_experts, value):
        super().__init__()
        self.linear, self.value = torch.nn.Linear(dim, num_experts), value

    def forward(self, x):
        out = self.linear(x)
        marked = (x[..., :1] == self.MARK).expand_as(out)
        if math.isinf(self.value):
            marked = marked & (torch.arange(out.shape[-1]) == 1)
        return out.masked_fill(marked, self.value)


def _subject_module(name, kind):
    bad, value = 2, float("nan") if kind.endswith("nan") else float("inf")
    router = _MarkedRouter(8, 4, value) if kind.startswith("logit") else None
    if name == "SparseMoE":
        m = SparseMoE(8, 6, 4, 2, bias=True, shared_gate=True, num_shared_experts=1, router=router)
        x = torch.randn(9, 8, dtype=F64)
    elif name == "DenseMoE":
        m = DenseMoE(8, 6, 4, bias=True, router=router)
        x = torch.randn(9, 8, dtype=F64)
    else:
        m = SoftMoE(8, num_slots=2, num_experts=3, expert_mult=1)
        x = torch.randn(4, 5, 8, dtype=F64)
    m = m.to(F64).eval()
    if kind.startswith("logit"):
        x[bad, 0] = _MarkedRouter.MARK
    elif name == "SoftMoE":
        x[bad, 1, 3] = value
    else:
        x[bad, 3] = value
    copies = {}

    def fn(x):
        if x.dtype not in copies:
            copies[x.dtype] = copy.deepcopy(m).to(x.dtype)
        return copies[x.dtype](x)
    return fn, [x], bad


def _subject_soft_masked(kind):
    # the bad token is masked out: it still poisons its sequence (its weight is 0, and 0 * NaN is NaN)
    m = SoftMoE(8, num_slots=2, num_experts=3, expert_mult=1).to(F64).eval()
    x = torch.randn(3, 6, 8, dtype=F64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4] = False
    x[1, 4, 0] = float("nan") if kind == "x-nan" else float("inf")
    copies = {}

    def fn(x, mask_rows=None):
        if x.dtype not in copies:
            copies[x.dtype] = copy.deepcopy(m).to(x.dtype)
        rows = torch.arange(3) if x.shape[0] == 3 else torch.tensor([0, 2])
        return copies[x.dtype](x, mask[rows])
    return fn, [x], 1


NAN_SUBJECTS = (
    [pytest.param("moe_mlp", lambda k=k: _subject_moe_mlp(k), id=f"moe_mlp-{k}")
     for k in ("x-nan", "x-inf", "logit-nan", "logit-inf")] +
    [pytest.param(n, lambda n=n, k=k: _subject_module(n, k), id=f"{n}-{k}")
     for n in ("SparseMoE", "DenseMoE", "SoftMoE") for k in ("x-nan", "x-inf")] +
    # router logits going non-finite on one token (a router of the caller's, on a finite x)
    [pytest.param(n, lambda n=n, k=k: _subject_module(n, k), id=f"{n}-{k}")
     for n in ("SparseMoE", "DenseMoE") for k in ("logit-nan", "logit-inf")] +
    [pytest.param("SoftMoE", lambda k=k: _subject_soft_masked(k), id=f"SoftMoE-masked-{k}") for k in ("x-nan", "x-inf")]
)


def _finite_rows(t):
    return torch.isfinite(t).flatten(1).all(1)


@pytest.mark.parametrize("backend_name, name, subject", per_backend(NAN_SUBJECTS))
def test_non_finite_token_stays_in_its_token(backend_name, name, subject):
    fn, inputs64, bad = subject()
    dtype = _kernel_dtype(backend_name)
    n = inputs64[0].shape[0]
    keep = torch.tensor([i for i in range(n) if i != bad])

    def run(backend, inputs, grad=None):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with moe_kernels.use_backend(backend):
            out = fn(*leaves)
        grad = torch.randn_like(out) if grad is None else grad.to(out.dtype)
        return out.detach(), torch.autograd.grad(out, leaves, grad), grad

    full = [t.to(dtype) for t in inputs64]
    out, grads, grad = run(backend_name, full)
    # the bad row is non-finite everywhere, every other row finite
    assert not bool(_finite_rows(out)[bad]), "the bad token's output is finite"
    assert bool(torch.isfinite(out[keep]).all()), "a non-finite value leaked into another token's output"
    for i, g in enumerate(grads):
        assert bool(torch.isfinite(g[keep]).all()), f"input {i}: a non-finite gradient leaked into a clean token"
    # NaN and inf exactly where the reference puts them, on the whole batch
    ref_out, ref_grads, _ = run("reference", full, grad)
    assert same_bits(torch.isfinite(out), torch.isfinite(ref_out)), "non-finite outputs placed unlike the reference"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert same_bits(torch.isfinite(g), torch.isfinite(r)), \
            f"input {i}: non-finite gradients placed unlike the reference"
    # the clean rows equal the reference computed without the bad one (float64), gradients included
    ref64, ref64_grads, _ = run("reference", [t[keep] for t in inputs64], grad[keep])
    same, same_grads, _ = run("reference", [t[keep] for t in full], grad[keep])
    _assert_matches(out[keep], ref64, same, 64, "clean rows of the output")
    for i, (g, r, s) in enumerate(zip(grads, ref64_grads, same_grads)):
        _assert_matches(g[keep], r, s, 64, f"clean rows of the gradient of input {i}")


@pytest.mark.parametrize("kind", ["x-nan", "logit-nan"])
@pytest.mark.parametrize("backend_name", backends_of("moe_mlp"))
def test_non_finite_token_under_capacity_matches_reference(backend_name, kind):
    # with a capacity the bad token still takes its experts' capacity (NaN scores rank first, as torch.sort puts
    # them), so the batch without it is another problem: compare with the reference on the same batch
    fn, inputs64, bad = _subject_moe_mlp(kind, capacity=4)
    dtype = _kernel_dtype(backend_name)
    full = [t.to(dtype) for t in inputs64]
    with moe_kernels.use_backend(backend_name):
        out = fn(*full)
    with moe_kernels.use_backend("reference"):
        want, same = fn(*inputs64), fn(*full)
    assert not bool(_finite_rows(out)[bad]) and bool(_finite_rows(torch.cat([out[:bad], out[bad + 1:]])).all())
    assert same_bits(torch.isfinite(out), torch.isfinite(want))
    ok = torch.isfinite(want)
    _assert_matches(out[ok], want[ok], same[ok], 64, "finite outputs")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend_name", backends_of("topk_route"))
def test_topk_route_non_finite_logits_match_reference(backend_name, score):
    # row 1: a NaN logit; row 2: +inf (softmax: NaN weights; sigmoid: a score of 1); row 3: -inf logits, a mask (k
    # of 5 experts still finite); row 4: all -inf but one; row 5: all -inf (logsumexp -inf, softmax NaN). Every
    # result, non-finite ones included, as the reference gives it
    logits = torch.randn(7, 5)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, [0, 2]] = float("-inf")
    logits[4, [0, 1, 3, 4]] = float("-inf")
    logits[5] = float("-inf")
    with moe_kernels.use_backend(backend_name):
        r = ops.topk_route(logits, 2, score=score)
    with moe_kernels.use_backend("reference"):
        want = ops.topk_route(logits, 2, score=score)
        want64 = ops.topk_route(logits.double(), 2, score=score)
    assert torch.equal(r.experts, want.experts) and torch.equal(r.counts, want.counts)
    assert not bool(((r.experts[3, :, None] == torch.tensor([0, 2])).any()))   # a -inf expert is never chosen
    for name in ("weights", "prob_sum", "lse"):
        got, ref, ref64 = getattr(r, name), getattr(want, name), getattr(want64, name)
        assert same_bits(got.isnan(), ref.isnan()) and same_bits(got.isinf(), ref.isinf()), \
            f"{name}: NaN / inf placed unlike the reference: {got} vs {ref}"
        ok = torch.isfinite(ref)
        assert torch.equal(got[~ok & ~got.isnan()], ref[~ok & ~ref.isnan()]), f"{name}: infinities of another sign"
        _assert_matches(got[ok], ref64[ok], ref[ok], 8, name)
