"""The Hopper grouped GEMM kernels (grouped_gemm_tma, grouped_gemm_tn_tma) against the float64 reference under the
Triton interpreter (fp16: bf16 tl.dot is wrong there), every epilogue and the ragged edges: empty experts,
one-row experts, row counts not a multiple of the tile, rows past offsets[E], E=1, widths not multiples of the
tile. Outputs are poisoned first: every element must be written."""
import pytest
import torch

pytest.importorskip("triton")

from moe_kernels.reference.activations import glu  # noqa: E402
from moe_kernels.triton import grouped_gemm_tma as gt  # noqa: E402
from tests.helpers import assert_earned_max, poisoned_empty, reordered_sum_atol  # noqa: E402

F64 = torch.float64
DT = torch.float16
# small tiles, so the interpreter walks many tiles per program and K, N tails appear
SMALL = "16,16,16,4,2,1"
SMALL_TN = "16,32,16,4,2,1"


def _offsets(counts, extra_rows=0):
    """offsets [E+1] int32 of these per-expert row counts; extra_rows: rows past offsets[E] (dropped pairs)."""
    c = torch.tensor(counts, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]).to(torch.int32)
    return offsets, int(offsets[-1]) + extra_rows


def _ref(a, w, offsets, trans_w, bias, activation, gated, scale, dtype):
    """(out, pre) of the reference math in dtype (float64: the oracle; fp16: the same-dtype baseline)."""
    R = a.shape[0]
    MW = w.shape[1] if trans_w else w.shape[2]
    pre = torch.zeros(R, MW, dtype=dtype)
    for e in range(w.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        we = w[e].to(dtype)
        pre[lo:hi] = a[lo:hi].to(dtype) @ (we.t() if trans_w else we)
        if bias is not None:
            pre[lo:hi] += bias[e].to(dtype)
    out = glu(pre, activation, gated)
    if scale is not None:
        out = out * scale[:, None].to(dtype)
    out[int(offsets[-1]):] = 0
    return out, pre


COUNTS = [
    pytest.param([5, 0, 37, 1], 3, id="empty-one-row-ragged-tail"),   # an empty expert, a 1-row expert, 3 dropped rows
    pytest.param([19], 0, id="E1"),                                   # one expert, rows not a multiple of the tile
    pytest.param([0, 0, 0], 4, id="all-empty"),                       # nothing kept: only zero tiles
    pytest.param([16, 32, 7, 0, 9], 0, id="prime-E-exact-tiles"),
]


@pytest.mark.parametrize("counts,extra", COUNTS)
@pytest.mark.parametrize("flags", ["up_save", "up_bias_gelu", "down_scale", "dh_fp32", "plain_relu_bias"])
def test_grouped_gemm_tma_matches_reference(monkeypatch, counts, extra, flags):
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, SMALL)
    offsets, R = _offsets(counts, extra)
    E = len(counts)
    K, H = 40, 24                       # K not a multiple of BLOCK_K, H of BLOCK_N
    trans_w, gated, act, bias, scale, save, out32 = {
        "up_save": (True, True, "silu", False, False, True, False),
        "up_bias_gelu": (True, True, "gelu", True, False, True, False),
        "down_scale": (True, False, "identity", False, True, False, False),
        "dh_fp32": (False, False, "identity", False, False, False, True),
        "plain_relu_bias": (True, False, "relu", True, True, True, False),
    }[flags]
    MW = 2 * H if gated else H
    a = torch.randn(R, K, dtype=DT)
    w = torch.randn(E, MW, K, dtype=DT) / K**0.5 if trans_w else torch.randn(E, K, MW, dtype=DT) / K**0.5
    b = torch.randn(E, MW, dtype=DT) if bias else None
    s = torch.rand(R) + 0.5 if scale else None
    with poisoned_empty():
        got = gt.grouped_gemm_tma(a, w, offsets, trans_w=trans_w, row_scale=s, bias=b, activation=act, gated=gated,
                                  out_dtype=torch.float32 if out32 else None, save_pre=save)
    out, pre = got if save else (got, None)
    assert out.dtype == (torch.float32 if out32 else DT)
    out64, pre64 = _ref(a, w, offsets, trans_w, b, act, gated, s, F64)
    same, pre_same = _ref(a, w, offsets, trans_w, b, act, gated, s, DT)
    atol = reordered_sum_atol(out64, DT, K)
    assert_earned_max(out, out64, same, atol=atol)
    assert not out[int(offsets[-1]):].any(), "rows past offsets[E] must be zero"
    if save:
        assert_earned_max(pre, pre64, pre_same, atol=reordered_sum_atol(pre64, DT, K), name="pre-activation")
        assert not pre[int(offsets[-1]):].any()


