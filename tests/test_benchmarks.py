"""The benchmark suite's own logic: the acceptance targets evaluated from a run's rows, the fp32 oracle of 16-bit
providers, and a quick run end to end (`python -m benchmarks --quick`, what `make bench` runs at its smallest)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_expert_mlp, bench_soft_moe, common, report

ROOT = Path(__file__).resolve().parents[1]


def _row(label, T, pass_name, provider, ms, pct=None, bound="compute"):
    return {"family": "expert_mlp", "label": label, "tokens": T, "pass": pass_name, "provider": provider,
            "seconds": ms / 1e3, "ms": ms, "pct_limit": pct, "bound": bound if pct is not None else None}


def test_cpu_targets_from_rows():
    olmoe, mixtral, decode = "OLMoE/4 T2048-D512-H256-E64-k8", "Mixtral/8 T2048-D512-H1024-E8-k2", \
        "OLMoE/4 T4-D512-H256-E64-k8"
    rows = [_row(olmoe, 2048, "fwd+bwd", "ours", 100.0, pct=80),
            _row(olmoe, 2048, "fwd+bwd", "ours bf16", 40.0),
            _row(olmoe, 2048, "fwd+bwd", "transformers grouped_mm", 130.0),
            _row(olmoe, 2048, "fwd+bwd", "transformers eager", 400.0),
            _row(mixtral, 2048, "fwd", "ours", 50.0, pct=84),
            _row(mixtral, 2048, "fwd", "ours bf16", 55.0),
            _row(mixtral, 2048, "fwd+bwd", "ours", 150.0, pct=90),
            _row(decode, 4, "fwd", "ours", 1.0, pct=60, bound="memory"),
            _row(decode, 4, "fwd", "transformers eager", 3.0),
            _row(decode, 4, "fwd", "transformers grouped_mm", 2.5)]
    got = {name: (measured, met) for name, measured, met in bench_expert_mlp.targets(rows, "cpu")}
    assert got["OLMoE/4 T2048 fwd+bwd >= 1.25x transformers grouped_mm"] == (
        "1.30x (100 vs 130 ms, transformers grouped_mm)", True)
    assert got["OLMoE/4 T2048 fwd+bwd >= 5x transformers eager"][1] is False          # 4x
    assert got["OLMoE/4 T2048 fwd+bwd >= 75% of the dense rate"] == ("80% (compute)", True)
    assert got["Mixtral/8 T2048 fwd >= 85% of the dense rate"][1] is False            # 84%
    assert got["Mixtral/8 T2048 fwd+bwd >= 85% of the dense rate"][1] is True
    # the fastest transformers implementation is the one compared
    assert got["OLMoE/4 T4 fwd >= 2x the fastest transformers implementation"] == (
        "2.50x (1 vs 2.5 ms, transformers grouped_mm)", True)
    measured, met = got["bf16 at least as fast as fp32 (every case)"]
    assert met is False and measured.startswith("0.91x at worst (Mixtral/8 T2048 fwd)") and "2.50x at best" in measured
    table = report.targets(bench_expert_mlp.targets(rows, "cpu"))
    assert table.count("| **no** |") == 3 and table.count("| yes |") == 4


def test_gpu_targets_from_rows():
    mixtral, qwen, olmoe, deepseek = ("Mixtral T16384-D4096-H14336-E8-k2", "Qwen3-30B-A3B T32768-D2048-H768-E128-k8",
                                      "OLMoE T16384-D2048-H1024-E64-k8", "DeepSeek-V3 T4096-D7168-H2048-E256-k8")
    gm = "torch grouped_mm"
    rows = [_row(mixtral, 16384, "fwd+bwd", "ours", 100.0), _row(mixtral, 16384, "fwd+bwd", gm, 115.0),
            _row(mixtral, 16384, "fwd", "ours", 30.0, pct=86),
            _row(qwen, 32768, "fwd+bwd", "ours", 10.0), _row(qwen, 32768, "fwd+bwd", gm, 12.0),
            _row(qwen, 32768, "fwd+bwd", "transformers grouped_mm", 9.0),      # not the peer of these targets
            _row(olmoe, 16384, "fwd+bwd", "ours", 10.0), _row(olmoe, 16384, "fwd+bwd", gm, 14.0),
            _row(deepseek, 4096, "fwd+bwd", "ours", 50.0), _row(deepseek, 4096, "fwd+bwd", gm, 45.0),
            _row("Mixtral T4-D4096-H14336-E8-k2", 4, "fwd", "ours", 0.2, pct=72, bound="memory")]
    got = {name: (measured, met) for name, measured, met in bench_expert_mlp.targets(rows, "cuda")}
    assert got["Mixtral T16384 fwd+bwd >= 1.1x the torch grouped_mm layer"] == (
        "1.15x (100 vs 115 ms, torch grouped_mm)", True)
    assert got["Mixtral T16384 fwd >= 85% of the dense cuBLAS rate"] == ("86% (compute)", True)
    assert got["Qwen3-30B-A3B T32768 fwd+bwd >= 1.3x the torch grouped_mm layer"][1] is False    # 1.2x
    assert got["OLMoE T16384 fwd+bwd >= 1.3x the torch grouped_mm layer"][1] is True              # 1.4x
    measured, met = got["every fwd+bwd case >= 1.0x the torch grouped_mm layer"]
    assert met is False and measured.startswith("0.90x at worst (DeepSeek-V3 T4096), 1.40x at best (OLMoE T16384)")
    assert got["Mixtral T4 fwd >= 70% of copy bandwidth"] == ("72% (memory)", True)
    assert len(got) == 6                      # decode T1 and T8 did not run: no row
    two = bench_expert_mlp.TWO_LAUNCH
    more = rows + [_row("Mixtral bf16-w T1-D4096-H14336-E8-k2", 1, "fwd", "ours", 0.2),
                   _row("Mixtral bf16-w T1-D4096-H14336-E8-k2", 1, "fwd", two, 0.12),
                   _row("Qwen3-30B-A3B mxfp4-w T8-D2048-H768-E128-k8", 8, "fwd", two, 0.05, pct=88, bound="memory")]
    got = {name: (measured, met) for name, measured, met in bench_expert_mlp.targets(more, "cuda")}
    assert got["Mixtral bf16 weights T1 fwd <= 0.15 ms"] == ("0.2 ms", False)
    assert got["Mixtral bf16 weights T1 fwd <= 0.15 ms (two-launch decode)"] == ("0.12 ms", True)
    assert got["Qwen3-30B-A3B mxfp4 weights T8 fwd >= 85% of the copy rate of its weight bytes (two-launch decode)"
               ] == ("88% (memory)", True)
    assert len(got) == 9
    # without the peer the ratios are unknown, not failed
    alone = {n: met for n, _, met in bench_expert_mlp.targets([r for r in rows if r["provider"] != gm], "cuda")}
    assert alone["every fwd+bwd case >= 1.0x the torch grouped_mm layer"] is None
    assert alone["Mixtral T16384 fwd+bwd >= 1.1x the torch grouped_mm layer"] is None


def test_peer_table():
    label = "Mixtral T16384-D4096-H14336-E8-k2"
    rows = [_row(label, 16384, "fwd+bwd", "ours", 100.0) | {"flops": 18 * 16384 * 2 * 4096 * 14336,
                                                            "limit": {"dense_matmul_ms": 80.0}},
            _row(label, 16384, "fwd+bwd", "torch grouped_mm", 120.0),
            _row(label, 16384, "fwd", "ours", 1.0) | {"seconds": None, "ms": None,
                                                     "status": "wrong result: ...; not timed"}]
    lines = bench_expert_mlp.peer_table(rows).splitlines()
    assert lines[2] == f"| {label} | fwd+bwd | 100 | 120 (1.20x) | - | 80 (0.80x) | 346 |"
    assert lines[3].startswith(f"| {label} | fwd | wrong result")


def _run(p, dtype=torch.bfloat16):
    case = common.Case("soft_moe", "synthetic", ("fwd",), None)
    return {r["provider"]: r for r in common.run_pass(case, "fwd", p, "cpu", dtype, budget_s=0.01, min_repeats=1,
                                                      measure_memory=False)}


def test_16bit_providers_are_checked_against_the_oracle():
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    truth = torch.randn(1 << 14, dtype=torch.float64)
    noisy = lambda s: (truth + s * torch.randn_like(truth)).to(bf16)  # noqa: E731  -- relative RMS error about s
    ref, good, bad = noisy(0.05), noisy(0.04), noisy(0.15)
    provs = [common.Provider("reference", lambda: ref, "reference", bf16),
             common.Provider("ours", lambda: good, "ours", bf16), common.Provider("bad", lambda: bad, "peer", bf16)]
    rows = _run(common.Pass(provs, common.Work(0, []), oracle=lambda: truth.float()))
    assert rows["ours"]["status"] == "ok" and 0.035 < rows["ours"]["rel_err"] < 0.045 and rows["ours"]["seconds"]
    assert rows["reference"]["status"] == "ok"
    # earned: twice the 16-bit reference's error (~0.1), so 0.15 is out
    assert rows["bad"]["status"].startswith("wrong result: relative RMS error 1.") and "fp32 oracle" in \
        rows["bad"]["status"] and rows["bad"]["seconds"] is None
    # against the 16-bit reference the more accurate provider would have been refused (~6% apart)
    assert _run(common.Pass(provs, common.Work(0, [])))["ours"]["status"].startswith("wrong result")
    # an fp32 provider is still checked against the reference
    f32 = [common.Provider("reference", lambda: truth.float(), "reference", torch.float32),
           common.Provider("ours", lambda: truth.float() * 1.01, "ours", torch.float32)]
    assert "against the reference" in _run(common.Pass(f32, common.Work(0, []), oracle=lambda: truth),
                                           torch.float32)["ours"]["status"]


def test_soft_moe_16bit_passes_have_an_fp32_oracle():
    case = bench_soft_moe.cases("cpu", "quick")[0]
    assert case.build("cpu", torch.float32)(False).oracle is None
    p = case.build("cpu", torch.bfloat16)(True)
    assert p.oracle().dtype == torch.float32
    rows = {r["provider"]: r for r in common.run_pass(case, "fwd+bwd", p, "cpu", torch.bfloat16, budget_s=0.01,
                                                      min_repeats=1, measure_memory=False)}
    assert rows["ours"]["status"] == "ok" and rows["reference"]["status"] == "ok"


def test_gpu_check_small_passes_and_catches_a_wrong_engine(capsys, monkeypatch):
    from benchmarks import gpu_check
    from moe_kernels.triton import engines, grouped_gemm as gg

    if os.environ.get("TRITON_INTERPRET") != "1" or type(gg._grouped_gemm_kernel).__name__ != "InterpretedFunction":
        pytest.skip("--small runs the kernels in the interpreter: TRITON_INTERPRET=1 before moe_kernels' import")

    assert gpu_check.main(["--small", "--cases", "empty-experts", "capacity-drop"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  ") == 6 and "ran tma" in out and "ran torch" in out and "gpu_check: PASS (6 of 6" in out
    real = engines.torch_gemm
    monkeypatch.setattr(engines, "torch_gemm", lambda *a, **kw: real(*a, **kw) * 1.02)
    assert gpu_check.main(["--small", "--engines", "torch", "triton", "--cases", "capacity-drop"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  torch  capacity-drop" in out and "PASS  triton capacity-drop" in out
    assert out.splitlines()[-1].startswith("gpu_check: FAIL (1 of 2")


def test_quick_suite_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-plots", "--no-memory", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"], written
    md = next(tmp_path.glob("*.md")).read_text()
    assert "## Summary" in md and "| ours |" in md


def test_memory_measurement_keeps_the_terminal_quiet(capfd):
    # torch's profiler logs its start and stop on file descriptor 2; the progress bar must not be buried under them
    from benchmarks import common

    peak = common.peak_memory(lambda: torch.randn(1000, 100).sum(), "cpu")
    out, err = capfd.readouterr()
    assert "profiler_start" not in err + out and "USDT" not in err + out
    assert peak is None or peak >= 1000 * 100 * 4
    print("still here", file=sys.stderr)     # descriptor 2 is back
    assert "still here" in capfd.readouterr().err


def test_gpu_session_fits_one_device_command():
    """The GPU session script parses, and its steps' default timeouts sum to less than the 600 s a device command
    may run (with room for the card query and the archive)."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_session.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    timeouts = dict(re.findall(r"\$\{(\w+_TIMEOUT):-(\d+)\}", text))
    assert {"CHECK_TIMEOUT", "TEST_TIMEOUT", "DECODE_TEST_TIMEOUT", "TUNE_TIMEOUT", "BENCH_TIMEOUT",
            "PROFILE_TIMEOUT"} <= set(timeouts)
    total = sum(int(v) for v in timeouts.values())
    assert total <= 590, f"the steps' timeouts sum to {total} s"
    assert f"sum to {total} s" in text          # the header says what the script does
