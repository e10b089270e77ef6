"""The activation passes of the triton backend (glu_forward after GEMM1, glu_backward between dH and the backward
GEMMs) against the float64 reference for every activation and the GLU options of the MoE families (alpha, limit
before or after the activation, up_offset, interleaved gate/up columns), NaN and clamp bounds included; rows past
offsets[E] never reach a result; outputs poisoned."""
import pytest
import torch

pytest.importorskip("triton")

from moe_kernels.reference.activations import ACTIVATIONS, glu, glu_backward, parse_activation  # noqa: E402
from moe_kernels.triton import activations as ta  # noqa: E402
from tests.helpers import GLU_SPECS, assert_earned_max, poisoned_empty, reordered_sum_atol  # noqa: E402

F64 = torch.float64
CASES = ([pytest.param(a, g, id=f"{a}-{'gated' if g else 'plain'}") for a in ACTIVATIONS for g in (True, False)]
         + [pytest.param(spec, True, id=spec) for spec in GLU_SPECS])


def _on_the_bounds(pre, activation):
    """Some pre-activations exactly at the clamp bounds (where the clamps' gradients still pass)."""
    limit = parse_activation(activation).limit
    if limit is not None:
        pre[1, :6] = limit
        pre[2, :6] = -limit
    return pre


def _kept_rows(N, E):
    counts = torch.randint(0, 5, (E,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).clamp(max=N).to(torch.int32)
    return offsets


@pytest.mark.parametrize("activation,gated", CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_glu_forward_matches_reference(activation, gated, bias):
    N, H, E = 23, 20, 5
    offsets = _kept_rows(N, E)
    end = int(offsets[-1])
    MW = 2 * H if gated else H
    pre = _on_the_bounds(torch.randn(N, MW) * 3, activation)
    pre[end:] = float("nan")          # whatever a GEMM left past offsets[E]
    pre[0, 1] = float("nan")          # NaN in a kept row stays in that row
    b = torch.randn(E, MW) if bias else None
    want = pre.double().clone()
    if bias:
        rows = torch.arange(N)
        e = torch.searchsorted(offsets[1:].long(), rows, right=True).clamp(max=E - 1)
        want += b.double()[e]
    want[end:] = 0
    h64 = glu(want, activation, gated)
    got_pre = pre.clone()
    with poisoned_empty():
        h = ta.glu_forward(got_pre, offsets, b, activation, gated)
    same = glu(want.float(), activation, gated)
    assert_earned_max(h, h64, same, atol=1e-6)
    torch.testing.assert_close(got_pre.double(), want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("activation,gated", CASES)
@pytest.mark.parametrize("dh_dtype", [torch.float32, torch.float16], ids=["dh32", "dh16"])
def test_glu_backward_matches_reference(activation, gated, dh_dtype):
    N, H, E = 29, 20, 4
    offsets = _kept_rows(N, E)
    end = int(offsets[-1])
    MW = 2 * H if gated else H
    pre = _on_the_bounds(torch.randn(N, MW, dtype=torch.float16) * 3, activation)
    pre[end:] = 0
    dh = torch.randn(N, H).to(dh_dtype)
    dh[end:] = float("nan")           # the torch engine leaves rows past offsets[E] unwritten
    scale = torch.rand(N) + 0.1
    order = torch.randperm(N).to(torch.int32)
    extra = torch.randn(N)
    with poisoned_empty():
        dpre, hs, gw = ta.glu_backward(dh, pre, scale, order, offsets, activation, gated, extra)

    def ref(dtype):
        p, d, s = pre[:end].to(dtype), dh[:end].to(dtype), scale[:end].to(dtype)
        h = glu(p, activation, gated)
        dp = torch.zeros(N, MW, dtype=dtype)
        dp[:end] = glu_backward(d * s[:, None], p, activation, gated)
        hs_ = torch.zeros(N, H, dtype=dtype)
        hs_[:end] = h * s[:, None]
        g = torch.zeros(N, dtype=dtype)
        g[order[:end].long()] = (d * h).sum(-1) + extra[:end].to(dtype)
        return dp, hs_, g
    for got, want, same, name in zip((dpre, hs, gw), ref(F64), ref(torch.float32), ("dpre", "hs", "grad_w")):
        assert not got.isnan().any(), f"{name}: NaN leaked from rows past offsets[E]"
        assert_earned_max(got, want, same, atol=reordered_sum_atol(want, torch.float16, H), name=name)
