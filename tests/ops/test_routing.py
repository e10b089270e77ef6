"""moe_kernels.ops.topk_route, load_balancing_loss, router_z_loss and the custom ops
moe_kernels::topk_route / topk_route_backward.

The oracle is `naive_route` below: plain Python loops over tokens and experts in float64 (math.exp, sorted
lists), written from the definitions (the op contracts in the docstrings), independent of moe_kernels.reference. Inputs are fresh
random float64 logits each run (the autouse fixture in conftest.py seeds torch), so ties have probability zero
and the chosen experts must match exactly.
"""
import math

import pytest
import torch

import moe_kernels
from moe_kernels import _backend, ops
from tests.helpers import assert_earned, num_threads, same_bits

RTOL = 1e-12   # float64 vs float64 loops: a few ulps of reassociation, nothing more
ATOL = 1e-14


# --- the independent oracle ---------------------------------------------------------------------
def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def naive_route(logits, k, score="softmax", renormalize=True, bias=None, num_groups=None, topk_groups=None,
                scale=1.0):
    """Loops over tokens. Returns (weights [T,k] f64, experts [T,k] i64, counts [E] i32, prob_sum [E] f64,
    lse [T] f64)."""
    rows = logits.double().tolist()
    T, E = logits.shape
    b = [0.0] * E if bias is None else bias.double().tolist()
    weights, experts, lse = [], [], []
    counts = [0] * E
    prob_sum = [0.0] * E
    for t in range(T):
        z = rows[t]
        m = max(z)
        ex = [math.exp(v - m) for v in z]
        tot = math.fsum(ex)
        lse.append(m + math.log(tot))
        if score == "softmax":
            s = [v / tot for v in ex]
            p = s
        else:
            s = [_sigmoid(v) for v in z]
            ssum = math.fsum(s)
            p = [v / ssum for v in s]           # the load-balancing distribution for sigmoid scores
        for e in range(E):
            prob_sum[e] += p[e]
        choice = [s[e] + b[e] for e in range(E)]  # bias shifts the choice only
        allowed = list(range(E))
        if num_groups is not None and num_groups > 1:
            size = E // num_groups
            group_score = []
            for g in range(num_groups):
                members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                group_score.append(sum(members[:2]))   # sum of the top-2 biased scores of the group
            top = sorted(range(num_groups), key=lambda g: group_score[g], reverse=True)[:topk_groups]
            allowed = [e for g in sorted(top) for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: choice[e], reverse=True)[:k]
        w = [s[e] for e in chosen]                 # weights from the unbiased scores
        if renormalize:
            wsum = math.fsum(w)
            w = [v / wsum for v in w]
        w = [v * scale for v in w]
        weights.append(w)
        experts.append(chosen)
        for e in chosen:
            counts[e] += 1
    return (torch.tensor(weights, dtype=torch.float64).reshape(T, k),
            torch.tensor(experts, dtype=torch.int64).reshape(T, k),
            torch.tensor(counts, dtype=torch.int32),
            torch.tensor(prob_sum, dtype=torch.float64),
            torch.tensor(lse, dtype=torch.float64).reshape(T))


