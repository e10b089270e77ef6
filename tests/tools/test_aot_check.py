"""aot_check compiles every Triton kernel config for sm_80 and sm_90 with no spills, and fails loudly."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}


def run(args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=1200, **kw)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    r = run(["-m", "moe_kernels.tools.aot_check"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    listing = run(["-c", "import moe_kernels.tools.aot_check as a; print('\\n'.join(f + '.' + e['name'] for f, e in a.configs()))"])
    names = listing.stdout.split()
    assert names, "no kernel configs: " + listing.stderr[-2000:]
    compiled = {(line.split()[0], line.split()[1]) for line in r.stdout.splitlines() if " sm_" in line}
    for name in names:  # every config of every kernel, for both architectures
        assert (name, "sm_80") in compiled and (name, "sm_90") in compiled, name
    assert f"{2 * len(names)} of {2 * len(names)} kernel x arch compiles clean" in r.stdout
    assert "FAILED" not in r.stdout and "<-" not in r.stdout


def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(textwrap.dedent('''
        import sys
        import triton, triton.language as tl
        import moe_kernels.tools.aot_check as aot

        @triton.jit
        def broken(x_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i) @ 3)   # not a valid operation: must not compile

        entry = {"name": "broken", "fn": broken, "signature": {"x_ptr": "*fp32", "BLOCK": "constexpr"},
                 "constexprs": {"BLOCK": 16}, "num_warps": 4, "num_stages": 2}
        aot.configs = lambda: [("test", entry)]
        sys.exit(aot.main(["--arch", "90", "--jobs", "1"]))
    '''))
    r = run([str(script)])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout


def test_runs_from_an_interpreter_environment():
    # the kernels would be defined as interpreted functions there; the tool starts a clean process itself
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "moe_kernels.tools.aot_check", "--arch", "90", "--filter",
                        "sort_hist-i32-flat"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 of 1 kernel x arch compiles clean" in r.stdout


def test_no_configs_is_an_error():
    r = run(["-m", "moe_kernels.tools.aot_check", "--filter", "no-such-kernel"])
    assert r.returncode == 1 and "no Triton kernel configs" in r.stderr
