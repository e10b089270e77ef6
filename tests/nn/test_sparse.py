"""SparseMoE against a plain per-token loop written here from the module's parameters (float64).

The loop is the spec of the layer, independent of the package's reference ops: per token, router logits,
scores (softmax or sigmoid), the choice (correction bias, group-limited), top-k, renormalisation and scale,
then sum_j w_j * down_e(act(gate_e x) * up_e x) (w_j = 1 without scale_by_gate), plus the (gated) shared
expert; capacity keeps ceil(capacity_factor * T * k / E) pairs per expert (clamped to [min_capacity,
max_capacity]) in priority order (all first choices in token order, then all second choices, ...).
"""
import copy
import math

import pytest
import torch
from torch import nn

import moe_kernels
from moe_kernels import SparseMoE, _backend

from ..helpers import assert_earned, assert_earned_max

F64 = torch.float64
# float64 end to end: the loop and the module differ only in summation order; the errors seen are ~1e-15
# (outputs and gradients of magnitude ~1), so 1e-12 leaves a margin of hundreds and still catches any real error
TOL = dict(rtol=1e-12, atol=1e-12)

ACT = {  # the activations, written out (not the package's)
    "silu": lambda h: h * torch.sigmoid(h),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "identity": lambda h: h,
}


# --- the plain loop ------------------------------------------------------------------------------
def loop_logits(m, xt):
    """The default router, nn.Linear(D, E), on one token."""
    z = m.router.weight @ xt
    return z + m.router.bias if m.router.bias is not None else z


def loop_route(m, z):
    """One token's logits z [E] -> (chosen experts in rank order, their weights [k], scores [E], logits [E])."""
    E, k = m.num_experts, m.top_k
    if m.score == "softmax":
        s = torch.exp(z - z.max())
        s = s / s.sum()
    else:
        s = 1 / (1 + torch.exp(-z))
    choice = s.detach().tolist()
    if m.e_score_correction_bias is not None:  # DeepSeek-V3: shifts the choice, never the weights
        choice = [c + b for c, b in zip(choice, m.e_score_correction_bias.double().tolist())]
    allowed = list(range(E))
    if m.num_groups is not None and m.num_groups > 1:
        size = E // m.num_groups
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(m.num_groups)]
        top_groups = sorted(range(m.num_groups), key=lambda g: -group_score[g])[:m.topk_groups]
        allowed = [e for e in range(E) if e // size in top_groups]
    chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
    w = s[chosen]
    if m.renormalize:
        w = w / w.sum()
    return chosen, w * m.routed_scale, s, z


def loop_mlp(bank, e, xt):
    """Expert e of an Experts bank on one token: down_e(act(gate_e x) * up_e x) (+ biases)."""
    h = bank.gate_up_proj[e] @ xt
    if bank.gate_up_bias is not None:
        h = h + bank.gate_up_bias[e]
    if bank.gated:
        H = bank.hidden_dim
        a = ACT[bank.activation](h[:H]) * h[H:]  # gate rows first, then up
    else:
        a = ACT[bank.activation](h)
    y = bank.down_proj[e] @ a
    if bank.down_bias is not None:
        y = y + bank.down_bias[e]
    return y


def loop_expert(m, e, xt):
    return loop_mlp(m.experts, e, xt)


def loop_capacity(m, T):
    cap = math.ceil(m.capacity_factor * T * m.top_k / m.num_experts)
    if m.min_capacity is not None:
        cap = max(cap, m.min_capacity)
    return cap if m.max_capacity is None else min(cap, m.max_capacity)


def loop_sparse(m, x, logits=None):
    """x [..., D] -> (out [..., O], info) with info: chosen experts, kept flags, scores, logits per token, the
    capacity and the pairs each expert processed. logits [T, E]: the router's output, when the test computes it
    (a custom router, jitter, noise); else the default nn.Linear router, token by token."""
    shape = x.shape
    x = x.reshape(-1, m.dim)
    T, k, E = x.shape[0], m.top_k, m.num_experts
    routes = [loop_route(m, loop_logits(m, x[t]) if logits is None else logits[t]) for t in range(T)]
    kept = [[True] * k for _ in range(T)]
    cap = None
    used = [0] * E
    for j in range(k):              # all first choices (token order), then all second choices, ...
        for t in range(T):
            e = routes[t][0][j]
            if m.capacity_factor is not None:
                cap = loop_capacity(m, T)
                kept[t][j] = used[e] < cap
            used[e] += kept[t][j]
    outs = []
    for t in range(T):
        chosen, w = routes[t][0], routes[t][1]
        if not m.scale_by_gate:
            w = torch.ones_like(w)  # a hand-written Switch layer: the chosen expert's output, unscaled
        terms = [w[j] * loop_expert(m, e, x[t]) for j, e in enumerate(chosen) if kept[t][j]]
        y = sum(terms, x.new_zeros(m.out_dim))
        if m.shared_experts is not None:
            g = torch.sigmoid(m.shared_gate.weight[0] @ x[t]) if m.shared_gate is not None else 1.0
            y = y + g * loop_mlp(m.shared_experts, 0, x[t])
        outs.append(y)
    out = torch.stack(outs).reshape(*shape[:-1], m.out_dim) if T else x.new_empty(*shape[:-1], m.out_dim)
    info = dict(chosen=[r[0] for r in routes], kept=kept, scores=[r[2] for r in routes], logits=[r[3] for r in routes],
                capacity=cap, usage=used)
    return out, info


def loop_aux_loss(m, info):
    """aux_loss_coef * E * sum_e (count_e / T) * mean_t p_te + z_loss_coef * mean_t logsumexp(logits_t)^2 (with
    aux_loss_type="entropy", sum_e mean_p_e * log(mean_p_e + 1e-10) in place of the first sum). count_e counts
    all top-k choices (before capacity); p is the softmax of the logits (sigmoid scores are normalised to sum to
    one, DeepSeek-V3's sequence-wise balance loss)."""
    T, E = len(info["chosen"]), m.num_experts
    counts = [sum(c.count(e) for c in info["chosen"]) for e in range(E)]
    probs = [s / s.sum() for s in info["scores"]]  # softmax scores already sum to one
    mean_p = sum(probs) / T
    if m.aux_loss_type == "entropy":  # the MoE guide's AdvancedMoELayer
        balance = sum(mean_p[e] * torch.log(mean_p[e] + 1e-10) for e in range(E))
    elif m.aux_loss_type == "switch":
        balance = E * sum(counts[e] / T * mean_p[e] for e in range(E))
    else:
        balance = 0.0
    lse = [z.max() + torch.log(torch.exp(z - z.max()).sum()) for z in info["logits"]]
    zl = sum(v * v for v in lse) / T
    return m.aux_loss_coef * balance + m.z_loss_coef * zl


# --- helpers -------------------------------------------------------------------------------------
def make(dim, hidden, E, k, correction=None, **kw):
    m = SparseMoE(dim, hidden, E, k, dtype=F64, **kw)
    if m.e_score_correction_bias is not None:
        # never the zeros it starts at: a random shift (std ~ the spread of sigmoid scores) so it moves choices
        m.e_score_correction_bias.copy_(torch.randn(E) * 0.3 if correction is None else correction)
    return m


def params(m):
    return [(n, p) for n, p in m.named_parameters() if p.requires_grad]


def assert_close(actual, expected, name="output"):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda s: f"{name}: {s}")


