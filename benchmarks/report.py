"""The suite's output: tables for the terminal and Markdown, the JSON record, the plots, and the README block."""
import json
import os
import re

COLUMNS_HELP = """\
- **ms**: median time of one call over the timed repeats, after warm-up (CPU: samples of all providers and limits
  interleaved; CUDA: `triton.testing.do_bench`, synchronised).
- **{unit}**: the family's FLOP model over that time (gated expert MLP forward 6·T·k·D·H, forward+backward
  three times that; each family's docstring gives its model). The same FLOPs count for every provider, so a
  provider that computes more (every expert for every token) shows a lower rate.
- **GB/s**: for bandwidth-bound cases, the bytes a call must move at least over its time.
- **% limit**: the time of the device's own limit for this work, measured in the same run, over the provider's
  time: a dense matmul of the same FLOPs in the same GEMM shapes (no routing, no grouping) and, where memory is
  the bound (decode, routing, permutation), a copy moving the same bytes (half read, half written); the longer of
  the two when both apply. The dense matmul runs in the provider's own dtype or the run's, whichever is faster
  (ours bf16 on CPU: a bf16 matmul where oneDNN runs it several times faster than float32, on CPUs with bf16 dot
  products; elsewhere the float32 one, which torch's bf16 matmul there falls far behind). Above
  100% means the op's own GEMMs ran faster than the dense ones of the same FLOPs (smaller, cache-friendlier
  blocks), or noise.
- **peak MB**: peak bytes allocated during one call above what was allocated before it (CUDA: allocator
  statistics; CPU: torch's profiler, every allocation and free of torch's CPU allocator). Memory kept across
  calls is not in it: ours on CPU keeps one scratch buffer of the expert-ordered rows (T·k·D elements) for reuse.
- **vs reference**, **vs best peer**: the reference backend's time, and the fastest peer's time, over this
  provider's (above 1: faster).
- Every provider's output (forward) or input gradient (forward+backward) is compared with the reference's
  before timing; one that disagrees beyond a loose tolerance (relative RMS 1e-3 in fp32, 3e-2 in bf16) is not
  timed and is listed as such.
"""


def _fmt(v, spec, empty=""):
    return empty if v is None else format(v, spec)


def _pct(v):
    return "" if v is None else format(v, ".2g" if v < 10 else ".0f")


def _mb(nbytes):
    return "" if nbytes is None else format(nbytes / 2**20, ".2g" if nbytes < 10 * 2**20 else ".0f")


def _rate(row, device):
    if row.get("gflops") is None:
        return None
    return row["gflops"] / 1e3 if device == "cuda" else row["gflops"]


