"""Helpers shared by the tests: the earned-tolerance comparison, poisoning, random routing."""
import torch


def assert_earned(fast, ref64, same_dtype, atol=1e-6, name="output"):
    """flash-attention's rule: |fast - ref64| <= 2 * |same_dtype - ref64| + atol, elementwise, where
    `same_dtype` is plain PyTorch computing the same thing in fast's dtype."""
    err = (fast.double() - ref64).abs()
    bound = 2 * (same_dtype.double() - ref64).abs() + atol
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed the earned tolerance; "
                           f"max error {err.max().item():.3g}, max bound there {bound[bad].max().item():.3g}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor that a kernel is about to overwrite with NaN (floats) or a sentinel (ints)."""
    return t.fill_(float("nan") if t.is_floating_point() else -(2**30))


def rand_experts(T, k, E, generator=None):
    """[T, k] int64 expert ids, distinct within a token (as top-k gives), uniformly random."""
    if T == 0:
        return torch.empty(0, k, dtype=torch.int64)
    return torch.rand(T, E).argsort(dim=1)[:, :k]