# (constructor kwargs, input shape); the id names the edge each case covers
CASES = [
    pytest.param(dict(dim=16, hidden=12, E=8, k=2), (24, 16), id="mixtral-T24-D16-H12-E8-k2"),
    pytest.param(dict(dim=16, hidden=12, E=4, k=2), (3, 7, 16), id="BSD-B3-S7-E4-k2"),
    pytest.param(dict(dim=16, hidden=12, E=4, k=2), (2, 3, 5, 16), id="4d-input-2x3x5"),
    # T=1: a single decode token
    pytest.param(dict(dim=16, hidden=12, E=8, k=2), (1, 16), id="T1"),
    # k=1, no renormalisation: Switch Transformer (the weight is the softmax probability)
    pytest.param(dict(dim=16, hidden=12, E=8, k=1, renormalize=False), (20, 16), id="switch-k1"),
    # k=E: every expert on every token
    pytest.param(dict(dim=16, hidden=12, E=4, k=4), (10, 16), id="k=E-E4"),
    # E=1: a single expert, routing is trivial (weight 1)
    pytest.param(dict(dim=16, hidden=12, E=1, k=1), (9, 16), id="E1-k1"),
    # prime E, odd D and H, odd T
    pytest.param(dict(dim=13, hidden=11, E=7, k=3), (17, 13), id="prime-E7-k3-D13-H11"),
    # non-gated ReLU experts with biases on experts and router
    pytest.param(dict(dim=16, hidden=12, E=6, k=2, gated=False, activation="relu", bias=True, router_bias=True),
                 (15, 16), id="relu-nongated-bias"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=2, activation="gelu_tanh", bias=True), (15, 16), id="geglu-tanh-bias"),
    pytest.param(dict(dim=16, hidden=12, E=5, k=2, activation="gelu", gated=False), (11, 16), id="gelu-nongated"),
    pytest.param(dict(dim=16, hidden=12, E=5, k=2, activation="identity"), (11, 16), id="bilinear-identity"),
    # DeepSeek-V3 routing: sigmoid scores, correction bias, group-limited top-k, renormalise, routed scale
    pytest.param(dict(dim=16, hidden=8, E=16, k=4, score="sigmoid", correction_bias=True, num_groups=4,
                      topk_groups=2, routed_scale=2.5), (24, 16), id="deepseek-v3-sigmoid-bias-groups"),
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, score="sigmoid", renormalize=False, routed_scale=0.7), (12, 16),
                 id="sigmoid-no-renorm-scale"),
    # capacity_factor 0.5: half of the T*k pairs fit, so pairs are certainly dropped
    pytest.param(dict(dim=16, hidden=12, E=4, k=2, capacity_factor=0.5), (24, 16), id="capacity-0.5-drops"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=3, capacity_factor=1.25), (3, 5, 16), id="capacity-1.25-BSD"),
    # T=0: an empty batch (e.g. an expert-parallel rank with no tokens)
    pytest.param(dict(dim=16, hidden=12, E=4, k=2, capacity_factor=1.0), (0, 16), id="T0-empty"),
    # min_capacity above ceil(0.25 * 24 * 2 / 4) = 3, so 5 pairs per expert; max_capacity below ceil(2.0 * ...) = 24
    pytest.param(dict(dim=16, hidden=12, E=4, k=2, capacity_factor=0.25, min_capacity=5), (24, 16), id="min_capacity"),
    pytest.param(dict(dim=16, hidden=12, E=4, k=2, capacity_factor=2.0, max_capacity=7), (24, 16), id="max_capacity"),
    # expert outputs of another width: down_proj [E, O, H], out [..., O]
    pytest.param(dict(dim=16, hidden=12, E=6, k=2, out_dim=9, bias=True), (2, 7, 16), id="out_dim-9<D"),
    pytest.param(dict(dim=8, hidden=12, E=5, k=3, out_dim=20, capacity_factor=0.75), (13, 8), id="out_dim-20>D"),
    # a hand-written Switch layer: top-1, the chosen expert's output unscaled, ReLU MLP experts with biases
    pytest.param(dict(dim=16, hidden=12, E=6, k=1, scale_by_gate=False, activation="relu", gated=False, bias=True,
                      router_bias=True), (3, 5, 16), id="switch-unscaled"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=2, scale_by_gate=False), (11, 16), id="unscaled-k2"),
    # shared experts: DeepSeek (two shared experts of the routed width, ungated), Qwen2-MoE (own width, sigmoid gate)
    pytest.param(dict(dim=16, hidden=8, E=8, k=2, num_shared_experts=2), (2, 5, 16), id="deepseek-shared-2"),
    pytest.param(dict(dim=16, hidden=8, E=8, k=2, num_shared_experts=1, shared_hidden_dim=20, shared_gate=True,
                      bias=True, out_dim=10), (13, 16), id="qwen2-shared-gate-out_dim"),
]


