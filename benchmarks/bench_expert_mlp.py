"""The expert MLP (`moe_mlp`, the heart of SparseMoE) against the hardware's measured limits and its peers.

    python -m benchmarks.bench_expert_mlp [--device cpu|cuda] [--quick]

Providers on the same routing and weights: ours (`auto` backend: the fused Triton kernels on CUDA), the
reference backend, and a layer built from torch.nn.functional.grouped_mm with torch's own permutation
(argsort + index_add). Limits measured in the same run: a dense matmul of the same FLOPs (compute-bound
shapes) and a device-to-device copy (HBM bandwidth, for decode: the bytes of the active experts' weights).
GPU targets: Mixtral fwd >= 85% / fwd+bwd >= 75% of the dense rate; Qwen3-30B-A3B fwd+bwd >= 1.3x the
grouped_mm layer; decode >= 70% of copy bandwidth.
"""
import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

import moe_kernels
from moe_kernels import ops

from . import common

SHAPES = {
    # name: T, D, H, E, k
    "cuda": [("Mixtral", 16384, 4096, 14336, 8, 2), ("Qwen3-30B-A3B", 32768, 2048, 768, 128, 8),
             ("Mixtral-decode-T1", 1, 4096, 14336, 8, 2), ("Mixtral-decode-T64", 64, 4096, 14336, 8, 2),
             ("Qwen3-decode-T1", 1, 2048, 768, 128, 8), ("Qwen3-decode-T64", 64, 2048, 768, 128, 8)],
    "cpu": [("Mixtral/32", 1024, 256, 448, 8, 2), ("Qwen3/16", 1024, 128, 48, 32, 4),
            ("Qwen3/16-decode-T4", 4, 128, 48, 32, 4)],
}


def grouped_mm_layer(x, experts, weights, w_up_t, w_down_t):
    """A MoE expert layer as users build it from torch.nn.functional.grouped_mm (w_*_t: [E, in, out])."""
    T, k = experts.shape
    E = w_up_t.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    tok = order // k
    h = F.grouped_mm(x[tok], w_up_t, offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, w_down_t, offs=offs) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def run(device, dtype, quick=False):
    rows = []
    shapes = SHAPES[device][:1] + SHAPES[device][-1:] if quick else SHAPES[device]
    for name, T, D, H, E, k in shapes:
        x = torch.randn(T, D, device=device, dtype=dtype)
        logits = torch.randn(T, E, device=device)
        r = ops.topk_route(logits, k)
        w_up = (torch.randn(E, 2 * H, D, device=device, dtype=dtype) / D**0.5).requires_grad_()
        w_down = (torch.randn(E, D, H, device=device, dtype=dtype) / H**0.5).requires_grad_()
        w_up_t = w_up.detach().transpose(1, 2).contiguous().requires_grad_()
        w_down_t = w_down.detach().transpose(1, 2).contiguous().requires_grad_()
        xg = x.clone().requires_grad_()
        g = torch.randn(T, D, device=device, dtype=dtype)
        decode = T <= 64

        def ours(backend, backward):
            def fn():
                with moe_kernels.use_backend(backend):
                    if backward:
                        out = ops.moe_mlp(xg, r.experts, r.weights, w_up, w_down)
                        torch.autograd.grad(out, (xg, w_up, w_down), g)
                    else:
                        with torch.no_grad():
                            ops.moe_mlp(x, r.experts, r.weights, w_up, w_down)
            return fn

        def peer(backward):
            def fn():
                if backward:
                    out = grouped_mm_layer(xg, r.experts, r.weights, w_up_t, w_down_t)
                    torch.autograd.grad(out, (xg, w_up_t, w_down_t), g)
                else:
                    with torch.no_grad():
                        grouped_mm_layer(x, r.experts, r.weights, w_up_t, w_down_t)
            return fn

        for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
            if decode and backward:
                continue
            fns = {"ours": ours("auto", backward), "reference": ours("reference", backward)}
            if device == "cuda" or D % 4 == 0:
                fns["torch grouped_mm"] = peer(backward)
            if decode:
                active = int(torch.unique(r.experts).numel())  # sync outside the timed region
                nbytes = active * 3 * H * D * x.element_size()
                src = torch.empty(max(nbytes // 4, 1), device=device, dtype=torch.float32)
                dst = torch.empty_like(src)
                fns["limit"] = lambda: dst.copy_(src)
            else:
                fns["limit"], limit_flops = common.dense_matmul(T * k, 3 * H, D, dtype, device, backward)
            try:
                times = common.timeit(fns, device=device)
            except RuntimeError as exc:  # e.g. grouped_mm without a kernel for this device/dtype
                fns.pop("torch grouped_mm", None)
                print(f"{name} {pass_name}: torch grouped_mm skipped ({str(exc).splitlines()[0]})")
                times = common.timeit(fns, device=device)
            t_limit = times.pop("limit")
            flops = common.sparse_flops(T, k, D, H, True, backward)
            best_peer = times.get("torch grouped_mm")
            for prov, t in times.items():
                row = {"case": f"{name} T{T}-D{D}-H{H}-E{E}-k{k}", "pass": pass_name, "provider": prov,
                       "ms": t * 1e3, "tflops": flops / t / 1e12,
                       "vs_peer": best_peer / t if best_peer else None}
                if decode:
                    row["gbps"] = nbytes / t / 1e9
                    row["pct_limit"] = 100 * t_limit / t  # copy of the same bytes / our time
                else:
                    row["pct_limit"] = 100 * (flops / t) / (limit_flops / t_limit)
                rows.append(row)
    return rows


def format_table(rows):
    lines = ["| case | pass | provider | ms | TFLOP/s | GB/s | % limit | vs grouped_mm |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = f"{r['gbps']:.1f}" if "gbps" in r else ""
        vs = f"{r['vs_peer']:.2f}x" if r["vs_peer"] else ""
        lines.append(f"| {r['case']} | {r['pass']} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.3f} | {gb} | "
                     f"{r['pct_limit']:.0f}% | {vs} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_expert_mlp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    rows = run(args.device, dtype, args.quick)
    device = common.device_name(args.device)
    table = format_table(rows)
    print(f"expert MLP on {device}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}\n\n{table}")
    if args.device == "cuda":
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"expert_mlp-{device}-{datetime.date.today().isoformat()}")
        with open(stem + ".json", "w") as f:
            json.dump({"device": device, "dtype": str(dtype), "torch": torch.__version__, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"# expert MLP: {device}\n\n{table}\n")


if __name__ == "__main__":
    main()
