"""Routing + permutation alone, per backend, against the grouped expert GEMMs of the same layer.

    python -m benchmarks.bench_routing [--device cpu|cuda]

GPU target (DESIGN.md shapes): at T=65,536, E=128, k=8 (Qwen3-30B-A3B: D=2048, H=768) routing +
permutation take under 15% of the time of the expert GEMMs. CPU: the same split at a scaled-down shape, and
reference vs native vs triton per step where each applies.
"""
import argparse

import torch

import moe_kernels
from moe_kernels import ops

from . import common

SHAPES = {
    "cuda": [dict(T=65536, D=2048, H=768, E=128, k=8), dict(T=64, D=2048, H=768, E=128, k=8)],
    "cpu": [dict(T=2048, D=256, H=96, E=64, k=8), dict(T=16, D=256, H=96, E=64, k=8)],
}


def _backends(device):
    names = ["reference"]
    if device == "cpu" and moe_kernels._backend.NATIVE:
        names.append("native")
    if device == "cuda" and moe_kernels.triton.AVAILABLE:
        names.append("triton")
    return names


def run(device, dtype):
    rows = []
    for s in SHAPES[device]:
        T, D, H, E, k = s["T"], s["D"], s["H"], s["E"], s["k"]
        logits = torch.randn(T, E, device=device, dtype=dtype)
        x = torch.randn(T, D, device=device, dtype=dtype)
        w_up = torch.randn(E, 2 * H, D, device=device, dtype=dtype) / D**0.5
        w_down = torch.randn(E, D, H, device=device, dtype=dtype) / H**0.5
        r = ops.topk_route(logits, k)
        srt = ops.sort_by_expert(r.experts, E)
        xs = ops.permute(x, srt)
        h = ops.grouped_mm(xs, w_up, srt.offsets, activation="silu", gated=True)
        y = ops.grouped_mm(h, w_down, srt.offsets)

        def gemms():
            ops.grouped_mm(ops.grouped_mm(xs, w_up, srt.offsets, activation="silu", gated=True), w_down, srt.offsets)

        steps = {
            "topk_route": lambda: ops.topk_route(logits, k),
            "sort_by_expert": lambda: ops.sort_by_expert(r.experts, E),
            "permute": lambda: ops.permute(x, srt),
            "unpermute": lambda: ops.unpermute(y, srt, r.weights),
        }
        fns = {"expert GEMMs": gemms}
        for b in _backends(device):
            for step, fn in steps.items():
                def timed(fn=fn, b=b):
                    with moe_kernels.use_backend(b):
                        fn()
                fns[f"{step} [{b}]"] = timed
        times = common.timeit(fns, device=device)
        gemm = times.pop("expert GEMMs")
        case = f"T{T}-D{D}-H{H}-E{E}-k{k}"
        rows.append({"case": case, "step": "expert GEMMs", "backend": "auto", "ms": gemm * 1e3, "pct_of_gemms": 100.0})
        for b in _backends(device):
            total = sum(times[f"{step} [{b}]"] for step in steps)
            for step in steps:
                t = times[f"{step} [{b}]"]
                rows.append({"case": case, "step": step, "backend": b, "ms": t * 1e3, "pct_of_gemms": 100 * t / gemm})
            rows.append({"case": case, "step": "routing+permutation", "backend": b, "ms": total * 1e3,
                         "pct_of_gemms": 100 * total / gemm})
    return rows


def format_table(rows):
    lines = ["| case | step | backend | ms | % of expert GEMMs |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['step']} | {r['backend']} | {r['ms']:.3f} | {r['pct_of_gemms']:.1f}% |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    print(f"routing + permutation on {common.device_name(args.device)}, {str(dtype).replace('torch.', '')}\n")
    print(format_table(run(args.device, dtype)))


if __name__ == "__main__":
    main()
