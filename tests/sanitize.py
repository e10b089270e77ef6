"""`make sanitize`: the native ops built with AddressSanitizer and UndefinedBehaviorSanitizer into their own build
folder, and the native-relevant tests run against that build at each instruction-set level this CPU has, in the
debug mode that poisons every output and scratch buffer and allocates the kept buffers fresh per call
(MOE_KERNELS_POISON=1, csrc/buffers.h), so that an overrun inside them is an overrun of a heap block.

    python -m tests.sanitize [--isa avx512 avx2 baseline] [--csrc DIR] [--build-only] [-- PYTEST_ARGS ...]

The tests (TESTS below: the op tests and the property tests) cover every native kernel: routing, permutation, the
grouped GEMM and its epilogues, the fused expert MLP forward and backward, LoRA's partial backward, the quantized
expert MLP and Soft MoE; only their native-backend cases run (MOE_KERNELS_TEST_CPU_BACKENDS=native). They run at the
CPU's best ISA level; at each level below it, those of the kernels built per level (ISA_TESTS) run again. Any sanitizer
report ends the run with a non-zero exit. --csrc builds another copy of the sources (say, one with a planted bug) into
a folder of its own.
"""
import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "sanitize"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-wrapv", "-fno-omit-frame-pointer",
            "-O1", "-g"]
TESTS = ["tests/ops", "tests/test_properties.py"]
# the tests of the kernels built per ISA level (grouped_gemm.h's streaming decode kernel, the epilogues, the
# quantized row sources), run again at each level below the CPU's best
ISA_TESTS = ["tests/ops/test_grouped_gemm.py", "tests/ops/test_glu_specs.py", "tests/ops/test_expert_mlp.py",
             "tests/ops/test_quantized_native.py", "tests/ops/test_quantized.py"]
ISA_ORDER = ["avx512", "avx2", "baseline"]


def runtime(name: str) -> str:
    """The compiler's copy of a sanitizer runtime (libasan.so), to preload into Python, which is not built with it."""
    cxx = shlex.split(os.environ.get("CXX") or "c++")
    path = subprocess.run(cxx + [f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        sys.exit(f"sanitize: the compiler ({' '.join(cxx)}) has no {name}: install its sanitizer runtimes "
                 "(libasan, libubsan)")
    return path


def sanitizer_env(library: Optional[Path]) -> dict:
    """The environment of a process that loads a sanitizer build; `library` (when given) is the build it loads."""
    # libstdc++ preloaded too: ASan's __cxa_throw interceptor must find the real one at start-up, or the first C++
    # exception (a TORCH_CHECK) aborts
    return {**os.environ, "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libstdc++.so')}",
            # Python and torch keep allocations until exit by design; leaks are not what this run looks for
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "MOE_KERNELS_POISON": "1",
            **({"MOE_KERNELS_NATIVE_LIBRARY": str(library)} if library else {})}


def build(csrc: Path, folder: Path) -> Path:
    """Builds csrc/*.cpp with the sanitizers into folder (ninja: only what changed is rebuilt) -> the library."""
    sys.path.insert(0, str(ROOT))
    from moe_kernels import _native
    folder.mkdir(parents=True, exist_ok=True)
    name = "moe_kernels_sanitize"
    script = ("import sys, torch.utils.cpp_extension as ext; "
              f"ext.load(name={name!r}, sources=sys.argv[1:], build_directory={str(folder)!r}, "
              f"extra_cflags={_native.CXX_FLAGS + SANITIZE!r}, extra_ldflags={_native.LD_FLAGS + SANITIZE[:1]!r}, "
              "is_python_module=False, verbose=False)")
    sources = sorted(str(p) for p in csrc.glob("*.cpp"))
    print(f"sanitize: building {len(sources)} sources of {csrc} into {folder}", flush=True)
    subprocess.run([sys.executable, "-c", script, *sources], env=sanitizer_env(None), check=True)
    return folder / f"{name}.so"


def isa_levels(library: Path) -> list:
    """The ISA levels this CPU runs, best first, as the library reports its pick without a cap."""
    env = sanitizer_env(library)
    env.pop("MOE_KERNELS_CPU_ISA", None)
    best = subprocess.run([sys.executable, "-c", "import moe_kernels._backend as b; print(b.native_cpu_isa())"],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    return ISA_ORDER[ISA_ORDER.index(best):]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", choices=ISA_ORDER, help="these levels only (default: every level)")
    parser.add_argument("--csrc", type=Path, default=ROOT / "csrc", help="the sources to build (default: csrc/)")
    parser.add_argument("--build-only", action="store_true")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    csrc = args.csrc.resolve()
    folder = BUILD if csrc == ROOT / "csrc" else BUILD.parent / f"sanitize-{csrc.name}"
    library = build(csrc, folder)
    if args.build_only:
        return 0
    best = isa_levels(library)
    levels = args.isa or best
    for isa in levels:
        env = {**sanitizer_env(library), "MOE_KERNELS_CPU_ISA": isa, "MOE_KERNELS_TEST_CPU_BACKENDS": "native"}
        # --capture=sys: a sanitizer report goes to file descriptor 2 and then aborts; pytest's default capture of
        # that descriptor would swallow it
        # the tests that rerun a file at every ISA level in subprocesses are this loop's job here
        tests = ["-k", "not at_every_isa_level", *(TESTS if isa == best[0] else ISA_TESTS)]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", "-m", "not slow",
               *(pytest_args or tests)]
        print(f"sanitize: MOE_KERNELS_CPU_ISA={isa} {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        if rc != 0:
            print(f"sanitize: failed at MOE_KERNELS_CPU_ISA={isa} (exit {rc})", flush=True)
            return rc
    print(f"sanitize: clean at {', '.join(levels)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
