"""The triton backend of the permutation family (moe_kernels/triton/permutation.py), through the public ops,
against the reference backend: sort_by_expert bit-identical, permute / unpermute forward and backward exact where
the arithmetic is the same (gathers, slot-order sums, single products) and within the earned tolerance where
the order of a sum differs (the grad_w dot products, weighted sums in 16 bits).

Every triton call runs with torch.empty poisoned (NaN / -2**30), so an output element a kernel forgets to write
shows up as a difference from the reference. Under TRITON_INTERPRET=1 (tests/conftest.py) the kernels run on CPU
tensors; shapes are kept small for the interpreter.
"""
import contextlib

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import ops  # noqa: E402
from tests.helpers import assert_earned, poisoned_empty, rand_experts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("sort_by_expert", "permute", "permute_backward", "unpermute", "unpermute_backward")


@contextlib.contextmanager
def triton_backend():
    with moe_kernels.use_backend("triton"), poisoned_empty():
        yield


def on_ref(fn, *args):
    with moe_kernels.use_backend("reference"):
        return fn(*args)


def on_triton(fn, *args):
    with triton_backend():
        return fn(*args)


def test_triton_backend_registered():
    impl = moe_kernels.backends()["ops"]
    for op in OPS:
        assert "triton" in impl[op]["implemented"], (op, impl[op])


# --- expert ids ------------------------------------------------------------------------------------
def ids_random(T, k, E):
    return rand_experts(T, k, E)                                   # distinct within a token, like top-k


def ids_dups(T, k, E):
    return torch.randint(0, E, (T, k))                             # repeated ids within a token


