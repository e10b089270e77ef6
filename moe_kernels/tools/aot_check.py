"""Ahead-of-time compile check of every Triton kernel of the package, no GPU needed.

    python -m moe_kernels.tools.aot_check [--arch 80 90] [--filter NAME ...] [--jobs N]

Compiles each entry of every `moe_kernels.triton.<family>.AOT_CONFIGS` (every config its launcher can launch
with) for each architecture asked for that the entry's "archs" allows (default: all) with
`triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))`, reads registers, spills (STACK) and local
memory from the cubin with the cuobjdump that ships with Triton, the total shared memory (static + dynamic)
from the kernel's metadata, and the hardware paths from the PTX (and HGMMA from the SASS), and prints a table
kernel x arch x config. Every compile must be free of spills and local memory and fit the architecture's
shared memory per block. On sm_90 an entry's requirements must hold: "wgmma" (wgmma in the PTX, HGMMA in the
SASS), "qgmma" (fp8 wgmma: QGMMA in the SASS), "tma_load" / "tma_store" (cp.async.bulk.tensor global -> shared /
shared -> global), "warp_specialized"
(setmaxnreg, the producer / consumer register split), and any of them needs the PTX to target sm_90a; on every
architecture "cp_async_16" needs 16-byte cp.async loads in the SASS (LDGSTS.E.BYPASS.128: pointer and gathered
operands pipelined through shared memory). An entry's "divisible" args are compiled as a launch on real model
shapes specialises them (16-byte aligned pointers, integers that are multiples of 16).
Exits 1 on a compile failure or any failed requirement, each named after `<-`.
"""
import argparse
import collections
import concurrent.futures
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

# opt-in shared memory per block (bytes), CUDA C programming guide
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
HOPPER_KEYS = ("wgmma", "qgmma", "tma_load", "tma_store", "warp_specialized")
_TMA_LOAD = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global")   # shared::cluster (3.6), ::cta (3.9)
_TMA_STORE = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::")


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def configs():
    """(family, entry) for every AOT_CONFIGS entry of the moe_kernels.triton modules."""
    import moe_kernels.triton as pkg

    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"moe_kernels.triton.{info.name}")
        out.extend((info.name, e) for e in getattr(mod, "AOT_CONFIGS", ()))
    seen = collections.Counter(f"{family}.{e['name']}" for family, e in out)
    repeated = sorted(name for name, n in seen.items() if n > 1)
    if repeated:     # a report row must name one compile
        raise ValueError(f"AOT_CONFIGS entries share a name: {', '.join(repeated)}")
    return out


def archs(entry: dict, asked) -> list:
    """The architectures of `asked` that the entry compiles for."""
    return [a for a in asked if a in entry.get("archs", asked)]


