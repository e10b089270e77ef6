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


def timeit(fn, *, warmup=2, repeats=7, device="cpu") -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def dense_rate(M, N, K, dtype, device, backward=False) -> float:
    """FLOP/s of a dense [M, K] x [K, N] matmul (and its backward) measured now: the limit for these FLOPs."""
    a = torch.randn(M, K, dtype=dtype, device=device, requires_grad=backward)
    b = torch.randn(K, N, dtype=dtype, device=device, requires_grad=backward)
    if backward:
        g = torch.randn(M, N, dtype=dtype, device=device)

        def fn():
            torch.autograd.grad(a @ b, (a, b), g)
        flops = 6 * M * N * K
    else:
        def fn():
            a @ b
        flops = 2 * M * N * K
    return flops / timeit(fn, device=device)


def sparse_flops(T, k, D, H, gated, backward):
    """Expert MLP FLOPs: forward 2*T*k*D*H*(3 if gated else 2); forward+backward three times that."""
    f = 2 * T * k * D * H * (3 if gated else 2)
    return 3 * f if backward else f


def soft_flops(B, N, S_total, D, H, gated, backward):
    """Dispatch and combine logits + mixes (4 GEMMs of B*N*S*D each... 2 logits, 2 mixes) plus the experts."""
    mix = 2 * B * N * S_total * D * 4
    experts = 2 * B * S_total * D * H * (3 if gated else 2)
    return (mix + experts) * (3 if backward else 1)
