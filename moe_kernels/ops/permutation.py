"""Permutation ops: moe_kernels::sort_by_expert (routing metadata), moe_kernels::permute and
moe_kernels::unpermute (+ backwards). Spec: moe_kernels.reference.permutation."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend
from .. import triton as _triton
from ..reference import permutation as ref
from . import _checks


# --- sort_by_expert -----------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::sort_by_expert", mutates_args=())
def _sort_by_expert(experts: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    fn = _backend.dispatch("sort_by_expert", experts.device.type)
    return fn(experts, num_experts, None if capacity < 0 else capacity)


@_sort_by_expert.register_fake
def _(experts, num_experts, capacity):
    T, k = experts.shape
    return (experts.new_empty(T * k, dtype=torch.int32), experts.new_empty(T, k, dtype=torch.int32),
            experts.new_empty(num_experts + 1, dtype=torch.int32))


# native (csrc/permutation.cpp): looked up on call, so that the package imports without the extension
def _sort_native(experts, num_experts, capacity):
    return torch.ops.moe_kernels_C.sort_by_expert(experts, num_experts, -1 if capacity is None else capacity)


_backend.register("sort_by_expert", "reference", ref.sort_by_expert)
_backend.register("sort_by_expert", "native", _sort_native)


# --- permute ------------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::permute", mutates_args=())
def _permute(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    return _backend.dispatch("permute", x.device.type)(x, order, inverse)


@_permute.register_fake
def _(x, order, inverse):
    return x.new_empty(order.shape[0], x.shape[1])


@torch.library.custom_op("moe_kernels::permute_backward", mutates_args=())
def _permute_backward(grad: Tensor, inverse: Tensor) -> Tensor:
    return _backend.dispatch("permute_backward", grad.device.type)(grad, inverse)


@_permute_backward.register_fake
def _(grad, inverse):
    return grad.new_empty(inverse.shape[0], grad.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _permute_bwd(ctx, grad):
    (inverse,) = ctx.saved_tensors
    return _permute_backward(grad.contiguous(), inverse), None, None


_backend.register_autograd(_permute, _permute_bwd, _permute_setup)
_backend.register("permute", "reference", ref.permute)
_backend.register("permute_backward", "reference", ref.permute_backward)
_backend.register("permute", "native", lambda *args: torch.ops.moe_kernels_C.permute(*args))
_backend.register("permute_backward", "native", lambda *args: torch.ops.moe_kernels_C.permute_backward(*args))


# --- unpermute ----------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::unpermute", mutates_args=())
def _unpermute(y: Tensor, inverse: Tensor, weights: Optional[Tensor]) -> Tensor:
    return _backend.dispatch("unpermute", y.device.type)(y, inverse, weights)


@_unpermute.register_fake
def _(y, inverse, weights):
    return y.new_empty(inverse.shape[0], y.shape[1])


@torch.library.custom_op("moe_kernels::unpermute_backward", mutates_args=())
def _unpermute_backward(grad: Tensor, y: Tensor, inverse: Tensor, weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    grad_y, grad_w = _backend.dispatch("unpermute_backward", grad.device.type)(grad, y, inverse, weights)
    return grad_y, grad_w if grad_w is not None else grad.new_empty(0)


@_unpermute_backward.register_fake
def _(grad, y, inverse, weights):
    return torch.empty_like(y), (torch.empty_like(weights) if weights is not None else grad.new_empty(0))


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_bwd(ctx, grad):
    y, inverse, weights = ctx.saved_tensors
    grad_y, grad_w = _unpermute_backward(grad.contiguous(), y, inverse, weights)
    return grad_y, None, grad_w if weights is not None else None


def _unpermute_backward_native(grad, y, inverse, weights):
    grad_y, grad_w = torch.ops.moe_kernels_C.unpermute_backward(grad, y, inverse, weights)
    return grad_y, grad_w if weights is not None else None


_backend.register_autograd(_unpermute, _unpermute_bwd, _unpermute_setup)
_backend.register("unpermute", "reference", ref.unpermute)
_backend.register("unpermute_backward", "reference", ref.unpermute_backward)
_backend.register("unpermute", "native", lambda *args: torch.ops.moe_kernels_C.unpermute(*args))
_backend.register("unpermute_backward", "native", _unpermute_backward_native)


if _triton.AVAILABLE:
    from ..triton import permutation as _tri

    _backend.register("sort_by_expert", "triton", _tri.sort_by_expert)
    _backend.register("permute", "triton", _tri.permute)
    _backend.register("permute_backward", "triton", _tri.permute_backward)
    _backend.register("unpermute", "triton", _tri.unpermute)
    _backend.register("unpermute_backward", "triton", _tri.unpermute_backward)


# --- public functions ---------------------------------------------------------------------------
class Sorted(NamedTuple):
    order: Tensor    # [T*k] int32: flat (token*k + slot) index of each row in expert order
    inverse: Tensor  # [T, k] int32: row of each (token, slot), -1 when not kept
    offsets: Tensor  # [E+1] int32: rows of expert e are [offsets[e], offsets[e+1])

    @property
    def dropped(self) -> Tensor:
        """Number of (token, slot) pairs not kept (capacity, or ids outside [0, E)), as a 0-d tensor."""
        return self.order.shape[0] - self.offsets[-1]


class _Made(Sorted):
    """A Sorted that sort_by_expert made: its invariants hold by construction and are never checked again (a Sorted
    built by a caller is checked where an op takes it, check_sorted)."""
    __slots__ = ()


def check_sorted(s: Sorted, name: str = "sorted") -> None:
    """The invariants of a caller's Sorted, each error naming the field: order [T*k], inverse [T, k] and offsets
    [E+1] int32 on one device; offsets non-decreasing from 0 to the kept count n <= T*k; inverse a row in [0, n)
    for each kept pair, each row once, and -1 for the others; order its inverse on the kept rows (order[inverse[t,
    j]] = t*k + j). Reads the values on the host: for metadata from outside the package, never on its own."""
    if isinstance(s, _Made) or torch.compiler.is_compiling():
        return
    if not isinstance(s, Sorted):
        raise TypeError(f"{name} must be a moe_kernels.ops.Sorted (from sort_by_expert), got {type(s).__name__}")
    _checks.tensor(f"{name}.inverse", s.inverse, ndim=2, dtypes=(torch.int32,))
    T, k = s.inverse.shape
    _checks.pairs(T, k, f"{name}.inverse of shape {(T, k)}")
    _checks.tensor(f"{name}.order", s.order, shape=(T * k,), dtypes=(torch.int32,))
    _checks.tensor(f"{name}.offsets", s.offsets, ndim=1, dtypes=(torch.int32,))
    _checks.same_device(**{f"{name}.order": s.order, f"{name}.inverse": s.inverse, f"{name}.offsets": s.offsets})
    offsets = s.offsets.tolist()
    if not offsets or offsets[0] != 0 or offsets[-1] > T * k or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name}.offsets must be non-decreasing from 0 to the kept count <= T*k = {T * k}, got "
                         f"{offsets if len(offsets) <= 16 else offsets[:16] + ['...']}")
    n = offsets[-1]
    inverse = s.inverse.reshape(-1).long().cpu()
    kept = inverse >= 0
    if bool((inverse < -1).any()) or bool((inverse >= n).any()):
        bad = int(torch.nonzero((inverse < -1) | (inverse >= n))[0])
        raise ValueError(f"{name}.inverse must hold a row in [0, {n}) (the kept count, offsets[-1]) or -1 for each "
                         f"pair, got {int(inverse[bad])} at pair {bad} (token {bad // k}, slot {bad % k})")
    rows = inverse[kept]
    if rows.numel() != n or torch.unique(rows).numel() != n:
        raise ValueError(f"{name}.inverse must give each of the {n} kept rows to exactly one pair, got "
                         f"{rows.numel()} kept pairs on {torch.unique(rows).numel()} distinct rows")
    order = s.order.long().cpu()
    pairs = torch.nonzero(kept).reshape(-1)
    wrong = order[rows] != pairs
    if bool(wrong.any()):
        i = int(torch.nonzero(wrong)[0])
        raise ValueError(f"{name}.order must map each kept row back to its pair (order[inverse[t, j]] = t*k + j), "
                         f"got order[{int(rows[i])}] = {int(order[rows[i]])} for pair {int(pairs[i])}")


def sort_by_expert(experts: Tensor, num_experts: int, capacity: Optional[int] = None) -> Sorted:
    """Index-only stable counting sort of the (token, slot) pairs of experts [T, k] by expert id.

    capacity: rows kept per expert (first choices before second, token order within a choice); ids outside
    [0, num_experts) are never kept (the transformers expert-parallel sentinel).
    """
    _checks.tensor("experts", experts, ndim=2, dtypes=_checks.INDEX_DTYPES)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")
    _checks.pairs(*experts.shape, f"experts of shape {tuple(experts.shape)}")
    return _Made(*_sort_by_expert(experts, num_experts, -1 if capacity is None else capacity))


def permute(x: Tensor, sorted: Sorted) -> Tensor:
    """x: [T, D] -> [T*k, D] in expert order (row p is x[order[p] // k]; rows of pairs not kept are zero)."""
    _checks.tensor("x", x, ndim=2)
    check_sorted(sorted)
    if x.shape[0] != sorted.inverse.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens (shape {tuple(x.shape)}) but the sort has "
                         f"{sorted.inverse.shape[0]} (inverse {tuple(sorted.inverse.shape)})")
    _checks.pairs(*sorted.inverse.shape, f"sorted.inverse of shape {tuple(sorted.inverse.shape)}")
    _checks.same_device(x=x, order=sorted.order, inverse=sorted.inverse)
    return _permute(x, sorted.order, sorted.inverse)


def unpermute(y: Tensor, sorted: Sorted, weights: Optional[Tensor] = None) -> Tensor:
    """y: [T*k, D] in expert order -> [T, D], each token the weighted sum of its k rows (slot order,
    fp32 accumulation, no atomics). weights: [T, k] or None (sum)."""
    _checks.tensor("y", y, ndim=2)
    check_sorted(sorted)
    if y.shape[0] != sorted.order.shape[0]:
        raise ValueError(f"y must have T*k = {sorted.order.shape[0]} rows, got shape {tuple(y.shape)}")
    if weights is not None:
        _checks.tensor("weights", weights, shape=tuple(sorted.inverse.shape), dtypes=_checks.FLOAT_DTYPES)
    _checks.pairs(*sorted.inverse.shape, f"sorted.inverse of shape {tuple(sorted.inverse.shape)}")
    _checks.same_device(y=y, inverse=sorted.inverse, weights=weights)
    return _unpermute(y, sorted.inverse, weights)
