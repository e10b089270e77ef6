"""Backend selection: reference (always), native (csrc, CPU tensors), triton (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1).

MOE_KERNELS_BACKEND=reference|triton|native|auto (default auto: triton on CUDA, native on CPU when built,
else reference), or `moe_kernels.use_backend(name)` for a block of code. An op that a chosen backend does
not implement runs on the reference backend.

The native ops are loaded on first native use, not at import (moe_kernels._native: the extension built at install
time, else a build on first use cached per torch version and flags, else unavailable with a reason). Under auto, the
first CPU op that would have run natively warns once when they are unavailable. `native_available()` (also readable
as the module attribute `NATIVE`) and `native_error()` (also `_native_error`) say whether they are there and why not.
"""
import contextlib
import os
import threading
from typing import Optional

from . import _native

BACKENDS = ("auto", "reference", "native", "triton")


def native_available() -> bool:
    """Whether the native CPU ops are available; loads them (building them on first use where that is the way)."""
    return _native.available()


def native_error() -> Optional[str]:
    """Why the native CPU ops are unavailable, with the fix; None when they are available."""
    st = _native.state()
    return None if st.available else st.describe()


def __getattr__(name):
    # NATIVE and _native_error are evaluated when first read (module __getattr__), so that importing the package
    # neither loads nor compiles the native ops
    if name == "NATIVE":
        return native_available()
    if name == "_native_error":
        return native_error()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# op name -> {backend: implementation}; filled by moe_kernels.ops as each op registers its backends
IMPLS: dict[str, dict[str, object]] = {}
_local = threading.local()


def _requested() -> str:
    name = getattr(_local, "backend", None) or os.environ.get("MOE_KERNELS_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"MOE_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _triton_usable(device_type: str) -> bool:
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, device_type: str, *, warn: bool = True) -> str:
    """The backend that runs `op` on tensors of `device_type` now. Under auto, a CPU op with a native implementation
    loads the native ops (on first use); without them it runs on reference and, if `warn`, warns once per process."""
    name = _requested()
    impls = IMPLS.get(op, {})
    if name == "auto":
        if device_type == "cuda" and "triton" in impls:
            return "triton"
        if device_type == "cpu" and "native" in impls:
            if native_available():
                return "native"
            if warn:
                _native.warn_unavailable()
        return "reference"
    if name == "native":
        if not native_available():
            raise RuntimeError(f"MOE_KERNELS_BACKEND=native but moe_kernels._C is not available ({native_error()})")
        if device_type != "cpu":
            raise RuntimeError(f"the native backend runs on CPU tensors, got {device_type} tensors")
    if name == "triton" and not _triton_usable(device_type):
        raise RuntimeError(f"the triton backend needs CUDA tensors or TRITON_INTERPRET=1, got {device_type} tensors")
    return name if name in impls else "reference"


# the base activations the native CPU ops compute, and the options of a spec string they compute with each
# (moe_kernels.reference.activations); a spec with an option outside these runs on the reference backend there
NATIVE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity", "relu2")
NATIVE_OPTIONS = ("alpha", "limit", "clamp_after", "up_offset", "interleaved", "gate_softcap", "up_softcap")
_NATIVE_TAKES: dict = {}  # spec string -> bool (a plain dict: torch.compile traces through it without a warning)


def native_takes(activation: str) -> bool:
    """Whether the native ops compute this activation spec string: every valid spec whose options they know (they
    parse the string themselves); an invalid one runs on the reference backend, which names what is wrong."""
    takes = _NATIVE_TAKES.get(activation) if isinstance(activation, str) else None
    if takes is None:
        import dataclasses

        from .reference.activations import Activation, parse_activation
        try:
            a = parse_activation(activation)
        except ValueError:
            return False
        default = Activation(a.name)
        takes = a.name in NATIVE_ACTIVATIONS and all(
            getattr(a, f.name) == getattr(default, f.name) for f in dataclasses.fields(a)
            if f.name != "name" and f.name not in NATIVE_OPTIONS)
        if isinstance(activation, str):
            _NATIVE_TAKES[activation] = takes
    return takes


