"""The main job: fused (the `auto` backend) vs reference for the MoE modules, against the dense-matmul rate
measured in the same run. `python -m benchmarks [--device cpu|cuda] [--quick]`; writes
benchmarks/results/<device>-<date>.json and .md."""
import argparse
import datetime
import json
import os
import sys

import torch

from . import common
from .bench_modules import CASES, run_case


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--quick", action="store_true", help="the smallest shape of each case only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    torch.manual_seed(0)
    import moe_kernels

    info = moe_kernels.backends()
    print(f"moe_kernels backends: native {info['native']}; triton {info['triton']}", file=sys.stderr)
    cases = [c for c in CASES if (not args.quick or c.get("quick")) and (args.device == "cuda" or not c.get("gpu"))]
    try:
        from tqdm import tqdm
        it = tqdm(cases, desc="benchmarks", file=sys.stderr)
    except ImportError:
        it = cases
    rows = []
    for case in it:
        rows.extend(run_case(case, args.device, dtype))
    device = common.device_name(args.device)
    table = format_table(rows)
    print(f"\nmoe_kernels benchmarks on {device}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}\n")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{device}-{datetime.date.today().isoformat()}")
    meta = {"device": device, "dtype": str(dtype), "torch": torch.__version__, "backends": info,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# moe_kernels benchmarks: {device}\n\n{meta['date']}, {meta['dtype']}, torch {meta['torch']}\n\n")
        f.write("Median of timed repeats after warm-up; `% limit` is the achieved FLOP rate over the rate of a dense "
                "matmul of the same FLOPs measured in the same run.\n\n")
        f.write(table + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")


def format_table(rows):
    cols = ["case", "pass", "provider", "ms", "GFLOP/s", "% limit", "vs reference"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([r["case"], r["pass"], r["provider"], f"{r['ms']:.2f}", f"{r['gflops']:.1f}",
                                        f"{r['pct_limit']:.0f}%", f"{r['speedup_vs_reference']:.2f}x"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