def ids_all_one(T, k, E):
    return torch.full((T, k), E // 2, dtype=torch.int64)           # every pair to one expert


def ids_few(T, k, E):
    return torch.randint(0, min(3, E), (T, k))                     # experts 3..E-1 empty


def ids_sentinel(T, k, E):
    ids = torch.randint(-1, E + 1, (T, k))                         # -1 and E: the expert-parallel sentinels
    if T:
        ids[0, 0], ids[-1, -1] = -1, E
    return ids


def ids_far(T, k, E):
    ids = torch.randint(0, E, (T, k))
    ids[::3, 0] = -(2**40)                                          # far outside [0, E) both ways (int64 only)
    ids[1::4, -1] = 2**40 + 5
    return ids


def _case(T, k, E, make, capacity=None, dtype=torch.int64, id=None):
    return pytest.param(T, k, E, make, capacity, dtype, id=id)


# the sort kernels work on blocks of SORT_BLOCK = 128 pairs and histogram buckets in chunks of 64
SORT_CASES = [
    _case(0, 2, 8, ids_random, id="T0-E8-k2"),                               # no tokens
    _case(0, 2, 8, ids_random, 3, id="T0-E8-k2-cap3"),                       # no tokens, capacity pass skipped
    _case(1, 2, 8, ids_random, id="T1-E8-k2"),                               # one token (decode)
    _case(1, 8, 8, ids_random, 0, id="T1-E8-k8-cap0"),                       # one token, k=E, nothing kept
    _case(20, 2, 6, ids_random, id="T20-E6-k2"),                             # N=40: less than one block
    _case(37, 3, 7, ids_random, id="T37-E7-k3"),                             # prime E, N=111 not a block multiple
    _case(37, 3, 7, ids_random, 4, id="T37-E7-k3-cap4"),                     # capacity drops later choices
    _case(64, 2, 5, ids_random, id="T64-E5-k2"),                             # N=128: exactly one block
    _case(128, 2, 5, ids_dups, 40, id="T128-E5-k2-dups-cap40"),              # N=256: exactly two blocks
    _case(16, 1, 13, ids_random, id="T16-E13-k1"),                           # k=1, prime E
    _case(9, 5, 5, ids_random, id="T9-E5-k5"),                               # k=E
    _case(12, 1, 1, ids_random, id="T12-E1-k1"),                             # E=1
    _case(150, 1, 1, ids_random, 100, id="T150-E1-k1-cap100"),               # E=1 over two blocks, capacity
    _case(90, 2, 6, ids_all_one, id="T90-E6-k2-all-to-one"),                 # one expert over two blocks
    _case(90, 2, 6, ids_all_one, 100, id="T90-E6-k2-all-to-one-cap100"),     # ... capacity cuts across blocks
    _case(60, 2, 16, ids_few, id="T60-E16-k2-empty-experts"),                # most experts empty
    _case(31, 4, 6, ids_dups, 5, id="T31-E6-k4-dups-cap5"),                  # repeated ids within a token
    _case(11, 2, 4, ids_random, 0, id="T11-E4-k2-cap0"),                     # capacity=0: nothing kept
    _case(11, 2, 4, ids_random, 50, id="T11-E4-k2-cap50"),                   # capacity > T: nothing dropped
    _case(23, 3, 6, ids_sentinel, id="T23-E6-k3-sentinel"),                  # ids -1 and E never kept
    _case(23, 3, 6, ids_sentinel, 3, id="T23-E6-k3-sentinel-cap3"),          # sentinels use no capacity
    _case(19, 2, 5, ids_far, 4, id="T19-E5-k2-far-ids-cap4"),                # ids beyond int32, int64
    _case(37, 3, 7, ids_sentinel, 4, torch.int32, id="T37-E7-k3-int32-sentinel-cap4"),   # int32 ids
    _case(300, 4, 61, ids_random, id="T300-E61-k4"),                         # N=1200: ten blocks
    _case(300, 4, 61, ids_sentinel, 15, id="T300-E61-k4-sentinel-cap15"),    # blocks + drops
    _case(250, 2, 130, ids_dups, 3, torch.int32, id="T250-E130-k2-int32-cap3"),  # E+1 > 64: 3 bucket chunks
]


def check_invariants(s, experts, E, capacity):
    T, k = experts.shape
    off = s.offsets.long()
    assert off[0] == 0 and bool((off[1:] >= off[:-1]).all()) and off[-1] <= T * k
    assert torch.equal(s.order.sort().values, torch.arange(T * k, dtype=torch.int32, device=s.order.device))
    assert int(s.dropped) == T * k - int(off[-1])
    flat = experts.reshape(-1).long()
    key = torch.bucketize(torch.arange(int(off[-1]), device=off.device), off[1:], right=True)
    assert torch.equal(flat[s.order[:off[-1]].long()], key)                  # rows of expert e hold id e
    kept = s.inverse >= 0
    assert int(kept.sum()) == int(off[-1])
    assert torch.equal(s.order[s.inverse[kept].long()],
                       torch.arange(T * k, dtype=torch.int32, device=kept.device)[kept.reshape(-1)])
    if capacity is not None:
        assert bool((off[1:] - off[:-1] <= capacity).all())


@pytest.mark.parametrize("T,k,E,make,capacity,dtype", SORT_CASES)
def test_sort_equals_reference(T, k, E, make, capacity, dtype):
    experts = make(T, k, E).to(dtype).to(DEVICE)
    ref = on_ref(ops.sort_by_expert, experts, E, capacity)
    out = on_triton(ops.sort_by_expert, experts, E, capacity)
    for a, b, name in zip(out, ref, ("order", "inverse", "offsets")):
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs from the reference"
    check_invariants(out, experts, E, capacity)


def test_sort_non_contiguous_and_deterministic():
    # a transposed view of the ids; two runs give the same bits
    T, k, E = 150, 3, 7
    experts = rand_experts(T, k, E).t().contiguous().t().to(DEVICE)
    assert not experts.is_contiguous()
    ref = on_ref(ops.sort_by_expert, experts, E, 30)
    a = on_triton(ops.sort_by_expert, experts, E, 30)
    b = on_triton(ops.sort_by_expert, experts, E, 30)
    for u, v, w in zip(a, b, ref):
        assert torch.equal(u, v) and torch.equal(u, w)


# --- permute / unpermute ---------------------------------------------------------------------------
# (T, k, E, make, capacity, D): D picks the row tile (<=32, <=64, >64) and 130 runs two steps of the D loop
ROW_CASES = [
    pytest.param(37, 3, 7, ids_random, None, 5, id="T37-E7-k3-D5"),                   # prime E, odd D
    pytest.param(37, 3, 7, ids_random, 4, 40, id="T37-E7-k3-cap4-D40"),               # dropped rows
    pytest.param(1, 2, 8, ids_random, None, 16, id="T1-E8-k2-D16"),                    # one token
    pytest.param(9, 5, 5, ids_sentinel, 2, 64, id="T9-E5-k5-sentinel-cap2-D64"),      # k=E, sentinels, drops
    pytest.param(11, 2, 4, ids_random, 0, 8, id="T11-E4-k2-cap0-D8"),                 # nothing kept
    pytest.param(150, 2, 13, ids_sentinel, 20, 33, id="T150-E13-k2-sentinel-cap20-D33"),  # many tiles
    pytest.param(13, 3, 6, ids_dups, None, 130, id="T13-E6-k3-dups-D130"),            # D loop of 2 steps
]


def _sorted(T, k, E, make, capacity):
    return on_ref(ops.sort_by_expert, make(T, k, E).to(DEVICE), E, capacity)


def grad_w_slack(gu, y, s, wdtype):
    """The grad_w dot products sum over D in another order than torch's: a rigorous bound on what the order can
    change, (D + 1) u sum_d |g_d y_d| with u the fp32 unit roundoff, plus one rounding step of weights' dtype."""
    T, k = s.inverse.shape
    kept = (s.inverse >= 0).unsqueeze(-1)
    rows = torch.where(kept, y.double()[s.inverse.long().clamp(min=0)], 0.0)          # [T, k, D]
    mag = (rows.abs() * gu.double().abs().unsqueeze(1)).sum(-1)
    u = torch.finfo(torch.float32).eps / 2
    return (y.shape[1] + 1) * u * mag + torch.finfo(wdtype).eps * mag


def _fwd_bwd(backend, x, y, w, s, gp, gu):
    """permute(x) and unpermute(y, w) forward, and their gradients for upstream gp, gu."""
    with moe_kernels.use_backend(backend), (poisoned_empty() if backend == "triton" else contextlib.nullcontext()):
        x = x.detach().requires_grad_()
        y = y.detach().requires_grad_()
        w = None if w is None else w.detach().requires_grad_()
        p = ops.permute(x, s)
        u = ops.unpermute(y, s, w)
        (gx,) = torch.autograd.grad(p, x, gp)
        grads = torch.autograd.grad(u, (y,) if w is None else (y, w), gu)
    return p.detach(), u.detach(), gx, grads[0], (None if w is None else grads[1])


@pytest.mark.parametrize("T,k,E,make,capacity,D", ROW_CASES)
@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "sum"])
def test_rows_fp32(T, k, E, make, capacity, D, with_weights):
    s = _sorted(T, k, E, make, capacity)
    x = torch.randn(T, D, device=DEVICE)
    y = torch.randn(T * k, D, device=DEVICE)
    w = torch.rand(T, k, device=DEVICE) + 0.1 if with_weights else None
    gp = torch.randn(T * k, D, device=DEVICE)
    gu = torch.randn(T, D, device=DEVICE)
    p, u, gx, gy, gw = _fwd_bwd("triton", x, y, w, s, gp, gu)
    rp, ru, rgx, rgy, rgw = _fwd_bwd("reference", x, y, w, s, gp, gu)
    # gathers, slot-order sums and single products: the same arithmetic, the same bits
    assert torch.equal(p, rp), "permute"
    assert torch.equal(gx, rgx), "permute backward"
    assert torch.equal(gy, rgy), "unpermute backward, grad y"
    if w is None:
        assert torch.equal(u, ru), "unpermute (sum)"
        return
    # w * y + acc may be contracted into an FMA on a GPU: earned tolerance, against float64
    r64 = _fwd_bwd("reference", x.double(), y.double(), w.double(), s, gp.double(), gu.double())
    assert_earned(u, r64[1], ru, name="unpermute")
    # the dot products of grad_w sum over D in another order than torch
    assert gw.dtype == w.dtype
    assert_earned(gw, r64[4], rgw, atol=grad_w_slack(gu, y, s, w.dtype), name="grad w")


