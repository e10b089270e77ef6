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
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype} (shape {tuple(t.shape)})")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def same_device(**tensors):
    given = {n: t for n, t in tensors.items() if t is not None}
    if len({t.device for t in given.values()}) > 1:
        raise ValueError("tensors must be on one device, got " +
                         ", ".join(f"{n} {tuple(t.shape)} on {t.device}" for n, t in given.items()))


def same_dtype(**tensors):
    given = {n: t for n, t in tensors.items() if t is not None}
    if len({t.dtype for t in given.values()}) > 1:
        raise TypeError("tensors must share a dtype, got " +
                        ", ".join(f"{n} {t.dtype} {tuple(t.shape)}" for n, t in given.items()))


def top_k(k, num_experts, name="k", where=""):
    """where: what the experts were counted from, for the message (e.g. "logits of shape (5, 8)")."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        of = f" ({where})" if where else ""
        raise ValueError(f"{name} must be in [1, num_experts={num_experts}]{of}, got {k}")


def pairs(T, k, what):
    """T*k (token, slot) pairs are indexed with int32 (order, inverse, offsets, counts): refuse more than that
    addresses, before any kernel, instead of wrapping. what: the argument the pairs come from, with its shape."""
    if T * k > INT32_MAX:
        raise ValueError(f"{what}: T*k = {T}*{k} = {T * k} (token, slot) pairs overflow the int32 indices "
                         f"(limit {INT32_MAX})")


def rows(name, t):
    """Rows of t addressed by int32 offsets: at most INT32_MAX."""
    if t.shape[0] > INT32_MAX:
        raise ValueError(f"{name} of shape {tuple(t.shape)} has more rows than int32 offsets address "
                         f"(limit {INT32_MAX})")


def offset_values(offsets, n_rows):
    """offsets [E+1] must be non-decreasing in [0, n_rows]: the groups the kernels read and write. Checked where the
    values are on the host already (CPU tensors); on CUDA that would be a device sync, so there they are trusted."""
    if offsets.device.type != "cpu" or torch.compiler.is_compiling():
        return
    o = offsets.tolist()
    if o and (o[0] < 0 or o[-1] > n_rows or any(a > b for a, b in zip(o, o[1:]))):
        raise ValueError(f"offsets of shape {tuple(offsets.shape)} must be non-decreasing in [0, N = {n_rows}] "
                         f"(the rows of a), got {o if len(o) <= 16 else o[:16] + ['...']}")


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def module_input(module, x, param, dtype=True):
    """x must be on the device and (with dtype) in the dtype of the module's parameters (param: one of them): a
    clear error naming x, before torch's own from deep inside a matmul."""
    name = type(module).__name__
    if x.device != param.device:
        raise ValueError(f"x of shape {tuple(x.shape)} is on {x.device} but the {name}'s parameters are on "
                         f"{param.device}")
    if dtype and x.dtype != param.dtype:
        raise TypeError(f"x of shape {tuple(x.shape)} is {x.dtype} but the {name}'s parameters are {param.dtype}")