@pytest.mark.parametrize("cfg, shape", CASES)
def test_forward_matches_loop(cfg, shape, backend):
    m = make(**cfg)
    x = torch.randn(shape, dtype=F64)
    out = m(x)
    ref, info = loop_sparse(m, x)
    assert out.shape == (*x.shape[:-1], m.out_dim) and out.dtype == F64
    assert_close(out, ref)
    if m.capacity_factor == 0.5 or m.max_capacity is not None:
        assert not all(all(k) for k in info["kept"]), "the capacity case must drop pairs"
    if m.min_capacity is not None:  # the clamp decides: without it some pair would be dropped
        assert info["capacity"] == m.min_capacity > math.ceil(m.capacity_factor * 24 * 2 / 4)
        assert max(info["usage"]) > math.ceil(m.capacity_factor * 24 * 2 / 4)
    if m.num_groups:
        # the group limit must change some token's choice, or the case would not test it
        bias = m.e_score_correction_bias.double()
        unrestricted = [(s + bias).topk(m.top_k).indices.tolist() for s in info["scores"]]
        size = m.num_experts // m.num_groups
        assert all(len({e // size for e in c}) <= m.topk_groups for c in info["chosen"])
        assert any(len({e // size for e in c}) > m.topk_groups for c in unrestricted)


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(dim=16, hidden=12, E=8, k=2), id="mixtral"),
    pytest.param(dict(dim=13, hidden=11, E=7, k=3, capacity_factor=0.75, bias=True), id="prime-E7-capacity-bias"),
    pytest.param(dict(dim=16, hidden=8, E=16, k=4, score="sigmoid", correction_bias=True, num_groups=4,
                      topk_groups=2, routed_scale=2.5), id="deepseek-v3"),
])
def test_float32_within_earned_tolerance(cfg, backend):
    """fp32 module vs the loop in fp64, within twice the error of the same loop run in fp32 (+1e-6)."""
    m32 = make(**cfg).float()
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(4, 9, m32.dim)
    out = m32(x)
    assert out.dtype == torch.float32
    ref64, info64 = loop_sparse(m64, x.double())
    same, info32 = loop_sparse(m32, x)
    # a near-tie (scores within ~1e-7) could route differently in fp32; odds ~1e-5 on random inputs
    assert info32["chosen"] == info64["chosen"] and info32["kept"] == info64["kept"]
    assert_earned(out, ref64, same)


@pytest.mark.parametrize("num_shared, width, want", [(2, None, 24), (1, 20, 20), (3, 5, 5)])
def test_shared_expert_width(num_shared, width, want):
    """num_shared_experts * hidden_dim (DeepSeek's shared experts as one MLP), or shared_hidden_dim (Qwen2-MoE)."""
    m = SparseMoE(16, 12, 4, 2, num_shared_experts=num_shared, shared_hidden_dim=width, gated=True)
    assert m.shared_experts.gate_up_proj.shape == (1, 2 * want, 16)
    assert m.shared_experts.down_proj.shape == (1, 16, want)
    assert m.shared_gate is None


def test_noncontiguous_input(backend):
    m = make(16, 12, 6, 2, capacity_factor=1.0)
    x = torch.randn(16, 3, 10, dtype=F64).permute(2, 1, 0)  # [10, 3, 16], strides not row-major
    assert not x.is_contiguous()
    assert_close(m(x), loop_sparse(m, x)[0])


GRAD_CASES = [
    pytest.param(dict(dim=16, hidden=12, E=8, k=2), (2, 9, 16), id="mixtral-BSD"),
    pytest.param(dict(dim=16, hidden=12, E=8, k=1, renormalize=False), (20, 16), id="switch-k1"),
    pytest.param(dict(dim=13, hidden=11, E=7, k=3, capacity_factor=0.75), (17, 13), id="prime-E7-capacity-0.75"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=2, gated=False, activation="relu", bias=True, router_bias=True),
                 (15, 16), id="relu-nongated-bias"),
    pytest.param(dict(dim=16, hidden=8, E=16, k=4, score="sigmoid", correction_bias=True, num_groups=4,
                      topk_groups=2, routed_scale=2.5, bias=True), (12, 16), id="deepseek-v3"),
    pytest.param(dict(dim=16, hidden=12, E=4, k=4, activation="gelu"), (6, 16), id="k=E-gelu"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=2, out_dim=7, capacity_factor=2.0, max_capacity=5, bias=True),
                 (2, 8, 16), id="out_dim-max_capacity-bias"),
    pytest.param(dict(dim=16, hidden=8, E=8, k=2, num_shared_experts=1, shared_hidden_dim=20, shared_gate=True,
                      bias=True), (13, 16), id="qwen2-shared-gate"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=1, scale_by_gate=False, activation="relu", gated=False, bias=True,
                      router_bias=True), (3, 5, 16), id="switch-unscaled"),
]


