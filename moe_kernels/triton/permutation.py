"""Triton kernels of the permutation op family (counting sort, permute, unpermute)."""