@pytest.mark.parametrize("ydtype,wdtype", [(torch.float16, torch.float32), (torch.float16, torch.float16),
                                            (torch.float32, torch.float64), (torch.float64, torch.float64)],
                         ids=["fp16-w32", "fp16-w16", "fp32-w64", "fp64-w64"])
def test_rows_dtypes(ydtype, wdtype):
    T, k, E, D = 45, 3, 7, 24
    s = _sorted(T, k, E, ids_sentinel, 14)
    x = torch.randn(T, D, device=DEVICE).to(ydtype)
    y = torch.randn(T * k, D, device=DEVICE).to(ydtype)
    w = (torch.rand(T, k, device=DEVICE) + 0.1).to(wdtype)
    gp = torch.randn(T * k, D, device=DEVICE).to(ydtype)
    gu = torch.randn(T, D, device=DEVICE).to(ydtype)
    p, u, gx, gy, gw = _fwd_bwd("triton", x, y, w, s, gp, gu)
    rp, ru, rgx, rgy, rgw = _fwd_bwd("reference", x, y, w, s, gp, gu)
    r64 = _fwd_bwd("reference", x.double(), y.double(), w.double(), s, gp.double(), gu.double())
    assert p.dtype == u.dtype == gx.dtype == gy.dtype == ydtype and gw.dtype == wdtype
    assert torch.equal(p, rp), "permute is a gather"
    assert torch.equal(gx, rgx), "permute backward: slot-order sum in the same accumulator"
    assert_earned(u, r64[1], ru, name="unpermute")
    assert_earned(gy, r64[3], rgy, name="grad y")
    assert_earned(gw, r64[4], rgw, atol=grad_w_slack(gu, y, s, wdtype), name="grad w")


