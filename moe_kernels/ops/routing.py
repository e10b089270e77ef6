"""Top-k routing op: moe_kernels::topk_route (+ its backward), and the auxiliary losses built on its
statistics. Spec: moe_kernels.reference.routing."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend
from .. import triton as _triton
from ..reference import routing as ref
from . import _checks


# --- custom ops ---------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::topk_route", mutates_args=())
def _topk_route(logits: Tensor, k: int, score: str, renormalize: bool, bias: Optional[Tensor], num_groups: int,
                topk_groups: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _backend.dispatch("topk_route", logits.device.type)
    return fn(logits, k, score=score, renormalize=renormalize, bias=bias, num_groups=num_groups or None,
              topk_groups=topk_groups or None, scale=scale)


@_topk_route.register_fake
def _(logits, k, score, renormalize, bias, num_groups, topk_groups, scale):
    T, E = logits.shape
    f = ref.compute_dtype(logits.dtype)
    return (logits.new_empty(T, k, dtype=f), logits.new_empty(T, k, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int32), logits.new_empty(E, dtype=f), logits.new_empty(T, dtype=f))


@torch.library.custom_op("moe_kernels::topk_route_backward", mutates_args=())
def _topk_route_backward(grad_weights: Optional[Tensor], grad_prob_sum: Optional[Tensor], grad_lse: Optional[Tensor],
                         logits: Tensor, experts: Tensor, score: str, renormalize: bool, scale: float) -> Tensor:
    fn = _backend.dispatch("topk_route_backward", logits.device.type)
    return fn(grad_weights, grad_prob_sum, grad_lse, logits, experts, score, renormalize, scale)


@_topk_route_backward.register_fake
def _(grad_weights, grad_prob_sum, grad_lse, logits, experts, score, renormalize, scale):
    return torch.empty_like(logits)


# native (csrc/routing.cpp): looked up on call, so that the package imports without the extension
def _route_native(logits, k, *, score, renormalize, bias, num_groups, topk_groups, scale):
    return torch.ops.moe_kernels_C.topk_route(logits, k, score, renormalize, bias, num_groups or 0, topk_groups or 0,
                                              scale)


def _route_backward_native(grad_weights, grad_prob_sum, grad_lse, logits, experts, score, renormalize, scale):
    return torch.ops.moe_kernels_C.topk_route_backward(grad_weights, grad_prob_sum, grad_lse, logits, experts, score,
                                                       renormalize, scale)


_backend.register("topk_route", "reference", ref.topk_route)
_backend.register("topk_route_backward", "reference", ref.topk_route_backward)
_backend.register("topk_route", "native", _route_native)
_backend.register("topk_route_backward", "native", _route_backward_native)
if _triton.AVAILABLE:
    from ..triton import routing as _tri

    _backend.register("topk_route", "triton", _tri.topk_route)
    _backend.register("topk_route_backward", "triton", _tri.topk_route_backward)


# --- autograd -----------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    logits, k, score, renormalize, bias, num_groups, topk_groups, scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.args = (score, renormalize, scale)
    ctx.set_materialize_grads(False)  # outputs without a gradient (often prob_sum, lse) come as None: no work


def _backward(ctx, grad_weights, grad_experts, grad_counts, grad_prob_sum, grad_lse):
    logits, experts = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _topk_route_backward(grad_weights, grad_prob_sum, grad_lse, logits, experts, *ctx.args)
    return grad, None, None, None, None, None, None, None


_backend.register_autograd(_topk_route, _backward, _setup_context)


# --- public functions ---------------------------------------------------------------------------
def check_routing(E: int, k: int, score: str, num_groups: Optional[int], topk_groups: Optional[int], where: str = ""):
    """Validates the routing arguments for E experts; returns (num_groups, topk_groups), 0 for no groups.
    where: what E was counted from, for the messages (e.g. "logits of shape (5, 8)")."""
    _checks.choice("score", score, ref.SCORES)
    _checks.top_k(k, E, where=where)
    for name, v in (("num_groups", num_groups), ("topk_groups", topk_groups)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} must be an int or None, got {type(v).__name__}")
    if num_groups is None or num_groups == 1:
        return 0, 0
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of experts E={E}")
    if topk_groups is None or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
    if k > topk_groups * (E // num_groups):
        raise ValueError(f"k={k} exceeds the {topk_groups * (E // num_groups)} experts of topk_groups={topk_groups} "
                         f"groups of size {E // num_groups}")
    return num_groups, topk_groups


class Routing(NamedTuple):
    weights: Tensor   # [T, k] fp32 (fp64 for fp64 logits)
    experts: Tensor   # [T, k] int64
    counts: Tensor    # [E] int32: (token, slot) pairs per expert
    prob_sum: Tensor  # [E]: sum over tokens of the routing probabilities (load-balancing loss)
    lse: Tensor       # [T]: logsumexp of each token's logits (z-loss)


def topk_route(logits: Tensor, k: int, *, score: str = "softmax", renormalize: bool = True,
               bias: Optional[Tensor] = None, num_groups: Optional[int] = None, topk_groups: Optional[int] = None,
               scale: float = 1.0) -> Routing:
    """Top-k routing of logits [T, E].

    score: "softmax" (Mixtral, Qwen, OLMoE) or "sigmoid" (DeepSeek-V3). renormalize: weights of the k chosen
    experts sum to one. bias [E]: DeepSeek-V3's correction bias, shifts the choice only. num_groups /
    topk_groups: group-limited choice (groups ranked by the sum of their top-2 scores). scale: multiplies the
    weights. Differentiable w.r.t. logits through weights, prob_sum and lse.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if bias is not None:
        _checks.tensor("bias", bias, shape=(logits.shape[1],), dtypes=_checks.FLOAT_DTYPES)
        _checks.same_device(logits=logits, bias=bias)
    num_groups, topk_groups = check_routing(logits.shape[1], k, score, num_groups, topk_groups,
                                            where=f"logits of shape {tuple(logits.shape)}")
    _checks.pairs(logits.shape[0], k, f"logits of shape {tuple(logits.shape)} with k = {k}")
    return Routing(*_topk_route(logits, k, score, renormalize, bias, num_groups, topk_groups, float(scale)))


