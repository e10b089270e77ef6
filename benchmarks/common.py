"""What every benchmark family shares: cases and providers, the passes, FLOP models, the limits measured in the
same run, timing, peak memory, the agreement check, and a description of the machine.

A family module (bench_expert_mlp, bench_routing, bench_permutation, bench_soft_moe, bench_modules) lists its
cases with `cases(device, size)`; a case builds, per pass, its providers (plain functions over the same weights
and inputs) and the work one call does (FLOPs, bytes moved, the GEMMs of a dense matmul of the same FLOPs).
`run_pass` checks every provider against the reference, measures peak memory, times providers and limits
interleaved, and returns one row per provider.
"""
import contextlib
import dataclasses
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch

import moe_kernels
from moe_kernels import _backend

PASSES = {"fwd": False, "fwd+bwd": True}   # pass name -> with the backward


# --- cases and providers ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Provider:
    """One implementation of a case's pass. fn() runs one call and returns what is checked against the
    reference: the output (forward) or the input's gradient (forward+backward)."""
    name: str
    fn: Callable[[], Any]
    kind: str                      # "ours" (a backend of moe_kernels), "reference" (its reference backend), "peer"
    dtype: torch.dtype


@dataclasses.dataclass
class Work:
    """What one call of a pass does. flops: by the FLOP models below; gemms: (M, N, K) of the dense matmuls
    of the same FLOPs (the compute limit); bytes: bytes one call must move at least, per compute dtype (the
    memory limit), or None where memory is not the bound worth measuring."""
    flops: int
    gemms: list
    bytes: Optional[Callable[[torch.dtype], int]] = None


@dataclasses.dataclass
class Pass:
    providers: list
    work: Work
    canon: Callable[[Any], torch.Tensor] = lambda out: out   # the comparable tensor of a provider's result
    notes: list = dataclasses.field(default_factory=list)
    # fn() giving what 16-bit providers are checked against instead of the 16-bit reference, where that is the
    # less accurate result (e.g. the reference in fp32 on the same bf16-representable inputs); see run_pass
    oracle: Optional[Callable[[], Any]] = None


@dataclasses.dataclass
class Case:
    family: str                     # the op family: expert_mlp, routing, permutation, soft_moe, modules
    label: str                      # shape and setting, e.g. "OLMoE/4 T2048-D512-H256-E64-k8"
    passes: tuple                   # of PASSES
    build: Callable[[str, torch.dtype], Callable[[bool], Pass]]   # (device, dtype) -> (backward -> Pass)
    sweep: Optional[str] = None     # cases of one token sweep share this name ...
    tokens: Optional[int] = None    # ... and differ in this

    @property
    def name(self) -> str:
        return f"{self.family} {self.label}"


_NOTES: list = []


def note(text: str) -> None:
    """A run-wide remark for the report (a peer that is not installed, ...), recorded once."""
    if text not in _NOTES:
        _NOTES.append(text)


def notes() -> list:
    return list(_NOTES)


def ours_backends(op: str, device: str) -> list:
    """[(provider name, backend)] of moe_kernels for `op` on `device`: `auto` as "ours", then each other backend
    that applies on the device and differs from what auto runs (native on CPU, triton on CUDA)."""
    with moe_kernels.use_backend("auto"):
        auto = _backend.resolve(op, device)
    out = [("ours", "auto")]
    other = "native" if device == "cpu" else "triton"
    if other != auto and other in _backend.IMPLS.get(op, {}) and (other != "native" or _backend.NATIVE):
        out.append((f"ours {other}", other))
    return out


def under(backend: str, fn: Callable) -> Callable:
    """fn run under moe_kernels.use_backend(backend)."""
    def wrapped(*args):
        with moe_kernels.use_backend(backend):
            return fn(*args)
    return wrapped


def with_env(name: str, value: str, fn: Callable) -> Callable:
    """fn run with the environment variable `name` set to `value` (restored after each call)."""
    def wrapped(*args):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return wrapped


