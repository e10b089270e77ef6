"""Where the native CPU ops (csrc/, registered as ``torch.ops.moe_kernels_C.*``) come from, and why they are missing
when they are.

Nothing here runs at ``import moe_kernels``. The native ops are looked for on first native use: the first op on CPU
tensors that the backend choice would run natively (``auto`` or ``native``), ``moe_kernels.backends()``, or
``_backend.NATIVE``. An op on CUDA tensors never gets here, so a CUDA-only program neither loads nor compiles them.
In that order:

1. The extension ``moe_kernels._C`` built at install time: ``pip install --no-build-isolation .`` (or ``-e .``,
   ``make build``), that is, a build that can import torch. This is the fast path and compiles nothing at run time.
2. Otherwise, in an installed package that ships its C++ sources (``moe_kernels/_csrc/``: a wheel built without
   torch in its build environment, e.g. a plain ``pip install .`` or ``python -m build``), a build of those sources
   with ``torch.utils.cpp_extension.load`` and ninja into a cache directory, done once per cache key and loaded from
   there by later processes without compiling. While it compiles, one line goes to stderr::

       moe_kernels: compiling the native CPU ops for torch <version> (once, about 1-2 minutes) in <dir>

   The cache root is ``MOE_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_kernels``, else
   ``~/.cache/moe_kernels``. The cache key (the directory's name) covers the Python ABI, the machine, the torch
   version, its git revision and C++ ABI, the compiler and linker flags, and the sources' contents. It does not
   cover the CPU's instruction set: the flags carry no ``-march``, and the library picks its AVX-512 / AVX2 /
   baseline kernels at run time (capped by ``MOE_KERNELS_CPU_ISA``), so one build serves every x86 CPU.
   Concurrent processes: an exclusive ``fcntl.flock`` on ``<dir>/moe_kernels.lock`` serialises them (a waiting one
   says so on stderr), torch's own lock file (``<dir>/lock``) is taken by ``cpp_extension.load`` inside it, and a
   build counts only once ``<dir>/complete`` is written after the library loaded; the flock dies with its process,
   so a killed build never blocks the next one. A failed build is recorded in ``<dir>/failed.json`` and not retried
   with the same compiler (another ``CXX``, or a changed compiler binary, retries; so does removing the directory).
   A source checkout (no ``_csrc/``) never compiles at run time: build it in place with
   ``pip install --no-build-isolation -e .``.
3. Otherwise the native ops are unavailable: the CPU ops run on the reference backend, ``backends()["native"]``
   says ``unavailable, CPU ops fall back to reference (<reason>. Fix: <fix>)``, and the first CPU op that would have
   run natively under ``auto`` warns once per process (:class:`NativeOpsUnavailableWarning`, a ``UserWarning``:
   shown by default, at the user's line that called the op) with the same reason and fix. Choosing
   ``MOE_KERNELS_BACKEND=reference`` (or ``use_backend("reference")``) asks for the reference explicitly and does
   not warn; ``MOE_KERNELS_BACKEND=native`` raises instead.

``MOE_KERNELS_NATIVE_LIBRARY=<path>`` loads the native ops from that library instead, before anything above: a
build of ``csrc/`` made elsewhere, such as the AddressSanitizer / UndefinedBehaviorSanitizer build of ``make sanitize``
(whose runtime must then be preloaded). A path that does not load is an error, not a fallback.

``MOE_KERNELS_BUILD_NATIVE=0`` means: compile nothing. At build time the package is pure Python (no ``_C``, and no
sources shipped, so it never compiles later either). At run time it stops the first-use build; a ``_C`` built at
install time or a complete build already in the cache is still used. Without either, the first CPU op under ``auto``
warns once that the native ops are off because of that variable (a deliberate choice, but a slow one that may have
been made long ago in a Dockerfile; ``MOE_KERNELS_BACKEND=reference`` silences it).
"""
import hashlib
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

