"""The benchmark suite's own logic: the acceptance targets evaluated from a run's rows, and a quick run end to end
(`python -m benchmarks --quick`, what `make bench` runs at its smallest)."""
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_expert_mlp, report

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


def test_quick_suite_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-plots", "--no-memory", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"], written
    md = next(tmp_path.glob("*.md")).read_text()
    assert "## Summary" in md and "| ours |" in md
