"""The triton backend of moe_kernels.ops.topk_route (moe_kernels/triton/routing.py), through the public op, against
the reference backend on fresh random inputs (conftest.py seeds torch each test; kernels run in the Triton
interpreter on CPU tensors).

Expert ids and counts must equal the reference exactly. Weights, prob_sum, lse and the logits' gradients pass by
the earned tolerance of tests/helpers.assert_earned: |triton - ref64| <= 2 |reference fp32 - ref64| + atol, where
ref64 is the same math in float64 on the same (fp32-exact) logits with the same chosen experts, and atol is
1e-6 relative to the magnitude of the value (~8 fp32 ulps): the kernel sums in another order than torch (tree
reductions per row, per-block partial sums over tokens), which moves a result by a few ulps of its magnitude.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import ops  # noqa: E402
from moe_kernels.reference import routing as ref  # noqa: E402
from moe_kernels.triton import routing as tri  # noqa: E402
from tests.helpers import assert_earned  # noqa: E402

F64 = torch.float64


def route(backend, logits, k, **kw):
    with moe_kernels.use_backend(backend):
        return ops.topk_route(logits, k, **kw)


def rel_atol(ref64):
    """~8 fp32 ulps of each value's magnitude (at least of 1): the reassociation allowance."""
    return 1e-6 * ref64.abs().clamp(min=1.0)


def ref64_of(logits, experts, score="softmax", renormalize=True, scale=1.0, **_):
    """weights, prob_sum, lse in float64 for the given (reference-chosen) experts."""
    z = logits.detach().double()
    s = ref.scores(z, score)
    w = s.gather(1, experts)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + ref.EPS)
    return w * scale, ref.loss_probs(s, score).sum(0), torch.logsumexp(z, -1)


def check_forward(logits, k, **kw):
    """Triton vs reference backend on the same logits; returns the triton result."""
    T, E = logits.shape
    r = route("triton", logits, k, **kw)
    f = route("reference", logits, k, **kw)
    assert r.weights.shape == (T, k) and r.experts.shape == (T, k)
    assert r.counts.shape == (E,) and r.prob_sum.shape == (E,) and r.lse.shape == (T,)
    assert r.weights.dtype == r.prob_sum.dtype == r.lse.dtype == torch.float32
    assert r.experts.dtype == torch.int64 and r.counts.dtype == torch.int32
    assert torch.equal(r.experts, f.experts), f"experts differ:\n{r.experts}\nvs reference\n{f.experts}"
    assert torch.equal(r.counts, f.counts)
    w64, p64, l64 = ref64_of(logits, f.experts, **kw)
    assert_earned(r.weights, w64, f.weights, atol=rel_atol(w64), name="weights")
    assert_earned(r.prob_sum, p64, f.prob_sum, atol=rel_atol(p64), name="prob_sum")
    assert_earned(r.lse, l64, f.lse, atol=rel_atol(l64), name="lse")
    return r


def rand_logits(T, E, dtype=torch.float32):
    return (torch.randn(T, E) * 2).to(dtype)