def assert_route_equal(r, expected):
    w, x, c, ps, lse = expected
    assert r.experts.dtype == torch.int64 and r.counts.dtype == torch.int32
    assert r.weights.dtype == r.prob_sum.dtype == r.lse.dtype == torch.float64
    assert torch.equal(r.experts, x), f"experts differ:\n{r.experts}\nvs naive\n{x}"
    assert torch.equal(r.counts, c)
    torch.testing.assert_close(r.weights, w, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(r.prob_sum, ps, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(r.lse, lse, rtol=RTOL, atol=ATOL)


def rand_logits(T, E, dtype=torch.float64, requires_grad=False):
    return (torch.randn(T, E, dtype=torch.float64) * 2).to(dtype).requires_grad_(requires_grad)


# --- forward against the naive loops --------------------------------------------------------------
SHAPES = [
    pytest.param(37, 7, 3, id="T37-E7-k3"),        # prime E, T not a multiple of anything nice
    pytest.param(0, 8, 2, id="T0-E8-k2"),          # no tokens
    pytest.param(1, 8, 2, id="T1-E8-k2"),          # a single token (decode)
    pytest.param(16, 13, 1, id="T16-E13-k1"),      # k=1 (Switch), prime E
    pytest.param(9, 5, 5, id="T9-E5-k5"),          # k=E: every expert chosen, order by score
    pytest.param(12, 1, 1, id="T12-E1-k1"),        # E=1: a single expert
    pytest.param(64, 64, 8, id="T64-E64-k8"),      # OLMoE-like
]
VARIANTS = [
    pytest.param("softmax", True, 1.0, id="softmax-renorm"),
    pytest.param("softmax", False, 2.5, id="softmax-raw-scale2.5"),
    pytest.param("sigmoid", True, 2.5, id="sigmoid-renorm-scale2.5"),
    pytest.param("sigmoid", False, 1.0, id="sigmoid-raw"),
]


@pytest.mark.parametrize("score,renormalize,scale", VARIANTS)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_topk_route_matches_naive(backend, T, E, k, score, renormalize, scale):
    logits = rand_logits(T, E)
    r = ops.topk_route(logits, k, score=score, renormalize=renormalize, scale=scale)
    assert r.weights.shape == (T, k) and r.experts.shape == (T, k)
    assert r.counts.shape == (E,) and r.prob_sum.shape == (E,) and r.lse.shape == (T,)
    assert_route_equal(r, naive_route(logits, k, score, renormalize, scale=scale))
    if renormalize and T:
        torch.testing.assert_close(r.weights.sum(-1), torch.full((T,), scale, dtype=torch.float64),
                                   rtol=RTOL, atol=0)
    assert int(r.counts.sum()) == T * k


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_topk_route_bias_shifts_choice_not_weights(backend, score):
    T, E, k = 41, 11, 3
    logits = rand_logits(T, E)
    bias = torch.randn(E, dtype=torch.float32) * 0.3          # fp32 bias on fp64 logits, as in DeepSeek-V3
    r = ops.topk_route(logits, k, score=score, bias=bias)
    assert_route_equal(r, naive_route(logits, k, score, bias=bias))

    # a dominant bias on one expert puts it first for every token, while its weight stays the unbiased score
    strong = torch.zeros(E, dtype=torch.float64)
    strong[4] = 100.0
    r = ops.topk_route(logits, k, score=score, bias=strong, renormalize=False)
    assert torch.equal(r.experts[:, 0], torch.full((T,), 4))
    s = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    torch.testing.assert_close(r.weights, s.gather(1, r.experts), rtol=RTOL, atol=ATOL)
    assert_route_equal(r, naive_route(logits, k, score, renormalize=False, bias=strong))


GROUPS = [
    pytest.param(16, 4, 2, 4, "sigmoid", True, id="E16-G4-tg2-k4-sigmoid-bias"),   # DeepSeek-V3 in miniature
    pytest.param(12, 3, 1, 2, "softmax", False, id="E12-G3-tg1-k2-softmax"),       # a single group allowed
    pytest.param(8, 8, 3, 3, "sigmoid", True, id="E8-G8-tg3-k3-groupsize1"),       # group score = the one score
    pytest.param(14, 7, 7, 5, "softmax", True, id="E14-G7-tg7-k5-allgroups"),      # every group allowed
    pytest.param(15, 5, 2, 6, "softmax", True, id="E15-G5-tg2-k6-k=allowed"),      # k equals the allowed experts
]


@pytest.mark.parametrize("E,G,tg,k,score,with_bias", GROUPS)
def test_topk_route_groups(backend, E, G, tg, k, score, with_bias):
    T = 37
    logits = rand_logits(T, E)
    bias = torch.randn(E, dtype=torch.float64) * 0.2 if with_bias else None
    r = ops.topk_route(logits, k, score=score, bias=bias, num_groups=G, topk_groups=tg, scale=1.5)
    assert_route_equal(r, naive_route(logits, k, score, bias=bias, num_groups=G, topk_groups=tg, scale=1.5))
    groups_used = (r.experts // (E // G)).tolist()
    assert all(len(set(g)) <= tg for g in groups_used)


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="softmax"),
                                    pytest.param(dict(score="sigmoid", num_groups=4, topk_groups=2), id="groups")])