def pass_fn(forward: Callable, inputs: tuple, params=(), *, backward: bool, grad=None) -> Callable[[], Any]:
    """One call of a pass of forward(*inputs): the forward under no_grad, or the forward and the backward of
    `grad` (a tensor, or a function of the forward's result) w.r.t. the floating-point inputs and `params`,
    returning the first input's gradient. forward may return a tuple; its first element is differentiated."""
    if not backward:
        def fn():
            with torch.no_grad():
                return forward(*inputs)
        return fn
    leaves = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs)
    wrt = [t for t in leaves if t.requires_grad] + [p for p in params if p.requires_grad]

    def fn():
        out = forward(*leaves)
        y = out[0] if isinstance(out, tuple) else out
        # allow_unused: a parameter the output does not depend on (a top-1 gate that scales nothing) has no grad
        return torch.autograd.grad(y, wrt, grad(out) if callable(grad) else grad, allow_unused=True)[0]
    return fn


# --- FLOP models --------------------------------------------------------------------------------------------
def mlp_gemms(rows, D, H, O=None, gated=True):
    """(M, N, K) of the two GEMMs of an expert MLP on `rows` rows: D -> H (2H gated) -> O."""
    return [(rows, (2 if gated else 1) * H, D), (rows, O or D, H)]


def gemm_flops(gemms, backward=False) -> int:
    """2*M*N*K per GEMM; forward+backward three times that (dX and dW each cost a forward)."""
    return sum(2 * M * N * K for M, N, K in gemms) * (3 if backward else 1)


# --- timing ----------------------------------------------------------------------------------------------------
def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def call_time(fn, device) -> tuple:
    """(result, seconds) of one call."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def timeit(fns: dict, estimates: dict, device: str, *, budget_s: float, min_repeats: int = 3,
           max_repeats: int = 15) -> dict:
    """(median, minimum) seconds of one call of each fn (after the warm-up the caller did). On CUDA,
    triton.testing.do_bench's median and 0th percentile. On CPU the samples are interleaved (a, b, c, a, b, c, ...), so load from
    elsewhere on the machine hits every provider alike and the ratios hold; each fn gets about budget_s seconds
    of samples (from its estimated time), at least min_repeats, and a sample under 2 ms runs the fn several times
    (the sample's time divided by the count)."""
    if device == "cuda":
        return {name: _do_bench(fn) for name, fn in fns.items()}
    inner = {n: max(1, math.ceil(2e-3 / max(estimates[n], 1e-7))) for n in fns}
    reps = {n: max(min_repeats, min(max_repeats, int(budget_s / max(estimates[n] * inner[n], 1e-9)))) for n in fns}
    samples = {n: [] for n in fns}
    gc_was_enabled = gc.isenabled()
    gc.collect()   # once (a full collection takes a third of a second with transformers loaded), then none
    gc.disable()   # while sampling: tensors are freed by reference counting all the same
    try:
        for r in range(max(reps.values())):
            for name, fn in fns.items():
                if r >= reps[name]:
                    continue
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: (statistics.median(s), min(s)) for n, s in samples.items()}


def _do_bench(fn) -> tuple:
    try:
        import triton.testing
    except ImportError:
        return _cuda_events(fn)
    median, low = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0])
    return median / 1e3, low / 1e3


def _cuda_events(fn, repeats=20) -> tuple:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), min(times)


# --- peak memory -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null for the block (what C++ code writes there too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device) -> Optional[int]:
    """Peak bytes allocated during one call above what was allocated before it. CUDA: the caching allocator's
    statistics. CPU: torch's profiler records every allocation and free of torch's CPU allocator; the peak of
    their running sum. Either way memory an implementation keeps across calls (a cache allocated before this
    call) is not counted, and neither is memory outside torch's allocator."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    try:
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():    # the profiler's start / stop log lines, written to fd 2 by its C++ side
            prof.__enter__()
        try:
            fn()
        finally:
            with _quiet_stderr():
                prof.__exit__(None, None, None)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # a torch without these profiler internals: no reading, rather than a wrong one
        return None
    events.sort(key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


# --- the limits: a dense matmul of the same FLOPs, a copy of the same bytes ------------------------------------
def dense_matmul(gemms, dtype, device, backward=False) -> Callable[[], Any]:
    """fn() running the dense [M, K] x [K, N] matmuls of `gemms` (and their backward): the rate of the same FLOPs
    with no routing, permutation or grouping."""
    mats = [(torch.randn(M, K, dtype=dtype, device=device, requires_grad=backward),
             torch.randn(K, N, dtype=dtype, device=device, requires_grad=backward)) for M, N, K in gemms]
    if not backward:
        return lambda: [a @ b for a, b in mats]
    grads = [torch.randn(M, N, dtype=dtype, device=device) for M, N, K in gemms]
    return lambda: [torch.autograd.grad(a @ b, (a, b), g) for (a, b), g in zip(mats, grads)]


def copy_bytes(nbytes, device) -> Callable[[], Any]:
    """fn() copying nbytes / 2 bytes: it reads and writes nbytes in all, the bandwidth limit of moving nbytes."""
    n = max(nbytes // 8, 1)  # float32 elements in half the bytes
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# --- agreement with the reference ------------------------------------------------------------------------------
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}
_16BIT = (torch.float16, torch.bfloat16)


def disagreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error of out against ref (exact comparison for integer tensors: 0 or 1)."""
    if out.shape != ref.shape:
        return math.inf
    if not ref.is_floating_point():
        return 0.0 if torch.equal(out.to(ref.dtype), ref) else 1.0
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp_min(1e-30))


