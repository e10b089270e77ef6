"""Ahead-of-time compile check of every Triton kernel of the package, no GPU needed.

    python -m moe_kernels.tools.aot_check [--arch 80 90] [--filter NAME]

Compiles each entry of every `moe_kernels.triton.<family>.AOT_CONFIGS` (every config its launcher can launch
with) for each architecture with `triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))`, reads
registers, spills (STACK bytes) and shared memory from the cubin with the cuobjdump that ships with Triton,
and prints a table kernel x arch x config. Entries with "wgmma": True must use wgmma on sm_90. Exits 1 on a
compile failure, a spill or a missing wgmma.
"""
import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile


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
    return out


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED of the (single-kernel) cubin, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def compile_one(entry: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=entry["fn"], signature=entry["signature"], constexprs=entry.get("constexprs", {}))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": entry["num_warps"], "num_stages": entry.get("num_stages", 2)})
    usage = resource_usage(kernel.asm["cubin"])
    usage["wgmma"] = "wgmma" in kernel.asm["ptx"]
    return usage


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
    p.add_argument("--filter", default="", help="only kernels whose name contains this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = p.parse_args(argv)
    _ENTRIES[:] = [(fam, e) for fam, e in configs() if args.filter in e["name"]]
    if not _ENTRIES:
        print("aot_check: no Triton kernel configs found", file=sys.stderr)
        return 1
    jobs = [(i, arch) for i in range(len(_ENTRIES)) for arch in args.arch]
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_indexed, *zip(*jobs), chunksize=4))
    else:
        results = [_compile_indexed(i, arch) for i, arch in jobs]
    failures = 0
    print(f"{'kernel':<28} {'arch':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'wgmma':>6}  config")
    for (i, arch), (u, error) in zip(jobs, results):
        fam, e = _ENTRIES[i]
        name = f"{fam}.{e['name']}"
        if error:
            failures += 1
            print(f"{name:<28} sm_{arch:<2} FAILED {error}  {describe(e)}")
            continue
        bad = []
        if u["stack"]:
            bad.append(f"spills {u['stack']} B")
        if e.get("wgmma") and arch >= 90 and not u["wgmma"]:
            bad.append("no wgmma")
        failures += bool(bad)
        print(f"{name:<28} sm_{arch:<2} {u['reg']:>5} {u['stack']:>6} {u['shared']:>7} {str(u['wgmma']):>6}  "
              f"{describe(e)}" + (f"  <- {'; '.join(bad)}" if bad else ""))
    total = len(jobs)
    print(f"\n{total - failures} of {total} kernel x arch compiles clean" + (f", {failures} failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
