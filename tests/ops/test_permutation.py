"""moe_kernels.ops.sort_by_expert, permute, unpermute and the custom ops moe_kernels::sort_by_expert,
permute(_backward), unpermute(_backward) (+ the native sort torch.ops.moe_kernels_C.sort_by_expert).

The oracle is written here with plain Python loops over (token, slot) pairs, from the contract:
  * pairs are the flat indices i = t*k + j;
  * a pair is kept when its id is in [0, E) and, with a capacity, it is among the first `capacity` pairs of its
    expert in slot-major priority order (all slot-0 pairs in token order, then all slot-1 pairs, ...);
  * order lists the kept pairs expert by expert (ascending flat index within an expert), then the pairs not kept
    in flat order; offsets[e] is where expert e starts, offsets[E] the number kept;
  * inverse[t, j] is the position of pair t*k+j in order, or -1 when it is not kept;
  * permute row p = x[order[p] // k]; unpermute out[t] = sum_j w[t, j] * y[inverse[t, j]] over kept pairs.
It does not use moe_kernels.reference.
"""
import pytest
import torch

import moe_kernels
from moe_kernels import _backend, ops
from tests.helpers import assert_earned, num_threads, rand_experts, same_bits

RTOL = 1e-12
ATOL = 1e-14


# --- the independent oracle ---------------------------------------------------------------------
def naive_sort(experts, E, capacity=None):
    ids = experts.tolist()
    T, k = experts.shape
    kept = [[False] * k for _ in range(T)]
    taken = [0] * E
    for j in range(k):                  # slot-major priority: first choices before second choices
        for t in range(T):              # token order within a slot
            e = ids[t][j]
            if 0 <= e < E and (capacity is None or taken[e] < capacity):
                kept[t][j] = True
                taken[e] += 1
    buckets = [[] for _ in range(E)]
    rest = []
    for t in range(T):
        for j in range(k):
            (buckets[ids[t][j]] if kept[t][j] else rest).append(t * k + j)
    order, offsets = [], [0]
    for e in range(E):
        order += buckets[e]
        offsets.append(len(order))
    order += rest
    inverse = [[-1] * k for _ in range(T)]
    for p, i in enumerate(order):
        t, j = divmod(i, k)
        if kept[t][j]:
            inverse[t][j] = p
    return (torch.tensor(order, dtype=torch.int32).reshape(T * k),
            torch.tensor(inverse, dtype=torch.int32).reshape(T, k),
            torch.tensor(offsets, dtype=torch.int32))


