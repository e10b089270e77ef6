"""Timing, FLOP models and the dense-matmul limit shared by the benchmarks."""
import gc
import platform
import statistics
import time

import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def timeit(fns: dict, *, warmup=2, repeats=9, device="cpu") -> dict:
    """Median seconds of each fn() in `fns`. On CPU the runs are interleaved (a, b, c, a, b, c, ...), so load
    from elsewhere on the machine hits every provider alike and the ratios hold; on CUDA, do_bench."""
    if device == "cuda":
        import triton.testing

        return {name: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
                for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(fn, device="cpu"):
    """Peak bytes allocated by fn() on CUDA; None on CPU (no allocator statistics)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def dense_matmul(M, N, K, dtype, device, backward=False):
    """(fn, flops) of a dense [M, K] x [K, N] matmul (and its backward): its rate is the limit for these FLOPs."""
    a = torch.randn(M, K, dtype=dtype, device=device, requires_grad=backward)
    b = torch.randn(K, N, dtype=dtype, device=device, requires_grad=backward)
    if not backward:
        return (lambda: a @ b), 2 * M * N * K
    g = torch.randn(M, N, dtype=dtype, device=device)
    return (lambda: torch.autograd.grad(a @ b, (a, b), g)), 6 * M * N * K


def sparse_flops(T, k, D, H, gated, backward):
    """Expert MLP FLOPs: forward 2*T*k*D*H*(3 if gated else 2); forward+backward three times that."""
    f = 2 * T * k * D * H * (3 if gated else 2)
    return 3 * f if backward else f


def soft_flops(B, N, S_total, D, H, gated, backward):
    """Soft MoE: dispatch and combine each compute the [B, N, S] logits and one mix (four GEMMs of 2*B*N*S*D),
    plus the experts on B*S slots; forward+backward three times that."""
    mix = 2 * B * N * S_total * D * 4
    experts = 2 * B * S_total * D * H * (3 if gated else 2)
    return (mix + experts) * (3 if backward else 1)
