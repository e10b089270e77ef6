"""Where the expert MLP's time goes on a GPU: per-kernel CUDA time of one forward+backward (torch.profiler),
ours beside the torch grouped_mm layer of the suite (peers.grouped_mm_layer), on the same routing and weights, and
the GEMM engine each of our six grouped GEMMs ran on (moe_kernels.triton.engines.LAST).

    python -m benchmarks.profile_expert_mlp [--shape Mixtral|Qwen3-30B-A3B|OLMoE|DeepSeek-V3] [--tokens T]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moe_kernels import ops
from moe_kernels.triton import engines

from . import peers
from .bench_expert_mlp import MODELS

TOKENS = {"Mixtral": 16384, "Qwen3-30B-A3B": 32768, "DeepSeek-V3": 4096, "OLMoE": 16384}


def kernel_table(fn, steps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1e3, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    lines = [f"  total {total:.3f} ms"] + [f"  {ms:8.3f} ms  x{n:<3d} {name[:110]}" for name, ms, n in rows[:14]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_expert_mlp", description=__doc__)
    p.add_argument("--shape", default="Mixtral", choices=list(MODELS))
    p.add_argument("--tokens", type=int, default=None)
    a = p.parse_args(argv)
    D, H, E, k = MODELS[a.shape]
    T = a.tokens or TOKENS[a.shape]
    dt = torch.bfloat16
    x = torch.randn(T, D, device="cuda", dtype=dt, requires_grad=True)
    r = ops.topk_route(torch.randn(T, E, device="cuda"), k)
    w_up = (torch.randn(E, 2 * H, D, device="cuda", dtype=dt) / D**0.5).requires_grad_()
    w_down = (torch.randn(E, D, H, device="cuda", dtype=dt) / H**0.5).requires_grad_()
    grouped_mm = peers.torch_grouped_mm()
    g = torch.randn(T, D, device="cuda", dtype=dt)

    def ours():
        torch.autograd.grad(ops.moe_mlp(x, r.experts, r.weights, w_up, w_down), (x, w_up, w_down), g)

    def peer():
        y = peers.grouped_mm_layer(x, r.experts, r.weights, w_up.transpose(1, 2), w_down.transpose(1, 2), grouped_mm)
        torch.autograd.grad(y, (x, w_up, w_down), g)

    print(f"{a.shape} T={T} D={D} H={H} E={E} k={k} bf16, forward+backward, per-kernel CUDA time")
    engines.LAST.clear()
    print("ours:\n" + kernel_table(ours))
    print("engines: " + ", ".join(f"{role} {engines.LAST[role][0]}" if role in engines.LAST else f"{role} -"
                                  for role in engines.ROLES) + f" ({T * k} rows)")
    print("torch grouped_mm layer:\n" + kernel_table(peer))


if __name__ == "__main__":
    main()