def table(rows, device) -> str:
    """The full Markdown table: one line per (case, pass, provider)."""
    unit = "TFLOP/s" if device == "cuda" else "GFLOP/s"
    head = ["case", "pass", "provider", "ms", unit, "GB/s", "% limit", "peak MB", "vs reference", "vs best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("ms") is None:
            cells = [r["label"], r["pass"], r["provider"], r["status"], "", "", "", "", "", ""]
        else:
            rate = _rate(r, device)
            cells = [r["label"], r["pass"], r["provider"], _fmt(r["ms"], ".3g" if r["ms"] < 1 else ".1f"),
                     _fmt(rate, ".3g"), _fmt(r.get("gbps"), ".3g"),
                     _pct(r.get("pct_limit")) + ("%" if r.get("pct_limit") is not None else "")
                     + (" (mem)" if r.get("bound") == "memory" else ""),
                     _mb(r.get("peak_bytes")),
                     _fmt(r.get("vs_reference"), ".2f") + ("x" if r.get("vs_reference") else ""),
                     _fmt(r.get("vs_best_peer"), ".2f") + ("x" if r.get("vs_best_peer") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows, device) -> str:
    """One line per (case, pass): ours against the limit, the reference and the best peer."""
    bf16 = any(r["provider"] == "ours bf16" for r in rows)
    head = ["case", "pass", "ours ms", "% limit", "vs reference", "best peer", "vs best peer", "peak MB ours / peer"]
    if bf16:
        head.append("bf16 vs fp32")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, pass_name), group in _groups(rows):
        by = {r["provider"]: r for r in group}
        ours = by.get("ours")
        if ours is None or ours.get("ms") is None:
            status = ours["status"] if ours else "not run"
            lines.append(f"| {case} | {pass_name} | {status} |" + " |" * (len(head) - 3))
            continue
        peer = by.get(ours["best_peer"]) if ours.get("best_peer") else None
        mem = (_mb(ours.get("peak_bytes")) or "?") + " / " + ((_mb(peer.get("peak_bytes")) or "?") if peer else "-")
        cells = [case, pass_name, _fmt(ours["ms"], ".3g" if ours["ms"] < 1 else ".1f"),
                 _pct(ours.get("pct_limit")) + "%" + (" (mem)" if ours.get("bound") == "memory" else "")
                 if ours.get("pct_limit") is not None else "",
                 _fmt(ours.get("vs_reference"), ".2f") + "x" if ours.get("vs_reference") else "",
                 ours["best_peer"] or "", _fmt(ours.get("vs_best_peer"), ".2f") + "x" if ours.get("vs_best_peer")
                 else "", mem]
        if bf16:
            b = by.get("ours bf16")
            cells.append(f"{ours['seconds'] / b['seconds']:.2f}x" if b and b.get("seconds") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(target_rows) -> str:
    """The families' acceptance targets as evaluated on this run: [(target, measured, met)] -> a Markdown table."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, measured, met in target_rows:
        lines.append(f"| {name} | {measured} | {'?' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(lines)


def _groups(rows):
    """[((case, pass), rows)] in run order."""
    out = {}
    for r in rows:
        out.setdefault((r["case"], r["pass"]), []).append(r)
    return list(out.items())


def problems(rows) -> list:
    """Lines for providers that were not timed (an error, a wrong result) or not checked."""
    return [f"{r['case']} {r['pass']}, {r['provider']}: {r['status']}" for r in rows if r["status"] != "ok"]


def busy_passes(rows, meta) -> list:
    """'case pass (load)' of the passes that ended with the 1-minute load average above the CPUs plus one (CPU)."""
    if meta.get("device_kind") != "cpu" or not meta.get("logical_cpus"):
        return []
    out = []
    for (case, pass_name), group in _groups(rows):
        load = group[0].get("load_1min")
        if load is not None and load > meta["logical_cpus"] + 1:
            out.append(f"{case} {pass_name} ({load:.1f})")
    return out


def header(meta) -> str:
    m = meta
    pk = m["packages"]
    load = m.get("load_average") or [None]
    after = m.get("load_average_after") or [None]
    what = m["gpu"] if m.get("gpu") else f"{m['cpu']}, {m['logical_cpus']} logical CPUs"
    if not m.get("gpu") and m.get("cpu_isa"):
        what += f" (native kernels: {m['cpu_isa']}"
        if m.get("cpu_bf16_gemm") is not None:
            what += ", bf16 GEMMs in bf16" if m["cpu_bf16_gemm"] else ", bf16 GEMMs widened to fp32"
        if m.get("cpu_amx"):
            what += ", quantized decode on AMX tiles"
        what += ")"
    return (f"{what}; torch {m['torch']} ({m['torch_threads']} threads), transformers {pk.get('transformers')}, "
            f"soft-moe-pytorch {pk.get('soft-moe-pytorch')}, triton {pk.get('triton')}; moe_kernels "
            f"{m['moe_kernels']} at {m.get('commit')}; {m['date']}, {m['size']} set in {m['duration_s']:.0f} s; "
            f"load average {_fmt(load[0], '.2f')} before, {_fmt(after[0], '.2f')} after")


def markdown(meta, rows, notes, plots, target_rows=()) -> str:
    unit = "TFLOP/s" if meta["device_kind"] == "cuda" else "GFLOP/s"
    out = [f"# moe_kernels benchmarks: {meta['device']}", "", header(meta), "",
           f"Data type {meta['dtype']} unless a provider says otherwise. Compare providers within this run: other "
           "work on a shared machine moves absolute times, the interleaved samples keep the ratios.", "",
           "## Summary", "", summary(rows, meta["device_kind"]), ""]
    if target_rows:
        out += ["## Acceptance targets", "", targets(target_rows), ""]
    for title, path in plots:
        out += [f"![{title}]({os.path.basename(path)})", ""]
    out += ["## Columns", "", COLUMNS_HELP.format(unit=unit)]
    families = []
    for r in rows:
        if r["family"] not in families:
            families.append(r["family"])
    for fam in families:
        out += [f"## {fam}", "", table([r for r in rows if r["family"] == fam], meta["device_kind"]), ""]
    pass_notes = sorted({f"{r['case']} {r['pass']}: {n}" for r in rows for n in r.get("notes", [])})
    bad = problems(rows)
    busy = busy_passes(rows, meta)
    if busy:
        bad.append(f"other work competed for the {meta['logical_cpus']} CPUs (1-minute load average above "
                   f"{meta['logical_cpus'] + 1}, this run's own threads included) during: "
                   + "; ".join(busy) + ". Ratios there are less reliable: implementations differ in how "
                   "badly they suffer when their threads are descheduled.")
    if notes or pass_notes or bad:
        out += ["## Notes", ""] + [f"- {n}" for n in (*notes, *pass_notes, *bad)] + [""]
    return "\n".join(out)


def write(stem, meta, rows, notes, plots=True, target_rows=()) -> list:
    """<stem>.json, <stem>.md and the plots beside them; returns the paths written."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    made = []
    if plots:
        made = plot(stem, rows, meta)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "notes": notes, "rows": rows,
                   "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in target_rows]}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, rows, notes, made, target_rows))
    return [stem + ".json", stem + ".md"] + [p for _, p in made]


def plot(stem, rows, meta) -> list:
    """[(title, path)] of the PNGs: time vs tokens per provider for each token sweep, % of the limit per case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    sweeps = {}
    for r in rows:
        if r.get("sweep") and r["pass"] == "fwd" and r.get("ms") is not None:
            sweeps.setdefault(r["sweep"], {}).setdefault(r["provider"], []).append((r["tokens"], r["ms"]))
    sweeps = {k: v for k, v in sweeps.items() if len({t for pts in v.values() for t, _ in pts}) > 1}
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.8), squeeze=False)
        for ax, (name, by_provider) in zip(axes[0], sweeps.items()):
            for prov, pts in by_provider.items():
                pts.sort()
                style = "-" if prov.startswith("ours") else ("--" if prov == "reference" else ":")
                ax.plot([t for t, _ in pts], [ms for _, ms in pts], style, marker="o", ms=3, label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms per forward (median)")
            ax.set_title(f"{name}, forward", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Time vs tokens, {meta['device']}", fontsize=11)
        fig.tight_layout()
        path = stem + "-sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(("time vs tokens per provider", path))

    bars = []
    for (case, pass_name), group in _groups(rows):
        by = {r["provider"]: r for r in group}
        ours = by.get("ours")
        if ours is None or ours.get("pct_limit") is None:
            continue
        peer = by.get(ours["best_peer"]) if ours.get("best_peer") else None
        bars.append((f"{group[0]['label']} {pass_name}", ours["pct_limit"],
                     (by.get("reference") or {}).get("pct_limit"), peer and peer.get("pct_limit"),
                     ours.get("bound") == "memory"))
    if bars:
        import numpy as np

        fig, ax = plt.subplots(figsize=(12, 0.32 * len(bars) + 1.8))
        y = np.arange(len(bars))
        h = 0.27
        for i, (label, color) in enumerate((("ours", "tab:blue"), ("reference", "tab:gray"),
                                            ("best peer", "tab:orange"))):
            vals = [b[1 + i] or 0 for b in bars]
            ax.barh(y + (i - 1) * h, vals, h, label=label, color=color)
        ax.set_yticks(y)
        ax.set_yticklabels([b[0] + (" [mem]" if b[4] else "") for b in bars], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="k", lw=0.8)
        ax.set_xlabel("% of the limit measured in the same run:\na dense matmul of the same FLOPs; [mem]: a copy "
                      "moving the same bytes", fontsize=8)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"% of limit per case, {meta['device']}", fontsize=10)
        fig.tight_layout()
        path = stem + "-limit.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(("% of limit per case", path))
    return made


def update_readme(readme, device_kind, block) -> bool:
    """Replaces the text between `<!-- results:<device_kind> -->` and `<!-- /results:<device_kind> -->` in the
    README with `block`; False when the markers are not there."""
    with open(readme) as f:
        text = f.read()
    start, end = f"<!-- results:{device_kind} -->", f"<!-- /results:{device_kind} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    with open(readme, "w") as f:
        f.write(pattern.sub(lambda _: f"{start}\n{block}\n{end}", text))
    return True