def test_rows_non_contiguous():
    # transposed views of x, y and weights are read in logical order
    T, k, E, D = 29, 3, 7, 12
    s = _sorted(T, k, E, ids_random, None)
    x = torch.randn(D, T, device=DEVICE).t()
    y = torch.randn(D, T * k, device=DEVICE).t()
    w = torch.rand(k, T, device=DEVICE).t() + 0.1
    assert not (x.is_contiguous() or y.is_contiguous() or w.is_contiguous())
    assert torch.equal(on_triton(ops.permute, x, s), on_ref(ops.permute, x, s))
    assert torch.equal(on_triton(ops.unpermute, y, s, None), on_ref(ops.unpermute, y, s, None))
    ref64 = on_ref(ops.unpermute, y.double(), s, w.double())
    assert_earned(on_triton(ops.unpermute, y, s, w), ref64, on_ref(ops.unpermute, y, s, w))


def test_empty_tokens():
    # T=0: every op returns empty results of the right shapes
    k, E, D = 2, 8, 16
    experts = torch.empty(0, k, dtype=torch.int64, device=DEVICE)
    s = on_triton(ops.sort_by_expert, experts, E, None)
    assert s.order.shape == (0,) and s.inverse.shape == (0, k) and torch.equal(s.offsets, torch.zeros_like(s.offsets))
    x = torch.randn(0, D, device=DEVICE, requires_grad=True)
    y = torch.randn(0, D, device=DEVICE, requires_grad=True)
    w = torch.rand(0, k, device=DEVICE, requires_grad=True)
    with triton_backend():
        p = ops.permute(x, s)
        u = ops.unpermute(y, s, w)
        assert p.shape == (0, D) and u.shape == (0, D)
        gx, = torch.autograd.grad(p.sum(), x)
        gy, gw = torch.autograd.grad(u.sum(), (y, w))
    assert gx.shape == (0, D) and gy.shape == (0, D) and gw.shape == (0, k)