@pytest.mark.parametrize("cfg, shape", GRAD_CASES)
def test_gradients_match_loop(cfg, shape, backend):
    m = make(**cfg)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    named = params(m)
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((out * g).sum(), wrt, allow_unused=True)
    want = torch.autograd.grad((loop_sparse(m, x)[0] * g).sum(), wrt, allow_unused=True)
    names = ["x"] + [n for n, _ in named]
    for name, a, b in zip(names, got, want):
        if name.startswith("router.") and not m.scale_by_gate:
            # unscaled outputs (a hand-written Switch layer): the router learns nothing from the output, in both
            assert a is None and b is None, name
            continue
        assert_close(a, b, name=f"grad {name}")
    if m.scale_by_gate:  # the routing weights carry a gradient to the router (E > 1 in every case here)
        assert got[names.index("router.weight")].abs().max() > 0


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, aux_loss_coef=0.01, z_loss_coef=0.001), id="softmax-aux+z"),
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, aux_loss_coef=0.5, z_loss_coef=0.0, capacity_factor=0.5,
                      router_bias=True), id="softmax-capacity-router-bias"),
    pytest.param(dict(dim=16, hidden=12, E=8, k=1, renormalize=False, aux_loss_coef=1.0, z_loss_coef=1.0),
                 id="switch-k1"),
    pytest.param(dict(dim=16, hidden=8, E=16, k=4, score="sigmoid", correction_bias=True, num_groups=4,
                      topk_groups=2, aux_loss_coef=0.1, z_loss_coef=0.01), id="deepseek-v3-sigmoid"),
    # the MoE guide's AdvancedMoELayer: sum_e mean_p_e * log(mean_p_e + 1e-10), alone and with a z-loss
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, aux_loss_type="entropy", aux_loss_coef=1.0), id="entropy"),
    pytest.param(dict(dim=16, hidden=12, E=6, k=3, aux_loss_type="entropy", aux_loss_coef=0.3, z_loss_coef=0.01,
                      score="sigmoid"), id="entropy-sigmoid+z"),
    # no balance loss: the z-loss alone
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, aux_loss_type=None, z_loss_coef=0.1), id="z-loss-only"),
])
def test_aux_loss_matches_loop(cfg):
    m = make(**cfg).train()
    x = torch.randn(3, 8, 16, dtype=F64)
    m(x)
    _, info = loop_sparse(m, x)
    want = loop_aux_loss(m, info)
    assert m.aux_loss is not None and m.aux_loss.dim() == 0
    assert_close(m.aux_loss, want, name="aux_loss")
    # differentiable w.r.t. the router (counts are constants, the mean probabilities are not)
    (got,) = torch.autograd.grad(m.aux_loss, m.router.weight)
    (ref,) = torch.autograd.grad(want, m.router.weight)
    assert_close(got, ref, name="grad router.weight of aux_loss")
    assert got.abs().max() > 0


def test_aux_loss_only_in_training():
    m = make(16, 12, 4, 2).eval()
    m(torch.randn(5, 16, dtype=F64))
    assert m.aux_loss is None


def test_no_aux_loss_configured():
    """aux_loss_type=None and no z-loss: aux_loss stays None in training too (no zero tensor tied to the router)."""
    m = make(16, 12, 4, 2, aux_loss_type=None).train()
    m(torch.randn(5, 16, dtype=F64))
    assert m.aux_loss is None


def test_aux_loss_of_empty_batch_is_zero():
    """T=0 (an expert-parallel rank with no tokens): the losses are 0, not 0/0."""
    m = make(16, 12, 4, 2, z_loss_coef=0.1).train()
    out = m(torch.randn(0, 16, dtype=F64))
    assert out.shape == (0, 16)
    assert m.aux_loss.item() == 0.0


def test_noisy_gating():
    """Shazeer et al.: logits + randn * softplus(x @ noise.weight^T) in training only."""
    m = make(16, 12, 8, 2, noisy_gating=True)
    with torch.no_grad():
        m.noise.weight.normal_(0, 0.5)  # not the zeros it starts at
    x = torch.randn(20, 16, dtype=F64)
    # eval: no noise, the plain loop
    assert_close(m.eval()(x), loop_sparse(m, x)[0])
    # training: replaying the draws of randn_like(logits) gives the loop with noisy logits
    m.train()
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    out = m(x)
    torch.manual_seed(seed)
    noise = torch.randn(20, 8, dtype=F64)

    def noisy_loop():
        outs = []
        for t in range(x.shape[0]):
            std = torch.log1p(torch.exp(m.noise.weight @ x[t]))  # softplus
            z = m.router.weight @ x[t] + noise[t] * std
            s = torch.exp(z - z.max())
            s = s / s.sum()
            chosen = sorted(range(8), key=lambda e: -s[e].item())[:2]
            w = s[chosen] / s[chosen].sum()
            outs.append(sum(w[j] * loop_expert(m, e, x[t]) for j, e in enumerate(chosen)))
        return torch.stack(outs)

    ref = noisy_loop()
    assert_close(out, ref)
    assert not torch.allclose(out, m.eval()(x), **TOL), "the noise must change the training output"
    # the noise weights learn: their gradient matches the loop's
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad((out * g).sum(), m.noise.weight)
    (want,) = torch.autograd.grad((ref * g).sum(), m.noise.weight)
    assert_close(got, want, name="grad noise.weight")
    assert got.abs().max() > 0


@pytest.mark.parametrize("k, capacity_factor", [
    pytest.param(1, None, id="k1"),
    pytest.param(2, None, id="k2"),
    # every first choice on one expert and capacity 1.0: that expert keeps only C = ceil(T*k/E) of them
    pytest.param(2, 1.0, id="k2-capacity-1.0"),
])
def test_all_tokens_to_one_expert(k, capacity_factor, backend):
    E, T = 6, 18
    m = make(16, 12, E, k, router_bias=True, capacity_factor=capacity_factor)
    hot = int(torch.randint(E, ()))
    with torch.no_grad():
        m.router.bias.uniform_(-0.1, 0.1)
        m.router.bias[hot] = 50.0  # the logit of `hot` dominates every token's
    x = torch.randn(T, 16, dtype=F64)
    ref, info = loop_sparse(m, x)
    assert all(c[0] == hot for c in info["chosen"])
    assert_close(m(x), ref)
    if capacity_factor is not None:
        kept_first = sum(k_[0] for k_ in info["kept"])
        assert kept_first == math.ceil(capacity_factor * T * k / E) < T


def test_correction_bias_shifts_choice_not_weights(backend):
    """A huge bias on one expert: every token chooses it, yet its weight is its unbiased sigmoid score."""
    E = 8
    m = make(16, 12, E, 2, score="sigmoid", correction_bias=True, renormalize=False,
             correction=torch.cat([torch.full((1,), 10.0), torch.zeros(E - 1)]).roll(int(torch.randint(E, ()))))
    hot = int(m.e_score_correction_bias.argmax())
    x = torch.randn(12, 16, dtype=F64)
    ref, info = loop_sparse(m, x)
    assert all(c[0] == hot for c in info["chosen"])
    assert all(0 < s[hot] < 1 for s in info["scores"])
    assert_close(m(x), ref)