def block_t(E, k=1):
    return tri.fwd_config(E, k)[0]


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
VARIANTS = [
    pytest.param("softmax", True, 1.0, id="softmax-renorm"),
    pytest.param("softmax", False, 2.5, id="softmax-raw-scale2.5"),
    pytest.param("sigmoid", True, 2.5, id="sigmoid-renorm-scale2.5"),
    pytest.param("sigmoid", False, 1.0, id="sigmoid-raw"),
]
SHAPES = [
    pytest.param(1, 8, 2, id="T1-E8-k2"),                          # a single token (decode)
    pytest.param(block_t(8) // 2 + 3, 8, 2, id="T<BLOCK_T-E8-k2"),  # T smaller than one block of tokens
    pytest.param(2 * block_t(8) + 5, 8, 2, id="T%BLOCK_T-E8-k2"),   # T not a multiple of BLOCK_T: a ragged last block
    pytest.param(2 * block_t(64), 64, 8, id="T=2BLOCK_T-E64-k8"),  # T an exact multiple of BLOCK_T
    pytest.param(23, 7, 3, id="T23-E7-k3"),                        # prime E: padded expert columns
    pytest.param(19, 13, 1, id="T19-E13-k1"),                      # k=1 (Switch), prime E
    pytest.param(9, 5, 5, id="T9-E5-k5"),                          # k=E: every expert chosen, ordered by score
    pytest.param(12, 1, 1, id="T12-E1-k1"),                        # E=1: a single expert
    pytest.param(5, 512, 8, id="T5-E512-k8"),                      # the largest E (BLOCK_T small), two blocks
]


@pytest.mark.parametrize("score,renormalize,scale", VARIANTS)
@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(dtype, T, E, k, score, renormalize, scale):
    r = check_forward(rand_logits(T, E, dtype), k, score=score, renormalize=renormalize, scale=scale)
    assert int(r.counts.sum()) == T * k


def test_forward_empty():
    # T=0: no tokens; counts and prob_sum are zeros, not garbage from the partial-sum buffers
    r = check_forward(torch.randn(0, 8), 2)
    assert torch.equal(r.counts, torch.zeros(8, dtype=torch.int32))
    assert torch.equal(r.prob_sum, torch.zeros(8))


def test_forward_k_equals_large_e():
    # k=E at a non-power-of-two E bigger than one tile row of the small-E configs
    check_forward(rand_logits(6, 40), 40, score="sigmoid")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_all_tokens_to_one_expert(dtype):
    # one logit column much larger than the rest: every token's first choice is that expert
    T, E, k = 37, 16, 2
    logits = torch.randn(T, E)
    logits[:, 11] += 30.0
    r = check_forward(logits.to(dtype), k)
    assert torch.equal(r.experts[:, 0], torch.full((T,), 11))
    assert int(r.counts[11]) == T


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_ties_go_to_lower_index(dtype, score):
    # logits rounded to three levels: many exact ties in the scores; ids must still equal the stable sort's
    T, E, k = 45, 12, 5
    logits = torch.randint(-1, 2, (T, E)).to(dtype)
    r = check_forward(logits, k, score=score)
    # within a token, equal scores are listed by increasing expert id
    s = ref.scores(logits, score).gather(1, r.experts)
    same = s[:, 1:] == s[:, :-1]
    assert (r.experts[:, 1:][same] > r.experts[:, :-1][same]).all()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_bias(dtype, score):
    # the correction bias shifts the choice only; fp16 bias converted to fp32 as the reference does
    T, E, k = 29, 11, 3
    bias = (torch.randn(E) * 0.3).to(dtype)
    check_forward(rand_logits(T, E, dtype), k, score=score, bias=bias)


GROUPS = [
    pytest.param(16, 4, 2, 4, "sigmoid", True, id="E16-G4-tg2-k4-sigmoid-bias"),   # DeepSeek-V3 in miniature
    pytest.param(12, 4, 3, 5, "softmax", False, id="E12-G4-tg3-k5-groupsize3"),    # group size not a power of two
    pytest.param(8, 8, 3, 2, "sigmoid", True, id="E8-G8-tg3-k2-groupsize1"),       # group score = the one score
    pytest.param(15, 5, 2, 6, "softmax", True, id="E15-G5-tg2-k6-k=allowed"),      # k equals the allowed experts
    pytest.param(64, 8, 4, 8, "sigmoid", True, id="E64-G8-tg4-k8"),               # DeepSeek-V3 proportions
]


@pytest.mark.parametrize("E,G,tg,k,score,with_bias", GROUPS)
def test_forward_groups(E, G, tg, k, score, with_bias):
    T = 37
    bias = torch.randn(E) * 0.2 if with_bias else None
    r = check_forward(rand_logits(T, E), k, score=score, bias=bias, num_groups=G, topk_groups=tg, scale=1.5)
    assert all(len(set(g)) <= tg for g in (r.experts // (E // G)).tolist())


def test_forward_groups_ties():
    # ties between group scores and within groups: logits on two levels, groups of 4
    logits = torch.randint(0, 2, (40, 16)).float()
    check_forward(logits, 4, score="sigmoid", num_groups=4, topk_groups=2)


def test_forward_non_contiguous():
    # a transposed view: the launcher makes it contiguous
    logits = rand_logits(21, 12).t()
    assert not logits.is_contiguous()
    check_forward(logits, 3)


@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("sigmoid", True), ("sigmoid", False)])
def test_forward_nan_token(score, renormalize):
    # NaN in one token's logits: that token's weights are NaN (its NaN expert ranks first, as in torch.sort), its
    # ids stay valid expert ids, and the other tokens' ids and weights are exactly those of the clean logits
    T, E, k = 9, 8, 3
    logits = rand_logits(T, E)
    clean = route("triton", logits, k, score=score, renormalize=renormalize)
    logits[4, 5] = float("nan")
    r = route("triton", logits, k, score=score, renormalize=renormalize)
    f = route("reference", logits, k, score=score, renormalize=renormalize)
    assert torch.equal(r.experts, f.experts)
    assert ((r.experts[4] >= 0) & (r.experts[4] < E)).all()
    nan_w = r.weights[4].isnan()
    assert nan_w.all() if renormalize or score == "softmax" else nan_w[0] and not nan_w[1:].any()
    assert torch.isnan(r.lse[4])
    others = torch.arange(T) != 4
    assert torch.equal(r.experts[others], clean.experts[others])
    assert torch.equal(r.weights[others], clean.weights[others])
    assert torch.equal(r.lse[others], clean.lse[others])


# --- gradients --------------------------------------------------------------------------------------
def grads(backend, logits, k, cotangents, **kw):
    x = logits.detach().clone().requires_grad_(True)
    r = route(backend, x, k, **kw)
    outs = [o for o, c in zip((r.weights, r.prob_sum, r.lse), cotangents) if c is not None]
    cots = [c.to(o.dtype) for o, c in zip((r.weights, r.prob_sum, r.lse), cotangents) if c is not None]
    (g,) = torch.autograd.grad(outs, x, cots)
    return r, g


GRAD_CASES = [
    pytest.param("softmax", True, 1.0, id="softmax-renorm"),
    pytest.param("softmax", False, 2.0, id="softmax-raw-scale2"),
    pytest.param("sigmoid", True, 2.5, id="sigmoid-renorm-scale2.5"),
    pytest.param("sigmoid", False, 1.0, id="sigmoid-raw"),
]
WHICH = [
    pytest.param((True, True, True), id="all"),
    pytest.param((True, False, False), id="weights"),
    pytest.param((False, True, False), id="prob_sum"),
    pytest.param((False, False, True), id="lse"),
]


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("score,renormalize,scale", GRAD_CASES)
@pytest.mark.parametrize("T,E,k", [pytest.param(2 * block_t(13) + 3, 13, 3, id="T%BLOCK_T-E13-k3"),
                                   pytest.param(3, 64, 64, id="T3-E64-k=E")])
def test_backward_matches_reference(T, E, k, score, renormalize, scale, which):
    logits = rand_logits(T, E)
    cot = [torch.randn(T, k), torch.randn(E), torch.randn(T)]
    cot = [c if w else None for c, w in zip(cot, which)]
    kw = dict(score=score, renormalize=renormalize, scale=scale)
    r, g = grads("triton", logits, k, cot, **kw)
    f, g32 = grads("reference", logits, k, cot, **kw)
    f64, g64 = grads("reference", logits.double(), k, cot, **kw)
    assert torch.equal(r.experts, f.experts) and torch.equal(f.experts, f64.experts)
    assert g.dtype == torch.float32
    assert_earned(g, g64, g32, atol=1e-6 * g64.abs().max().clamp(min=1.0), name="grad_logits")


def test_backward_through_losses():
    # weights into a weighted sum, prob_sum through load_balancing_loss, lse through router_z_loss
    T, E, k = 37, 16, 2

    def run(backend, logits):
        x = logits.clone().requires_grad_(True)
        c = torch.randn(T, k, generator=torch.Generator().manual_seed(1), device="cpu").to(logits)
        with moe_kernels.use_backend(backend):
            r = ops.topk_route(x, k, score="sigmoid", bias=torch.randn(E, generator=torch.Generator().manual_seed(2), device="cpu").to(x.device))
            loss = (r.weights * c).sum() + 0.1 * ops.load_balancing_loss(r) + 0.01 * ops.router_z_loss(r)
        (g,) = torch.autograd.grad(loss, x)
        return loss.detach(), g

    logits = rand_logits(T, E)
    lt, gt = run("triton", logits)
    lr, gr = run("reference", logits)
    l64, g64 = run("reference", logits.double())
    assert_earned(lt.reshape(1), l64.reshape(1), lr.reshape(1), atol=1e-6 * abs(l64.item()), name="loss")
    assert_earned(gt, g64, gr, atol=1e-6 * g64.abs().max().clamp(min=1.0), name="grad_logits")


def test_backward_fp16_logits():
    # fp16 logits: the gradient comes back in fp16, from the fp32 computation rounded once
    T, E, k = 21, 10, 3
    logits = rand_logits(T, E, torch.float16)
    cot = [torch.randn(T, k), torch.randn(E), torch.randn(T)]
    _, g = grads("triton", logits, k, cot)
    _, g32 = grads("reference", logits, k, cot)
    assert g.dtype == torch.float16
    # both round the same fp32 value (up to fp32 reassociation) to fp16: at most one fp16 ulp apart
    torch.testing.assert_close(g.float(), g32.float(), rtol=2 ** -10, atol=1e-6)


def test_backward_empty():
    # T=0: an empty gradient
    _, g = grads("triton", torch.randn(0, 8), 2, [torch.randn(0, 2), torch.randn(8), torch.randn(0)])
    assert g.shape == (0, 8)


# --- registration -----------------------------------------------------------------------------------
def test_triton_backend_registered():
    ops_ = moe_kernels.backends()["ops"]
    for name in ("topk_route", "topk_route_backward"):
        assert "triton" in ops_[name]["implemented"], ops_[name]


def test_aot_configs_cover_launcher():
    # every (BLOCK_T, BLOCK_E, num_warps) the launchers pick for E in 1..512 appears in AOT_CONFIGS
    listed = {(e["fn"], e["constexprs"]["BLOCK_T"], e["constexprs"]["BLOCK_E"], e["num_warps"])
              for e in tri.AOT_CONFIGS}
    for E in range(1, 513):
        bt, be, _, nw = tri.fwd_config(E, 1)
        assert (tri._topk_route_fwd_kernel, bt, be, nw) in listed, E
        bt, be, nw = tri.bwd_config(E, 1)
        assert (tri._topk_route_bwd_kernel, bt, be, nw) in listed, E
    assert tri.EPS.value == ref.EPS