def naive_permute(x, order, k, inverse):
    """Row p is x[order[p] // k] for a kept pair; rows of pairs not kept are zero."""
    out = torch.empty(order.shape[0], x.shape[1], dtype=x.dtype)
    inv = inverse.reshape(-1).tolist()
    for p, i in enumerate(order.tolist()):
        out[p] = x[i // k] if inv[i] >= 0 else 0
    return out


def naive_unpermute(y, inverse, weights):
    """float64, slot order, pairs not kept contribute nothing."""
    T, k = inverse.shape
    inv = inverse.tolist()
    y64 = y.double()
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if inv[t][j] >= 0:
                w = 1.0 if weights is None else float(weights[t, j])
                out[t] += w * y64[inv[t][j]]
    return out


# --- inputs ---------------------------------------------------------------------------------------
def ids_random(T, k, E):
    return rand_experts(T, k, E)                                   # distinct within a token, like top-k


def ids_with_replacement(T, k, E):
    return torch.randint(0, E, (T, k))                             # duplicates within a token


def ids_all_one(T, k, E):
    return torch.full((T, k), E // 2, dtype=torch.int64)           # every pair to one expert


def ids_few_experts(T, k, E):
    return torch.randint(0, 3, (T, k))                             # experts 3..E-1 empty


def ids_sentinel(T, k, E):
    ids = torch.randint(-1, E + 1, (T, k))                         # -1 and E: the expert-parallel sentinels
    ids[0, 0], ids[-1, -1] = -1, E                                 # at least one of each
    return ids


def ids_far_out(T, k, E):
    ids = torch.randint(0, E, (T, k))
    ids[::3, 0] = -(2**40)                                          # far outside [0, E) both ways
    ids[1::4, -1] = 2**40 + 5
    return ids


def _sort_case(T, k, E, make, capacity=None, dtype=torch.int64, id=None):
    return pytest.param(T, k, E, make, capacity, dtype, id=id)


SORT_CASES = [
    _sort_case(37, 3, 7, ids_random, id="T37-E7-k3"),                        # prime E, T not a nice number
    _sort_case(37, 3, 7, ids_random, 4, id="T37-E7-k3-cap4"),               # capacity drops some second choices
    _sort_case(0, 2, 8, ids_random, id="T0-E8-k2"),                          # no tokens
    _sort_case(0, 2, 8, ids_random, 3, id="T0-E8-k2-cap3"),                  # no tokens, with a capacity
    _sort_case(1, 2, 8, ids_random, id="T1-E8-k2"),                          # one token (decode)
    _sort_case(16, 1, 13, ids_random, id="T16-E13-k1"),                      # k=1, prime E
    _sort_case(9, 5, 5, ids_random, id="T9-E5-k5"),                          # k=E: every expert once per token
    _sort_case(12, 1, 1, ids_random, id="T12-E1-k1"),                        # E=1
    _sort_case(20, 2, 6, ids_all_one, id="T20-E6-k2-all-to-one"),            # one expert gets all, others empty
    _sort_case(20, 2, 6, ids_all_one, 7, id="T20-E6-k2-all-to-one-cap7"),    # ... and a capacity cuts it
    _sort_case(25, 2, 16, ids_few_experts, id="T25-E16-k2-empty-experts"),   # most experts empty
    _sort_case(31, 4, 6, ids_with_replacement, 5, id="T31-E6-k4-dups-cap5"), # repeated ids within a token
    _sort_case(11, 2, 4, ids_random, 0, id="T11-E4-k2-cap0"),                # capacity=0: nothing kept
    _sort_case(11, 2, 4, ids_random, 50, id="T11-E4-k2-cap50"),              # capacity > T: nothing dropped
    _sort_case(23, 3, 6, ids_sentinel, id="T23-E6-k3-sentinel"),             # ids -1 and E never kept
    _sort_case(23, 3, 6, ids_sentinel, 3, id="T23-E6-k3-sentinel-cap3"),     # sentinels do not use capacity
    _sort_case(19, 2, 5, ids_far_out, 4, id="T19-E5-k2-far-ids-cap4"),       # ids far outside [0, E)
    _sort_case(37, 3, 7, ids_sentinel, 4, torch.int32, id="T37-E7-k3-int32-sentinel-cap4"),  # int32 ids
    _sort_case(3000, 4, 61, ids_random, id="T3000-E61-k4"),                  # T*k=12000 > 4096: several chunks
    _sort_case(3000, 4, 61, ids_sentinel, 150, id="T3000-E61-k4-sentinel-cap150"),  # chunks + drops
]


def assert_sorted_equal(s, expected):
    order, inverse, offsets = expected
    assert s.order.dtype == s.inverse.dtype == s.offsets.dtype == torch.int32
    assert torch.equal(s.offsets, offsets), f"offsets {s.offsets} vs naive {offsets}"
    assert torch.equal(s.order, order), "order differs from the naive loops"
    assert torch.equal(s.inverse, inverse), "inverse differs from the naive loops"


@pytest.mark.parametrize("T,k,E,make,capacity,dtype", SORT_CASES)
def test_sort_by_expert_matches_naive(backend, T, k, E, make, capacity, dtype):
    experts = make(T, k, E).to(dtype)
    s = ops.sort_by_expert(experts, E, capacity)
    expected = naive_sort(experts, E, capacity)
    assert_sorted_equal(s, expected)
    assert int(s.dropped) == T * k - int(expected[2][-1])
    # invariants that hold whatever the oracle says
    off = s.offsets.long()
    assert off[0] == 0 and (off[1:] >= off[:-1]).all() and off[-1] <= T * k
    assert torch.equal(s.order.sort().values, torch.arange(T * k, dtype=torch.int32))   # a permutation
    flat = experts.reshape(-1).long()
    for e in range(E):
        assert (flat[s.order[off[e]:off[e + 1]].long()] == e).all()
    kept = s.inverse >= 0
    assert torch.equal(s.order[s.inverse[kept].long()], torch.arange(T * k, dtype=torch.int32)[kept.reshape(-1)])
    if capacity is not None:
        assert (off[1:] - off[:-1] <= capacity).all()


def test_native_backend_is_used():
    # without this the `native` leg of the backend fixture could silently be the reference
    if not _backend.NATIVE:
        pytest.skip(f"native extension not built: {_backend.backends()['native']}")
    with moe_kernels.use_backend("native"):
        assert _backend.resolve("sort_by_expert", "cpu") == "native"


NATIVE_VS_REF = [
    pytest.param(37, 3, 7, None, id="T37-E7-k3"),
    pytest.param(37, 3, 7, 5, id="T37-E7-k3-cap5"),
    pytest.param(1, 8, 8, 0, id="T1-E8-k8-cap0"),
    pytest.param(2048, 2, 8, None, id="T2048-E8-k2-one-chunk-exactly"),     # N = 4096 = one full chunk
    pytest.param(2049, 2, 8, 300, id="T2049-E8-k2-cap300-chunk-edge"),      # N = 4098: a 2-row second chunk
    pytest.param(3001, 8, 128, None, id="T3001-E128-k8"),                   # Qwen3-like E, k: 6 chunks
    pytest.param(3001, 8, 128, 150, id="T3001-E128-k8-cap150"),
]


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("T,k,E,capacity", NATIVE_VS_REF)
@pytest.mark.parametrize("make", [ids_random, ids_sentinel, ids_with_replacement], ids=["distinct", "sentinel", "dups"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_sort_native_equals_reference(T, k, E, capacity, make, dtype):
    experts = make(T, k, E).to(dtype)
    with moe_kernels.use_backend("reference"):
        a = ops.sort_by_expert(experts, E, capacity)
    with moe_kernels.use_backend("native"):
        b = ops.sort_by_expert(experts, E, capacity)
    c = torch.ops.moe_kernels_C.sort_by_expert(experts, E, -1 if capacity is None else capacity)
    for u, v, w, name in zip(a, b, c, ("order", "inverse", "offsets")):
        assert torch.equal(u, v) and torch.equal(u, w), f"{name}: native != reference"


def test_sort_non_contiguous_experts(backend):
    # a transposed view: the native path must not read raw memory in the wrong order
    T, k, E = 29, 3, 7
    experts = rand_experts(T, k, E).t().contiguous().t()
    assert not experts.is_contiguous()
    assert_sorted_equal(ops.sort_by_expert(experts, E, 6), naive_sort(experts, E, 6))


# --- permute / unpermute forward ------------------------------------------------------------------
PERM_CASES = [
    pytest.param(37, 3, 7, ids_random, None, id="T37-E7-k3"),                  # prime E, odd T
    pytest.param(37, 3, 7, ids_random, 4, id="T37-E7-k3-cap4"),                # dropped pairs
    pytest.param(0, 2, 8, ids_random, None, id="T0-E8-k2"),                    # no tokens
    pytest.param(1, 2, 8, ids_random, None, id="T1-E8-k2"),                    # one token
    pytest.param(16, 1, 13, ids_random, None, id="T16-E13-k1"),                # k=1
    pytest.param(9, 5, 5, ids_random, None, id="T9-E5-k5"),                    # k=E
    pytest.param(12, 1, 1, ids_random, None, id="T12-E1-k1"),                  # E=1
    pytest.param(20, 2, 6, ids_all_one, None, id="T20-E6-k2-all-to-one"),      # all to one expert
    pytest.param(11, 2, 4, ids_random, 0, id="T11-E4-k2-cap0"),                # nothing kept
    pytest.param(23, 3, 6, ids_sentinel, None, id="T23-E6-k3-sentinel"),       # ids -1 and E
    pytest.param(23, 3, 6, ids_sentinel, 2, id="T23-E6-k3-sentinel-cap2"),     # sentinels and drops
]


@pytest.mark.parametrize("T,k,E,make,capacity", PERM_CASES)
def test_permute_matches_naive(backend, T, k, E, make, capacity):
    D = 5
    x = torch.randn(T, D, dtype=torch.float64)
    s = ops.sort_by_expert(make(T, k, E), E, capacity)
    out = ops.permute(x, s)
    assert out.shape == (T * k, D) and out.dtype == x.dtype
    assert torch.equal(out, naive_permute(x, s.order, k, s.inverse))


@pytest.mark.parametrize("T,k,E,make,capacity", PERM_CASES)
@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "sum"])
def test_unpermute_matches_naive(backend, T, k, E, make, capacity, with_weights):
    D = 5
    s = ops.sort_by_expert(make(T, k, E), E, capacity)
    y = torch.randn(T * k, D, dtype=torch.float64)
    w = torch.rand(T, k, dtype=torch.float64) + 0.1 if with_weights else None
    out = ops.unpermute(y, s, w)
    assert out.shape == (T, D) and out.dtype == torch.float64
    torch.testing.assert_close(out, naive_unpermute(y, s.inverse, w), rtol=RTOL, atol=ATOL)


def test_permute_unpermute_roundtrip_k1(backend):
    # k=1, no drops: unpermute(permute(x)) is x, bit for bit
    T, E = 37, 7
    x = torch.randn(T, 8, dtype=torch.float64)
    s = ops.sort_by_expert(rand_experts(T, 1, E), E)
    assert torch.equal(ops.unpermute(ops.permute(x, s), s), x)


@pytest.mark.parametrize("ydtype,wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                            (torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
                         ids=["fp32-w32", "fp16-w32", "bf16-w32", "fp32-w64"])
def test_unpermute_low_precision(backend, ydtype, wdtype):
    T, k, E, D = 37, 3, 7, 16
    s = ops.sort_by_expert(rand_experts(T, k, E), E, 14)
    y = torch.randn(T * k, D).to(ydtype)
    w = torch.rand(T, k, dtype=wdtype)
    out = ops.unpermute(y, s, w)
    assert out.dtype == ydtype
    kept = (s.inverse >= 0).unsqueeze(-1)
    rows = y[s.inverse.long().clamp(min=0)]
    same = torch.where(kept, rows * w.to(ydtype).unsqueeze(-1), torch.zeros((), dtype=ydtype)).sum(1)
    assert_earned(out, naive_unpermute(y, s.inverse, w), same, atol=1e-6, name="unpermute")


# --- gradients ------------------------------------------------------------------------------------
GRAD_CASES = [
    pytest.param(7, 3, 5, ids_random, None, id="T7-E5-k3"),
    pytest.param(7, 3, 5, ids_random, 3, id="T7-E5-k3-cap3-dropped"),       # capacity drops pairs
    pytest.param(7, 3, 5, ids_sentinel, None, id="T7-E5-k3-sentinel"),      # ids -1 and E
    pytest.param(6, 2, 4, ids_random, 0, id="T6-E4-k2-cap0"),               # every pair dropped
]


@pytest.mark.parametrize("T,k,E,make,capacity", GRAD_CASES)
def test_permute_gradcheck(backend, T, k, E, make, capacity):
    s = ops.sort_by_expert(make(T, k, E), E, capacity)
    x = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, s), (x,))


