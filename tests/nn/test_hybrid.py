"""HybridMoE built directly (its conversion from the hybrid-router layer of tests/zoo is tests/test_convert.py):
the expert weights of its three routers and its output against a plain loop over experts written here (float64)."""
import math

import pytest
import torch

from moe_kernels.nn import HybridMoE

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)  # float64, summation order only (errors seen ~1e-16)


def loop_hybrid(m, x, enc):
    """x [T, D] -> [T, D], token by token and expert by expert."""
    outs = []
    for t in range(x.shape[0]):
        xt = x[t]
        soft = torch.softmax(m.soft_router[0].weight @ xt + m.soft_router[0].bias, -1)
        z = m.sparse_router.weight @ xt + m.sparse_router.bias
        top = sorted(range(m.num_experts), key=lambda e: -z[e].item())[:m.k]
        sparse = torch.zeros_like(z)
        sparse[top] = torch.softmax(z[top], -1)
        att = torch.softmax(m.m_key @ xt / math.sqrt(m.dims), -1)
        memory = torch.softmax(att @ m.m_val, -1)
        w = (m.alpha_moe * sparse + (1 - m.alpha_moe) * soft + memory) / 2
        ex = m.experts
        moe = 0
        for e in range(m.num_experts):
            h = ex.gate_up_proj[e] @ xt + ex.gate_up_bias[e]
            moe = moe + w[e] * (ex.down_proj[e] @ (h * torch.sigmoid(h)) + ex.down_bias[e])
        feats = [torch.sigmoid(g[0].weight @ xt + g[0].bias) * enc.get(name, x)[t]
                 for g, name in zip(m.fusion_gates, m.modalities)]
        fused = m.fusion_projection.weight @ torch.cat(feats) + m.fusion_projection.bias
        outs.append(m.alpha_fusion * fused + (1 - m.alpha_fusion) * moe)
    return torch.stack(outs)


@pytest.mark.parametrize("E, k", [(5, 1), (4, 2), (3, 3)])
def test_matches_loop(E, k, backend):
    m = HybridMoE(8, E, k, memory_size=12, dtype=F64)
    with torch.no_grad():
        m.alpha_moe.uniform_(0.1, 0.9)
        m.alpha_fusion.uniform_(0.1, 0.9)
    x = torch.randn(9, 8, dtype=F64)
    enc = {"waveform": torch.randn(9, 8, dtype=F64), "envelope": torch.randn(9, 8, dtype=F64)}
    torch.testing.assert_close(m(x, enc), loop_hybrid(m, x, enc), **TOL)


def test_leading_dims(backend):
    """[B, S, D] is B*S tokens (the hybrid-router layer it converts from takes [T, D] only)."""
    m = HybridMoE(8, 4, 2, memory_size=10, dtype=F64)
    x = torch.randn(2, 5, 8, dtype=F64)
    enc = {"pitch": torch.randn(2, 5, 8, dtype=F64)}
    out = m(x, enc)
    assert out.shape == (2, 5, 8)
    flat = m(x.reshape(10, 8), {"pitch": enc["pitch"].reshape(10, 8)})
    torch.testing.assert_close(out.reshape(10, 8), flat, **TOL)


def test_wrong_width():
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., D\] with D = 8, got \(3, 7\)"):
        HybridMoE(8)(torch.randn(3, 7), {})