# --- NaN isolation and determinism ---------------------------------------------------------------------
def test_nan_isolation():
    T, k, E, D = 60, 3, 7, 20
    s = _sorted(T, k, E, ids_sentinel, 18)
    n_kept = int(s.offsets[-1])
    assert n_kept < T * k, "the case needs rows no pair keeps"
    y = torch.randn(T * k, D, device=DEVICE)
    w = torch.rand(T, k, device=DEVICE) + 0.1
    gu = torch.randn(T, D, device=DEVICE)
    clean = _fwd_bwd("triton", torch.randn(T, D), y, w, s, torch.randn(T * k, D), gu)

    # NaN in the rows no pair keeps: nothing changes, forward or backward
    bad = y.clone()
    bad[n_kept:] = float("nan")
    got = _fwd_bwd("triton", torch.randn(T, D), bad, w, s, torch.randn(T * k, D), gu)
    assert torch.equal(got[1], clean[1]) and torch.equal(got[3], clean[3]) and torch.equal(got[4], clean[4])

    # NaN in one kept row: only its token's output and that pair's grad_w
    t0, j0 = (s.inverse >= 0).nonzero()[0].tolist()
    bad = y.clone()
    bad[s.inverse[t0, j0]] = float("nan")
    got = _fwd_bwd("triton", torch.randn(T, D), bad, w, s, torch.randn(T * k, D), gu)
    others = torch.arange(T, device=DEVICE) != t0
    assert got[1][t0].isnan().all() and torch.equal(got[1][others], clean[1][others])
    assert got[4][t0, j0].isnan()
    gw_mask = torch.ones(T, k, dtype=torch.bool, device=DEVICE)
    gw_mask[t0, j0] = False
    assert torch.equal(got[4][gw_mask], clean[4][gw_mask])

    # NaN in the upstream gradient of a dropped pair's row of permute reaches no token
    x = torch.randn(T, D, device=DEVICE)
    gp = torch.randn(T * k, D, device=DEVICE)
    base = _fwd_bwd("triton", x, y, w, s, gp, gu)[2]
    gp_bad = gp.clone()
    gp_bad[n_kept:] = float("nan")
    assert torch.equal(_fwd_bwd("triton", x, y, w, s, gp_bad, gu)[2], base)


def test_deterministic():
    T, k, E, D = 200, 4, 13, 40
    experts = ids_sentinel(T, k, E).to(DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    y = torch.randn(T * k, D, device=DEVICE)
    w = torch.rand(T, k, device=DEVICE)
    gp = torch.randn(T * k, D, device=DEVICE)
    gu = torch.randn(T, D, device=DEVICE)
    runs = []
    for _ in range(2):
        s = on_triton(ops.sort_by_expert, experts, E, 50)
        runs.append(tuple(s) + _fwd_bwd("triton", x, y, w, s, gp, gu))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_aot_configs_cover_launchers():
    # every entry names a kernel of the module and a signature for each of its parameters
    from moe_kernels.triton import permutation as tri

    names = set()
    for e in tri.AOT_CONFIGS:
        assert e["name"] not in names, e["name"]
        names.add(e["name"])
        params = e["fn"].arg_names
        assert list(e["signature"]) == list(params), e["name"]
        assert set(e["constexprs"]) == {p for p, ty in e["signature"].items() if ty == "constexpr"}, e["name"]
    kernels = {e["fn"] for e in tri.AOT_CONFIGS}
    assert kernels == {tri._sort_hist_kernel, tri._sort_capacity_kernel, tri._sort_scatter_kernel, tri._permute_kernel,
                       tri._unpermute_kernel, tri._unpermute_backward_kernel}
