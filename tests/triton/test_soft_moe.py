"""The triton backend of the soft ops (moe_kernels/triton/soft_moe.py): soft_dispatch, soft_combine and their
backwards through the public API, forward and every gradient (x, phi, y).

Oracle: the reference backend in float64 on the same inputs (ref64). Results pass on FlashAttention's earned
tolerance |triton - ref64| <= 2 |reference in the same dtype - ref64| + atol, with atol = sqrt(n) ulps of the
largest sum of |terms| behind a result (tests/helpers.reordered_sum_atol on term_magnitudes; n = D + N + S, the
lengths of the sums a result goes through): elementwise in fp32, over the whole tensor in fp16
(tests/helpers.assert_earned / assert_earned_max). Every output the launchers allocate is poisoned with NaN first
(tests/helpers.poisoned_empty), so an element a kernel never writes fails the comparison.

Under TRITON_INTERPRET=1 (tests/conftest.py) the kernels run on CPU tensors, slowly: shapes are small, most cases
run the production tiles, and the `small_tiles` cases pin 16-wide tiles so that every loop of every kernel (key
blocks with the online softmax, D chunks, column blocks, query blocks, the batch loop of a shared phi) runs more
than once. bf16 (whose tl.dot is wrong in the interpreter) is tested in the CUDA section at the bottom.
"""
import math

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import _backend, ops  # noqa: E402
from moe_kernels.triton import soft_moe as tri  # noqa: E402
from tests.helpers import assert_earned, assert_earned_max, poisoned_empty, reordered_sum_atol  # noqa: E402

F64 = torch.float64


# --- inputs -------------------------------------------------------------------------------------------------
def make_masks(B, N, S, kind):
    """(mask [B, N], slot_mask [B, S]) or None each. About 30% masked, at least one token and one slot kept per row;
    "dead": token row 0 fully masked and slot row 1 fully masked (B >= 3: row 2 stays ordinary)."""
    mask = slot_mask = None
    if kind in ("tokens", "both", "dead"):
        mask = torch.rand(B, N) > 0.3
        mask[torch.arange(B), torch.randint(N, (B,))] = True
    if kind in ("slots", "both", "dead"):
        slot_mask = torch.rand(B, S) > 0.3
        slot_mask[torch.arange(B), torch.randint(S, (B,))] = True
    if kind == "dead":
        mask[0] = False
        slot_mask[1] = False
    return mask, slot_mask


def make_inputs(B, N, D, S, Dv, phi_kind, dtype):
    """x [B, N, D], phi [S, D] or [B, S, D] at 2/sqrt(D) (logits of spread ~2), y [B, S, Dv], in `dtype`."""
    x = torch.randn(B, N, D)
    phi = torch.randn(*((B,) if phi_kind == "phi3d" else ()), S, D) * (2 / math.sqrt(D))
    y = torch.randn(B, S, Dv)
    return x.to(dtype), phi.to(dtype), y.to(dtype)


NAMES = ("slots", "dispatch grad x", "dispatch grad phi", "out", "combine grad x", "combine grad phi",
         "combine grad y")


