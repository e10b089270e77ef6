"""DenseMoE against a plain loop written here (float64): out_t = sum_e g_te * expert_e(x_t), with
g_t = softmax(router(x_t)) or the caller's gates, expert_e(x) = down_e(act(gate_e x) * up_e x)."""
import copy
import math

import pytest
import torch
from torch import nn

from moe_kernels import DenseMoE
from moe_kernels.nn import LinearExperts

from ..helpers import assert_earned

F64 = torch.float64
# errors seen are ~1e-15 (values and gradients of magnitude ~1): 1e-12 keeps a wide margin, catches real errors
TOL = dict(rtol=1e-12, atol=1e-12)

ACT = {
    "silu": lambda h: h * torch.sigmoid(h),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "identity": lambda h: h,
}


def loop_expert(m, e, xt):
    ex = m.experts
    if isinstance(ex, LinearExperts):  # one affine map per expert
        y = ex.weight[e] @ xt
        return y + ex.bias[e] if ex.bias is not None else y
    h = ex.gate_up_proj[e] @ xt
    if ex.gate_up_bias is not None:
        h = h + ex.gate_up_bias[e]
    H = ex.hidden_dim
    a = ACT[ex.activation](h[:H]) * h[H:] if ex.gated else ACT[ex.activation](h)  # gate rows first
    y = ex.down_proj[e] @ a
    if ex.down_bias is not None:
        y = y + ex.down_bias[e]
    return y


def loop_dense(m, x, gates=None):
    """x [..., D] -> [..., O]. gates [..., E]: the caller's gates, or the test's own router output (already a
    distribution when m.score is None); None: the module's router on each token, then its score."""
    shape = x.shape
    xs = x.reshape(-1, m.dim)
    gs = None if gates is None else gates.reshape(-1, m.num_experts)
    outs = []
    for t in range(xs.shape[0]):
        if gs is None:
            z = m.router(xs[t:t + 1])[0]
            if m.score == "softmax":
                g = torch.exp(z - z.max())
                g = g / g.sum()
            else:
                g = 1 / (1 + torch.exp(-z)) if m.score == "sigmoid" else z
        else:
            g = gs[t]
        outs.append(sum(g[e] * loop_expert(m, e, xs[t]) for e in range(m.num_experts)))
    return torch.stack(outs).reshape(*shape[:-1], m.out_dim)


def assert_close(actual, expected, name="output"):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda s: f"{name}: {s}")


def make(dim=16, hidden=12, E=4, router=None, **kw):
    return DenseMoE(dim, hidden, E, router=router, dtype=F64, **kw)


CASES = [
    pytest.param(dict(), (10, 16), id="T10-D16-H12-E4-silu"),
    pytest.param(dict(), (2, 5, 16), id="BSD-B2-S5"),
    pytest.param(dict(dim=13, hidden=7, E=5), (3, 2, 4, 13), id="4d-odd-D13-H7-prime-E5"),
    # T=1: one token
    pytest.param(dict(), (1, 16), id="T1"),
    # E=1: the gate is 1
    pytest.param(dict(E=1), (6, 16), id="E1"),
    pytest.param(dict(activation="relu", gated=False, bias=True), (9, 16), id="relu-nongated-bias"),
    pytest.param(dict(activation="gelu", bias=True), (9, 16), id="geglu-bias"),
    pytest.param(dict(activation="gelu_tanh", gated=False), (9, 16), id="gelu-tanh-nongated"),
    pytest.param(dict(activation="identity"), (9, 16), id="bilinear"),
    # expert outputs of another width (the MoE guide's MoELayer: ReLU MLPs with biases, output_size != input_size)
    pytest.param(dict(out_dim=5, activation="relu", gated=False, bias=True), (2, 6, 16), id="out_dim-5-relu-bias"),
    pytest.param(dict(dim=8, out_dim=19, E=3), (7, 8), id="out_dim-19>D"),
    # linear experts (Shazeer et al. 2017: one Linear(D, O) each), with and without bias
    pytest.param(dict(hidden=None, out_dim=3, bias=True), (2, 5, 16), id="linear-experts-O3-bias"),
    pytest.param(dict(hidden=None, E=5), (9, 16), id="linear-experts-nobias"),
    # sigmoid gates (independent per expert)
    pytest.param(dict(score="sigmoid", bias=True), (9, 16), id="sigmoid-gates"),
]


@pytest.mark.parametrize("cfg, shape", CASES)
def test_forward_matches_loop(cfg, shape, backend):
    m = make(**cfg)
    x = torch.randn(shape, dtype=F64)
    out = m(x)
    assert out.shape == (*x.shape[:-1], m.out_dim)
    assert_close(out, loop_dense(m, x))


@pytest.mark.parametrize("cfg", [pytest.param(dict(), id="silu"),
                                 pytest.param(dict(activation="gelu", gated=False, bias=True), id="gelu-bias")])
def test_float32_within_earned_tolerance(cfg, backend):
    """fp32 module vs the loop in fp64, within twice the error of the same loop run in fp32 (+1e-6)."""
    m32 = make(**cfg).float()
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(3, 11, 16)
    out = m32(x)
    assert out.dtype == torch.float32
    assert_earned(out, loop_dense(m64, x.double()), loop_dense(m32, x))


def test_noncontiguous_input(backend):
    m = make()
    x = torch.randn(16, 5, 3, dtype=F64).transpose(0, 2)  # [3, 5, 16], not row-major
    assert not x.is_contiguous()
    assert_close(m(x), loop_dense(m, x))