# The extension's compile and link flags, shared with setup.py (which loads this file on its own, so no imports
# beyond the standard library at module level).
IS_WINDOWS = sys.platform == "win32"
CXX_FLAGS = ["-O3", "-std=c++17"] + ([] if IS_WINDOWS else ["-fopenmp"])
LD_FLAGS = [] if IS_WINDOWS else ["-fopenmp"]

LIB_NAME = "moe_kernels_C"  # the library's file name in the cache (its ops: torch.ops.moe_kernels_C.*)
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES_DIR = PACKAGE_DIR / "_csrc"  # the C++ sources a wheel ships (setup.py's build_py copies csrc/ there)
DISABLED_MARK = "DISABLED"  # in _csrc/ instead of the sources: the package was built with MOE_KERNELS_BUILD_NATIVE=0

ENV_BUILD = "MOE_KERNELS_BUILD_NATIVE"
ENV_LIBRARY = "MOE_KERNELS_NATIVE_LIBRARY"
ENV_CACHE = "MOE_KERNELS_CACHE_DIR"


class NativeOpsUnavailableWarning(UserWarning):
    """The native CPU ops are unavailable and the CPU path runs on the (slower) reference backend."""


class State(NamedTuple):
    available: bool
    origin: Optional[str]  # "prebuilt" (moe_kernels._C), "cache" (built on first use) or "library" (ENV_LIBRARY)
    library: Optional[str]  # the loaded library's path, when available
    reason: Optional[str]  # why not, when unavailable
    fix: Optional[str]  # what to do about it

    def describe(self) -> str:
        return "available" if self.available else f"{self.reason}. Fix: {self.fix}"


_lock = threading.Lock()
_state: Optional[State] = None
_warned = False