def register(op: str, backend: str, fn) -> None:
    IMPLS.setdefault(op, {})[backend] = fn


def dispatch(op: str, device_type: str):
    return IMPLS[op][resolve(op, device_type)]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops of this thread on backend `name` inside the block (overrides MOE_KERNELS_BACKEND)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def current() -> Optional[str]:
    """The backend this thread's `use_backend` block chose, or None (then MOE_KERNELS_BACKEND / auto)."""
    return getattr(_local, "backend", None)


def register_autograd(op, backward, setup_context):
    """op.register_autograd(backward, setup_context=...), with the backward run under the forward's `use_backend`
    choice: autograd runs the backward of CUDA tensors on its own worker thread, which a thread-local choice
    would not reach (and so does the recomputation of torch.utils.checkpoint)."""
    def setup(ctx, inputs, output):
        ctx.moe_kernels_backend = current()
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        name = ctx.moe_kernels_backend
        if name is None or name == current():
            return backward(ctx, *grads)
        with use_backend(name):
            return backward(ctx, *grads)
    op.register_autograd(run_backward, setup_context=setup)


def native_cpu_isa() -> Optional[str]:
    """The instruction set the native CPU kernels run with ('avx512', 'avx2' or 'baseline'; capped by
    MOE_KERNELS_CPU_ISA), or None without the native extension."""
    if not native_available():
        return None
    import torch
    return torch.ops.moe_kernels_C.cpu_isa()


def native_cpu_bf16_gemm() -> Optional[bool]:
    """Whether the native CPU ops run bfloat16 GEMMs in bfloat16 (oneDNN, on CPUs with AVX512-BF16 or AMX-BF16 at
    the avx512 ISA level) rather than widened to float32; None without the native extension."""
    if not native_available():
        return None
    import torch
    return torch.ops.moe_kernels_C.cpu_bf16_gemm()


def native_cpu_amx() -> Optional[bool]:
    """Whether the native decode kernels of quantized experts run on AMX tiles (CPUs with AMX-BF16 whose kernel
    grants the tile state, at the avx512 ISA level; MOE_KERNELS_CPU_AMX=0 turns them off); None without the native
    extension."""
    if not native_available():
        return None
    import torch
    return torch.ops.moe_kernels_C.cpu_amx()


def backends() -> dict:
    """What is available and what `auto` picks, per op: {'requested', 'native', 'cpu_isa', 'cpu_bf16_gemm', 'cpu_amx',
    'triton', 'gemm_engines' (the engine of each grouped GEMM role of the expert MLP on CUDA: moe_kernels.triton.engines),
    'decode' (which kernels run a GPU decode step: moe_kernels.triton.expert_mlp_decode), 'ops'}."""
    try:
        import triton  # noqa: F401
        triton_state = "available"
    except Exception as exc:
        triton_state = f"unavailable ({type(exc).__name__}: {exc})"
    def cpu_choice(op):
        try:
            return resolve(op, "cpu", warn=False)
        except (RuntimeError, ValueError) as exc:
            return f"error: {exc}"

    try:
        requested = _requested()
    except ValueError as exc:
        requested = f"error: {exc}"
    try:
        from .triton import engines, expert_mlp_decode
        gemm_engines = engines.report()
        decode = expert_mlp_decode.report()
    except Exception as exc:  # no triton: the expert MLP's GEMMs run on the native or reference backend
        gemm_engines = decode = f"unavailable ({type(exc).__name__}: {exc})"
    return {
        "requested": requested,
        "native": ("available" if native_available()
                   else f"unavailable, CPU ops fall back to reference ({native_error()})"),
        "cpu_isa": native_cpu_isa(),
        "cpu_bf16_gemm": native_cpu_bf16_gemm(),
        "cpu_amx": native_cpu_amx(),
        "triton": triton_state,
        "gemm_engines": gemm_engines,
        "decode": decode,
        "ops": {op: {"implemented": sorted(impls), "cpu": cpu_choice(op)} for op, impls in sorted(IMPLS.items())},
    }