def test_nan_token_stays_in_its_row(backend):
    m = make(16, 12, 8, 2)
    x = torch.randn(10, 16, dtype=F64)
    clean = m(x)
    bad = int(torch.randint(10, ()))
    x[bad, int(torch.randint(16, ()))] = float("nan")
    out = m(x)
    assert out[bad].isnan().all()
    others = torch.arange(10) != bad
    assert not out[others].isnan().any()
    assert_close(out[others], clean[others], name="the other tokens")
    assert_close(out[others], loop_sparse(m, x[others])[0], name="the other tokens vs loop")


@pytest.mark.skipif(not _backend.NATIVE, reason="the native extension is not built")
@pytest.mark.parametrize("cfg", [
    pytest.param(dict(E=8, k=2), id="E8-k2"),
    pytest.param(dict(E=8, k=2, capacity_factor=0.75), id="E8-k2-capacity-0.75"),
    pytest.param(dict(E=7, k=3, capacity_factor=1.0, score="sigmoid"), id="E7-k3-capacity-sigmoid"),
])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_backends_agree(cfg, dtype):
    """The native backend (C++ routing, sort and fused expert MLP) against the reference backend on one module:
    float64 equal up to summation order; float32 within twice the reference's own float32 error (both against the
    module in float64), taken over each tensor."""
    cfg = dict(cfg)
    m = SparseMoE(16, 12, cfg.pop("E"), cfg.pop("k"), dtype=dtype, **cfg).train()
    m64 = copy.deepcopy(m).double()
    x = torch.randn(4, 33, 16, dtype=dtype)  # T=132 (token count not a multiple of anything)
    g = torch.randn_like(x)

    def run(module, name, x):
        with moe_kernels.use_backend(name):
            assert _backend.resolve("moe_mlp_fused", "cpu") == name
            xi = x.clone().requires_grad_()
            out = module(xi)
            grads = torch.autograd.grad((out * g.to(x.dtype)).sum() + module.aux_loss, [xi] + list(module.parameters()))
            return (out, module.aux_loss, *grads)

    reference, native = run(m, "reference", x), run(m, "native", x)
    if dtype == F64:
        for a, b in zip(reference, native):
            torch.testing.assert_close(b, a, **TOL)
        return
    ref64 = run(m64, "reference", x.double())
    for i, (fast, r64, same) in enumerate(zip(native, ref64, reference)):
        assert_earned_max(fast, r64, same, atol=1e-6, name=f"result {i}")


@pytest.mark.slow  # slow-ish: a dynamo trace (~3 s); aot_eager keeps it off the inductor compiler
def test_torch_compile_fullgraph_matches_eager():
    m = make(16, 12, 8, 2, capacity_factor=1.25, bias=True).train()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for T in (12, 19):  # a second token count: a recompile (or dynamic shapes) must also be right
        x = torch.randn(T, 16, dtype=F64, requires_grad=True)
        g = torch.randn(T, 16, dtype=F64)
        out_c = compiled(x)
        aux_c = m.aux_loss
        grads_c = torch.autograd.grad((out_c * g).sum() + aux_c, [x] + list(m.parameters()))
        out_e = m(x)
        aux_e = m.aux_loss
        grads_e = torch.autograd.grad((out_e * g).sum() + aux_e, [x] + list(m.parameters()))
        assert_close(out_c, out_e, name=f"T={T} compiled output")
        assert_close(aux_c, aux_e, name=f"T={T} compiled aux_loss")
        for a, b in zip(grads_c, grads_e):
            assert_close(a, b, name=f"T={T} compiled grad")
        assert_close(out_c, loop_sparse(m, x)[0], name=f"T={T} compiled vs loop")


# --- the router's input: jitter, custom routers ------------------------------------------------------
def test_router_jitter(backend):
    """Switch Transformer: in training the router sees x * U(1-eps, 1+eps) (elementwise); the experts see x."""
    eps = 0.3
    m = make(16, 12, 8, 2, router_jitter=eps, router_bias=True)
    x = torch.randn(4, 5, 16, dtype=F64)
    assert_close(m.eval()(x), loop_sparse(m, x)[0], name="eval output (no jitter)")
    m.train()
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    out = m(x)
    torch.manual_seed(seed)  # replay the module's draw
    u = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    logits = torch.stack([loop_logits(m, xt) for xt in (x * u).reshape(-1, 16)])
    ref, _ = loop_sparse(m, x, logits)
    assert_close(out, ref)
    assert not torch.allclose(out, loop_sparse(m, x)[0], **TOL), "the jitter must change the training output"
    g = torch.randn_like(out)
    wrt = [m.router.weight, m.router.bias, m.experts.gate_up_proj, m.experts.down_proj]
    got = torch.autograd.grad((out * g).sum(), wrt)
    want = torch.autograd.grad((ref * g).sum(), wrt)
    for name, a, b in zip(["router.weight", "router.bias", "gate_up_proj", "down_proj"], got, want):
        assert_close(a, b, name=f"grad {name}")


