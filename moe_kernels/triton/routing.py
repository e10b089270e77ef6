"""Triton kernels of the routing op family (top-k gating forward and backward)."""
