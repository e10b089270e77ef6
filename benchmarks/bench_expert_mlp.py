"""The expert MLP (`moe_mlp`, the heart of SparseMoE) against the hardware's measured limits and its peers.

    python -m benchmarks.bench_expert_mlp [--device cpu|cuda] [--quick] [--shapes NAME,...]

Providers on the same routing and weights: ours (`auto` backend: the fused Triton kernels on CUDA, the native C++
op on CPU), the reference backend, a layer built from torch.nn.functional.grouped_mm with torch's own permutation
(argsort + index_add), and, when transformers is installed, its experts implementations `eager`, `grouped_mm` and
`batched_mm` (the last only where its per-pair copy of the expert weights fits in memory) on a transformers
MixtralExperts module holding our weights. On CPU, ours also runs on the same weights in bfloat16 (`ours bf16`).
Limits measured in the same run: a dense matmul of the same FLOPs (compute-bound shapes) and a copy of the active
experts' weight bytes (decode).
CPU targets: T2048-D512-H256-E64-k8 fwd+bwd >= 1.25x transformers grouped_mm, >= 5x eager, >= 75% of the dense
rate; T2048-D512-H1024-E8-k2 >= 85% of the dense rate forward and forward+backward; decode T4 forward >= 2x the
fastest transformers implementation; bf16 at least as fast as fp32.
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
    "cpu": [("OLMoE/4", 2048, 512, 256, 64, 8), ("Mixtral/8", 2048, 512, 1024, 8, 2),
            ("OLMoE/4-decode-T4", 4, 512, 256, 64, 8), ("Mixtral/32", 1024, 256, 448, 8, 2),
            ("Qwen3/16", 1024, 128, 48, 32, 4), ("Qwen3/16-decode-T4", 4, 128, 48, 32, 4)],
}
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_MAX_BYTES = 2**30  # batched_mm copies the weights of every (token, slot) pair


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


def transformers_experts(w_up, w_down, implementation):
    """A transformers MixtralExperts module holding copies of our weights, running `implementation`, or None when
    transformers is not installed."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None
    E, H2, D = w_up.shape
    config = MixtralConfig(hidden_size=D, intermediate_size=H2 // 2, num_local_experts=E, hidden_act="silu")
    config._experts_implementation = implementation
    module = MixtralExperts(config).to(device=w_up.device, dtype=w_up.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(w_up)
        module.down_proj.copy_(w_down)
    return module


def providers(x, r, w_up, w_down, g, backward, device):
    """{name: fn} of every provider of one pass, on the same routing r and weights."""
    T, D = x.shape
    k = r.experts.shape[1]

    def timed(forward, params, x=x, g=g):
        xg = x.detach().clone().requires_grad_()

        def fn():
            if backward:
                torch.autograd.grad(forward(xg), (xg, *params), g)
            else:
                with torch.no_grad():
                    forward(x)
        return fn

    def ours(backend, up, down):
        def forward(inp):
            with moe_kernels.use_backend(backend):
                return ops.moe_mlp(inp, r.experts, r.weights, up, down)
        return forward

    fns = {"ours": timed(ours("auto", w_up, w_down), (w_up, w_down)),
           "reference": timed(ours("reference", w_up, w_down), (w_up, w_down))}
    if device == "cpu":
        up16, down16 = (w.detach().to(torch.bfloat16).requires_grad_() for w in (w_up, w_down))
        fns["ours bf16"] = timed(ours("auto", up16, down16), (up16, down16), x.to(torch.bfloat16),
                                 g.to(torch.bfloat16))
    if device == "cuda" or D % 4 == 0:
        up_t, down_t = (w.detach().transpose(1, 2).contiguous().requires_grad_() for w in (w_up, w_down))
        fns["torch grouped_mm"] = timed(lambda inp: grouped_mm_layer(inp, r.experts, r.weights, up_t, down_t),
                                        (up_t, down_t))
    for impl in HF_IMPLEMENTATIONS:
        if impl == "batched_mm" and T * k * w_up[0].numel() * 3 // 2 * w_up.element_size() > BATCHED_MM_MAX_BYTES:
            continue
        module = transformers_experts(w_up.detach(), w_down.detach(), impl)
        if module is None:
            break
        fns[f"transformers {impl}"] = timed(lambda inp, m=module: m(inp, r.experts, r.weights),
                                            (module.gate_up_proj, module.down_proj))
    return fns


def run(device, dtype, quick=False, names=None):
    rows = []
    shapes = SHAPES[device]
    if names:
        shapes = [s for s in shapes if s[0] in names]
    elif quick:
        shapes = shapes[:1] + shapes[-1:]
    for name, T, D, H, E, k in shapes:
        x = torch.randn(T, D, device=device, dtype=dtype)
        r = ops.topk_route(torch.randn(T, E, device=device), k)
        w_up = (torch.randn(E, 2 * H, D, device=device, dtype=dtype) / D**0.5).requires_grad_()
        w_down = (torch.randn(E, D, H, device=device, dtype=dtype) / H**0.5).requires_grad_()
        g = torch.randn(T, D, device=device, dtype=dtype)
        decode = T <= 64
        for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
            if decode and backward:
                continue
            fns = providers(x, r, w_up, w_down, g, backward, device)
            if decode:
                active = int(torch.unique(r.experts).numel())  # sync outside the timed region
                nbytes = active * 3 * H * D * x.element_size()
                src = torch.empty(max(nbytes // 4, 1), device=device, dtype=torch.float32)
                dst = torch.empty_like(src)
                fns["limit"] = lambda: dst.copy_(src)
            else:
                fns["limit"], limit_flops = common.dense_matmul(T * k, 3 * H, D, dtype, device, backward)
            # on CPU the slowest peers take seconds a call: fewer repeats, still interleaved
            reps = dict(warmup=1, repeats=5) if device == "cpu" and not decode else {}
            try:
                times = common.timeit(fns, device=device, **reps)
            except RuntimeError as exc:  # e.g. grouped_mm without a kernel for this device/dtype
                fns.pop("torch grouped_mm", None)
                print(f"{name} {pass_name}: torch grouped_mm skipped ({str(exc).splitlines()[0]})")
                times = common.timeit(fns, device=device, **reps)
            t_limit = times.pop("limit")
            flops = common.sparse_flops(T, k, D, H, True, backward)
            best_peer = times.get("torch grouped_mm")
            for prov, t in times.items():
                row = {"case": f"{name} T{T}-D{D}-H{H}-E{E}-k{k}", "pass": pass_name, "provider": prov,
                       "ms": t * 1e3, "tflops": flops / t / 1e12,
                       "vs_peer": best_peer / t if best_peer else None, "ours_speedup": t / times["ours"]}
                if decode:
                    row["gbps"] = nbytes / t / 1e9
                    row["pct_limit"] = 100 * t_limit / t  # copy of the same bytes / our time
                else:
                    row["pct_limit"] = 100 * (flops / t) / (limit_flops / t_limit)
                rows.append(row)
    return rows


def format_table(rows, device):
    unit, scale = ("TFLOP/s", 1) if device == "cuda" else ("GFLOP/s", 1e3)
    lines = [f"| case | pass | provider | ms | {unit} | GB/s | % limit | vs grouped_mm | ours faster by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = f"{r['gbps']:.1f}" if "gbps" in r else ""
        vs = f"{r['vs_peer']:.2f}x" if r["vs_peer"] else ""
        lines.append(f"| {r['case']} | {r['pass']} | {r['provider']} | {r['ms']:.3f} | {r['tflops'] * scale:.3f} | "
                     f"{gb} | {r['pct_limit']:.0f}% | {vs} | {r['ours_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_expert_mlp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", default=None, help="comma-separated shape names (default: all of the device's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]  # other work on the machine: the ratios hold, the absolute times do not
    rows = run(args.device, dtype, args.quick, args.shapes.split(",") if args.shapes else None)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    device = common.device_name(args.device)
    table = format_table(rows, args.device)
    header = (f"{device}, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, {load}")
    print(f"expert MLP on {header}\n\n{table}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"expert_mlp-{device}-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "dtype": str(dtype), "torch": torch.__version__, "load": load, "rows": rows}, f,
                  indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# expert MLP: {header}\n\n`% limit`: our FLOP rate over a dense matmul's of the same FLOPs "
                f"(copy bandwidth of the active experts' weights for decode), measured in the same run; "
                f"`ours faster by`: this provider's time over ours.\n\n{table}\n")


if __name__ == "__main__":
    main()