class LSTMRouter(nn.Module):
    """A router that needs the sequence: [B, S, D] -> logits [B, S, E] (an LSTM over each sequence)."""

    def __init__(self, dim, hidden, num_experts):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_experts)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def mlp_router(D, E):
    return nn.Sequential(nn.Linear(D, 10), nn.ReLU(), nn.Linear(10, E)).to(F64)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_custom_router(kind, backend):
    """router= replaces the Linear; it is called on x in its own shape, its parameters learn through the weights."""
    D, E = 16, 6
    router = mlp_router(D, E) if kind == "mlp" else LSTMRouter(D, 7, E).to(F64)
    m = make(D, 12, E, 2, router=router, bias=True, capacity_factor=1.0)
    assert m.router is router
    x = torch.randn(3, 5, D, dtype=F64, requires_grad=True)
    out = m(x)
    # the test's own logits: token by token (MLP) or sequence by sequence (LSTM)
    if kind == "mlp":
        logits = torch.stack([router(xt[None])[0] for xt in x.reshape(-1, D)])
    else:
        logits = torch.cat([router(x[b:b + 1])[0] for b in range(x.shape[0])])
    ref, _ = loop_sparse(m, x, logits)
    assert_close(out, ref)
    g = torch.randn_like(out)
    named = params(m)
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((out * g).sum(), wrt)
    want = torch.autograd.grad((ref * g).sum(), wrt)
    for name, a, b in zip(["x"] + [n for n, _ in named], got, want):
        assert_close(a, b, name=f"grad {name}")
    assert all(a.abs().max() > 0 for (n, _), a in zip(named, got[1:]) if n.startswith("router."))


@pytest.mark.parametrize("out_shape, ok", [
    pytest.param(lambda x, E: (*x.shape[:-1], E), True, id="[..., E]"),
    pytest.param(lambda x, E: (x.shape[0] * x.shape[1], E), True, id="[T, E]-flat"),
    pytest.param(lambda x, E: (*x.shape[:-1], E + 1), False, id="E+1"),
    pytest.param(lambda x, E: (x.shape[1], x.shape[0], E), False, id="transposed"),
])
def test_router_output_shape(out_shape, ok):
    E = 4

    class Fixed(nn.Module):
        def forward(self, x):
            return torch.randn(out_shape(x, E), dtype=x.dtype)

    m = make(8, 6, E, 2, router=Fixed())
    x = torch.randn(2, 3, 8, dtype=F64)
    if ok:
        assert m(x).shape == (2, 3, 8)
        return
    with pytest.raises(ValueError, match=r"router \(Fixed\) must map x \(2, 3, 8\)") as err:
        m(x)
    assert str(out_shape(x, E)) in str(err.value)


# --- statistics -----------------------------------------------------------------------------------
def test_expert_stats_and_dropped(backend):
    """routed, usage, importance, capacity, dropped of the last forward; total_usage over forwards."""
    m = make(16, 12, 4, 2, capacity_factor=0.5, router_bias=True).train()
    with pytest.raises(RuntimeError, match="forward"):
        m.expert_stats()
    assert m.dropped is None
    x = torch.randn(24, 16, dtype=F64)
    m(x)
    _, info = loop_sparse(m, x)
    st = m.expert_stats()
    assert all(isinstance(st[n], torch.Tensor) for n in ("routed", "usage", "importance", "capacity", "dropped"))
    assert st["routed"].tolist() == [sum(c.count(e) for c in info["chosen"]) for e in range(4)]
    assert st["usage"].tolist() == info["usage"]
    assert st["capacity"].item() == info["capacity"] == 6
    dropped = sum(not kept for row in info["kept"] for kept in row)
    assert m.dropped.item() == st["dropped"].item() == dropped > 0
    assert_close(st["importance"], torch.stack(info["scores"]).sum(0), name="importance")
    assert not st["importance"].requires_grad
    # an eval forward records too; total_usage sums the two batches
    x2 = torch.randn(10, 16, dtype=F64)
    m.eval()(x2)
    _, info2 = loop_sparse(m, x2)
    assert m.expert_stats()["total_usage"].tolist() == [a + b for a, b in zip(info["usage"], info2["usage"])]
    m.reset_stats()
    with pytest.raises(RuntimeError, match="forward"):
        m.expert_stats()


def test_expert_stats_without_capacity(backend):
    m = make(16, 12, 5, 3)
    x = torch.randn(2, 9, 16, dtype=F64)
    m(x)
    _, info = loop_sparse(m, x)
    st = m.expert_stats()
    assert st["capacity"] is None and st["dropped"].item() == 0
    assert st["usage"].tolist() == st["routed"].tolist() == info["usage"]
    assert sum(info["usage"]) == 18 * 3


# --- checkpointing ----------------------------------------------------------------------------------
def test_checkpoint_experts_same_gradients(backend, monkeypatch):
    """checkpoint_experts recomputes the expert MLPs (routed and shared) in the backward: same output and
    gradients, the expert op run twice in training, once in eval."""
    cfg = dict(dim=16, hidden=12, E=6, k=2, capacity_factor=1.0, num_shared_experts=1, shared_gate=True, bias=True)
    m = make(**cfg, checkpoint_experts=True).train()
    plain = copy.deepcopy(m)
    plain.checkpoint_experts = False
    calls = []
    real = moe_kernels.ops.moe_mlp
    monkeypatch.setattr(moe_kernels.ops, "moe_mlp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 7, 16, dtype=F64)
    g = torch.randn(2, 7, 16, dtype=F64)
    results = []
    for module in (m, plain):
        calls.clear()
        xi = x.clone().requires_grad_()
        out = module(xi)
        grads = torch.autograd.grad((out * g).sum() + module.aux_loss, [xi] + list(module.parameters()))
        results.append((len(calls), out, grads))
    (n_ckpt, out_c, grads_c), (n_plain, out_p, grads_p) = results
    assert (n_ckpt, n_plain) == (2, 1)
    assert_close(out_c, out_p)
    for (name, _), a, b in zip([("x", None)] + list(m.named_parameters()), grads_c, grads_p):
        assert_close(a, b, name=f"grad {name}")
    calls.clear()
    m.eval()(x)
    assert len(calls) == 1


# --- resizing ---------------------------------------------------------------------------------------
def per_expert(name, t, E):
    """Whether parameter or buffer `name` has one row per expert."""
    return t.shape[:1] == (E,) and name.split(".")[0] in ("experts", "router", "noise", "e_score_correction_bias")


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(router_bias=True, num_shared_experts=1), id="softmax-renorm-shared"),
    pytest.param(dict(renormalize=False), id="softmax-no-renorm"),
    pytest.param(dict(score="sigmoid", correction_bias=True, noisy_gating=True, bias=True), id="sigmoid-bias-noise"),
])
def test_remove_experts_keeps_the_others(cfg, backend):
    """The kept experts keep their weights, router rows, noise rows and correction bias. A token none of whose
    top-k choices was removed keeps its choice; its output is unchanged when its weights do not depend on the
    removed logits (renormalised softmax, sigmoid) and is divided by the kept experts' softmax share otherwise."""
    E, T = 8, 40
    # any correction bias well below the spread of the scores, so that tokens do not all share the same choice
    m = make(16, 12, E, 2, correction=torch.randn(E) * 0.02, **cfg).eval()
    if m.noise is not None:
        with torch.no_grad():
            m.noise.weight.normal_(0, 0.5)
    x = torch.randn(T, 16, dtype=F64)
    before, info = m(x), loop_sparse(m, x)[1]
    old = copy.deepcopy(m)
    removed = torch.randperm(E)[:2].tolist()
    keep = [e for e in range(E) if e not in removed]
    m.remove_experts(removed)
    assert m.num_experts == m.experts.num_experts == m.router.out_features == 6
    new_state = m.state_dict()
    for name, t in old.state_dict().items():
        want = t[keep] if per_expert(name, t, E) else t
        assert torch.equal(new_state[name], want), name
    after = m(x)
    assert_close(after, loop_sparse(m, x)[0], name="after removal vs loop")
    untouched = [t for t in range(T) if not set(info["chosen"][t]) & set(removed)]
    touched = [t for t in range(T) if t not in untouched]
    assert len(untouched) >= 3 and touched  # ~54% and ~46% of the tokens
    if m.score == "softmax" and not m.renormalize:
        share = torch.stack([info["scores"][t][keep].sum() for t in untouched])
        assert_close(after[untouched], before[untouched] / share[:, None], name="untouched tokens, rescaled")
    else:
        assert_close(after[untouched], before[untouched], name="untouched tokens")
    assert not torch.allclose(after[touched], before[touched], **TOL)