@pytest.mark.parametrize("T,k,E,make,capacity", GRAD_CASES)
def test_unpermute_gradcheck(backend, T, k, E, make, capacity):
    s = ops.sort_by_expert(make(T, k, E), E, capacity)
    y = torch.randn(T * k, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(T, k, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda y, w: ops.unpermute(y, s, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: ops.unpermute(y, s), (y,))


def test_backward_deterministic(backend):
    # two backward passes with the same inputs and upstream gradient give the same bits
    T, k, E, D = 300, 4, 13, 32
    s = ops.sort_by_expert(ids_sentinel(T, k, E), E, 80)
    x = torch.randn(T, D, requires_grad=True)
    y = torch.randn(T * k, D, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    gp = torch.randn(T * k, D)
    gu = torch.randn(T, D)
    first = torch.autograd.grad(ops.permute(x, s), x, gp)
    second = torch.autograd.grad(ops.permute(x, s), x, gp)
    assert torch.equal(first[0], second[0])
    first = torch.autograd.grad(ops.unpermute(y, s, w), (y, w), gu)
    second = torch.autograd.grad(ops.unpermute(y, s, w), (y, w), gu)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_native_permutation_independent_of_threads(dtype):
    # many token chunks of the native parallel loops: each token owns its rows, so the bits never depend on the
    # thread count; float64 against the naive loops as well
    T, k, E, D = 1500, 4, 13, 24
    s = ops.sort_by_expert(ids_sentinel(T, k, E), E, 400)
    x = torch.randn(T, D, dtype=dtype)
    y = torch.randn(T * k, D, dtype=dtype)
    w = torch.rand(T, k, dtype=torch.float32)
    gp, gu = torch.randn(T * k, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    runs = []
    for n in (1, 3, 4):
        xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
        with moe_kernels.use_backend("native"), num_threads(n):
            p, u = ops.permute(xs, s), ops.unpermute(ys, s, ws)
            runs.append((p, u, *torch.autograd.grad((p, u), (xs, ys, ws), (gp, gu))))
    for name, *results in zip(("permute", "unpermute", "grad_x", "grad_y", "grad_w"), *runs):
        assert all(same_bits(results[0], v) for v in results[1:]), f"{name} depends on the thread count"
    if dtype == torch.float64:
        assert torch.equal(runs[0][0], naive_permute(x, s.order, k, s.inverse))
        torch.testing.assert_close(runs[0][1], naive_unpermute(y, s.inverse, w), rtol=RTOL, atol=ATOL)


# --- custom-op registration -----------------------------------------------------------------------
def _ok(result):
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("capacity", [-1, 3], ids=["nocap", "cap3"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_opcheck_sort_by_expert(backend, capacity, dtype):
    experts = ids_sentinel(13, 3, 6).to(dtype)
    _ok(torch.library.opcheck(torch.ops.moe_kernels.sort_by_expert.default, (experts, 6, capacity)))


def _sample(T, k, E, capacity, dtype, requires_grad=False):
    s = ops.sort_by_expert(ids_sentinel(T, k, E), E, capacity)
    x = torch.randn(T, 4, dtype=dtype, requires_grad=requires_grad)
    y = torch.randn(T * k, 4, dtype=dtype, requires_grad=requires_grad)
    w = torch.rand(T, k, dtype=dtype, requires_grad=requires_grad)
    return s, x, y, w


OPCHECK = [pytest.param(torch.float32, None, id="fp32"), pytest.param(torch.float64, 2, id="fp64-cap2")]


@pytest.mark.parametrize("dtype,capacity", OPCHECK)
def test_opcheck_permute(dtype, capacity):
    s, x, _, _ = _sample(11, 3, 5, capacity, dtype, requires_grad=True)
    _ok(torch.library.opcheck(torch.ops.moe_kernels.permute.default, (x, s.order, s.inverse)))


@pytest.mark.parametrize("dtype,capacity", OPCHECK)
def test_opcheck_permute_backward(dtype, capacity):
    s, _, y, _ = _sample(11, 3, 5, capacity, dtype)
    _ok(torch.library.opcheck(torch.ops.moe_kernels.permute_backward.default, (torch.randn_like(y), s.inverse)))


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "sum"])
@pytest.mark.parametrize("dtype,capacity", OPCHECK)
def test_opcheck_unpermute(dtype, capacity, with_weights):
    s, _, y, w = _sample(11, 3, 5, capacity, dtype, requires_grad=True)
    _ok(torch.library.opcheck(torch.ops.moe_kernels.unpermute.default, (y, s.inverse, w if with_weights else None)))


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "sum"])
@pytest.mark.parametrize("dtype,capacity", OPCHECK)
def test_opcheck_unpermute_backward(dtype, capacity, with_weights):
    s, x, y, w = _sample(11, 3, 5, capacity, dtype)
    grad = torch.randn_like(x)
    _ok(torch.library.opcheck(torch.ops.moe_kernels.unpermute_backward.default,
                              (grad, y, s.inverse, w if with_weights else None)))


# --- NaN isolation --------------------------------------------------------------------------------
def test_unpermute_nan_row_isolated(backend):
    T, k, E, D = 29, 3, 7, 6
    s = ops.sort_by_expert(ids_sentinel(T, k, E), E, 9)
    y = torch.randn(T * k, D, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(T, k, dtype=torch.float64) + 0.1).requires_grad_()
    g = torch.randn(T, D, dtype=torch.float64)
    clean = ops.unpermute(y, s, w)
    clean_gw = torch.autograd.grad(clean, w, g)[0]
    kept = (s.inverse >= 0).nonzero().tolist()
    t0, j0 = kept[len(kept) // 2]
    assert len(kept) < T * k, "the case needs a not-kept row"

    # a NaN in a kept row reaches its own token only
    bad = y.detach().clone()
    bad[s.inverse[t0, j0]] = float("nan")
    bad.requires_grad_()
    out = ops.unpermute(bad, s, w)
    others = torch.arange(T) != t0
    assert out[t0].isnan().all()
    assert torch.equal(out[others], clean[others])
    gw = torch.autograd.grad(out, w, g)[0]
    assert gw[t0, j0].isnan()
    assert torch.equal(gw[others], clean_gw[others])

    # a NaN in a row no token keeps reaches nobody
    bad = y.detach().clone()
    bad[s.offsets[-1]:] = float("nan")
    out = ops.unpermute(bad.requires_grad_(), s, w)
    assert torch.equal(out, clean)
    assert torch.equal(torch.autograd.grad(out, w, g)[0], clean_gw)


def test_permute_backward_nan_isolated(backend):
    # a NaN in the gradient of one kept row reaches only the token that owns it
    T, k, E, D = 29, 3, 7, 6
    s = ops.sort_by_expert(rand_experts(T, k, E), E)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T * k, D, dtype=torch.float64)
    clean = torch.autograd.grad(ops.permute(x, s), x, g)[0]
    t0 = int(s.order[17]) // k
    g[17] = float("nan")
    got = torch.autograd.grad(ops.permute(x, s), x, g)[0]
    others = torch.arange(T) != t0
    assert got[t0].isnan().all()
    assert torch.equal(got[others], clean[others])


# --- bad input ------------------------------------------------------------------------------------
def _experts():
    return rand_experts(6, 2, 4)


SORT_BAD = [
    pytest.param(lambda: (_experts().double(), 4, None), TypeError, "experts", id="experts-float"),
    pytest.param(lambda: (torch.arange(6), 4, None), ValueError, "experts", id="experts-1d"),
    pytest.param(lambda: (torch.zeros(2, 3, 2, dtype=torch.int64), 4, None), ValueError, "experts", id="experts-3d"),
    pytest.param(lambda: ([[0, 1]], 4, None), TypeError, "experts", id="experts-list"),
    pytest.param(lambda: (_experts(), 0, None), ValueError, "num_experts", id="num_experts-0"),
    pytest.param(lambda: (_experts(), 4.0, None), ValueError, "num_experts", id="num_experts-float"),
    pytest.param(lambda: (_experts(), 4, -1), ValueError, "capacity", id="capacity-negative"),
    pytest.param(lambda: (_experts(), 4, 2.5), ValueError, "capacity", id="capacity-float"),
    pytest.param(lambda: (_experts(), 4, True), ValueError, "capacity", id="capacity-bool"),
]


@pytest.mark.parametrize("make,exc,match", SORT_BAD)
def test_sort_by_expert_bad_input(make, exc, match):
    experts, E, capacity = make()
    with pytest.raises(exc, match=match):
        ops.sort_by_expert(experts, E, capacity)


def _perm_bad(kind):
    s = ops.sort_by_expert(_experts(), 4)      # T=6, k=2
    if kind == "x-1d":
        return lambda: ops.permute(torch.randn(6), s)
    if kind == "x-tokens":
        return lambda: ops.permute(torch.randn(7, 3), s)
    if kind == "y-rows":
        return lambda: ops.unpermute(torch.randn(11, 3), s)
    if kind == "y-1d":
        return lambda: ops.unpermute(torch.randn(12), s)
    if kind == "weights-shape":
        return lambda: ops.unpermute(torch.randn(12, 3), s, torch.rand(2, 6))
    if kind == "weights-1d":
        return lambda: ops.unpermute(torch.randn(12, 3), s, torch.rand(12))
    if kind == "weights-int":
        return lambda: ops.unpermute(torch.randn(12, 3), s, torch.ones(6, 2, dtype=torch.int64))
    raise AssertionError(kind)


PERM_BAD = [
    pytest.param("x-1d", ValueError, "x must have 2 dimensions", id="x-1d"),
    pytest.param("x-tokens", ValueError, "x has 7 tokens", id="x-inverse-token-mismatch"),
    pytest.param("y-rows", ValueError, "y must have T\\*k = 12 rows", id="y-wrong-rows"),
    pytest.param("y-1d", ValueError, "y must have 2 dimensions", id="y-1d"),
    pytest.param("weights-shape", ValueError, "weights must have shape", id="weights-wrong-shape"),
    pytest.param("weights-1d", ValueError, "weights must have shape", id="weights-1d"),
    pytest.param("weights-int", TypeError, "weights must have dtype", id="weights-int"),
]


@pytest.mark.parametrize("kind,exc,match", PERM_BAD)
def test_permute_unpermute_bad_input(kind, exc, match):
    call = _perm_bad(kind)
    with pytest.raises(exc, match=match):
        call()


# --- the backends on metadata that no Sorted check saw (torch.compile skips it) ----------------------------------
def _unpermute_backward_of(backend):
    from moe_kernels.reference import permutation as ref_perm
    if backend == "native":
        return lambda *args: torch.ops.moe_kernels_C.unpermute_backward(*args)
    return ref_perm.unpermute_backward


def _dirty_allocator(shape, dtype):
    """Frees a few NaN-filled blocks of this size first, so memory an op takes without writing it is likely to hold
    NaN rather than the zeros of fresh pages."""
    for _ in range(4):
        torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("with_weights", [False, True], ids=["", "weights"])
def test_unpermute_backward_sums_pairs_that_share_a_row(backend, with_weights):
    # every pair of 4 tokens points at row 0 of 8: row 0's gradient is the sum of all 8 pairs' gradients, rows 1..7
    # are no pair's (zero). The native op once returned rows 1..7 unwritten (it zeroed only rows past the kept count).
    T, k, D = 4, 2, 3
    inverse = torch.zeros(T, k, dtype=torch.int32)
    y, grad = torch.randn(T * k, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    w = torch.rand(T, k, dtype=torch.float64) if with_weights else None
    _dirty_allocator((T * k, D), torch.float64)
    grad_y, grad_w = _unpermute_backward_of(backend)(grad, y, inverse, w)
    want = torch.zeros(T * k, D, dtype=torch.float64)
    want[0] = (grad.unsqueeze(1) * (w if with_weights else torch.ones(T, k, dtype=torch.float64)).unsqueeze(-1)).sum((0, 1))
    torch.testing.assert_close(grad_y, want, rtol=1e-12, atol=1e-12)
    if with_weights:
        torch.testing.assert_close(grad_w, (grad @ y[0]).unsqueeze(1).expand(T, k), rtol=1e-12, atol=1e-12)


def test_unpermute_backward_rows_past_the_kept_count(backend):
    # pairs on rows [n_kept, N) (a caller's inverse): those rows get their pair's gradient, the kept-count rows
    # no pair points at stay zero
    T, k, D = 3, 2, 4
    inverse = torch.tensor([[5, -1], [0, 4], [-1, -1]], dtype=torch.int32)
    y, grad = torch.randn(T * k, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    _dirty_allocator((T * k, D), torch.float64)
    grad_y, _ = _unpermute_backward_of(backend)(grad, y, inverse, None)
    want = torch.zeros(T * k, D, dtype=torch.float64)
    want[5], want[0], want[4] = grad[0], grad[1], grad[1]
    torch.testing.assert_close(grad_y, want, rtol=0, atol=0)


# --- a caller's Sorted is checked where an op takes it -----------------------------------------------------------
def _user_sorted(T=5, k=2, E=3, capacity=None):
    """A valid Sorted as a caller builds it (a plain Sorted of sort_by_expert's tensors) and x [T, 4]."""
    s = ops.sort_by_expert(rand_experts(T, k, E), E, capacity)
    return ops.Sorted(s.order.clone(), s.inverse.clone(), s.offsets.clone()), torch.randn(T, 4, dtype=torch.float64)


def test_a_valid_callers_sorted_runs_as_the_packages_own(backend):
    s, x = _user_sorted(capacity=2)
    made = ops.sort_by_expert(torch.zeros(1, 1, dtype=torch.long), 1)
    assert type(made) is not ops.Sorted and isinstance(made, ops.Sorted)     # the package's own: never re-checked
    y = ops.permute(x, s)
    assert torch.equal(ops.unpermute(y, s), ops.unpermute(ops.permute(x, s), s))


@pytest.mark.parametrize("case, match", [
    ("repeated-row", r"sorted.inverse must give each of the 8 kept rows to exactly one pair, got 8 kept pairs on 1"),
    ("offsets-start", r"sorted.offsets must be non-decreasing from 0"),
    ("offsets-decrease", r"sorted.offsets must be non-decreasing from 0"),
    ("offsets-past-pairs", r"sorted.offsets must be non-decreasing from 0 to the kept count <= T\*k = 10"),
    ("inverse-past-kept", r"sorted.inverse must hold a row in \[0, \d+\) .* or -1 for each pair, got \d+ at pair"),
    ("inverse-below-sentinel", r"sorted.inverse must hold a row .*got -2 at pair 3 \(token 1, slot 1\)"),
    ("order-not-inverse", r"sorted.order must map each kept row back to its pair"),
    ("int64", r"sorted.inverse must have dtype in \(int32\)"),
    ("order-shape", r"sorted.order must have shape \(10\)"),
])
def test_a_callers_invalid_sorted_is_refused_by_name(case, match):
    s, x = _user_sorted()
    order, inverse, offsets = s
    if case == "repeated-row":      # the example of a Sorted that made unpermute's backward read unwritten rows
        x = torch.randn(4, 4, dtype=torch.float64)
        order, inverse, offsets = (torch.arange(8, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int32),
                                   torch.tensor([0, 8], dtype=torch.int32))
    elif case == "offsets-start":
        offsets = offsets + 1
    elif case == "offsets-decrease":
        offsets = offsets.flip(0)
    elif case == "offsets-past-pairs":
        offsets = offsets.clone()
        offsets[-1] = 11
    elif case == "inverse-past-kept":
        inverse = inverse.clone()
        inverse[2, 0] = 10
    elif case == "inverse-below-sentinel":
        inverse = inverse.clone()
        inverse[1, 1] = -2
    elif case == "order-not-inverse":
        order = order.clone()
        order[[0, 1]] = order[[1, 0]]
    elif case == "int64":
        inverse = inverse.long()
    elif case == "order-shape":
        order = order[:-1]
    bad = ops.Sorted(order, inverse, offsets)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.permute(x, bad)
    y = torch.randn(order.shape[0] if case != "order-shape" else 10, 4, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.unpermute(y, bad)
