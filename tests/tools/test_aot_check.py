"""aot_check compiles every Triton kernel config for the architectures it names, with no spills and every hardware
path (wgmma, TMA, warp specialisation) its entry asks for, and fails loudly."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
from moe_kernels.tools.aot_check import archs, findings  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
HOPPER = {"archs": (90,), "wgmma": True, "tma_load": True, "tma_store": True, "warp_specialized": True}
CLEAN = {"reg": 168, "stack": 0, "local": 0, "shared": 1024, "smem": 131672, "target": "sm_90a", "wgmma": True,
         "hgmma": True, "tma_load": True, "tma_store": True, "setmaxnreg": True}


def run(args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=1200, **kw)


@pytest.mark.slow
def test_every_kernel_compiles_for_its_archs_without_spills():
    r = run(["-m", "moe_kernels.tools.aot_check"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    listing = run(["-c", "import moe_kernels.tools.aot_check as a\n"
                         "for f, e in a.configs(): print(f + '.' + e['name'], *a.archs(e, [80, 90]))"])
    expected = {(line.split()[0], f"sm_{arch}") for line in listing.stdout.splitlines() for arch in line.split()[1:]}
    assert expected, "no kernel configs: " + listing.stderr[-2000:]
    # every config compiles for at least one of the two
    assert {n for n, _ in expected} == {line.split()[0] for line in listing.stdout.splitlines()}
    compiled = {(line.split()[0], line.split()[1]) for line in r.stdout.splitlines() if " sm_" in line}
    assert compiled == expected     # every config of every kernel, for each of its architectures
    assert f"{len(expected)} of {len(expected)} kernel x arch compiles clean" in r.stdout
    assert "FAILED" not in r.stdout and "<-" not in r.stdout


def test_archs_restrict_the_architectures_asked_for():
    assert archs({}, [80, 90]) == [80, 90]
    assert archs({"archs": (90,)}, [80, 90]) == [90]
    assert archs({"archs": (90,)}, [80]) == []


def test_findings_of_a_clean_hopper_compile_are_none():
    assert findings(HOPPER, 90, CLEAN) == []
    assert findings({}, 80, dict(CLEAN, target="sm_80", wgmma=False, tma_load=False, tma_store=False,
                                 setmaxnreg=False, smem=100000)) == []
    # an entry asking for no Hopper path is not held to one
    assert findings({}, 90, dict(CLEAN, target="sm_90", wgmma=False, tma_load=False, setmaxnreg=False)) == []
    assert findings(dict(HOPPER, warp_specialized=False), 90, dict(CLEAN, setmaxnreg=False)) == []


@pytest.mark.parametrize("arch, usage, finding", [
    (90, {"stack": 16}, "spills 16 B"),
    (90, {"local": 8}, "local memory 8 B"),
    (90, {"smem": 232449}, "smem 232449 B > 232448 B"),
    (80, {"smem": 166913, "target": "sm_80"}, "smem 166913 B > 166912 B"),
    (90, {"target": "sm_90"}, "target sm_90, not sm_90a"),
    (90, {"wgmma": False, "hgmma": False}, "no wgmma"),
    (90, {"hgmma": False}, "no HGMMA in the SASS"),
    (90, {"tma_load": False}, "no TMA load"),
    (90, {"tma_store": False}, "no TMA store"),
    (90, {"setmaxnreg": False}, "no setmaxnreg (not warp-specialised)"),
])
def test_each_missing_requirement_is_named(arch, usage, finding):
    assert findings(HOPPER, arch, dict(CLEAN, **usage)) == [finding]


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


LOST_PATHS = '''
import sys
import triton, triton.language as tl
import moe_kernels.tools.aot_check as aot
import moe_kernels.triton.grouped_gemm_tma as g


@triton.jit
def pointer_gemm(a_ptr, b_ptr, c_ptr, IEEE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tile = i[:, None] * BLOCK + i[None, :]
    a = tl.load(a_ptr + tile)
    b = tl.load(b_ptr + tile)
    c = tl.dot(a, b, input_precision="ieee") if IEEE else tl.dot(a, b)
    tl.store(c_ptr + tile, c)


def pointer_entry(name, ty, ieee):
    return {"name": name, "fn": pointer_gemm, "num_warps": 4, "num_stages": 2,
            "signature": {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "c_ptr": "*fp32", "IEEE": "constexpr",
                          "BLOCK": "constexpr"}, "constexprs": {"IEEE": ieee, "BLOCK": 32}}


tn = next(e for e in g.AOT_CONFIGS if e["name"] == "grouped_gemm_tn_tma-bf16-large")
entries = [
    dict(tn, name="ws_at_8_warps", num_warps=8),     # Triton does not warp-specialise at 8 warps
    dict(pointer_entry("pointer_claims_tma", "bf16", False), archs=(90,), tma_load=True, tma_store=True),
    dict(pointer_entry("ieee_claims_wgmma", "fp32", True), archs=(90,), wgmma=True),
]
aot.configs = lambda: [("test", e) for e in entries]
sys.exit(aot.main(["--jobs", "1"]))
'''


@pytest.fixture(scope="module")
def lost_paths(tmp_path_factory):
    script = tmp_path_factory.mktemp("aot") / "lost_paths.py"
    script.write_text(LOST_PATHS)
    r = run([str(script)])
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if " sm_" in line}
    return r, lines


def test_kernels_that_lost_their_hardware_path_fail_the_check(lost_paths):
    r, lines = lost_paths
    assert r.returncode == 1, r.stdout + r.stderr
    assert set(lines) == {"test.ws_at_8_warps", "test.pointer_claims_tma", "test.ieee_claims_wgmma"}, r.stdout
    assert all(" sm_90 " in line for line in lines.values())     # archs=(90,): no sm_80 compile
    assert "0 of 3 kernel x arch compiles clean, 3 failed (3 kernel x arch left out" in r.stdout


def test_warp_specialize_at_8_warps_is_missing_setmaxnreg(lost_paths):
    line = lost_paths[1]["test.ws_at_8_warps"]
    assert line.endswith("<- no setmaxnreg (not warp-specialised)"), line
    assert " ld+st " in line and " yes " in line      # still TMA and wgmma


def test_pointer_loads_and_stores_are_missing_tma(lost_paths):
    line = lost_paths[1]["test.pointer_claims_tma"]
    assert line.endswith("<- no TMA load; no TMA store"), line


def test_an_ieee_fp32_dot_is_missing_wgmma(lost_paths):
    line = lost_paths[1]["test.ieee_claims_wgmma"]
    assert line.endswith("<- no wgmma"), line


def test_the_hopper_tma_kernels_pass_every_check():
    names = ["grouped_gemm_tma-bf16-gated-up_save", "grouped_gemm_tn_tma-fp16-large"]
    r = run(["-m", "moe_kernels.tools.aot_check", "--filter", *names])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line.split() for line in r.stdout.splitlines() if " sm_" in line]
    assert sorted(line[0] for line in lines) == ["grouped_gemm_tma." + n for n in names]
    for line in lines:     # arch regs spill local smem wgmma tma ws
        assert line[1] == "sm_90" and line[3:5] == ["0", "0"] and line[6:9] == ["yes", "ld+st", "yes"], line
    assert "2 of 2 kernel x arch compiles clean (2 kernel x arch left out by the entries' archs)" in r.stdout


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


def test_no_compile_left_by_the_archs_is_an_error():
    r = run(["-m", "moe_kernels.tools.aot_check", "--arch", "80", "--filter", "grouped_gemm_tn_tma-fp16-large"])
    assert r.returncode == 1 and "no kernel compiles for sm_80" in r.stderr


def test_config_names_are_unique(monkeypatch):
    import moe_kernels.tools.aot_check as aot
    names = [f + "." + e["name"] for f, e in aot.configs()]
    assert len(names) == len(set(names))
    from moe_kernels.triton import routing
    entries = list(getattr(routing, "AOT_CONFIGS", ()))
    assert entries, "routing has no AOT configs to repeat"
    monkeypatch.setattr(routing, "AOT_CONFIGS", entries + entries[:1], raising=False)
    with pytest.raises(ValueError, match=f"share a name: routing.{entries[0]['name']}"):
        aot.configs()
