"""SparseMoE against a plain per-token loop written here from the module's parameters (float64).

The loop is the spec of the layer, independent of the package's reference ops: per token, router logits,
scores (softmax or sigmoid), the choice (correction bias, group-limited), top-k, renormalisation and scale,
then sum_j w_j * down_e(act(gate_e x) * up_e x); capacity keeps ceil(capacity_factor * T * k / E) pairs per
expert in priority order (all first choices in token order, then all second choices, ...).
"""
import copy
import math

import pytest
import torch

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
def loop_route(m, xt):
    """One token x_t [D] -> (chosen experts in rank order, their weights [k], scores [E], logits [E])."""
    E, k = m.num_experts, m.top_k
    z = m.router.weight @ xt
    if m.router.bias is not None:
        z = z + m.router.bias
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


def loop_expert(m, e, xt):
    ex = m.experts
    h = ex.gate_up_proj[e] @ xt
    if ex.gate_up_bias is not None:
        h = h + ex.gate_up_bias[e]
    if ex.gated:
        H = ex.hidden_dim
        a = ACT[ex.activation](h[:H]) * h[H:]  # gate rows first, then up
    else:
        a = ACT[ex.activation](h)
    y = ex.down_proj[e] @ a
    if ex.down_bias is not None:
        y = y + ex.down_bias[e]
    return y


def loop_sparse(m, x):
    """x [..., D] -> (out [..., D], info) with info: chosen experts, kept flags, scores, logits per token."""
    shape = x.shape
    x = x.reshape(-1, m.dim)
    T, k, E = x.shape[0], m.top_k, m.num_experts
    routes = [loop_route(m, x[t]) for t in range(T)]
    kept = [[True] * k for _ in range(T)]
    if m.capacity_factor is not None:
        cap = math.ceil(m.capacity_factor * T * k / E)
        used = [0] * E
        for j in range(k):          # all first choices (token order), then all second choices, ...
            for t in range(T):
                e = routes[t][0][j]
                kept[t][j] = used[e] < cap
                used[e] += 1
    outs = []
    for t in range(T):
        chosen, w = routes[t][0], routes[t][1]
        terms = [w[j] * loop_expert(m, e, x[t]) for j, e in enumerate(chosen) if kept[t][j]]
        outs.append(sum(terms, x.new_zeros(m.dim)))
    out = torch.stack(outs).reshape(shape) if T else x.new_empty(shape)
    info = dict(chosen=[r[0] for r in routes], kept=kept, scores=[r[2] for r in routes], logits=[r[3] for r in routes])
    return out, info


def loop_aux_loss(m, info):
    """aux_loss_coef * E * sum_e (count_e / T) * mean_t p_te + z_loss_coef * mean_t logsumexp(logits_t)^2.
    count_e counts all top-k choices (before capacity); p is the softmax of the logits (sigmoid scores are
    normalised to sum to one, DeepSeek-V3's sequence-wise balance loss)."""
    T, E = len(info["chosen"]), m.num_experts
    counts = [sum(c.count(e) for c in info["chosen"]) for e in range(E)]
    probs = [s / s.sum() for s in info["scores"]]  # softmax scores already sum to one
    mean_p = sum(probs) / T
    lb = E * sum(counts[e] / T * mean_p[e] for e in range(E))
    lse = [z.max() + torch.log(torch.exp(z - z.max()).sum()) for z in info["logits"]]
    zl = sum(v * v for v in lse) / T
    return m.aux_loss_coef * lb + m.z_loss_coef * zl


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
]


@pytest.mark.parametrize("cfg, shape", CASES)
def test_forward_matches_loop(cfg, shape, backend):
    m = make(**cfg)
    x = torch.randn(shape, dtype=F64)
    out = m(x)
    ref, info = loop_sparse(m, x)
    assert out.shape == x.shape and out.dtype == F64
    assert_close(out, ref)
    if m.capacity_factor == 0.5:
        assert not all(all(k) for k in info["kept"]), "the capacity case must drop pairs"
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
]


@pytest.mark.parametrize("cfg, shape", GRAD_CASES)
def test_gradients_match_loop(cfg, shape, backend):
    m = make(**cfg)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    g = torch.randn(shape, dtype=F64)
    named = params(m)
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((m(x) * g).sum(), wrt)
    want = torch.autograd.grad((loop_sparse(m, x)[0] * g).sum(), wrt)
    names = ["x"] + [n for n, _ in named]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, name=f"grad {name}")
    # the routing weights carry a gradient to the router (true in every case here: E > 1)
    assert got[names.index("router.weight")].abs().max() > 0


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, aux_loss_coef=0.01, z_loss_coef=0.001), id="softmax-aux+z"),
    pytest.param(dict(dim=16, hidden=12, E=8, k=2, aux_loss_coef=0.5, z_loss_coef=0.0, capacity_factor=0.5,
                      router_bias=True), id="softmax-capacity-router-bias"),
    pytest.param(dict(dim=16, hidden=12, E=8, k=1, renormalize=False, aux_loss_coef=1.0, z_loss_coef=1.0),
                 id="switch-k1"),
    pytest.param(dict(dim=16, hidden=8, E=16, k=4, score="sigmoid", correction_bias=True, num_groups=4,
                      topk_groups=2, aux_loss_coef=0.1, z_loss_coef=0.01), id="deepseek-v3-sigmoid"),
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
