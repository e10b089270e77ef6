"""The package as built and installed (setup.py, moe_kernels/_native.py), each in a new virtual environment or a
fresh subprocess:

- a wheel built against the installed torch (`pip wheel --no-build-isolation`) carries the prebuilt `_C` and the
  C++ sources, and in a new virtual environment its native ops run without compiling anything;
- an isolated build (no torch in the build environment, as a plain `pip install .` makes) and the sdist ship the
  C++ sources and no `_C` (skipped when pip cannot get setuptools/wheel for the isolated environment);
- a package without a prebuilt `_C` compiles the native ops on first native use into MOE_KERNELS_CACHE_DIR, saying so
  in one line on stderr, with two processes starting at once building once; later processes load the cache without
  compiling (MOE_KERNELS_BUILD_NATIVE=0 too); `import moe_kernels` and a CUDA dispatch load nothing;
- when they cannot be built (CXX=/nonexistent, a compiler that fails), or are switched off (MOE_KERNELS_BUILD_NATIVE=0
  at run time or at build time), the first CPU op warns once with the reason and the fix, backends() says the same,
  and the ops run on the reference backend.
"""
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILING = "moe_kernels: compiling the native CPU ops"
WAITING = "moe_kernels: waiting for another process"
WARNING = "NativeOpsUnavailableWarning"
# variables of the test run that must not reach the package under test
DROPPED = ("MOE_KERNELS_BACKEND", "MOE_KERNELS_BUILD_NATIVE", "MOE_KERNELS_CACHE_DIR", "PYTHONPATH", "CXX",
           "TRITON_INTERPRET")

# Run in the package under test: what it loaded and when, what auto chose, the warnings, and the results against the
# reference backend. The last line of stdout is JSON.
CHECK = r"""
import json, sys, warnings
import torch
import moe_kernels
from moe_kernels import _backend, _native, ops

res = {"file": moe_kernels.__file__,
       "loaded_at_import": _native._state is not None
                           or "moe_kernels_C::topk_route" in torch._C._dispatch_get_all_op_names()}
res["cuda_choice"] = _backend.resolve("topk_route", "cuda")  # a CUDA op neither loads nor builds the native ops
res["loaded_after_cuda_choice"] = _native._state is not None
gen = torch.Generator().manual_seed(0)
x = torch.randn(9, 8, generator=gen)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # the package's own once-only rule, not the warning registry's, is under test
    auto = [ops.topk_route(x, 2) for _ in range(2)]
    m = moe_kernels.SparseMoE(8, 6, 4, 2)
    m(torch.randn(3, 8, generator=gen)).sum().backward()
res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, _native.NativeOpsUnavailableWarning)]
with moe_kernels.use_backend("reference"):
    ref = ops.topk_route(x, 2)

def same(a, b):
    return torch.equal(a.experts, b.experts) and torch.allclose(a.weights, b.weights, rtol=1e-5, atol=1e-6)

res["auto_equals_reference"] = all(same(a, ref) for a in auto)
res["cpu_choice"] = _backend.resolve("topk_route", "cpu")
res["native"] = moe_kernels.backends()["native"]
st = _native.state()
res["origin"], res["library"] = st.origin, st.library
if st.available:
    with moe_kernels.use_backend("native"):
        res["native_equals_reference"] = same(ops.topk_route(x, 2), ref)
    res["cpu_isa"] = _backend.native_cpu_isa()
print(json.dumps(res))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, cwd, env=None, timeout=900, check=True):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _check(python, cwd, **env):
    """Runs CHECK under `python`; (result dict, stderr)."""
    proc = _run([python, "-c", CHECK], cwd, _env(**env), timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _new_venv(path: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
    """A new virtual environment with `wheel` installed (no dependencies, no index) that reuses the running torch:
    --system-site-packages where torch is a system package, else a .pth file naming the site directory that holds
    it (a plain path entry: that directory's own .pth files, the editable install's among them, are not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True, timeout=300)
    python = path / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if subprocess.run([python, "-c", "import torch"], capture_output=True, env=_env(), timeout=300).returncode:
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        torch_site = pathlib.Path(torch.__file__).resolve().parents[1]
        pathlib.Path(purelib, "_moe_kernels_test_torch.pth").write_text(f"{torch_site}\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], path, timeout=300)
    return python


def _one_wheel(directory: pathlib.Path) -> pathlib.Path:
    (wheel,) = directory.glob("moe_kernels-*.whl")
    return wheel


# the tests that compile the native ops on purpose do not run where the run says to compile nothing
compiles = pytest.mark.skipif(os.environ.get("MOE_KERNELS_BUILD_NATIVE") == "0",
                              reason="MOE_KERNELS_BUILD_NATIVE=0: no compiling")


@pytest.fixture(scope="module")
def aot_wheel(tmp_path_factory):
    """The wheel built against the installed torch (what `pip install --no-build-isolation .` installs)."""
    out = tmp_path_factory.mktemp("aot_wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", out, ROOT], out,
         timeout=1200)
    return _one_wheel(out)