def test_grouped_gemm_tma_default_tiles():
    # the default 128-row tiles, as a GPU runs them: one tile overhangs three experts
    offsets, R = _offsets([3, 130, 0, 60], 5)
    a = torch.randn(R, 64, dtype=DT)
    w = torch.randn(4, 32, 64, dtype=DT) / 8
    with poisoned_empty():
        out = gt.grouped_gemm_tma(a, w, offsets)
    out64, _ = _ref(a, w, offsets, True, None, "identity", False, None, F64)
    same, _ = _ref(a, w, offsets, True, None, "identity", False, None, DT)
    assert_earned_max(out, out64, same, atol=reordered_sum_atol(out64, DT, 64))


def test_grouped_gemm_tma_nan_stays_in_its_row(monkeypatch):
    monkeypatch.setenv(gt.TMA_CONFIG_ENV, SMALL)
    offsets, R = _offsets([7, 9], 2)
    a = torch.randn(R, 32, dtype=DT)
    a[3, 5] = float("nan")
    a[R - 1, 0] = float("nan")          # a dropped row: never read into a kept one
    out = gt.grouped_gemm_tma(a, torch.randn(2, 16, 32, dtype=DT), offsets)
    nan_rows = out.isnan().any(1)
    assert nan_rows[3] and int(nan_rows.sum()) == 1


@pytest.mark.parametrize("counts", [[5, 0, 37, 1], [19], [0, 0], [64, 3, 0, 16, 1]],
                         ids=["empty-one-row-ragged", "E1", "all-empty", "tile-multiples-and-tails"])
def test_grouped_gemm_tn_tma_matches_reference(monkeypatch, counts):
    monkeypatch.setenv(gt.TN_TMA_CONFIG_ENV, SMALL_TN)
    offsets, R = _offsets(counts, 2)
    E, M, K = len(counts), 24, 40       # M and K not multiples of the tile
    x = torch.randn(R, K, dtype=DT)
    dy = torch.randn(R, M, dtype=DT)
    x[-2:] = float("nan")               # rows past offsets[E] belong to no expert
    with poisoned_empty():
        dw = gt.grouped_gemm_tn_tma(x, dy, offsets, E)

    def ref(dtype):
        return torch.stack([dy[lo:hi].to(dtype).t() @ x[lo:hi].to(dtype)
                            for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    dw64 = ref(F64)
    assert_earned_max(dw, dw64, ref(DT), atol=reordered_sum_atol(dw64, DT, max(counts)))
    for e, c in enumerate(counts):
        if c == 0:
            assert not dw[e].any(), f"expert {e} has no rows: its gradient is zero"


def test_tma_usable_rules():
    cpu = torch.device("cpu")
    assert gt.tma_usable(cpu, torch.float16, 16, 24)
    assert not gt.tma_usable(cpu, torch.float32, 16, 24), "16-bit operands only"
    assert not gt.tma_usable(cpu, torch.float16, 16, 12), "12 halves are 24 bytes: not a 16-byte row"
    t = torch.randn(8, 16, dtype=torch.float16)
    assert not gt.tma_usable(cpu, torch.float16, 16, tensors=(t.t(),)), "not contiguous"
    assert not gt.tma_usable(cpu, torch.float16, 16, tensors=(t.view(-1)[1:],)), "not on 16 bytes"


@pytest.mark.parametrize("env,value", [(gt.TMA_CONFIG_ENV, "128,128,64,4,3"), (gt.TMA_CONFIG_ENV, "128,100,64,4,3,1"),
                                       (gt.TN_TMA_CONFIG_ENV, "128,128,64,2,3,1"),
                                       (gt.TN_TMA_CONFIG_ENV, "128,128,64,4,3,2")])
def test_bad_pinned_config_is_a_clear_error(monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    offsets, R = _offsets([4, 4])
    with pytest.raises(ValueError, match=env):
        if env == gt.TMA_CONFIG_ENV:
            gt.grouped_gemm_tma(torch.randn(R, 16, dtype=DT), torch.randn(2, 16, 16, dtype=DT), offsets)
        else:
            gt.grouped_gemm_tn_tma(torch.randn(R, 16, dtype=DT), torch.randn(R, 16, dtype=DT), offsets, 2)