def _routing(routing) -> Routing:
    """The Routing of topk_route (or a tuple of its five tensors), checked: counts and prob_sum [E], lse [T]."""
    if not isinstance(routing, tuple) or len(routing) != len(Routing._fields):
        got = f"a tensor of shape {tuple(routing.shape)}" if isinstance(routing, Tensor) else type(routing).__name__
        raise TypeError(f"routing must be the Routing that topk_route returns (weights, experts, counts, prob_sum, "
                        f"lse), got {got}")
    r = Routing(*routing)
    for name in Routing._fields:
        _checks.tensor(f"routing.{name}", getattr(r, name))
    E = r.prob_sum.shape[0] if r.prob_sum.dim() == 1 else None
    if E is None or r.counts.shape != (E,) or r.lse.dim() != 1:
        raise ValueError(f"routing.counts and routing.prob_sum must be [E] and routing.lse [T], got counts "
                         f"{tuple(r.counts.shape)}, prob_sum {tuple(r.prob_sum.shape)} and lse {tuple(r.lse.shape)}")
    return r


def load_balancing_loss(routing: Routing) -> Tensor:
    """E * sum_e (count_e / T) * mean_t p_te (transformers' formula; equals k when perfectly balanced)."""
    r = _routing(routing)
    return ref.load_balancing_loss(r.counts, r.prob_sum, r.lse.shape[0])


def entropy_loss(routing: Routing) -> Tensor:
    """sum_e mean_t p_te * log(mean_t p_te + 1e-10): the negative entropy of the mean routing distribution
    (AdvancedMoELayer's load-balancing loss; -log E when balanced)."""
    r = _routing(routing)
    return ref.entropy_loss(r.prob_sum, r.lse.shape[0])


def router_z_loss(routing: Routing) -> Tensor:
    """mean_t logsumexp(logits_t)^2 (ST-MoE)."""
    return ref.router_z_loss(_routing(routing).lse)