@pytest.fixture(scope="module")
def sources_wheel(tmp_path_factory):
    """The wheel of a build that cannot import torch, as in an isolated build (plain `pip install .`), made offline:
    --no-build-isolation with a `torch` that fails to import put first on the build's path."""
    out = tmp_path_factory.mktemp("sources_wheel")
    shim = out / "no_torch" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('torch hidden from the build')\n")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w", out / "w",
                 ROOT], out, _env(PYTHONPATH=shim.parent), timeout=600)
    assert "torch is not importable at build time" in proc.stdout + proc.stderr, proc.stdout[-4000:]
    wheel = _one_wheel(out / "w")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("moe_kernels/_C.")], names
    return wheel


@pytest.fixture(scope="module")
def lazy_venv(tmp_path_factory, sources_wheel):
    """A new virtual environment holding the package without a prebuilt `_C`, with its C++ sources."""
    path = tmp_path_factory.mktemp("lazy_venv")
    python = _new_venv(path / "venv", sources_wheel)
    return python, path


@pytest.mark.slow
@compiles
def test_wheel_has_prebuilt_native_ops(aot_wheel, tmp_path):
    names = zipfile.ZipFile(aot_wheel).namelist()
    assert [n for n in names if n.startswith("moe_kernels/_C.") and n.endswith((".so", ".pyd"))], names
    sources = {n.rsplit("/", 1)[1] for n in names if n.startswith("moe_kernels/_csrc/")}
    assert sources == {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")}, sources
    python = _new_venv(tmp_path / "venv", aot_wheel)
    cache = tmp_path / "cache"
    res, err = _check(python, tmp_path, MOE_KERNELS_CACHE_DIR=cache)
    assert res["file"].startswith(str(tmp_path / "venv")), res["file"]  # the wheel's copy, not the source tree
    assert res["native"] == "available", res["native"]
    assert res["origin"] == "prebuilt" and res["library"].startswith(str(tmp_path / "venv")), res
    assert res["cpu_choice"] == "native" and res["native_equals_reference"] and res["auto_equals_reference"], res
    assert res["cpu_isa"] in ("avx512", "avx2", "baseline"), res
    assert not res["loaded_at_import"] and not res["loaded_after_cuda_choice"], res
    assert res["warnings"] == [] and COMPILING not in err and WARNING not in err, err
    assert not cache.exists()  # nothing compiled, nothing cached


def test_isolated_build_and_sdist_ship_the_sources(tmp_path):
    """`pip wheel .` without torch in the build environment (pip installs setuptools/wheel there: skipped when it
    cannot), and the sdist that `python -m build` builds its wheel from."""
    sdist_dir = tmp_path / "sdist"
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, sdist_dir], ROOT, timeout=300).stdout.strip().splitlines()[-1]
    members = tarfile.open(sdist_dir / name).getnames()
    for src in (ROOT / "csrc").iterdir():
        if src.suffix in (".cpp", ".h"):
            assert any(m.endswith(f"/csrc/{src.name}") for m in members), (src.name, members)

    out = tmp_path / "wheel"
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, ROOT], tmp_path, timeout=600,
                check=False)
    if proc.returncode:
        text = proc.stdout + proc.stderr
        if any(s in text for s in ("No matching distribution", "Could not find a version", "NewConnectionError",
                                   "Network is unreachable", "Temporary failure in name resolution")):
            pytest.skip("pip cannot install the build requirements (setuptools, wheel) in an isolated environment "
                        "here: no index reachable")
        raise AssertionError(text[-6000:])
    wheel = _one_wheel(out)
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # nothing compiled in
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("moe_kernels/_C.")], names
    assert "moe_kernels/_csrc/routing.cpp" in names and "moe_kernels/_csrc/grouped_gemm.h" in names, names
    assert "moe_kernels/_csrc/DISABLED" not in names


