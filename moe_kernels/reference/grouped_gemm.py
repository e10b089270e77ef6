"""Grouped GEMM over variable-sized expert groups, with the expert MLP's activation fused.

The spec of `moe_kernels.ops.grouped_mm`: rows [offsets[e], offsets[e+1]) of `a` use expert e's weight;
rows at or past offsets[E] (pairs not kept) give zero.
"""
import torch

from .activations import glu, glu_backward


def _segments(offsets: torch.Tensor, n_rows: int):
    """(e, lo, hi) of the non-empty groups; offsets must be non-decreasing in [0, n_rows] (a slice past the rows would
    silently shrink)."""
    bounds = offsets.tolist()
    if bounds and (bounds[0] < 0 or bounds[-1] > n_rows or any(a > b for a, b in zip(bounds, bounds[1:]))):
        raise ValueError(f"offsets must be non-decreasing in [0, N = {n_rows}], got {bounds}")
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _pre_activation(a, w, offsets, bias):
    """h [N, M] = a[rows of e] @ w[e]^T + bias[e], zero outside the groups."""
    h = torch.zeros(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    for e, lo, hi in _segments(offsets, a.shape[0]):
        h[lo:hi] = a[lo:hi] @ w[e].t()
        if bias is not None:
            h[lo:hi] += bias[e]
    return h


def grouped_mm(a, w, offsets, bias=None, activation="identity", gated=False):
    """a: [N, K], w: [E, M, K], offsets: [E+1], bias: [E, M] -> [N, M] (or [N, M/2] when gated)."""
    h = _pre_activation(a, w, offsets, bias)
    out = glu(h, activation, gated)
    end = int(offsets[-1])
    out[end:] = 0  # activation of a zero pre-activation need not be zero (a gelu of a bias would not be)
    return out


def grouped_mm_backward(grad_out, a, w, offsets, bias=None, activation="identity", gated=False, grad_w=True):
    """-> (grad_a [N, K], grad_w [E, M, K] (None when not grad_w: a frozen weight), grad_bias [E, M] or None).
    The pre-activation is recomputed."""
    grad_h = grad_out
    if gated or activation != "identity":
        grad_h = glu_backward(grad_out, _pre_activation(a, w, offsets, bias), activation, gated)
    grad_a = torch.zeros_like(a)
    grad_wt = torch.zeros_like(w) if grad_w else None
    grad_b = torch.zeros_like(bias) if bias is not None else None
    for e, lo, hi in _segments(offsets, a.shape[0]):
        grad_a[lo:hi] = grad_h[lo:hi] @ w[e]
        if grad_w:
            grad_wt[e] = grad_h[lo:hi].t() @ a[lo:hi]
        if bias is not None:
            grad_b[e] = grad_h[lo:hi].sum(0)
    return grad_a, grad_wt, grad_b
