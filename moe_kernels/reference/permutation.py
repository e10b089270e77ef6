"""Permutation of (token, slot) pairs into expert order and back.

The spec of `moe_kernels.ops.sort_by_expert`, `permute` and `unpermute`. N = T*k pairs, flat index t*k + j.
"""
import torch


def sort_by_expert(experts: torch.Tensor, num_experts: int, capacity: int | None = None):
    """experts: [T, k] -> order [N], inverse [T, k], offsets [E+1] (int32).

    order lists the flat indices of the kept pairs grouped by expert (ascending flat index within an
    expert), then the pairs not kept (id outside [0, E), or beyond `capacity`) in flat order.
    inverse[t, j] is the position of pair t*k+j in `order`, or -1 when it was not kept.
    With a capacity, an expert keeps its first `capacity` pairs in priority order: all first choices
    (slot 0) in token order, then all second choices, and so on.
    """
    T, k = experts.shape
    E = num_experts
    ids = experts.reshape(-1).to(torch.int64)
    key = torch.where((ids >= 0) & (ids < E), ids, E)
    if capacity is not None:
        # rank of each pair within its expert, in priority order (slot-major)
        priority = key.view(T, k).t().reshape(-1)
        sorted_key, perm = torch.sort(priority, stable=True)
        starts = torch.searchsorted(sorted_key, sorted_key, right=False)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(T * k, device=ids.device) - starts
        rank = rank.view(k, T).t().reshape(-1)
        key = torch.where(rank < capacity, key, E)
    _, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T * k, device=ids.device)
    inverse = torch.where(key < E, inverse, -1)
    return order.to(torch.int32), inverse.view(T, k).to(torch.int32), offsets.to(torch.int32)


def permute(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x: [T, D], order: [N], inverse: [T, k] -> [N, D]: row p = x[order[p] // k] for a kept pair, zero for the
    rows of pairs not kept (past offsets[E])."""
    k = inverse.shape[1]
    rows = x.index_select(0, order.long() // k)
    kept = inverse.reshape(-1).index_select(0, order.long()) >= 0
    return torch.where(kept.unsqueeze(-1), rows, torch.zeros((), dtype=x.dtype, device=x.device))


def gather_pairs(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of y [N, D] for each (token, slot) of inverse [T, k] -> [T, k, D]; not-kept pairs read as 0."""
    T, k = inverse.shape
    kept = inverse >= 0
    rows = y.index_select(0, inverse.reshape(-1).long().clamp(min=0)).view(T, k, y.shape[-1])
    # torch.where, not a multiply: a NaN in another token's row must not leak into this one
    return torch.where(kept.unsqueeze(-1), rows, torch.zeros((), dtype=y.dtype, device=y.device))


def unpermute(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """y: [N, D], inverse: [T, k], weights: [T, k] -> [T, D], out[t] = sum_j w[t, j] * y[inverse[t*k+j]] (accumulated in fp32,
    slot order), in y's dtype. Pairs not kept contribute zero."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    rows = gather_pairs(y, inverse).to(acc)
    if weights is not None:
        rows = rows * weights.to(acc).unsqueeze(-1)
    return rows.sum(1).to(y.dtype)


def permute_backward(grad: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """grad: [N, D] -> [T, D]: each token sums the gradients of its kept rows, in slot order (unpermute without
    weights)."""
    return unpermute(grad, inverse, None)


def unpermute_backward(grad_out, y, inverse, weights):
    """-> (grad_y [N, D], grad_weights [T, k] or None). grad_y[p] sums the gradients of the pairs whose inverse is p
    (one pair for sort_by_expert's inverse; a row no pair keeps is zero)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    T, k = inverse.shape
    kept = (inverse >= 0).reshape(-1)
    g = grad_out.to(acc)
    grad_rows = g.unsqueeze(1).expand(T, k, g.shape[-1])
    if weights is not None:
        grad_rows = grad_rows * weights.to(acc).unsqueeze(-1)
    grad_y = torch.zeros(y.shape, dtype=acc, device=y.device)
    idx = inverse.reshape(-1).long()[kept]
    grad_y.index_put_((idx,), grad_rows.reshape(-1, g.shape[-1])[kept], accumulate=True)
    grad_w = None
    if weights is not None:
        grad_w = (gather_pairs(y, inverse).to(acc) * g.unsqueeze(1)).sum(-1).to(weights.dtype)
    return grad_y.to(y.dtype), grad_w