@pytest.mark.slow
@compiles
def test_first_use_build_then_cache(lazy_venv, tmp_path):
    python, _ = lazy_venv
    cache = tmp_path / "cache"
    env = _env(MOE_KERNELS_CACHE_DIR=cache)
    # two processes meet the missing build at once: one compiles, the other waits for it; both run native ops
    procs = [subprocess.Popen([str(python), "-c", CHECK], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-6000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    errs = [err for _, err in outs]
    assert sum(err.count(COMPILING) for err in errs) == 1, errs
    (builder,) = [err for err in errs if COMPILING in err]
    (waiter,) = [err for err in errs if COMPILING not in err]
    assert waiter.count(WAITING) == 1, waiter  # it met the build in progress (an import takes seconds, a build ~1 min)
    assert len([ln for ln in builder.splitlines() if ln.strip()]) == 1, builder  # one line, nothing else
    (build_dir,) = [d for d in cache.iterdir() if d.is_dir()]
    assert str(build_dir) in builder and f"torch {torch.__version__}" in builder, builder
    assert (build_dir / "complete").exists() and not (build_dir / "lock").exists()
    for res, err in zip(results, errs):
        assert res["native"] == "available" and res["origin"] == "cache", res
        assert res["library"].startswith(str(build_dir)), res
        assert res["cpu_choice"] == "native" and res["native_equals_reference"] and res["auto_equals_reference"], res
        assert not res["loaded_at_import"] and not res["loaded_after_cuda_choice"], res
        assert res["warnings"] == [] and WARNING not in err, err
    # the cache key names the interpreter, the machine and the torch version; the library is the cache's
    assert sys.implementation.cache_tag in build_dir.name and "torch" in build_dir.name, build_dir.name
    mtime = (build_dir / "moe_kernels_C.so").stat().st_mtime

    # a later process loads the cache without compiling, with the build switched off too
    for extra in ({}, {"MOE_KERNELS_BUILD_NATIVE": "0"}):
        res, err = _check(python, tmp_path, MOE_KERNELS_CACHE_DIR=cache, **extra)
        assert res["origin"] == "cache" and res["native_equals_reference"], res
        assert COMPILING not in err and WAITING not in err and WARNING not in err, err
    assert (build_dir / "moe_kernels_C.so").stat().st_mtime == mtime

    # another cache directory, build switched off: nothing compiled, one warning naming the variable, reference ops
    empty = tmp_path / "empty"
    res, err = _check(python, tmp_path, MOE_KERNELS_CACHE_DIR=empty, MOE_KERNELS_BUILD_NATIVE="0")
    assert COMPILING not in err and not list(empty.glob("*/*.so")), err
    assert res["native"].startswith("unavailable, CPU ops fall back to reference"), res["native"]
    assert len(res["warnings"]) == 1 and "MOE_KERNELS_BUILD_NATIVE=0" in res["warnings"][0], res["warnings"]
    assert res["cpu_choice"] == "reference" and res["auto_equals_reference"], res


# fails every compile (`-c`) like a broken toolchain would; anything else (--version, ...) goes to the real one
FAILING_CXX = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-c" ]; then echo "simulated.cpp:1:1: error: simulated compiler failure" >&2; exit 1; fi
done
exec c++ "$@"
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script compiler")
def test_cannot_build_warns_once_and_runs_reference(lazy_venv, tmp_path):
    python, _ = lazy_venv
    # no compiler: nothing compiled, one warning with the reason and the fix
    cache = tmp_path / "cache"
    res, err = _check(python, tmp_path, MOE_KERNELS_CACHE_DIR=cache, CXX="/nonexistent")
    assert COMPILING not in err, err
    assert len(res["warnings"]) == 1, res["warnings"]
    (msg,) = res["warnings"]
    assert "'/nonexistent' not found" in msg and "install a C++ compiler" in msg and "ninja" in msg, msg
    assert "/nonexistent" in res["native"] and "Fix:" in res["native"], res["native"]
    assert res["native"].startswith("unavailable, CPU ops fall back to reference"), res["native"]
    assert res["origin"] is None and res["cpu_choice"] == "reference" and res["auto_equals_reference"], res

    # a compiler that fails: the build is tried once, the warning quotes its error and the log; not retried
    cxx = tmp_path / "failing-c++"
    cxx.write_text(FAILING_CXX)
    cxx.chmod(0o755)
    res, err = _check(python, tmp_path, MOE_KERNELS_CACHE_DIR=cache, CXX=cxx)
    assert err.count(COMPILING) == 1, err
    (msg,) = res["warnings"]
    assert "compiling the native CPU ops failed" in msg and "simulated compiler failure" in msg, msg
    (build_dir,) = [d for d in cache.iterdir() if d.is_dir()]
    assert str(build_dir / "build.log") in msg and (build_dir / "failed.json").exists(), msg
    assert "simulated compiler failure" in (build_dir / "build.log").read_text()
    assert res["cpu_choice"] == "reference" and res["auto_equals_reference"], res
    # the next process: no second attempt, and the warning shows under the default filters, once
    code = ("import torch, moe_kernels; from moe_kernels import ops; x = torch.randn(5, 6)\n"
            "for _ in range(3): ops.topk_route(x, 2)\n"
            "print(moe_kernels.backends()['native'])")
    proc = _run([python, "-c", code], tmp_path, _env(MOE_KERNELS_CACHE_DIR=cache, CXX=cxx))
    assert COMPILING not in proc.stderr and proc.stderr.count(WARNING) == 1, proc.stderr
    assert "an earlier first-use build failed" in proc.stderr and "simulated compiler failure" in proc.stderr
    assert proc.stdout.startswith("unavailable, CPU ops fall back to reference"), proc.stdout
    # choosing the reference backend explicitly is not warned about; asking for native raises with the reason
    code = ("import torch, moe_kernels; from moe_kernels import ops; x = torch.randn(5, 6); ops.topk_route(x, 2)\n"
            "with moe_kernels.use_backend('native'):\n"
            "    try: ops.topk_route(x, 2)\n"
            "    except RuntimeError as exc: print(exc)\n")
    proc = _run([python, "-c", code], tmp_path, _env(MOE_KERNELS_CACHE_DIR=cache, CXX=cxx,
                                                     MOE_KERNELS_BACKEND="reference"))
    assert WARNING not in proc.stderr, proc.stderr
    assert "moe_kernels._C is not available" in proc.stdout and "simulated" in proc.stdout, proc.stdout


def test_build_without_native_extension(tmp_path):
    """MOE_KERNELS_BUILD_NATIVE=0 at build time: a pure-Python package that never compiles, warns once at the first
    CPU op that would have run natively, and runs the reference."""
    env = _env(MOE_KERNELS_BUILD_NATIVE="0")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", tmp_path / "wheel",
          ROOT], tmp_path, env, timeout=300)
    wheel = _one_wheel(tmp_path / "wheel")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moe_kernels/__init__.py" in names and "moe_kernels/ops/routing.py" in names
    assert not [n for n in names if n.startswith("moe_kernels/_C.")], names
    assert [n for n in names if n.startswith("moe_kernels/_csrc/")] == ["moe_kernels/_csrc/DISABLED"], names
    # the pure-Python package imports and says the native backend is unavailable (editable-install finders of the
    # test environment are set aside so that the wheel's copy is the one imported); the run time has no
    # MOE_KERNELS_BUILD_NATIVE: the build's choice holds by itself
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cache = tmp_path / "cache"
    code = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n" + CHECK
    proc = _run([sys.executable, "-c", code], tmp_path, _env(PYTHONPATH=site, MOE_KERNELS_CACHE_DIR=cache))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(site)), res["file"]  # the wheel's copy, not the source tree
    assert res["native"].startswith("unavailable"), res["native"]
    assert "installed with MOE_KERNELS_BUILD_NATIVE=0" in res["native"], res["native"]
    assert len(res["warnings"]) == 1 and "MOE_KERNELS_BUILD_NATIVE=0" in res["warnings"][0], res["warnings"]
    assert res["cpu_choice"] == "reference" and res["auto_equals_reference"], res
    assert COMPILING not in proc.stderr and not cache.exists(), proc.stderr