def test_add_experts(backend):
    """New experts get fresh weights (router rows like nn.Linear's, zero noise rows and correction bias); the old
    ones keep theirs; tokens that still choose only old experts keep their outputs (sigmoid scores: with softmax
    the new experts would rescale the old probabilities against the unscaled correction bias)."""
    E, T, n = 6, 40, 3
    # a correction bias well below the spread of the scores (~0.15), so that the new experts (bias 0) get chosen
    m = make(16, 12, E, 2, score="sigmoid", router_bias=True, noisy_gating=True, correction_bias=True, bias=True,
             correction=torch.randn(E) * 0.02).eval()
    x = torch.randn(T, 16, dtype=F64)
    before = m(x)
    old = copy.deepcopy(m)
    m.add_experts(n)
    assert m.num_experts == m.experts.num_experts == m.router.out_features == m.noise.out_features == E + n
    new_state = m.state_dict()
    for name, t in old.state_dict().items():
        if per_expert(name, t, E):
            assert torch.equal(new_state[name][:E], t), name
            fresh = new_state[name][E:]
            if name.startswith(("noise", "e_score")):
                assert not fresh.any(), name
            else:
                assert fresh.abs().min() > 0 and fresh.abs().max() <= 1 / math.sqrt(min(16, 12)), name
        else:
            assert torch.equal(new_state[name], t), name
    assert m.e_score_correction_bias.dtype == torch.float32
    after, info = m(x), loop_sparse(m, x)[1]
    assert_close(after, loop_sparse(m, x)[0], name="after adding vs loop")
    old_only = [t for t in range(T) if max(info["chosen"][t]) < E]
    assert old_only and len(old_only) < T  # ~42% of the tokens choose two old experts
    assert_close(after[old_only], before[old_only], name="tokens routed to old experts only")


def test_prune_experts(backend):
    """The experts whose share of the tracked usage is below the threshold are pruned (among them one that no
    token chooses); the Sequential router's last Linear shrinks."""
    E = 6
    router = nn.Sequential(*mlp_router(16, E), nn.Dropout(0.0))  # Linear, ReLU, Linear, Dropout
    m = make(16, 12, E, 2, router=router)
    with pytest.raises(RuntimeError, match="forward"):
        m.prune_experts(0.01)
    cold = int(torch.randint(E, ()))
    with torch.no_grad():
        router[2].bias[cold] = -1e3  # its logit never makes the top-2
    for _ in range(2):
        m(torch.randn(20, 16, dtype=F64))
    total = m.expert_stats()["total_usage"].tolist()
    assert total[cold] == 0 and sum(total) == 2 * 20 * 2
    assert m.prune_experts(0.0) == []  # nothing is below a zero share
    # (top-2 of 6: at most 4 experts can have a share below 5%, since no expert takes more than half the pairs)
    below = [e for e in range(E) if total[e] / sum(total) < 0.05]
    assert cold in below
    assert m.prune_experts(0.05) == below
    n = E - len(below)
    assert m.num_experts == n and router[2].weight.shape == (n, 10) and router[2].out_features == n
    x = torch.randn(12, 16, dtype=F64)
    logits = torch.stack([router(xt[None])[0] for xt in x])
    assert_close(m(x), loop_sparse(m, x, logits)[0], name="after pruning vs loop")


@pytest.mark.parametrize("action, exc, match", [
    pytest.param(lambda m: m.remove_experts([0, 1, 2]), ValueError, r"top_k=2 needs at least 2 experts, but 1",
                 id="top_k>E"),
    pytest.param(lambda m: m.remove_experts([4]), ValueError, r"ids must be distinct .*num_experts=4", id="id>=E"),
    pytest.param(lambda m: m.remove_experts([1, 1]), ValueError, r"ids must be distinct", id="repeated-id"),
    pytest.param(lambda m: m.add_experts(0), ValueError, r"\bn must be a positive int", id="add-0"),
    pytest.param(lambda m: m.prune_experts(1.5), ValueError, r"threshold", id="threshold>1"),
])
def test_resize_errors_leave_the_layer_unchanged(action, exc, match):
    m = make(16, 12, 4, 2)
    m(torch.randn(5, 16, dtype=F64))
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(exc, match=match):
        action(m)
    assert m.num_experts == 4
    assert all(torch.equal(t, state[n]) for n, t in m.state_dict().items())