def run(backend, x, phi, y, mask, slot_mask, g_slots, g_out, dtype):
    """Forward and gradients of dispatch and combine on `backend`, inputs cast to `dtype` -> 7 tensors (NAMES)."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (x, phi, y)]
    with moe_kernels.use_backend(backend):
        slots = ops.soft_dispatch(leaves[0], leaves[1], mask, slot_mask)
        gx, gphi = torch.autograd.grad(slots, leaves[:2], g_slots.to(dtype))
        out = ops.soft_combine(leaves[0], leaves[1], leaves[2], mask, slot_mask)
        cgx, cgphi, cgy = torch.autograd.grad(out, leaves, g_out.to(dtype))
    return slots.detach(), gx, gphi, out.detach(), cgx, cgphi, cgy


def term_magnitudes(x, phi, y, mask, slot_mask, g_slots, g_out):
    """For each of NAMES, float64: the same sums as the result with every term taken in absolute value (dS's
    P (dP - Delta) as P (|dP| + |Delta|)): the scale a sum in another order perturbs. A result can cancel far below
    it (dispatch's phi gradient at N = 1 is zero: a softmax over one token has no gradient)."""
    x, phi, y, g_slots, g_out = (t.double() for t in (x, phi, y, g_slots, g_out))
    B, N, D = x.shape
    phi_b = phi.expand(B, *phi.shape[-2:])
    logits = torch.einsum("bnd,bsd->bns", x, phi_b)
    live = torch.ones_like(logits, dtype=torch.bool)
    if mask is not None:
        live &= mask[:, :, None]
    if slot_mask is not None:
        live &= slot_mask[:, None, :]
    logits = logits.masked_fill(~live, -torch.finfo(F64).max)

    def reduce_phi(g):
        return g.sum(0) if phi.dim() == 2 else g

    p = logits.softmax(1)                                           # dispatch: over tokens
    dp = torch.einsum("bnd,bsd->bns", x, g_slots)
    ds = (p * (dp.abs() + (dp * p).sum(1, keepdim=True).abs())).masked_fill(~live, 0)
    dispatch = (p.transpose(1, 2) @ x.abs(), p @ g_slots.abs() + ds @ phi_b.abs(),
                reduce_phi(ds.transpose(1, 2) @ x.abs()))
    p = logits.softmax(2)                                           # combine: over slots
    dp = g_out @ y.transpose(1, 2)
    ds = (p * (dp.abs() + (dp * p).sum(2, keepdim=True).abs())).masked_fill(~live, 0)
    combine = (p @ y.abs(), ds @ phi_b.abs(), reduce_phi(ds.transpose(1, 2) @ x.abs()),
               p.transpose(1, 2) @ g_out.abs())
    return dispatch + combine


def check_case(B, N, D, S, Dv, phi_kind, mask_kind, dtype):
    """Triton (poisoned outputs) vs ref64 on the earned tolerance, forward and every gradient."""
    x, phi, y = make_inputs(B, N, D, S, Dv, phi_kind, dtype)
    mask, slot_mask = make_masks(B, N, S, mask_kind)
    g_slots, g_out = torch.randn(B, S, D).to(dtype), torch.randn(B, N, Dv).to(dtype)
    with poisoned_empty():
        fast = run("triton", x, phi, y, mask, slot_mask, g_slots, g_out, dtype)
    ref64 = run("reference", x, phi, y, mask, slot_mask, g_slots, g_out, F64)
    same = run("reference", x, phi, y, mask, slot_mask, g_slots, g_out, dtype)
    mags = term_magnitudes(x, phi, y, mask, slot_mask, g_slots, g_out)
    for name, f, r, s, m in zip(NAMES, fast, ref64, same, mags):
        assert f.dtype == dtype and f.shape == r.shape == m.shape, (name, f.dtype, f.shape, r.shape)
        atol = reordered_sum_atol(m, dtype, D + N + S)
        (assert_earned if dtype == torch.float32 else assert_earned_max)(f, r, s, atol=atol, name=name)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles for every kernel: small shapes then run every loop of every kernel more than once."""
    tiles = tri.Config(16, 16, 16, 16, 4, 1)
    monkeypatch.setattr(tri, "CONFIGS", {k: {"16": tiles, "32": tiles} for k in tri.CONFIGS})


# --- forward and gradients against float64 ------------------------------------------------------------------
# phi [S, D] shared by the batch (its gradient reduced over the batch in the kernels) under every mask kind;
# phi [B, S, D] without and with masks
FP32_CASES = [("phi2d", m) for m in ("none", "tokens", "slots", "both", "dead")] + [("phi3d", "none"),
                                                                                     ("phi3d", "dead")]


@pytest.mark.parametrize("phi_kind, mask_kind", FP32_CASES)
def test_fp32_matches_float64(phi_kind, mask_kind):
    # N = 37, S = 11, D = 40: no dimension a multiple of a tile (D = 40 is a 32-chunk and a partial 8-chunk)
    B = 3 if mask_kind == "dead" else 2
    check_case(B, 37, 40, 11, 40, phi_kind, mask_kind, torch.float32)


@pytest.mark.parametrize("phi_kind, mask_kind", [("phi2d", "both"), ("phi3d", "dead")])
def test_fp16_matches_float64(phi_kind, mask_kind):
    check_case(3, 37, 40, 11, 40, phi_kind, mask_kind, torch.float16)


EDGES = [
    pytest.param(1, 1, 24, 5, 24, "phi3d", "tokens", id="B1-N1"),        # one batch row, one token
    pytest.param(2, 19, 24, 1, 24, "phi2d", "both", id="S1"),            # one slot: dispatch's logits are 1 x N
    pytest.param(2, 13, 24, 6, 70, "phi3d", "slots", id="Dv70"),         # combine's y wider than D, Dv odd
]


@pytest.mark.parametrize("B, N, D, S, Dv, phi_kind, mask_kind", EDGES)
def test_edge_shapes_match_float64(B, N, D, S, Dv, phi_kind, mask_kind):
    check_case(B, N, D, S, Dv, phi_kind, mask_kind, torch.float32)


def test_every_loop_twice_matches_float64(small_tiles):
    # 16-wide tiles: S = 17, N = 20 are two query / key blocks each way, D = 20 two chunks and two column blocks,
    # Dv = 18 two column blocks of combine; the shared phi runs the batch loop of its gradient in both ops
    check_case(3, 20, 20, 17, 18, "phi2d", "dead", torch.float32)


def test_dead_rows_are_uniform_averages():
    # a fully masked token row in dispatch and a fully masked slot row in combine give the plain mean
    B, N, D, S = 3, 37, 40, 11
    x, phi, y = make_inputs(B, N, D, S, D, "phi2d", torch.float32)
    mask, slot_mask = make_masks(B, N, S, "dead")
    with moe_kernels.use_backend("triton"):
        slots = ops.soft_dispatch(x, phi, mask, slot_mask)
        out = ops.soft_combine(x, phi, y, mask, slot_mask)
    torch.testing.assert_close(slots[0], x[0].mean(0).expand(S, D))     # every token of row 0 masked
    torch.testing.assert_close(slots[1], x[1].mean(0).expand(S, D))     # every slot of row 1 masked
    torch.testing.assert_close(out[0], y[0].mean(0).expand(N, D))       # masked tokens average all slots
    torch.testing.assert_close(out[1], y[1].mean(0).expand(N, D))       # no slot to weigh in row 1
    masked_tokens = ~mask[2]
    torch.testing.assert_close(out[2][masked_tokens], y[2].mean(0).expand(int(masked_tokens.sum()), D))


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_saved_lse_matches_float64(op):
    # the forward op's second output: logsumexp of each live query row's masked logits (dispatch: per slot over
    # tokens, combine: per token over slots), fp32
    B, N, D, S = 3, 37, 40, 11
    x, phi, y = make_inputs(B, N, D, S, D, "phi3d", torch.float32)
    mask, slot_mask = make_masks(B, N, S, "dead")
    args = (x, phi, mask, slot_mask) if op == "dispatch" else (x, phi, y, mask, slot_mask)
    fn = getattr(torch.ops.moe_kernels, f"soft_{op}")
    results = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("reference", F64)):
        with moe_kernels.use_backend(backend):
            results[backend, dtype] = fn(*(t.to(dtype) if t.is_floating_point() else t for t in args))[1]
    fast, same, ref64 = results["triton", torch.float32], results["reference", torch.float32], results["reference", F64]
    assert fast.shape == ((B, S) if op == "dispatch" else (B, N)) and fast.dtype == torch.float32
    q_keep, k_any = (slot_mask, mask.any(1)) if op == "dispatch" else (mask, slot_mask.any(1))
    live = q_keep & k_any[:, None]
    assert_earned(fast[live], ref64[live], same[live], atol=reordered_sum_atol(ref64[live], torch.float32, D + N),
                  name="lse")


def test_no_tokens():
    # N = 0: the slots are the empty sum (zeros, as the reference's), and phi's gradient is zero
    x, phi, y = make_inputs(2, 0, 24, 5, 24, "phi2d", torch.float32)
    leaves = [t.requires_grad_() for t in (x, phi)]
    with poisoned_empty(), moe_kernels.use_backend("triton"):
        slots = ops.soft_dispatch(*leaves)
        gx, gphi = torch.autograd.grad(slots, leaves, torch.randn(2, 5, 24))
    assert torch.equal(slots, torch.zeros(2, 5, 24))
    assert gx.shape == (2, 0, 24) and torch.equal(gphi, torch.zeros(5, 24))


def test_float64_runs_the_reference():
    x, phi, y = make_inputs(2, 7, 6, 3, 6, "phi3d", F64)
    mask, slot_mask = make_masks(2, 7, 3, "both")
    g_slots, g_out = torch.randn(2, 3, 6, dtype=F64), torch.randn(2, 7, 6, dtype=F64)
    for a, b in zip(run("triton", x, phi, y, mask, slot_mask, g_slots, g_out, F64),
                    run("reference", x, phi, y, mask, slot_mask, g_slots, g_out, F64)):
        assert torch.equal(a, b)


# --- determinism, registration, graph capture ---------------------------------------------------------------
def test_deterministic():
    # no atomics: two runs are bit-identical, the batch-reduced gradient of the shared phi included
    x, phi, y = make_inputs(2, 37, 40, 11, 40, "phi2d", torch.float32)
    mask, slot_mask = make_masks(2, 37, 11, "both")
    g_slots, g_out = torch.randn(2, 11, 40), torch.randn(2, 37, 40)
    first = run("triton", x, phi, y, mask, slot_mask, g_slots, g_out, torch.float32)
    second = run("triton", x, phi, y, mask, slot_mask, g_slots, g_out, torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_triton_backend_registered():
    for op in ("soft_dispatch", "soft_dispatch_backward", "soft_combine", "soft_combine_backward"):
        assert _backend.IMPLS[op]["triton"] is getattr(tri, op), op


def test_opcheck_on_triton():
    B, N, D, S = 2, 6, 5, 3
    x, phi, y = make_inputs(B, N, D, S, D, "phi2d", torch.float32)
    mask, slot_mask = make_masks(B, N, S, "both")
    with moe_kernels.use_backend("triton"):
        slots, lse = torch.ops.moe_kernels.soft_dispatch(x, phi, mask, slot_mask)
        torch.library.opcheck(torch.ops.moe_kernels.soft_dispatch_backward,
                              (torch.randn(B, S, D), x, phi, slots, lse, mask, slot_mask))
        torch.library.opcheck(torch.ops.moe_kernels.soft_dispatch,
                              (x.clone().requires_grad_(), phi.clone().requires_grad_(), mask, slot_mask))
        out, lse = torch.ops.moe_kernels.soft_combine(x, phi, y, mask, slot_mask)
        torch.library.opcheck(torch.ops.moe_kernels.soft_combine_backward,
                              (torch.randn(B, N, D), x, phi, y, out, lse, mask, slot_mask))
        torch.library.opcheck(torch.ops.moe_kernels.soft_combine,
                              (x.clone().requires_grad_(), phi.clone().requires_grad_(), y.clone().requires_grad_(),
                               mask, slot_mask))


def _soft_layer(x, phi, mask, slot_mask):
    slots = ops.soft_dispatch(x, phi, mask, slot_mask)
    return ops.soft_combine(x, phi, torch.tanh(slots) * 2, mask, slot_mask)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, phi, _ = make_inputs(2, 13, 24, 5, 24, "phi2d", torch.float32)
    mask, slot_mask = make_masks(2, 13, 5, "both")
    grad = torch.randn(2, 13, 24)
    compiled = torch.compile(_soft_layer, fullgraph=True, backend="aot_eager")
    results = []
    with moe_kernels.use_backend("triton"):
        for fn in (compiled, _soft_layer):
            leaves = [x.clone().requires_grad_(), phi.clone().requires_grad_()]
            out = fn(*leaves, mask, slot_mask)
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the real size, on a GPU -------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU (wrong in the interpreter)")
def test_bf16_real_size_on_gpu():
    # compiled kernels at the production tiles: several blocks in every dimension, D = 1024 in 4 or 8 column blocks
    with torch.device("cuda"):
        check_case(2, 2048, 1024, 1024, 1024, "phi3d", "both", torch.bfloat16)