def resource_usage(cubin: bytes, sass: bool = False) -> dict:
    """REG / STACK / SHARED (static) / LOCAL of the (single-kernel) cubin, from cuobjdump --dump-resource-usage;
    with sass also whether the SASS has HGMMA (16-bit wgmma) and QGMMA (fp8 wgmma)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", *(["--dump-sass"] if sass else []), f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(m.group(1)) if m else None
    if sass:
        usage["hgmma"] = re.search(r"\bHGMMA\.", text) is not None
        usage["qgmma"] = re.search(r"\bQGMMA\.", text) is not None
        usage["cp_async_16"] = re.search(r"\bLDGSTS\.E\.BYPASS(\.\w+)*\.128\b", text) is not None
    return usage


def compile_one(entry: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the specialisation a launch on real shapes gets: Triton marks 16-byte aligned pointers and integers that are
    # multiples of 16 as such, and the vectorised and cp.async loads depend on it
    names = list(entry["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in entry.get("divisible", ())}
    src = ASTSource(fn=entry["fn"], signature=entry["signature"], constexprs=entry.get("constexprs", {}), attrs=attrs)
    options = {"num_warps": entry["num_warps"], "num_stages": entry.get("num_stages", 2)}
    if entry.get("maxnreg"):       # as the launcher passes it
        options["maxnreg"] = entry["maxnreg"]
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    usage = resource_usage(kernel.asm["cubin"], sass=arch // 10 == 9 or bool(entry.get("cp_async_16")))
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
    usage.update(smem=kernel.metadata.shared, target=target.group(1) if target else None,
                 wgmma="wgmma.mma_async" in ptx, tma_load=_TMA_LOAD.search(ptx) is not None,
                 tma_store=_TMA_STORE.search(ptx) is not None, setmaxnreg="setmaxnreg" in ptx)
    return usage


def findings(entry: dict, arch: int, usage: dict) -> list:
    """The requirements the compile of `entry` for sm_`arch` (resource usage `usage`) fails, named."""
    bad = []
    if usage["stack"]:
        bad.append(f"spills {usage['stack']} B")
    if usage["local"]:
        bad.append(f"local memory {usage['local']} B")
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and usage["smem"] > limit:
        bad.append(f"smem {usage['smem']} B > {limit} B")
    if entry.get("cp_async_16") and not usage.get("cp_async_16"):
        bad.append("no 16-byte cp.async (LDGSTS.E.BYPASS.128)")
    if arch // 10 != 9 or not any(entry.get(k) for k in HOPPER_KEYS):
        return bad
    if usage["target"] != "sm_90a":
        bad.append(f"target {usage['target']}, not sm_90a")
    if entry.get("wgmma"):
        if not usage["wgmma"]:
            bad.append("no wgmma")
        elif usage.get("hgmma") is False:
            bad.append("no HGMMA in the SASS")
    if entry.get("qgmma") and not usage.get("qgmma"):
        bad.append("no QGMMA (fp8 wgmma) in the SASS")
    if entry.get("tma_load") and not usage["tma_load"]:
        bad.append("no TMA load")
    if entry.get("tma_store") and not usage["tma_store"]:
        bad.append("no TMA store")
    if entry.get("warp_specialized") and not usage["setmaxnreg"]:
        bad.append("no setmaxnreg (not warp-specialised)")
    return bad


_ENTRIES: list = []  # filled by main before the worker processes fork


def _compile_indexed(i: int, arch: int):
    try:
        return compile_one(_ENTRIES[i][1], arch), None
    except Exception as exc:  # a compile failure is a finding, reported and counted
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def describe(entry: dict) -> str:
    consts = ",".join(f"{k}={v}" for k, v in entry.get("constexprs", {}).items())
    ptrs = ",".join(f"{k}:{v}" for k, v in entry["signature"].items() if v.startswith("*"))
    return f"{consts} w{entry['num_warps']}s{entry.get('num_stages', 2)} [{ptrs}]"


def _tma(u: dict) -> str:
    return "+".join(s for s, k in (("ld", "tma_load"), ("st", "tma_store")) if u[k]) or "-"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") or "TRITON_DEFAULT_FP_FUSION" not in os.environ:
        # @triton.jit reads TRITON_INTERPRET when the kernels are defined (at import), so a clean process is
        # needed to get compilable kernels; fp fusion is pinned to what a launch compiles with today.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "moe_kernels.tools.aot_check", *args], env=env).returncode
    p = argparse.ArgumentParser(prog="python -m moe_kernels.tools.aot_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", nargs="+", default=[""], help="only kernels whose name contains one of these")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = p.parse_args(argv)
    _ENTRIES[:] = [(fam, e) for fam, e in configs() if any(f in e["name"] for f in args.filter)]
    if not _ENTRIES:
        print("aot_check: no Triton kernel configs found", file=sys.stderr)
        return 1
    jobs = [(i, arch) for i, (_, e) in enumerate(_ENTRIES) for arch in archs(e, args.arch)]
    skipped = len(_ENTRIES) * len(args.arch) - len(jobs)
    if not jobs:
        print(f"aot_check: no kernel compiles for sm_{', sm_'.join(map(str, args.arch))} (see their 'archs')",
              file=sys.stderr)
        return 1
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_indexed, *zip(*jobs), chunksize=4))
    else:
        results = [_compile_indexed(i, arch) for i, arch in jobs]
    failures = 0
    width = max(28, *(len(f"{fam}.{e['name']}") for fam, e in _ENTRIES))
    print(f"{'kernel':<{width}} {'arch':>5} {'regs':>5} {'spill':>6} {'local':>6} {'smem':>7} {'wgmma':>6} "
          f"{'tma':>6} {'ws':>4}  config")
    for (i, arch), (u, error) in zip(jobs, results):
        fam, e = _ENTRIES[i]
        name = f"{fam}.{e['name']}"
        if error:
            failures += 1
            print(f"{name:<{width}} sm_{arch:<2} FAILED {error}  {describe(e)}")
            continue
        bad = findings(e, arch, u)
        failures += bool(bad)
        wgmma = ("fp8" if u.get("qgmma") else "yes" if u.get("hgmma", True) else "ptx") if u["wgmma"] else "-"
        print(f"{name:<{width}} sm_{arch:<2} {u['reg']:>5} {u['stack']:>6} {u['local']:>6} {u['smem']:>7} "
              f"{wgmma:>6} {_tma(u):>6} {'yes' if u['setmaxnreg'] else 'no':>4}  {describe(e)}"
              + (f"  <- {'; '.join(bad)}" if bad else ""))
    total = len(jobs)
    print(f"\n{total - failures} of {total} kernel x arch compiles clean" + (f", {failures} failed" if failures else "")
          + (f" ({skipped} kernel x arch left out by the entries' archs)" if skipped else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