def test_resize_errors_groups_and_router():
    grouped = make(16, 8, 8, 2, score="sigmoid", num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match=r"7 experts do not fit the routing: num_groups=4 must divide"):
        grouped.remove_experts([3])
    lstm = make(16, 12, 4, 2, router=LSTMRouter(16, 5, 4).to(F64))
    with pytest.raises(TypeError, match=r"router of type LSTMRouter"):
        lstm.add_experts(1)
    assert grouped.num_experts == 8 and lstm.num_experts == 4


@pytest.mark.slow  # a dynamo trace (~5 s)
def test_torch_compile_fullgraph_jitter_shared_capacity():
    """fullgraph compile with router jitter, a gated shared expert, clamped capacity, the entropy loss and an
    output width: same outputs, losses, gradients and statistics as eager (same seed: aot_eager replays the
    random draws in order)."""
    m = make(16, 12, 6, 2, router_jitter=0.2, num_shared_experts=1, shared_gate=True, capacity_factor=0.75,
             min_capacity=2, max_capacity=9, aux_loss_type="entropy", out_dim=10, bias=True).train()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for T in (12, 19):
        x = torch.randn(T, 16, dtype=F64)
        g = torch.randn(T, 10, dtype=F64)
        seed = int(torch.randint(2**31, ()))
        runs = []
        for fn in (compiled, m):
            torch.manual_seed(seed)
            xi = x.clone().requires_grad_()
            out = fn(xi)
            grads = torch.autograd.grad((out * g).sum() + m.aux_loss, [xi] + list(m.parameters()))
            runs.append((out, m.aux_loss, grads, m.expert_stats()))
        (out_c, aux_c, grads_c, st_c), (out_e, aux_e, grads_e, st_e) = runs
        assert_close(out_c, out_e, name=f"T={T} compiled output")
        assert_close(aux_c, aux_e, name=f"T={T} compiled aux_loss")
        for a, b in zip(grads_c, grads_e):
            assert_close(a, b, name=f"T={T} compiled grad")
        for name in ("routed", "usage", "importance", "capacity", "dropped"):
            assert torch.equal(st_c[name], st_e[name]), name
        assert st_e["capacity"].item() == min(max(math.ceil(0.75 * T * 2 / 6), 2), 9)


# --- argument errors -----------------------------------------------------------------------------
# each error names the constructor argument a user passed: `top_k`, not the op-level `k`
@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(num_experts=4, top_k=5), r"\btop_k\b", id="k>E"),
    pytest.param(dict(num_experts=4, top_k=0), r"\btop_k\b", id="k<1"),
    pytest.param(dict(score="relu"), r"score", id="bad-score"),
    pytest.param(dict(capacity_factor=0.0), r"capacity_factor", id="capacity_factor=0"),
    pytest.param(dict(capacity_factor=-1.0), r"capacity_factor", id="capacity_factor<0"),
    pytest.param(dict(num_experts=8, num_groups=3, topk_groups=1), r"num_groups", id="groups-not-dividing-E"),
    pytest.param(dict(num_experts=8, num_groups=4, topk_groups=5), r"topk_groups", id="topk_groups>num_groups"),
    pytest.param(dict(num_experts=8, top_k=4, num_groups=4, topk_groups=1), r"topk_groups",
                 id="k>experts-in-topk-groups"),
    pytest.param(dict(activation="tanh"), r"activation", id="bad-activation"),
    pytest.param(dict(dim=0), r"\bdim\b", id="dim=0"),
    pytest.param(dict(hidden_dim=0), r"\bhidden_dim\b", id="hidden_dim=0"),
    pytest.param(dict(out_dim=0), r"\bout_dim\b", id="out_dim=0"),
    pytest.param(dict(min_capacity=2), r"min_capacity clamps the capacity of capacity_factor, which is None",
                 id="min_capacity-without-factor"),
    pytest.param(dict(capacity_factor=1.0, max_capacity=-1), r"max_capacity must be None or an int >= 0",
                 id="max_capacity<0"),
    pytest.param(dict(capacity_factor=1.0, min_capacity=5, max_capacity=4), r"min_capacity=5 exceeds max_capacity=4",
                 id="min>max"),
    pytest.param(dict(router_jitter=1.0), r"router_jitter must be in \[0, 1\)", id="jitter=1"),
    pytest.param(dict(aux_loss_type="l2"), r"aux_loss_type must be one of", id="bad-aux_loss_type"),
    pytest.param(dict(num_shared_experts=-1), r"num_shared_experts must be an int >= 0", id="shared<0"),
    pytest.param(dict(shared_gate=True), r"shared_gate=True needs num_shared_experts >= 1", id="gate-without-shared"),
    pytest.param(dict(shared_hidden_dim=8), r"shared_hidden_dim=8 needs num_shared_experts", id="width-without-shared"),
    pytest.param(dict(router=nn.Linear(8, 4), router_bias=True), r"router_bias applies to the default",
                 id="router+bias"),
])
def test_bad_constructor_args(kwargs, match):
    args = dict(dim=8, hidden_dim=6, num_experts=4, top_k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        SparseMoE(**args)


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9), (9,)], ids=["T3-D7", "B2-S3-D9", "vector-D9"])
def test_forward_wrong_last_dim(shape):
    m = SparseMoE(8, 6, 4, 2)
    with pytest.raises(ValueError, match=r"\bx\b") as err:
        m(torch.randn(shape))
    assert str(tuple(shape)) in str(err.value) and "8" in str(err.value)


def test_single_token_vector():
    """x [D] is [..., D] with no leading dims: one token, same shape back."""
    m = make(8, 6, 4, 2)
    x = torch.randn(8, dtype=F64)
    out = m(x)
    assert out.shape == (8,)
    assert_close(out, loop_sparse(m, x)[0])
