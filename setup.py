"""Builds the native CPU extension `moe_kernels._C` from csrc/ with torch's cpp_extension and ninja.

MOE_KERNELS_BUILD_NATIVE=0 skips it (the package then runs on the reference/triton backends).
Without torch importable at build time (an isolated build), the extension is skipped as well:
install with `pip install --no-build-isolation .` to build it against your torch.
"""
import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("MOE_KERNELS_BUILD_NATIVE", "1") != "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("moe_kernels: torch not importable at build time; skipping the native extension "
              "(use `pip install --no-build-isolation .`)", file=sys.stderr)
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
        extra = ["-O3", "-std=c++17"]
        if sys.platform != "win32":
            extra.append("-fopenmp")
        ext_modules.append(
            CppExtension(
                "moe_kernels._C",
                sources,
                extra_compile_args={"cxx": extra},
                extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
                py_limited_api=False,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