def test_custom_router_module(backend):
    """Any module mapping [T, D] -> [T, E] routes; its parameters are trained through the gates."""
    router = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 6)).to(F64)
    m = make(E=6, router=router, bias=True)
    assert m.router is router
    x = torch.randn(3, 7, 16, dtype=F64, requires_grad=True)
    g = torch.randn(3, 7, 16, dtype=F64)
    wrt = [x] + list(m.parameters())
    out = m(x)
    ref = loop_dense(m, x)
    assert_close(out, ref)
    got = torch.autograd.grad((out * g).sum(), wrt)
    want = torch.autograd.grad((ref * g).sum(), wrt)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, name=f"grad {name}")
    assert got[names.index("router.0.weight")].abs().max() > 0


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(), id="silu"),
    pytest.param(dict(activation="relu", gated=False, bias=True), id="relu-nongated-bias"),
    pytest.param(dict(dim=13, hidden=7, E=5, activation="gelu", bias=True), id="odd-geglu-bias"),
    pytest.param(dict(out_dim=5, activation="relu", gated=False, bias=True), id="out_dim-5"),
    pytest.param(dict(hidden=None, out_dim=3, bias=True), id="linear-experts"),
    pytest.param(dict(score="sigmoid"), id="sigmoid-gates"),
])
def test_gradients_match_loop(cfg, backend):
    m = make(**cfg)
    x = torch.randn(2, 6, m.dim, dtype=F64, requires_grad=True)
    g = torch.randn(2, 6, m.out_dim, dtype=F64)
    named = list(m.named_parameters())
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((m(x) * g).sum(), wrt)
    want = torch.autograd.grad((loop_dense(m, x) * g).sum(), wrt)
    for name, a, b in zip(["x"] + [n for n, _ in named], got, want):
        assert_close(a, b, name=f"grad {name}")


class LSTMGate(nn.Module):
    """A gating network over sequences, [B, S, D] -> gates [B, S, E] already softmaxed (the LSTM-gated layer of
    tests/zoo): the router must see x in its own shape, and score=None takes its output as the gates."""

    def __init__(self, dim, hidden, num_experts):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_experts)

    def forward(self, x):
        return torch.softmax(self.fc(self.lstm(x)[0]), dim=-1)


@pytest.mark.parametrize("hidden", [pytest.param(None, id="linear-experts"), pytest.param(12, id="mlp-experts")])
def test_sequence_router_gives_the_gates(hidden, backend):
    gate = LSTMGate(16, 7, 4).to(F64)
    m = make(hidden=hidden, E=4, out_dim=6, router=gate, score=None, bias=True)
    x = torch.randn(3, 5, 16, dtype=F64, requires_grad=True)
    out = m(x)
    gates = torch.cat([gate(x[b:b + 1]) for b in range(3)])  # sequence by sequence
    ref = loop_dense(m, x, gates)
    assert_close(out, ref)
    g = torch.randn_like(out)
    named = list(m.named_parameters())
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((out * g).sum(), wrt)
    want = torch.autograd.grad((ref * g).sum(), wrt)
    for name, a, b in zip(["x"] + [n for n, _ in named], got, want):
        assert_close(a, b, name=f"grad {name}")
    assert got[[n for n, _ in named].index("router.lstm.weight_ih_l0") + 1].abs().max() > 0


def test_router_output_shape_error():
    m = make(E=4, router=nn.Linear(16, 5).to(F64))
    want = r"router \(Linear\) must map x \(2, 3, 16\) to \[\.\.\., E\] = \(2, 3, 4\)"
    with pytest.raises(ValueError, match=want):
        m(torch.randn(2, 3, 16, dtype=F64))


def test_bad_score():
    with pytest.raises(ValueError, match="score must be one of"):
        DenseMoE(16, 12, 4, score="relu")


@pytest.mark.parametrize("shape", [(8, 16), (2, 3, 16)], ids=["TD", "BSD"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_caller_gates(shape, bias, backend):
    """gates=... replaces the router (any nonnegative or signed weights; they need not sum to one)."""
    m = make(E=5, bias=bias)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    gates = torch.randn(*shape[:-1], 5, dtype=F64, requires_grad=True)
    out = m(x, gates=gates)
    ref = loop_dense(m, x, gates)
    assert_close(out, ref)
    # the router is not used: it gets no gradient, the gates do
    gy = torch.randn_like(out)
    wrt = [x, gates, m.experts.gate_up_proj, m.experts.down_proj]
    got = torch.autograd.grad((out * gy).sum(), wrt)
    want = torch.autograd.grad((ref * gy).sum(), wrt)
    for name, a, b in zip(["x", "gates", "gate_up_proj", "down_proj"], got, want):
        assert_close(a, b, name=f"grad {name}")
    out2 = m(x, gates=gates)
    out2.sum().backward()
    assert m.router.weight.grad is None


@pytest.mark.parametrize("gshape", [(8, 4), (8, 6), (4, 5), (2, 4, 5)], ids=["E-too-small", "E-too-big", "T-wrong",
                                                                          "extra-dim"])
def test_wrong_gates_shape(gshape):
    m = make(E=5)
    x = torch.randn(8, 16, dtype=F64)
    with pytest.raises(ValueError, match=r"gates") as err:
        m(x, gates=torch.rand(gshape, dtype=F64))
    assert str(tuple(gshape)) in str(err.value) and "(8, 5)" in str(err.value)


def test_wrong_x_last_dim():
    m = make()
    with pytest.raises(ValueError, match=r"\bx\b") as err:
        m(torch.randn(4, 15, dtype=F64))
    assert "(4, 15)" in str(err.value) and "16" in str(err.value)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        DenseMoE(16, 12, 4, activation="swish")
