"""Tuned grouped-GEMM configs as data files: nearest-M lookup, logged default, pinned override, AOT coverage."""
import json
import logging

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels.triton.grouped_gemm as gg  # noqa: E402
from tests.helpers import assert_earned_max  # noqa: E402


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gg, "CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv(gg.CONFIG_ENV, raising=False)
    gg._load_tuned.cache_clear()
    gg._log_default.cache_clear()
    yield tmp_path
    gg._load_tuned.cache_clear()


def test_nearest_m_entry_of_the_tuned_file(config_dir):
    path = gg.config_file(3, 24, 16, "cpu", torch.float32)
    with open(path, "w") as f:
        json.dump({"16": [16, 32, 16, 4, 2], "512": [32, 64, 16, 4, 3]}, f)
    cpu = torch.device("cpu")
    assert gg.gemm_config(20, 3, torch.float32, False, N=24, K=16, device=cpu) == (16, 32, 16, 4, 2)
    assert gg.gemm_config(400, 3, torch.float32, False, N=24, K=16, device=cpu) == (32, 64, 16, 4, 3)
    # another shape has no file: the default rule
    default = gg.GEMM_CONFIGS[gg.gemm_config_name(400, 3, torch.float32, False)]
    assert gg.gemm_config(400, 3, torch.float32, False, N=32, K=16, device=cpu) == default


def test_a_tuned_config_is_launched_and_correct(config_dir):
    E, K, M = 3, 16, 24
    a = torch.randn(30, K)  # on the default device: the tuned file is the one of its device's name
    with open(gg.config_file(E, M, K, gg._device_name(a.device), torch.float32), "w") as f:
        json.dump({"30": [16, 32, 16, 4, 2]}, f)
    w = torch.randn(E, M, K)
    offsets = torch.tensor([0, 7, 7, 30], dtype=torch.int32)
    seen = []
    real = gg.gemm_config
    gg_config = lambda *args, **kw: seen.append(real(*args, **kw)) or seen[-1]  # noqa: E731
    gg.gemm_config = gg_config
    try:
        out = gg.grouped_gemm(a, w, offsets)
    finally:
        gg.gemm_config = real
    assert seen == [(16, 32, 16, 4, 2)]
    ref64 = torch.cat([a[:7].double() @ w[0].double().t(), a[7:].double() @ w[2].double().t()])
    assert_earned_max(out, ref64, torch.cat([a[:7] @ w[0].t(), a[7:] @ w[2].t()]))


