"""tune_gemm's CPU-side logic: the whole pipeline on small shapes under the interpreter with a fake timer (--dry-run),
the files it writes read back by the engine choice and the tile launchers, the joint dh / dw_down choice, the shared
tile file of two roles, the budget, and the candidate lists."""
import json
import os

import pytest
import torch

pytest.importorskip("triton")

from moe_kernels.tools import tune_gemm as tg  # noqa: E402


@pytest.fixture
def interpreter():
    """--dry-run needs the kernels defined under the interpreter (TRITON_INTERPRET=1 before moe_kernels' import)."""
    from moe_kernels.triton import grouped_gemm as gg

    if os.environ.get("TRITON_INTERPRET") != "1" or type(gg._grouped_gemm_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the Triton kernels were not defined under the interpreter")


def test_dry_run_writes_files_the_launchers_read(interpreter, tmp_path, capsys, monkeypatch):
    from moe_kernels.triton import engines, expert_mlp_decode as dec, grouped_gemm as gg, grouped_gemm_tma as gt

    for env in (engines.ENGINE_ENV, gg.CONFIG_ENV, gg.TN_CONFIG_ENV, gt.TMA_CONFIG_ENV, gt.TN_TMA_CONFIG_ENV):
        monkeypatch.delenv(env, raising=False)
    tg.main(["--dry-run", "--prune", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| model | T | role | torch ms (TFLOP/s) | tma ms (TFLOP/s) | triton ms (TFLOP/s) | chosen |" in out
    table = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(table) == 2 * (6 + 2)         # two models: six roles at the training size, up and down at decode

    data = json.loads((tmp_path / "gemm_engines-cpu-float16.json").read_text())
    assert set(data) == {"E4-D32-H16", "E5-D16-H24"}
    assert {r: sorted(t, key=int) for r, t in data["E4-D32-H16"].items()} == {
        **{r: ["48"] for r in ("dh", "dx", "dw_up", "dw_down")}, "up": ["8", "48"], "down": ["8", "48"],
        "decode": ["1", "4"]}          # decode steps up to the decode-size run (T = 4)
    assert all(e in engines.ENGINES for roles in data.values() for r, t in roles.items() if r != "decode"
               for e in t.values())
    assert all(c in ("fused", "split") for roles in data.values() for c in roles["decode"].values())
    assert "T=4: split" in out and "-> " in out

    kernels = {"grouped_gemm": 5, "grouped_gemm_tn": 5, "grouped_gemm_tma": 6, "grouped_gemm_tn_tma": 6}
    tiles = [p for p in tmp_path.iterdir() if not p.name.startswith("gemm_engines")]
    assert {p.name.split("-E")[0] for p in tiles} == set(kernels)
    for p in tiles:
        entries = json.loads(p.read_text())
        assert entries["_flags"]
        assert all(len(cfg) == kernels[p.name.split("-E")[0]] for m, cfg in entries.items() if not m.startswith("_"))
    # D = 2H: up (N 2H, K D) and dx (N D, K 2H) share their tile files; one config serves both
    shared = json.loads((tmp_path / "grouped_gemm-E4-N32-K32-cpu-float16.json").read_text())
    assert shared["_roles"] == "up+dx" and set(shared) >= {"48", "8"}

    # read back: the engine choice and the launchers' tile lookup take these files
    monkeypatch.setattr(engines, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(gg, "CONFIG_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    for role, widths in (("dh", (32, 16)), ("dw_up", (32, 32))):
        assert engines.choose(role, cpu, torch.float16, (4, 32, 16), 48, widths) == data["E4-D32-H16"][role]["48"]
    assert list(gg.gemm_config(48, 4, torch.float16, False, N=32, K=32, device=cpu)) == shared["48"]
    tma = json.loads((tmp_path / "grouped_gemm_tma-E4-N32-K32-cpu-float16.json").read_text())
    assert list(gt.tma_config(48, 4, 32, 32, torch.float16, False, cpu)) == tma["48"]
    for T, want in (("1", 1), ("4", 3), ("4", 64)):      # nearest token count on a log scale
        assert dec.tuned_choice(cpu, torch.float16, (4, 32, 16), want) == data["E4-D32-H16"]["decode"][T]

    # a second run merges into the files
    tg.main(["--dry-run", "--model", "tiny", "--tokens", "12", "--out", str(tmp_path)])
    again = json.loads((tmp_path / "gemm_engines-cpu-float16.json").read_text())
    assert set(again["E4-D32-H16"]["up"]) == {"8", "24", "48"} and "E5-D16-H24" in again


def test_budget_spent_skips_the_rest_with_a_note(interpreter, tmp_path, capsys):
    tg.main(["--dry-run", "--budget", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "note: budget of 0 s spent: skipped the rest of the work" in out
    assert not list(tmp_path.iterdir())


def test_dh_and_dw_down_are_chosen_together():
    best = {"up": {"torch": 1.0, "triton": 1.4}, "dh": {"torch": 1.0, "triton": 1.6},
            "dw_down": {"torch": 1.0, "triton": 1.6}}
    perm = {"x": 0.5, "g": 0.8}
    # each alone: torch 1.8 > triton 1.6; together torch 2.8 < triton 3.2 (one copy of dOut's rows)
    assert tg.choose(best, perm) == {"up": "triton", "dh": "torch", "dw_down": "torch"}
    assert tg.choose({"dh": {"tma": 1.0, "triton": 1.9}, "dw_down": {"torch": 3.0, "triton": 1.0}}, perm) == {
        "dh": "tma", "dw_down": "triton"}       # 1.0 + 1.0 + 0.8 < 1.9 + 1.0


def test_pick_tile_of_a_shared_file():
    a, b, c = (16, 16, 16, 4, 1), (32, 16, 16, 4, 2), (64, 64, 64, 4, 3)
    assert tg.pick_tile({"up": {a: 1.0, b: 2.0, c: 0.1}, "dx": {a: 3.0, b: 1.5}}) == b   # c: not measured by dx
    assert tg.pick_tile({"up": {a: 1.0}, "dx": {b: 0.5}}) == a


def test_candidates_and_default_runs():
    from moe_kernels.triton import grouped_gemm as gg, grouped_gemm_tma as gt

    for cfg in tg.CANDIDATES + tg.TN_CANDIDATES:
        assert gg._parse_pinned(",".join(map(str, cfg))) == cfg
    for cfg in tg.TMA_CANDIDATES + tg.TN_TMA_CANDIDATES:
        assert gt._parse_config(",".join(map(str, cfg)), "x") == cfg
    assert (128, 64, 64, 4, 3, 1) in tg._candidates("grouped_gemm_tma", "up", False)
    assert all(c[1] < 256 for c in tg._candidates("grouped_gemm_tma", "up", False))
    assert tg.default_runs(list(tg.MODELS)) == [("Mixtral", 16384), ("Qwen3-30B-A3B", 32768), ("OLMoE", 16384),
                                                ("DeepSeek-V3", 4096), ("Mixtral", 64), ("Qwen3-30B-A3B", 64),
                                                ("OLMoE", 64), ("DeepSeek-V3", 64)]


def test_decode_agreement_check():
    split = torch.randn(6, 32)
    assert tg.decode_agrees(split + 1e-3 * split.abs().max(), split)
    assert not tg.decode_agrees(split * 1.1, split)              # a 10% miss: a broken kernel, not rounding
    nan = split.clone()
    nan[2, 3] = float("nan")
    assert tg.decode_agrees(nan, nan) and not tg.decode_agrees(split, nan) and not tg.decode_agrees(nan, split)