def test_tied_scores_rank_lower_index_first(backend, kwargs):
    # logits on a grid of five values: most tokens tie within their top k and many between groups; every backend
    # ranks as a stable descending sort does (ties to the lower index), as the naive loops' sorted() does
    T, E, k = 41, 16, 5
    logits = torch.randint(-2, 3, (T, E)).double()
    r = ops.topk_route(logits, k, **kwargs)
    assert_route_equal(r, naive_route(logits, k, **kwargs))


def test_topk_route_one_group_is_no_groups(backend):
    # num_groups=1 (DeepSeek configs with n_group=1) is plain top-k
    logits = rand_logits(19, 10)
    a = ops.topk_route(logits, 3, score="sigmoid", num_groups=1, topk_groups=1)
    b = ops.topk_route(logits, 3, score="sigmoid")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert_route_equal(a, naive_route(logits, 3, "sigmoid"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_route_low_precision_logits(backend, dtype):
    # scores are taken in fp32 for every dtype below fp64; weights earned against fp64 on the same logits
    T, E, k = 37, 13, 4
    logits = rand_logits(T, E, dtype)
    r = ops.topk_route(logits, k)
    assert r.weights.dtype == r.prob_sum.dtype == r.lse.dtype == torch.float32
    s64 = logits.double().softmax(-1)
    # the chosen experts are a valid top-k of the fp32 scores (up to an fp32 ulp at the boundary)
    chosen = s64.gather(1, r.experts)
    unchosen = s64.scatter(1, r.experts, float("-inf"))
    assert (chosen.min(-1).values >= unchosen.max(-1).values - 1e-6).all()
    assert (chosen[:, :-1] >= chosen[:, 1:] - 1e-6).all()
    ref64 = chosen / chosen.sum(-1, keepdim=True)
    s32 = logits.float().softmax(-1).gather(1, r.experts)
    assert_earned(r.weights, ref64, s32 / s32.sum(-1, keepdim=True), atol=1e-7, name="weights")
    assert_earned(r.lse, torch.logsumexp(logits.double(), -1), torch.logsumexp(logits.float(), -1), atol=1e-6,
                  name="lse")


# --- losses ---------------------------------------------------------------------------------------
def transformers_load_balancing_loss(logits, k):
    """transformers' load_balancing_loss_func, from its definition (one layer, no attention mask)."""
    E = logits.shape[1]
    routing_weights = logits.double().softmax(-1)
    selected = routing_weights.topk(k, dim=-1).indices
    expert_mask = torch.nn.functional.one_hot(selected, E).double()   # [T, k, E]
    tokens_per_expert = expert_mask.mean(0)                              # [k, E]
    router_prob_per_expert = routing_weights.mean(0)                     # [E]
    return E * (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum()


@pytest.mark.parametrize("T,E,k", [pytest.param(37, 7, 2, id="T37-E7-k2"), pytest.param(1, 8, 2, id="T1-E8-k2"),
                                   pytest.param(50, 64, 8, id="T50-E64-k8")])
def test_load_balancing_loss_softmax(backend, T, E, k):
    logits = rand_logits(T, E)
    r = ops.topk_route(logits, k)
    loss = ops.load_balancing_loss(r)
    _, experts, _, _, _ = naive_route(logits, k)
    # E * sum_e (count_e / T) * mean_t p_te, by loops
    rows = logits.softmax(-1).tolist()
    expected = 0.0
    for e in range(E):
        count = sum(1 for t in range(T) for j in range(k) if experts[t, j] == e)
        mean_p = math.fsum(rows[t][e] for t in range(T)) / T
        expected += (count / T) * mean_p
    expected *= E
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=RTOL)
    assert loss.item() == pytest.approx(transformers_load_balancing_loss(logits, k).item(), rel=RTOL)


def test_load_balancing_loss_sigmoid(backend):
    # for sigmoid scores the averaged distribution is each token's normalised sigmoid s / sum(s)
    T, E, k = 29, 16, 4
    logits = rand_logits(T, E)
    bias = torch.randn(E, dtype=torch.float64) * 0.2
    r = ops.topk_route(logits, k, score="sigmoid", bias=bias, num_groups=4, topk_groups=2)
    _, experts, counts, prob_sum, _ = naive_route(logits, k, "sigmoid", bias=bias, num_groups=4, topk_groups=2)
    expected = E * math.fsum((counts[e].item() / T) * (prob_sum[e].item() / T) for e in range(E))
    assert ops.load_balancing_loss(r).item() == pytest.approx(expected, rel=RTOL)


def test_router_z_loss(backend):
    T, E = 37, 13
    logits = rand_logits(T, E) * 3
    r = ops.topk_route(logits, 2)
    rows = logits.tolist()
    expected = 0.0
    for t in range(T):
        m = max(rows[t])
        lse = m + math.log(math.fsum(math.exp(v - m) for v in rows[t]))
        expected += lse * lse
    expected /= T
    assert ops.router_z_loss(r).item() == pytest.approx(expected, rel=RTOL)


def test_entropy_loss(backend):
    # sum_e mean_p_e * log(mean_p_e + 1e-10) over the softmax probabilities (the MoE guide's AdvancedMoELayer),
    # and its gradient through the logits
    T, E = 23, 7
    logits = (rand_logits(T, E) * 2).requires_grad_()
    loss = ops.entropy_loss(ops.topk_route(logits, 2))
    rows = logits.detach().softmax(-1).tolist()
    mean_p = [math.fsum(rows[t][e] for t in range(T)) / T for e in range(E)]
    expected = math.fsum(p * math.log(p + 1e-10) for p in mean_p)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=RTOL)
    assert -math.log(E) <= loss.item() < 0  # the negative entropy of a distribution over E experts
    (got,) = torch.autograd.grad(loss, logits)
    mp = logits.softmax(-1).mean(0)
    (want,) = torch.autograd.grad((mp * torch.log(mp + 1e-10)).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_losses_no_tokens(backend):
    # T=0: every loss is a finite zero, not 0/0
    r = ops.topk_route(torch.randn(0, 8, dtype=torch.float64), 2)
    assert ops.load_balancing_loss(r).item() == 0.0
    assert ops.router_z_loss(r).item() == 0.0
    assert ops.entropy_loss(r).item() == 0.0


# --- gradients ------------------------------------------------------------------------------------
GRAD_CASES = [
    pytest.param(dict(score="softmax", renormalize=True, each_output=True), id="softmax-renorm"),
    pytest.param(dict(score="softmax", renormalize=False, scale=2.5), id="softmax-raw-scale2.5"),
    pytest.param(dict(score="sigmoid", renormalize=True, scale=2.5, each_output=True), id="sigmoid-renorm-scale2.5"),
    pytest.param(dict(score="sigmoid", renormalize=False), id="sigmoid-raw"),
    pytest.param(dict(score="sigmoid", renormalize=True, bias=True, num_groups=4, topk_groups=2),
                 id="sigmoid-renorm-bias-groups"),
    pytest.param(dict(score="softmax", renormalize=True, bias=True, num_groups=2, topk_groups=1),
                 id="softmax-renorm-bias-groups"),
]


@pytest.mark.parametrize("kwargs", GRAD_CASES)
def test_topk_route_gradcheck(kwargs):
    T, E, k = 5, 8, 3
    kwargs = dict(kwargs)
    each_output = kwargs.pop("each_output", False)
    if kwargs.pop("bias", False):
        kwargs["bias"] = torch.randn(E, dtype=torch.float64) * 0.2
    logits = rand_logits(T, E, requires_grad=True)

    def fn(z):
        r = ops.topk_route(z, k, **kwargs)
        return r.weights, r.prob_sum, r.lse

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)
    # each output alone (the others' grads arrive undefined): the None branches of the backward
    for i in range(3 if each_output else 0):
        assert torch.autograd.gradcheck(lambda z: fn(z)[i], (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_losses_gradcheck():
    logits = rand_logits(7, 6, requires_grad=True)

    def fn(z):
        r = ops.topk_route(z, 2)
        return ops.load_balancing_loss(r), ops.router_z_loss(r)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- custom-op registration -----------------------------------------------------------------------
OPCHECK_ROUTE = [
    pytest.param(torch.float32, dict(score="softmax", renormalize=True), id="fp32-softmax"),
    pytest.param(torch.float64, dict(score="sigmoid", renormalize=True, bias=True, num_groups=4, topk_groups=2,
                                     scale=2.5), id="fp64-sigmoid-bias-groups"),
    pytest.param(torch.float64, dict(score="softmax", renormalize=False), id="fp64-softmax-raw"),
]


def _op_args(logits, k, score="softmax", renormalize=True, bias=None, num_groups=0, topk_groups=0, scale=1.0):
    if bias is True:
        bias = torch.randn(logits.shape[1], dtype=logits.dtype) * 0.2
    return (logits, k, score, renormalize, bias, num_groups, topk_groups, scale)


@pytest.mark.parametrize("dtype,kwargs", OPCHECK_ROUTE)
def test_opcheck_topk_route(dtype, kwargs):
    logits = rand_logits(10, 8, dtype, requires_grad=True)
    result = torch.library.opcheck(torch.ops.moe_kernels.topk_route.default, _op_args(logits, 3, **kwargs))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype,kwargs", OPCHECK_ROUTE)
@pytest.mark.parametrize("which", ["all-grads", "weights-only", "stats-only"])
def test_opcheck_topk_route_backward(dtype, kwargs, which):
    T, E, k = 10, 8, 3
    logits = rand_logits(T, E, dtype)
    args = _op_args(logits, k, **kwargs)
    weights, experts, _, prob_sum, lse = torch.ops.moe_kernels.topk_route(*args)
    gw, gp, gl = torch.randn_like(weights), torch.randn_like(prob_sum), torch.randn_like(lse)
    if which == "weights-only":
        gp = gl = None
    elif which == "stats-only":
        gw = None
    score, renormalize, scale = args[2], args[3], args[7]
    result = torch.library.opcheck(torch.ops.moe_kernels.topk_route_backward.default,
                                   (gw, gp, gl, logits, experts, score, renormalize, scale))
    assert all(v == "SUCCESS" for v in result.values()), result


# --- NaN isolation --------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_nan_logit_isolated_to_its_token(backend, score):
    T, E, k = 23, 9, 3
    logits = rand_logits(T, E)
    clean = ops.topk_route(logits, k, score=score)
    bad = logits.clone()
    bad[11, 5] = float("nan")
    r = ops.topk_route(bad, k, score=score)
    assert r.weights[11].isnan().all()
    assert r.lse[11].isnan()
    others = torch.arange(T) != 11
    assert torch.equal(r.weights[others], clean.weights[others])
    assert torch.equal(r.experts[others], clean.experts[others])
    assert torch.equal(r.lse[others], clean.lse[others])
    # the gradient from the weights alone (the native sigmoid backward then touches only the k chosen experts of a
    # token; the NaN expert is always among them): the other tokens' rows as without the NaN, the NaN token's as
    # the reference gives it
    gw = torch.rand(T, k, dtype=logits.dtype)

    def grad_of(z):
        z = z.clone().requires_grad_()
        return torch.autograd.grad((ops.topk_route(z, k, score=score).weights * gw).nansum(), z)[0]

    g_bad = grad_of(bad)
    assert torch.equal(g_bad[others], grad_of(logits)[others])
    with moe_kernels.use_backend("reference"):
        want = grad_of(bad)[11]
    torch.testing.assert_close(g_bad[11], want, equal_nan=True, rtol=1e-12, atol=0)


# --- the native kernel's parallel chunks ------------------------------------------------------------
@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("kwargs", [pytest.param(dict(score="softmax"), id="softmax"),
                                    pytest.param(dict(score="sigmoid", bias=True, num_groups=4, topk_groups=2,
                                                      scale=2.5), id="sigmoid-bias-groups")])
def test_native_route_chunks_independent_of_threads(dtype, kwargs):
    # T = 3 chunks of 128 tokens and a partial fourth; a NaN token in the second chunk. prob_sum is reduced from
    # per-chunk partial sums in chunk order: every output and the gradient are the same bits for any thread count
    T, E, k = 3 * 128 + 37, 16, 4
    kwargs = dict(kwargs)
    if kwargs.pop("bias", False):
        kwargs["bias"] = torch.randn(E, dtype=torch.float32) * 0.2
    logits = rand_logits(T, E, dtype)
    logits[200, 3] = float("nan")
    gw = torch.rand(T, k)
    runs = []
    for n in (1, 3, 4):
        z = logits.clone().requires_grad_()
        with moe_kernels.use_backend("native"), num_threads(n):
            r = ops.topk_route(z, k, **kwargs)
            loss = (r.weights * gw.to(r.weights.dtype)).nansum() + (r.lse.nan_to_num() ** 2).sum()
            runs.append((*r, torch.autograd.grad(loss, z)[0]))
    for name, *results in zip(("weights", "experts", "counts", "prob_sum", "lse", "grad"), *runs):
        assert all(same_bits(results[0], v) for v in results[1:]), f"{name} depends on the thread count"
    if dtype == torch.float64:
        clean = logits.clone()
        clean[200, 3] = 0.0
        with moe_kernels.use_backend("native"):
            r = ops.topk_route(clean, k, **kwargs)
        assert_route_equal(r, naive_route(clean, k, **kwargs))


# --- bad input ------------------------------------------------------------------------------------
def _bad(logits=None, k=2, **kw):
    return (rand_logits(5, 8) if logits is None else logits), k, kw


BAD = [
    pytest.param(lambda: _bad(torch.randn(8, dtype=torch.float64)), ValueError, "logits", id="logits-1d"),
    pytest.param(lambda: _bad(torch.randn(2, 5, 8)), ValueError, "logits", id="logits-3d"),
    pytest.param(lambda: _bad(torch.randint(0, 5, (5, 8))), TypeError, "logits", id="logits-int"),
    pytest.param(lambda: _bad([[0.1, 0.2]]), TypeError, "logits", id="logits-list"),
    pytest.param(lambda: _bad(k=9), ValueError, "k must be", id="k>E"),
    pytest.param(lambda: _bad(k=0), ValueError, "k must be", id="k=0"),
    pytest.param(lambda: _bad(k=-1), ValueError, "k must be", id="k<0"),
    pytest.param(lambda: _bad(k=2.0), TypeError, "k must be an int", id="k-float"),
    pytest.param(lambda: _bad(k=True), TypeError, "k must be an int", id="k-bool"),
    pytest.param(lambda: _bad(score="relu"), ValueError, "score", id="score-unknown"),
    pytest.param(lambda: _bad(num_groups=3, topk_groups=1), ValueError, "num_groups", id="groups-not-dividing"),
    pytest.param(lambda: _bad(num_groups=-2, topk_groups=1), ValueError, "num_groups", id="groups-negative"),
    pytest.param(lambda: _bad(num_groups=2.0, topk_groups=1), TypeError, "num_groups", id="groups-float"),
    pytest.param(lambda: _bad(num_groups=4), ValueError, "topk_groups", id="topk_groups-missing"),
    pytest.param(lambda: _bad(num_groups=4, topk_groups=0), ValueError, "topk_groups", id="topk_groups-0"),
    pytest.param(lambda: _bad(num_groups=4, topk_groups=5), ValueError, "topk_groups", id="topk_groups>groups"),
    pytest.param(lambda: _bad(num_groups=4, topk_groups=2.0), TypeError, "topk_groups", id="topk_groups-float"),
    pytest.param(lambda: _bad(k=5, num_groups=4, topk_groups=2), ValueError, "topk_groups",
                 id="k>allowed-experts"),
    pytest.param(lambda: _bad(bias=torch.randn(9)), ValueError, "bias", id="bias-wrong-length"),
    pytest.param(lambda: _bad(bias=torch.randn(1, 8)), ValueError, "bias", id="bias-2d"),
    pytest.param(lambda: _bad(bias=torch.arange(8)), TypeError, "bias", id="bias-int"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_topk_route_bad_input(make, exc, match):
    logits, k, kw = make()
    with pytest.raises(exc, match=match):
        ops.topk_route(logits, k, **kw)