def test_the_default_is_logged_once_per_shape(config_dir, caplog):
    with caplog.at_level(logging.INFO, logger=gg.__name__):
        for _ in range(3):
            gg.gemm_config(64, 4, torch.float32, False, N=40, K=8, device=torch.device("cpu"))
    assert sum("no tuned config" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("bad", ["64,64,64,4", "64,64,8,4,3", "48,64,32,4,3", "a,b,c,d,e"])
def test_a_pinned_config_the_chip_cannot_run_is_refused(config_dir, monkeypatch, bad):
    # tl.dot needs tiles of at least 16 in each dimension (the interpreter would run BLOCK_K = 8; a GPU does not)
    monkeypatch.setenv(gg.CONFIG_ENV, bad)
    with pytest.raises(ValueError, match=gg.CONFIG_ENV):
        gg.gemm_config(16, 3, torch.float32, False)


def test_pinned_config_wins(config_dir, monkeypatch):
    with open(gg.config_file(3, 24, 16, "cpu", torch.float32), "w") as f:
        json.dump({"16": [16, 32, 16, 4, 2]}, f)
    monkeypatch.setenv(gg.CONFIG_ENV, "32,32,32,4,2")
    assert gg.gemm_config(16, 3, torch.float32, False, N=24, K=16, device=torch.device("cpu")) == (32, 32, 32, 4, 2)


def test_tuned_configs_are_compiled_by_aot_check(config_dir):
    with open(gg.config_file(8, 4096, 1024, "NVIDIA_H100", torch.bfloat16), "w") as f:
        json.dump({"4096": [128, 128, 64, 8, 4], "64": [16, 64, 64, 4, 4]}, f)
    names = {e["name"] for e in gg._aot_configs()}
    assert {"grouped_gemm-bf16-tuned128x128x64x8x4-up", "grouped_gemm-bf16-tuned16x64x64x4x4-down_sorted",
            "grouped_gemm-bf16-tuned16x64x64x4x4-up_pre"} <= names


def test_a_tuned_file_of_several_gemms_is_compiled_with_each(config_dir):
    # roles that share E, N and K share a file: "_flags" joins their flag sets with "+"
    with open(gg.config_file(8, 2048, 2048, "cpu", torch.bfloat16), "w") as f:
        json.dump({"_flags": "up+up_pre+dgrad", "_roles": "up+dx", "4096": [128, 64, 64, 8, 3]}, f)
    names = sorted(e["name"] for e in gg._aot_configs() if "tuned128x64x64x8x3" in e["name"])
    assert names == [f"grouped_gemm-bf16-tuned128x64x64x8x3-{f}" for f in ("dgrad", "up", "up_pre")]


def test_a_tuned_file_names_the_gemm_it_was_tuned_on(config_dir):
    # "_flags" is not a row count: the loader skips it, aot_check compiles the file's configs with those flags only
    with open(gg.config_file(8, 4096, 1024, "cpu", torch.bfloat16), "w") as f:
        json.dump({"_flags": "dh", "4096": [128, 128, 64, 8, 3]}, f)
    cpu = torch.device("cpu")
    assert gg.gemm_config(4000, 8, torch.bfloat16, False, N=4096, K=1024, device=cpu) == (128, 128, 64, 8, 3)
    tuned = [e for e in gg._aot_configs() if "tuned128x128x64x8x3" in e["name"]]
    assert [e["name"] for e in tuned] == ["grouped_gemm-bf16-tuned128x128x64x8x3-dh-outfp32"]
    assert tuned[0]["signature"]["out_ptr"] == "*fp32"


def test_dw_kernel_configs_pinned_tuned_and_default(config_dir, monkeypatch):
    dev = torch.device("cpu")
    default = gg.TN_CONFIGS[gg.tn_config_name(48, 16, torch.float32)]
    assert gg.tn_config(100, 3, 48, 16, torch.float32, dev) == default
    with open(gg.config_file(3, 48, 16, "cpu", torch.float32, "grouped_gemm_tn"), "w") as f:
        json.dump({"_flags": "gather-x", "64": [32, 32, 16, 4, 2], "1024": [64, 32, 32, 4, 3]}, f)
    gg._load_tuned.cache_clear()  # the lookup above cached the missing file
    assert gg.tn_config(100, 3, 48, 16, torch.float32, dev) == (32, 32, 16, 4, 2)
    assert gg.tn_config(900, 3, 48, 16, torch.float32, dev) == (64, 32, 32, 4, 3)
    assert [e["name"] for e in gg._aot_configs() if "tuned32x32x16x4x2" in e["name"]] == [
        "grouped_gemm_tn-fp32-tuned32x32x16x4x2-gather-x"]   # compiled with the flags it was tuned on
    monkeypatch.setenv(gg.TN_CONFIG_ENV, "16,16,16,4,1")
    assert gg.tn_config(100, 3, 48, 16, torch.float32, dev) == (16, 16, 16, 4, 1)
    monkeypatch.setenv(gg.TN_CONFIG_ENV, "16,16,8,4,1")
    with pytest.raises(ValueError, match=gg.TN_CONFIG_ENV):
        gg.tn_config(100, 3, 48, 16, torch.float32, dev)


def test_a_tuned_dw_config_is_launched_and_correct(config_dir):
    E, K, M = 3, 24, 40
    x, dy = torch.randn(30, K), torch.randn(30, M)
    offsets = torch.tensor([0, 9, 9, 30], dtype=torch.int32)
    with open(gg.config_file(E, M, K, gg._device_name(x.device), torch.float32, "grouped_gemm_tn"), "w") as f:
        json.dump({"30": [16, 16, 16, 4, 1]}, f)
    seen = []
    real = gg.tn_config
    gg.tn_config = lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1]
    try:
        dw = gg.grouped_gemm_tn(x, dy, offsets, E)
    finally:
        gg.tn_config = real
    assert seen == [(16, 16, 16, 4, 1)]
    ref64 = torch.stack([dy[a:b].double().t() @ x[a:b].double() for a, b in ((0, 9), (9, 9), (9, 30))])
    same = torch.stack([dy[a:b].t() @ x[a:b] for a, b in ((0, 9), (9, 9), (9, 30))])
    assert_earned_max(dw, ref64, same)
