"""The build switch: MOE_KERNELS_BUILD_NATIVE=0 gives a pure-Python package (no compile step)."""
import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_build_without_native_extension(tmp_path):
    env = dict(os.environ, MOE_KERNELS_BUILD_NATIVE="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, env=env, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("moe_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moe_kernels/__init__.py" in names and "moe_kernels/ops/routing.py" in names
    assert not [n for n in names if n.startswith("moe_kernels/_C")], names
    # the pure-Python package imports and says the native backend is unavailable (editable-install
    # finders of the test environment are set aside so that the wheel's copy is the one imported)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import moe_kernels; print(moe_kernels.__file__); print(moe_kernels.backends()['native'])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(site)), timeout=300).stdout
    file, native = out.splitlines()
    assert file.startswith(str(site)), file  # the wheel's copy, not the source tree
    assert native.startswith("unavailable"), native