def state() -> State:
    """The native ops' state, loading (and, where that is the way, compiling) them on the first call."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def available() -> bool:
    return state().available


def warn_unavailable() -> None:
    """Warns once per process that the native CPU ops are unavailable, with the reason and the fix; the warning
    points at the first caller outside moe_kernels and torch (the user's line)."""
    global _warned
    st = state()
    with _lock:
        if st.available or _warned:
            return
        _warned = True
    warnings.warn(f"moe_kernels: the native CPU ops are unavailable, so CPU tensors run on the much slower reference "
                  f"backend: {st.reason}. Fix: {st.fix}. (MOE_KERNELS_BACKEND=reference chooses the reference "
                  f"backend explicitly and silences this.)", NativeOpsUnavailableWarning, stacklevel=_outside_level())


def _outside_level() -> int:
    """warnings.warn's stacklevel of the first frame (from its caller's caller up) outside moe_kernels and torch."""
    import torch
    dirs = (str(PACKAGE_DIR), os.path.dirname(os.path.abspath(__file__)),
            os.path.dirname(os.path.abspath(torch.__file__)), os.path.dirname(os.path.realpath(torch.__file__)))
    skip = tuple({d + os.sep for d in dirs})
    frame, level = sys._getframe(1), 1  # level 1: warn_unavailable
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    if IS_WINDOWS and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "moe_kernels" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "moe_kernels"


def _build_disabled() -> bool:
    return os.environ.get(ENV_BUILD, "1") == "0"


def _unavailable(reason: str, fix: str) -> State:
    return State(False, None, None, reason, fix)


def _load() -> State:
    if os.environ.get(ENV_LIBRARY):
        import torch
        path = str(Path(os.environ[ENV_LIBRARY]).expanduser().resolve())
        torch.ops.load_library(path)  # raises when it does not load: the caller asked for this library
        return State(True, "library", path, None, None)
    try:
        mod = importlib.import_module("moe_kernels._C")
        return State(True, "prebuilt", getattr(mod, "__file__", None), None, None)
    except ModuleNotFoundError as exc:
        prebuilt_error = ("no prebuilt moe_kernels._C" if exc.name == "moe_kernels._C"
                          else f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # built against another torch, say
        prebuilt_error = f"the prebuilt moe_kernels._C does not load: {type(exc).__name__}: {exc}"
    if not SOURCES_DIR.is_dir():  # a source checkout (or a package that was not built by our setup.py)
        return _unavailable(f"moe_kernels._C is not available ({prebuilt_error}; a source checkout compiles nothing "
                            "at run time)",
                            "build it against the installed torch with `pip install --no-build-isolation -e .` in the "
                            "source tree (`make build`), with a C++ compiler and ninja installed")
    if (SOURCES_DIR / DISABLED_MARK).exists():
        return _unavailable(f"this moe_kernels was installed with {ENV_BUILD}=0, without native CPU ops",
                            f"reinstall it without {ENV_BUILD}=0, with a C++ compiler and ninja installed "
                            "(`pip install ninja`): the ops then build at install time, or on first use")
    sources = sorted(SOURCES_DIR.glob("*.cpp"))
    if not sources:
        return _unavailable(f"moe_kernels._C is not available ({prebuilt_error}) and {SOURCES_DIR} holds no C++ "
                            "sources to build it from", "reinstall moe_kernels")
    try:
        return _load_cached_or_build(sources, prebuilt_error)
    except Exception as exc:  # the cache directory not writable, and the like
        return _unavailable(f"the first-use build of the native CPU ops failed ({type(exc).__name__}: {exc})",
                            f"make {ENV_CACHE} point at a writable directory, or install with a C++ compiler and "
                            "ninja present: `pip install --no-build-isolation moe_kernels`")


def cache_key() -> str:
    """The cache directory's name for the shipped sources and the running torch."""
    import torch
    h = hashlib.sha256()
    parts = [sys.implementation.cache_tag, sys.platform, platform.machine(), torch.__version__,
             str(torch.version.git_version), str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
             " ".join(CXX_FLAGS), " ".join(LD_FLAGS)]
    h.update("\0".join(parts).encode())
    for path in sorted(SOURCES_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            h.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    version = "".join(c if c.isalnum() or c in "._" else "_" for c in torch.__version__)
    return f"{sys.implementation.cache_tag}-{platform.machine().lower()}-torch{version}-{h.hexdigest()[:16]}"


def _compiler() -> str:
    return os.environ.get("CXX") or ("cl" if IS_WINDOWS else "c++")


def _toolchain_id() -> dict:
    cxx = _compiler()
    exe = shutil.which(shlex.split(cxx)[0]) if cxx.strip() else None
    ident = {"CXX": cxx, "path": exe}
    if exe:
        st = os.stat(exe)
        ident.update(size=st.st_size, mtime=st.st_mtime)
    return ident


def _ninja_dir() -> Optional[str]:
    """A directory holding ninja when it is not on PATH: the running interpreter's scripts directory (a virtual
    environment that was not activated) or the `ninja` package's."""
    if shutil.which("ninja"):
        return None
    import sysconfig
    candidates = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    try:
        import ninja
        candidates.insert(0, getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    for d in candidates:
        if d and shutil.which("ninja", path=d):
            return d
    return ""  # nowhere


class _FileLock:
    """An exclusive flock on `path` (released when the process dies); a no-op where fcntl is missing."""

    def __init__(self, path: Path, waiting_message: str):
        self.path, self.waiting_message, self.fd, self.held = path, waiting_message, None, False

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: torch's lock file in cpp_extension.load still guards the build itself
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(self.waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.held = True
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd, self.held = None, False


def _first_error(text: str, exc: BaseException) -> str:
    """The line of a failed build's output that says what went wrong."""
    text = re.sub(r"^Error building extension '[^']*':\s*", "", text.strip())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"\berror\b:", r"not found|No such file|cannot execute|Permission denied"):
        for ln in lines:
            if re.search(pattern, ln, re.IGNORECASE):
                return ln[:300]
    return (lines[0][:300] if lines else type(exc).__name__)


def _load_cached_or_build(sources, prebuilt_error: str) -> State:
    import torch
    build_dir = cache_root() / cache_key()
    build_dir.mkdir(parents=True, exist_ok=True)
    complete, failed, log = build_dir / "complete", build_dir / "failed.json", build_dir / "build.log"
    with _FileLock(build_dir / "moe_kernels.lock",
                   f"moe_kernels: waiting for another process compiling the native CPU ops in {build_dir}") as lock:
        if complete.exists():
            library = build_dir / complete.read_text().strip()
            try:
                torch.ops.load_library(str(library))
                return State(True, "cache", str(library), None, None)
            except Exception as exc:
                if _build_disabled():
                    return _unavailable(f"the cached native CPU ops in {build_dir} failed to load "
                                        f"({type(exc).__name__}: {exc})", f"remove {build_dir} and unset {ENV_BUILD}")
                complete.unlink()  # rebuilt below
        if _build_disabled():
            return _unavailable(f"moe_kernels._C is not built and {ENV_BUILD}=0 stops moe_kernels from compiling the "
                                "native CPU ops", f"unset {ENV_BUILD} to compile them on first use (needs a C++ "
                                "compiler and ninja), or install with `pip install --no-build-isolation moe_kernels`")
        toolchain = _toolchain_id()
        if failed.exists():
            try:
                record = json.loads(failed.read_text())
            except ValueError:
                record = {}
            if record.get("toolchain") == toolchain:
                return _unavailable(f"an earlier first-use build failed ({record.get('detail')})",
                                    f"{record.get('fix')}; with the same compiler it is not retried until {build_dir} "
                                    "is removed")
        if not toolchain["path"]:
            return _unavailable(f"{prebuilt_error}, and no C++ compiler to build them on first use "
                                f"({toolchain['CXX']!r} not found)",
                                "install a C++ compiler (g++ or clang++; CXX names another one) and ninja "
                                "(`pip install ninja`): the ops then compile on first use; or install with "
                                "`pip install --no-build-isolation moe_kernels` with them present")
        ninja_dir = _ninja_dir()
        if ninja_dir == "":
            return _unavailable("ninja, needed to build the native CPU ops on first use, is not installed",
                                "`pip install ninja` (or your system's ninja package): the ops then compile on first "
                                "use")
        print(f"moe_kernels: compiling the native CPU ops for torch {torch.__version__} (once, about 1-2 minutes) in "
              f"{build_dir}", file=sys.stderr, flush=True)
        stale = build_dir / "lock"  # torch's lock file: with our flock held, one left behind by a killed build
        if lock.held and stale.exists():
            stale.unlink()
        old_path = os.environ.get("PATH", "")
        if ninja_dir:
            os.environ["PATH"] = ninja_dir + os.pathsep + old_path
        try:
            from torch.utils import cpp_extension
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cpp_extension's notes on the compiler's ABI
                library = cpp_extension.load(LIB_NAME, [str(s) for s in sources], extra_cflags=CXX_FLAGS,
                                             extra_ldflags=LD_FLAGS, build_directory=str(build_dir),
                                             is_python_module=False, verbose=False)
        except Exception as exc:
            text = str(exc)
            log.write_text(text)
            detail = f"{_first_error(text, exc)}; the full log is {log}"
            reason = f"compiling the native CPU ops failed ({detail})"
            fix = (f"read the log, then fix the compiler setup (CXX={toolchain['CXX']}) or install with `pip install "
                   "--no-build-isolation moe_kernels`")
            failed.write_text(json.dumps({"toolchain": toolchain, "detail": detail, "fix": fix}))
            return _unavailable(reason, fix)
        finally:
            if ninja_dir:
                os.environ["PATH"] = old_path
        complete.write_text(os.path.basename(library))
        if failed.exists():
            failed.unlink()
        return State(True, "cache", str(library), None, None)