def test_source_checkout_never_compiles_at_run_time(tmp_path):
    """The source tree without its built `_C` (hidden here): unavailable with the in-place build as the fix, and no
    first-use build (a checkout is built with `pip install --no-build-isolation -e .`, as `make build` does)."""
    cache = tmp_path / "cache"
    code = "import sys; sys.modules['moe_kernels._C'] = None\n" + CHECK
    proc = _run([sys.executable, "-c", code], ROOT, _env(MOE_KERNELS_CACHE_DIR=cache))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(ROOT)), res["file"]
    assert "pip install --no-build-isolation -e ." in res["native"], res["native"]
    assert len(res["warnings"]) == 1 and res["auto_equals_reference"], res
    assert COMPILING not in proc.stderr and not cache.exists(), proc.stderr


@pytest.mark.skipif(not list((ROOT / "moe_kernels").glob("_C*.so")), reason="no in-place build of moe_kernels._C")
def test_native_library_variable_loads_that_library(tmp_path):
    # MOE_KERNELS_NATIVE_LIBRARY (the sanitizer build of `make sanitize` uses it) is loaded instead of moe_kernels._C;
    # a path that does not load is an error at the first native use, not a silent fallback
    (library,) = (ROOT / "moe_kernels").glob("_C*.so")
    copy = tmp_path / "moe_kernels_other.so"
    copy.write_bytes(library.read_bytes())
    res, _ = _check(sys.executable, ROOT, MOE_KERNELS_NATIVE_LIBRARY=copy)
    assert res["origin"] == "library" and res["library"] == str(copy.resolve()), res
    assert res["native"] == "available" and res["native_equals_reference"] and res["auto_equals_reference"], res
    proc = _run([sys.executable, "-c", CHECK], ROOT, _env(MOE_KERNELS_NATIVE_LIBRARY=tmp_path / "missing.so"),
                check=False)
    assert proc.returncode != 0 and "missing.so" in proc.stderr, proc.stderr[-2000:]
