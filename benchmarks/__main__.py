"""The benchmark suite: every op family of moe_kernels against its reference, its peers and the device's limits.

    python -m benchmarks [--device cpu|cuda] [--quick | --full] [--only SUBSTRING ...] [--list]

Runs on the GPU when there is one, else on the CPU. The default set takes a few minutes on a 2-core CPU;
--quick is a smoke run of small shapes (seconds); --full adds cases and sizes. --only keeps the cases whose name
contains any of the given substrings (a family name such as `routing`, a shape such as `OLMoE/4`, `T2048`).
Prints the tables and writes benchmarks/results/<device>-<date>.json, .md and the plots beside them.
"""
import argparse
import datetime
import os
import sys
import time

import torch

from . import common, report

FAMILIES = ("expert_mlp", "routing", "permutation", "soft_moe", "modules")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# seconds of timed samples per provider and pass (at least min_repeats samples), per size
BUDGET = {"quick": (0.05, 2), "default": (0.5, 3), "full": (2.0, 5)}


def family_module(name):
    import importlib
    return importlib.import_module(f"benchmarks.bench_{name}")


def all_cases(device, size, families=FAMILIES, only=None) -> list:
    cases = [c for fam in families for c in family_module(fam).cases(device, size)]
    if only:
        cases = [c for c in cases if any(s.lower() in c.name.lower() for s in only)]
    return cases


def parse(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run: small shapes, few repeats")
    size.add_argument("--full", action="store_true", help="more cases and sizes")
    p.add_argument("--only", nargs="+", metavar="SUBSTRING", help="only the cases whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", default=RESULTS, help="where the JSON, Markdown and plots go (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--update-readme", action="store_true",
                   help="write the summary into README.md between <!-- results:<cpu|cuda> --> markers")
    return p.parse_args(argv)


def main(argv=None, families=FAMILIES):
    prog = "python -m benchmarks" + ("" if families == FAMILIES else f".bench_{families[0]}")
    args = parse(argv, prog)
    size = "quick" if args.quick else "full" if args.full else "default"
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    cases = all_cases(args.device, size, families, args.only)
    if args.list:
        for c in cases:
            print(f"{c.name}  [{', '.join(c.passes)}]")
        return
    if not cases:
        sys.exit(f"no case matches --only {' '.join(args.only)} (see --list)")
    meta = common.machine(args.device)
    steps = [(c, p) for c in cases for p in c.passes]
    budget_s, min_repeats = BUDGET[size]
    rows = []
    start = time.perf_counter()
    bar = _progress(len(steps))
    for case in cases:
        try:
            passes = case.build(args.device, dtype)
        except Exception as exc:   # the case cannot be set up here (memory, a missing kernel): say so and go on
            common.note(f"{case.name}: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            bar.update(len(case.passes))
            continue
        for pass_name in case.passes:
            bar.set_description(f"{case.name[:48]} {pass_name}")
            rows += common.run_pass(case, pass_name, passes(common.PASSES[pass_name]), args.device, dtype,
                                    budget_s=budget_s, min_repeats=min_repeats, measure_memory=not args.no_memory)
            bar.update(1)
        del passes
    bar.close()
    meta.update(device_kind=args.device, dtype=str(dtype).replace("torch.", ""), size=size, only=args.only,
                duration_s=time.perf_counter() - start, date=datetime.datetime.now().isoformat(timespec="seconds"),
                load_average_after=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    notes = common.notes()
    print(f"\nmoe_kernels benchmarks: {report.header(meta)}\n")
    for fam in families:
        fam_rows = [r for r in rows if r["family"] == fam]
        if fam_rows:
            print(f"## {fam}\n\n{report.table(fam_rows, args.device)}\n")
    print(f"## summary (ours)\n\n{report.summary(rows, args.device)}\n")
    target_rows = [t for fam in families if hasattr(family_module(fam), "targets")
                   for t in family_module(fam).targets(rows, args.device)]
    if target_rows:
        print(f"## acceptance targets\n\n{report.targets(target_rows)}\n")
    for line in notes + report.problems(rows):
        print(f"note: {line}")
    stem = os.path.join(args.out, _stem(meta, families, size, args.only))
    written = report.write(stem, meta, rows, notes, plots=not args.no_plots, target_rows=target_rows)
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in written))
    if args.update_readme:
        rel = os.path.relpath(stem + ".md", os.path.dirname(README))
        block = (f"{report.header(meta)}. Full report with plots: [{rel}]({rel}).\n\n{report.summary(rows, args.device)}")
        if target_rows:
            block += f"\n\nAcceptance targets (benchmarks/bench_expert_mlp.py), in this run:\n\n{report.targets(target_rows)}"
        if report.update_readme(README, args.device, block):
            print(f"updated the results:{args.device} block of {os.path.relpath(README)}")
        else:
            print(f"README.md has no <!-- results:{args.device} --> ... <!-- /results:{args.device} --> block")


def _stem(meta, families, size, only):
    parts = [] if families == FAMILIES else [families[0]]
    parts += [meta["device"], meta["date"][:10]]
    if size != "default":
        parts.append(size)
    if only:
        parts.append("only")
    return "-".join(parts)


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, text):
        print(text, file=sys.stderr)

    def close(self):
        pass


def _progress(total):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="pass", dynamic_ncols=True)


if __name__ == "__main__":
    main()
