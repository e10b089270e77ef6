"""Argument checks shared by the public op functions: each error names the argument and the shapes,
and is raised before any kernel runs."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1


def tensor(name, t, *, ndim=None, dtypes=None, shape=None):
    """shape: tuple of ints or None (any size) for each dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def same_dtype(**tensors):
    dts = {n: t.dtype for n, t in tensors.items() if t is not None}
    if len(set(dts.values())) > 1:
        raise TypeError("tensors must share a dtype, got " + ", ".join(f"{n} {d}" for n, d in dts.items()))


def top_k(k, num_experts, name="k"):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"{name} must be in [1, num_experts={num_experts}], got {k}")


def pairs(T, k):
    if T * k > INT32_MAX:
        raise ValueError(f"T*k = {T}*{k} = {T * k} (token, slot) pairs overflow the int32 indices (limit {INT32_MAX})")


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
