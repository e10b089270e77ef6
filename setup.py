"""Builds the native CPU extension `moe_kernels._C` from csrc/ with torch's cpp_extension and ninja, and ships the
C++ sources in the package (moe_kernels/_csrc/) so that a package built without torch compiles them on first use.

- torch importable at build time (`pip install --no-build-isolation .`, `-e .`, `make build`): `_C` is built now,
  against that torch; a failed build fails the install.
- torch not importable (an isolated build: plain `pip install .`, `pip wheel .`, `python -m build`): no `_C`; the
  package compiles the sources on first native use into a user cache directory (moe_kernels/_native.py).
- MOE_KERNELS_BUILD_NATIVE=0: a pure-Python package: no `_C` and no sources (moe_kernels/_csrc/ holds a DISABLED
  mark), so it never compiles; the CPU path runs on the reference backend (it says so once).
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.sdist import sdist as _sdist

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_NATIVE = os.environ.get("MOE_KERNELS_BUILD_NATIVE", "1") != "0"
CSRC = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.h")))


def _native_module():
    """moe_kernels/_native.py on its own (the package's __init__ imports torch): the flags and names it defines."""
    spec = importlib.util.spec_from_file_location("_moe_kernels_native_build", os.path.join(HERE, "moe_kernels",
                                                                                              "_native.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


native = _native_module()


class build_py(_build_py):
    """Also copies csrc/ into the package as moe_kernels/_csrc/ (a DISABLED mark instead with
    MOE_KERNELS_BUILD_NATIVE=0). An editable install skips it: a source checkout never compiles at run time."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "moe_kernels", os.path.basename(native.SOURCES_DIR))
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        if not BUILD_NATIVE:
            with open(os.path.join(dest, native.DISABLED_MARK), "w") as f:
                f.write("built with MOE_KERNELS_BUILD_NATIVE=0: no native CPU ops\n")
            return
        if not [s for s in CSRC if s.endswith(".cpp")]:
            raise RuntimeError(f"no C++ sources in {os.path.join(HERE, 'csrc')}")
        for src in CSRC:
            self.copy_file(src, os.path.join(dest, os.path.basename(src)))


class sdist(_sdist):
    """The source distribution carries csrc/ (the extension is not declared when torch is missing, so setuptools
    would not add its sources by itself)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, list(files) + [s for s in CSRC if s not in files])


ext_modules = []
cmdclass = {"build_py": build_py, "sdist": sdist}

if BUILD_NATIVE:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("moe_kernels: torch is not importable at build time (an isolated build), so the native CPU ops are not "
              "built now; the package ships their sources and compiles them on first use (a C++ compiler and ninja "
              "needed then). `pip install --no-build-isolation .` builds them now against the installed torch.",
              file=sys.stderr)
    else:
        ext_modules.append(
            CppExtension(
                "moe_kernels._C",
                [s for s in CSRC if s.endswith(".cpp")],
                extra_compile_args={"cxx": native.CXX_FLAGS},
                extra_link_args=native.LD_FLAGS,
                py_limited_api=False,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