# --- one pass of one case --------------------------------------------------------------------------------------
def run_pass(case: Case, pass_name: str, p: Pass, device: str, dtype: torch.dtype, *, budget_s: float,
             min_repeats: int = 3, measure_memory: bool = True) -> list:
    """Rows of one pass: each provider checked against the reference, its peak memory measured, then all timed
    with the limits, interleaved."""
    backward = PASSES[pass_name]
    wall = time.perf_counter()
    results, first = {}, {}
    status = {}
    for prov in p.providers:
        try:
            out, t = call_time(prov.fn, device)                        # warm-up, and the result to check
            results[prov.name] = p.canon(out)
            first[prov.name] = t
        except Exception as exc:                                       # e.g. no kernel for this device or dtype
            status[prov.name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    ref = results.get("reference")
    oracle = None
    if p.oracle is not None and ref is not None and any(prov.dtype in _16BIT for prov in p.providers):
        oracle = p.canon(p.oracle())
    errors = {}
    for prov in p.providers:
        if prov.name not in results:
            continue
        if ref is None:
            status.setdefault(prov.name, "unchecked: the reference failed")
            continue
        against, tol = ref, TOLERANCE[prov.dtype]
        if oracle is not None and prov.dtype in _16BIT:
            # earned (flash-attention's rule): at most twice the 16-bit reference's own error, never under the usual tolerance
            against, tol = oracle, max(tol, 2 * disagreement(ref, oracle))
        errors[prov.name] = disagreement(results[prov.name], against)
        if not errors[prov.name] <= tol:
            status[prov.name] = (f"wrong result: relative RMS error {errors[prov.name]:.2e} against the "
                                 f"{'fp32 oracle' if against is oracle else 'reference'} (tolerance {tol:.1e}); "
                                 f"not timed")
    timed = {prov.name: prov for prov in p.providers if prov.name in results and "not timed" not in
             status.get(prov.name, "")}
    results.clear()
    oracle = None
    memory = {}
    for name, prov in timed.items():   # a second warm-up call: measuring peak memory, or just a call if quick
        if measure_memory:
            memory[name] = peak_memory(prov.fn, device)
        elif first[name] < 0.5:
            call_time(prov.fn, device)
    estimates = {name: first[name] for name in timed}   # sets the number of samples only

    limits = {}
    # a provider's compute limit: the dense matmul in its own dtype or the run's, whichever is faster (bf16 runs
    # several times faster than fp32 where the CPU has bf16 dot products, and far slower where it has none)
    gemm_dtypes = sorted({prov.dtype for prov in timed.values()} | {dtype}, key=str) if p.work.gemms else []
    for dt in gemm_dtypes:
        limits[f"limit: dense matmul {dt}"] = dense_matmul(p.work.gemms, dt, device, backward)
    byte_dtypes = sorted({prov.dtype for prov in timed.values()}, key=str) if p.work.bytes else []
    for dt in byte_dtypes:
        limits[f"limit: copy {dt}"] = copy_bytes(p.work.bytes(dt), device)
    for name, fn in limits.items():
        call_time(fn, device)                                          # warm-up
        _, estimates[name] = call_time(fn, device)
    fns = {name: prov.fn for name, prov in timed.items()} | limits
    measured = timeit(fns, estimates, device, budget_s=budget_s, min_repeats=min_repeats) if fns else {}
    times = {name: median for name, (median, _) in measured.items()}

    t_dense = times.get(f"limit: dense matmul {dtype}")
    rows = []
    for prov in p.providers:
        t = times.get(prov.name)
        row = {"case": case.name, "family": case.family, "label": case.label, "pass": pass_name,
               "provider": prov.name, "kind": prov.kind, "dtype": str(prov.dtype).replace("torch.", ""),
               "sweep": case.sweep, "tokens": case.tokens, "status": status.get(prov.name, "ok"),
               "rel_err": errors.get(prov.name), "flops": p.work.flops, "seconds": t}
        if t is not None:
            limit_t, bound = None, None
            t_dense_best = min((times[f"limit: dense matmul {dt}"] for dt in (prov.dtype, dtype)
                                if f"limit: dense matmul {dt}" in times), default=None)
            if t_dense_best is not None:
                limit_t, bound = t_dense_best, "compute"
            if p.work.bytes:
                t_copy = times[f"limit: copy {prov.dtype}"]
                if limit_t is None or t_copy > limit_t:
                    limit_t, bound = t_copy, "memory"
                row["bytes"] = p.work.bytes(prov.dtype)
                row["gbps"] = row["bytes"] / t / 1e9
            row.update(ms=t * 1e3, min_ms=measured[prov.name][1] * 1e3, gflops=p.work.flops / t / 1e9 if p.work.flops else None,
                       pct_limit=100 * limit_t / t if limit_t else None, bound=bound,
                       peak_bytes=memory.get(prov.name))
        rows.append(row)
    _speedups(rows)
    limit_rows = {"dense_matmul_ms": t_dense * 1e3 if t_dense else None,
                  "dense_gflops": gemm_flops(p.work.gemms, backward) / t_dense / 1e9 if t_dense else None}
    for dt in gemm_dtypes:
        if dt != dtype and times.get(f"limit: dense matmul {dt}"):
            limit_rows[f"dense_matmul_ms_{str(dt).replace('torch.', '')}"] = times[f"limit: dense matmul {dt}"] * 1e3
    wall = time.perf_counter() - wall
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None   # this run's own threads included
    for r in rows:
        r.update(limit=limit_rows, notes=list(p.notes), pass_wall_s=wall, load_1min=load)
    return rows


def _speedups(rows):
    """vs_reference: the reference's time over this row's; vs_best_peer: the fastest peer's time over this row's."""
    t = {r["provider"]: r["seconds"] for r in rows if r["seconds"] is not None}
    peers = {r["provider"]: t[r["provider"]] for r in rows if r["kind"] == "peer" and r["provider"] in t}
    best = min(peers, key=peers.get) if peers else None
    for r in rows:
        s = r["seconds"]
        r["vs_reference"] = t["reference"] / s if s and "reference" in t else None
        r["best_peer"] = best
        r["vs_best_peer"] = peers[best] / s if s and best else None


# --- the machine -----------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    # the native kernels' ISA level names the machine too: with bf16 dot products, bf16 runs at several times the rate
    isa = _backend.native_cpu_isa()
    isa = "" if isa is None else f"-{isa}" + ("bf16" if _backend.native_cpu_bf16_gemm() else "")
    return f"cpu-{platform.machine()}{isa}-{torch.get_num_threads()}threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The commit measured, "+modified" when the code (not the results) differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "moe_kernels", "csrc",
                                  "setup.py", "benchmarks", ":(exclude)benchmarks/results"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+modified" if changed else "")) or None


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    info = {"device": device_name(device), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "moe_kernels": moe_kernels.__version__, "commit": _git_commit(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "packages": {p: _version(p) for p in ("triton", "transformers", "soft-moe-pytorch", "numpy")}}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    b = moe_kernels.backends()
    with moe_kernels.use_backend("auto"):
        info["auto_backend"] = {op: _backend.resolve(op, device) for op in sorted(_backend.IMPLS)}
    info["native"], info["triton_state"], info["cpu_isa"] = b["native"], b["triton"], b["cpu_isa"]
    info["cpu_bf16_gemm"] = b.get("cpu_bf16_gemm")
    info["cpu_amx"] = b.get("cpu_amx")
    return info
