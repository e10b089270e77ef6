"""moe_kernels.ops.soft_dispatch / soft_combine (custom ops moe_kernels::soft_dispatch, ::soft_combine and their
backwards): Soft-MoE's slot dispatch (softmax over tokens) and combine (softmax over slots).

Oracles: explicit per-slot (dispatch) and per-token (combine) softmax loops written here in float64, and
moe_kernels.reference.soft_* (the spec). Masked tokens get the logit -finfo(dtype).max: they take no part in
dispatch unless their whole row is masked (then every token weighs the same), and in combine they average
all slots. Lower precision passes on the earned tolerance against an einsum formulation in the same dtype.
Also: gradcheck, opcheck, determinism, strides, bad input; the native backend's chunking (small chunk settings
through every way of cutting a problem, and its peak memory on a long sequence).
"""
import math

import pytest
import torch

import moe_kernels
from moe_kernels import _backend
from moe_kernels import reference as ref
from moe_kernels.ops import soft_combine, soft_dispatch
from moe_kernels.ops import soft_moe as soft_moe_ops
from tests.helpers import assert_close64, assert_earned_dtype, poison_

F64 = torch.float64


# --- independent oracles ------------------------------------------------------------------------------
def _slot_embeddings(phi, b):
    return phi if phi.dim() == 2 else phi[b]


def _softmax(logits):
    """Softmax of a float64 vector from its definition, shifted by the maximum."""
    z = torch.exp(logits - logits.max())
    return z / z.sum()


def _masked(logits, keep, dtype):
    """Masked entries get -finfo(dtype).max (as a where, so that no gradient flows through them)."""
    if keep is None:
        return logits
    return torch.where(keep, logits, torch.full_like(logits, -torch.finfo(dtype).max))


def naive_soft_dispatch(x, phi, mask=None, slot_mask=None):
    """slots[b, s] = sum_n softmax_n(x[b, n] . phi_s)[n] * x[b, n], one slot at a time, float64."""
    dtype = x.dtype
    x, phi = x.double(), phi.double()
    B, N, D = x.shape
    S = phi.shape[-2]
    out = poison_(torch.empty(B, S, D, dtype=F64))  # every slot must be written below
    for b in range(B):
        emb = _slot_embeddings(phi, b)
        for s in range(S):
            logits = x[b] @ emb[s]  # [N]: slot s against every token of row b
            keep = None if mask is None else mask[b]
            if slot_mask is not None:
                keep = slot_mask[b, s].expand(N) if keep is None else keep & slot_mask[b, s]
            p = _softmax(_masked(logits, keep, dtype))
            out[b, s] = p @ x[b]
    return out


def naive_soft_combine(x, phi, y, mask=None, slot_mask=None):
    """out[b, n] = sum_s softmax_s(x[b, n] . phi_s)[s] * y[b, s], one token at a time, float64."""
    dtype = x.dtype
    x, phi, y = x.double(), phi.double(), y.double()
    B, N, D = x.shape
    S = phi.shape[-2]
    out = poison_(torch.empty(B, N, y.shape[-1], dtype=F64))  # every token must be written below
    for b in range(B):
        emb = _slot_embeddings(phi, b)
        for n in range(N):
            logits = emb @ x[b, n]  # [S]: token n of row b against every slot
            keep = None if mask is None else mask[b, n].expand(S)
            if slot_mask is not None:
                keep = slot_mask[b] if keep is None else keep & slot_mask[b]
            p = _softmax(_masked(logits, keep, dtype))
            out[b, n] = p @ y[b]
    return out


def same_dtype_logits(x, phi, mask, slot_mask=None):
    phi_b = phi.expand(x.shape[0], *phi.shape[-2:])
    logits = torch.einsum("bnd,bsd->bns", x, phi_b)
    if mask is not None:
        logits = logits.masked_fill(~mask[..., None], -torch.finfo(x.dtype).max)
    if slot_mask is not None:
        logits = logits.masked_fill(~slot_mask[:, None, :], -torch.finfo(x.dtype).max)
    return logits


def same_dtype_soft_dispatch(x, phi, mask=None):
    """Plain PyTorch (einsum) in x's dtype."""
    return torch.einsum("bns,bnd->bsd", same_dtype_logits(x, phi, mask).softmax(dim=1), x)


def same_dtype_soft_combine(x, phi, y, mask=None):
    return torch.einsum("bns,bsd->bnd", same_dtype_logits(x, phi, mask).softmax(dim=2), y)


# --- inputs -----------------------------------------------------------------------------------------
def make_mask(B, N, kind):
    """None, random (about 30% masked, at least one token kept per row), or fullrow (random, and row 0 fully
    masked)."""
    if kind == "nomask":
        return None
    mask = torch.rand(B, N) > 0.3
    mask[torch.arange(B), torch.randint(N, (B,))] = True
    if kind == "fullrow":
        mask[0] = False
    return mask


def make_slot_mask(B, S):
    """About 30% of the slots masked, row 0's first slot kept; if B > 1, row 1 has every slot masked."""
    smask = torch.rand(B, S) > 0.3
    smask[0, 0] = True
    if B > 1:
        smask[1] = False
    return smask


def make_inputs(B, N, D, S, phi_kind, mask_kind, dtype=F64):
    """Slot embeddings scaled by 1/sqrt(D), as soft-moe-pytorch initialises them."""
    x = torch.randn(B, N, D, dtype=F64)
    phi = torch.randn(*((B,) if phi_kind == "phi3d" else ()), S, D, dtype=F64) / math.sqrt(D)
    y = torch.randn(B, S, D, dtype=F64)
    return x.to(dtype), phi.to(dtype), y.to(dtype), make_mask(B, N, mask_kind)


# (B, N, D, S)
SHAPES = [
    pytest.param(2, 13, 15, 7, id="B2-N13-D15-S7"),  # odd D, prime N and S
    pytest.param(3, 10, 8, 4, id="B3-N10-D8-S4"),    # several batch rows
    pytest.param(2, 1, 6, 3, id="B2-N1-D6-S3"),      # N=1: one token per row
    pytest.param(2, 9, 6, 1, id="B2-N9-D6-S1"),      # S=1: one slot
    pytest.param(1, 5, 4, 9, id="B1-N5-D4-S9"),      # B=1, more slots than tokens
]
PHI = ["phi2d", "phi3d"]            # phi [S, D] shared by the batch, or [B, S, D]
MASKS = ["nomask", "mask", "fullrow"]  # no mask, a random mask, a random mask with row 0 fully masked


# --- forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("phi_kind", PHI)
@pytest.mark.parametrize("B, N, D, S", SHAPES)
def test_dispatch_float64_matches_naive_and_reference(backend, B, N, D, S, phi_kind, mask_kind):
    x, phi, _, mask = make_inputs(B, N, D, S, phi_kind, mask_kind)
    out = soft_dispatch(x, phi, mask)
    assert out.shape == (B, S, D) and out.dtype == F64
    assert_close64(out, naive_soft_dispatch(x, phi, mask), "vs naive loop")
    assert_close64(out, ref.soft_dispatch(x, phi, mask), "vs reference")
    if mask_kind == "fullrow":  # a fully masked row: every token weighs the same in every slot
        assert_close64(out[0], x[0].mean(0).expand(S, D), "fully masked row")


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("phi_kind", PHI)
@pytest.mark.parametrize("B, N, D, S", SHAPES)
def test_combine_float64_matches_naive_and_reference(backend, B, N, D, S, phi_kind, mask_kind):
    x, phi, y, mask = make_inputs(B, N, D, S, phi_kind, mask_kind)
    out = soft_combine(x, phi, y, mask)
    assert out.shape == (B, N, D) and out.dtype == F64
    assert_close64(out, naive_soft_combine(x, phi, y, mask), "vs naive loop")
    assert_close64(out, ref.soft_combine(x, phi, y, mask), "vs reference")
    if mask is not None:  # a masked token averages all slots
        b, n = torch.nonzero(~mask, as_tuple=True)
        assert_close64(out[b, n], y[b].mean(1), "masked tokens")


def test_combine_output_width_differs_from_model_width(backend):
    # y's last dimension (the experts' output width) need not equal x's D
    x, phi, _, mask = make_inputs(2, 7, 5, 3, "phi2d", "mask")
    y = torch.randn(2, 3, 11, dtype=F64)
    out = soft_combine(x, phi, y, mask)
    assert out.shape == (2, 7, 11)
    assert_close64(out, naive_soft_combine(x, phi, y, mask), "vs naive loop")


@pytest.mark.parametrize("phi_kind", PHI)
def test_masked_tokens_take_no_part_in_dispatch(backend, phi_kind):
    # rows that keep at least one token: changing the masked tokens changes no slot, bit for bit
    x, phi, _, mask = make_inputs(3, 12, 8, 5, phi_kind, "mask")
    before = soft_dispatch(x, phi, mask)
    x2 = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    assert torch.equal(soft_dispatch(x2, phi, mask), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("phi_kind", PHI)
def test_low_precision_earned(backend, phi_kind, mask_kind, dtype):
    x, phi, y, mask = make_inputs(4, 67, 31, 16, phi_kind, mask_kind, dtype=dtype)  # odd D, prime N
    out = soft_dispatch(x, phi, mask)
    assert out.dtype == dtype
    assert_earned_dtype(out, naive_soft_dispatch(x, phi, mask), same_dtype_soft_dispatch(x, phi, mask))
    out = soft_combine(x, phi, y, mask)
    assert out.dtype == dtype
    assert_earned_dtype(out, naive_soft_combine(x, phi, y, mask), same_dtype_soft_combine(x, phi, y, mask))


# --- backward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["nomask", "fullrow"])
@pytest.mark.parametrize("phi_kind", PHI)
def test_gradcheck_dispatch(backend, phi_kind, mask_kind):
    x, phi, _, mask = make_inputs(2, 5, 3, 4, phi_kind, mask_kind)
    assert torch.autograd.gradcheck(lambda x, phi: soft_dispatch(x, phi, mask),
                                    (x.requires_grad_(), phi.requires_grad_()))


@pytest.mark.parametrize("mask_kind", ["nomask", "fullrow"])
@pytest.mark.parametrize("phi_kind", PHI)
def test_gradcheck_combine(backend, phi_kind, mask_kind):
    x, phi, y, mask = make_inputs(2, 5, 3, 4, phi_kind, mask_kind)
    assert torch.autograd.gradcheck(lambda x, phi, y: soft_combine(x, phi, y, mask),
                                    (x.requires_grad_(), phi.requires_grad_(), y.requires_grad_()))


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("phi_kind", PHI)
def test_backward_matches_naive_autograd_and_reference(backend, phi_kind, mask_kind):
    x, phi, y, mask = make_inputs(3, 11, 7, 5, phi_kind, mask_kind)  # odd D, prime N and S
    leaves = [t.requires_grad_() for t in (x, phi, y)]
    g_slots, g_out = torch.randn(3, 5, 7, dtype=F64), torch.randn(3, 11, 7, dtype=F64)
    got = torch.autograd.grad(soft_dispatch(x, phi, mask), leaves[:2], g_slots)
    want = torch.autograd.grad(naive_soft_dispatch(x, phi, mask), leaves[:2], g_slots)
    spec = ref.soft_dispatch_backward(g_slots, x.detach(), phi.detach(), mask)
    for name, g, n, s in zip(("x", "phi"), got, want, spec):
        assert_close64(g, n, f"dispatch grad of {name} vs naive autograd")
        assert_close64(g, s, f"dispatch grad of {name} vs reference backward")
    got = torch.autograd.grad(soft_combine(x, phi, y, mask), leaves, g_out)
    want = torch.autograd.grad(naive_soft_combine(x, phi, y, mask), leaves, g_out)
    spec = ref.soft_combine_backward(g_out, x.detach(), phi.detach(), y.detach(), mask)
    for name, g, n, s in zip(("x", "phi", "y"), got, want, spec):
        assert_close64(g, n, f"combine grad of {name} vs naive autograd")
        assert_close64(g, s, f"combine grad of {name} vs reference backward")


@pytest.mark.parametrize("mask_kind", ["nomask", "mask"])
@pytest.mark.parametrize("phi_kind", PHI)
def test_slot_mask_forward_and_backward_match_naive(backend, phi_kind, mask_kind):
    # dynamic slots: masked slots get no weight in combine and dispatch nothing; row 1 has every slot masked
    B, N, D, S = 3, 11, 7, 5
    x, phi, y, mask = make_inputs(B, N, D, S, phi_kind, mask_kind)
    smask = make_slot_mask(B, S)
    leaves = [t.requires_grad_() for t in (x, phi, y)]
    g_slots, g_out = torch.randn(B, S, D, dtype=F64), torch.randn(B, N, D, dtype=F64)
    slots = soft_dispatch(x, phi, mask, smask)
    assert_close64(slots, naive_soft_dispatch(x, phi, mask, smask), "dispatch vs naive loop")
    out = soft_combine(x, phi, y, mask, smask)
    assert_close64(out, naive_soft_combine(x, phi, y, mask, smask), "combine vs naive loop")
    got = torch.autograd.grad(slots, leaves[:2], g_slots)
    want = torch.autograd.grad(naive_soft_dispatch(x, phi, mask, smask), leaves[:2], g_slots)
    for name, g, n in zip(("x", "phi"), got, want):
        assert_close64(g, n, f"dispatch grad of {name} (slot mask) vs naive autograd")
    got = torch.autograd.grad(out, leaves, g_out)
    want = torch.autograd.grad(naive_soft_combine(x, phi, y, mask, smask), leaves, g_out)
    for name, g, n in zip(("x", "phi", "y"), got, want):
        assert_close64(g, n, f"combine grad of {name} (slot mask) vs naive autograd")


# --- custom-op registration ---------------------------------------------------------------------------
OPCHECK = [pytest.param(torch.float32, "phi2d", id="fp32-phi2d"), pytest.param(F64, "phi3d", id="fp64-phi3d")]


@pytest.mark.parametrize("mask_kind", ["nomask", "mask"])
@pytest.mark.parametrize("dtype, phi_kind", OPCHECK)
def test_opcheck_dispatch(backend, dtype, phi_kind, mask_kind):
    x, phi, _, mask = make_inputs(2, 6, 5, 3, phi_kind, mask_kind, dtype=dtype)
    grad = torch.randn(2, 3, 5, dtype=dtype)
    # the backward op has no autograd of its own (no double backward): its inputs do not require grad
    smask = make_slot_mask(2, 3) if mask_kind == "mask" else None
    out, lse = torch.ops.moe_kernels.soft_dispatch(x, phi, mask, smask)  # the backward takes the saved out, lse
    assert lse.shape == (2, 3) and lse.dtype == (F64 if dtype == F64 else torch.float32)
    torch.library.opcheck(torch.ops.moe_kernels.soft_dispatch_backward, (grad, x, phi, out, lse, mask, smask))
    torch.library.opcheck(torch.ops.moe_kernels.soft_dispatch, (x.requires_grad_(), phi.requires_grad_(), mask, smask))


@pytest.mark.parametrize("mask_kind", ["nomask", "mask"])
@pytest.mark.parametrize("dtype, phi_kind", OPCHECK)
def test_opcheck_combine(backend, dtype, phi_kind, mask_kind):
    x, phi, y, mask = make_inputs(2, 6, 5, 3, phi_kind, mask_kind, dtype=dtype)
    grad = torch.randn(2, 6, 5, dtype=dtype)
    smask = make_slot_mask(2, 3) if mask_kind == "mask" else None
    out, lse = torch.ops.moe_kernels.soft_combine(x, phi, y, mask, smask)
    assert lse.shape == (2, 6) and lse.dtype == (F64 if dtype == F64 else torch.float32)
    torch.library.opcheck(torch.ops.moe_kernels.soft_combine_backward, (grad, x, phi, y, out, lse, mask, smask))
    torch.library.opcheck(torch.ops.moe_kernels.soft_combine,
                          (x.requires_grad_(), phi.requires_grad_(), y.requires_grad_(), mask, smask))


# --- determinism, strides ---------------------------------------------------------------------------
@pytest.mark.parametrize("phi_kind", PHI)
def test_deterministic_forward_and_backward(backend, phi_kind):
    x, phi, y, mask = make_inputs(4, 96, 32, 16, phi_kind, "mask", dtype=torch.float32)
    g_slots, g_out = torch.randn(4, 16, 32), torch.randn(4, 96, 32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, phi, y)]
        slots = soft_dispatch(leaves[0], leaves[1], mask)
        out = soft_combine(leaves[0], leaves[1], leaves[2], mask)
        runs.append((slots, out, *torch.autograd.grad(slots, leaves[:2], g_slots),
                     *torch.autograd.grad(out, leaves, g_out)))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


@pytest.mark.parametrize("phi_kind", PHI)
def test_non_contiguous_inputs(backend, phi_kind):
    B, N, D, S = 3, 10, 7, 4
    x = torch.randn(N, B, D, dtype=F64).transpose(0, 1)
    phi = (torch.randn(D, S, dtype=F64).t() if phi_kind == "phi2d" else torch.randn(B, D, S, dtype=F64).transpose(1, 2))
    y = torch.randn(B, D, S, dtype=F64).transpose(1, 2)
    mask = make_mask(N, B, "mask").t()
    strided = (x, phi / math.sqrt(D), y, mask)
    assert not any(t.is_contiguous() for t in strided)
    g_slots, g_out = torch.randn(B, S, D, dtype=F64), torch.randn(B, N, D, dtype=F64)
    results = []
    for x, phi, y, mask in (strided, tuple(t.contiguous() for t in strided)):
        leaves = [t.detach().requires_grad_() for t in (x, phi, y)]
        slots = soft_dispatch(leaves[0], leaves[1], mask)
        out = soft_combine(leaves[0], leaves[1], leaves[2], mask)
        results.append((slots, out, *torch.autograd.grad(slots, leaves[:2], g_slots),
                        *torch.autograd.grad(out, leaves, g_out)))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=lambda m: f"result {i}: {m}")


# --- the shared-logits form: soft_logits, read by soft_dispatch_logits and soft_combine_logits -----------------
def shared_form(x, phi, y, mask=None, slot_mask=None):
    logits = moe_kernels.ops.soft_logits(x, phi, mask, slot_mask)
    return moe_kernels.ops.soft_dispatch_logits(logits, x), moe_kernels.ops.soft_combine_logits(logits, y)


@pytest.mark.parametrize("slot_masked", [False, True], ids=["no-slot-mask", "slot-mask"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("phi_kind", PHI)
@pytest.mark.parametrize("B, N, D, S", SHAPES)
def test_shared_logits_match_naive_forward_and_backward(backend, B, N, D, S, phi_kind, mask_kind, slot_masked):
    # both mixes from one logits tensor: autograd sums their logit gradients before soft_logits' backward
    x, phi, y, mask = make_inputs(B, N, D, S, phi_kind, mask_kind)
    smask = make_slot_mask(B, S) if slot_masked else None
    leaves = [t.requires_grad_() for t in (x, phi, y)]
    slots, out = shared_form(x, phi, y, mask, smask)
    want_slots, want_out = naive_soft_dispatch(x, phi, mask, smask), naive_soft_combine(x, phi, y, mask, smask)
    assert_close64(slots, want_slots, "dispatch vs naive loop")
    assert_close64(out, want_out, "combine vs naive loop")
    g_slots, g_out = torch.randn_like(slots), torch.randn_like(out)
    got = torch.autograd.grad([slots, out], leaves, [g_slots, g_out])
    want = torch.autograd.grad([want_slots, want_out], leaves, [g_slots, g_out])
    for name, a, b in zip(("x", "phi", "y"), got, want):
        assert_close64(a, b, f"grad of {name} vs naive autograd")


@pytest.mark.parametrize("phi_kind", PHI)
def test_shared_logits_masked_tokens_take_no_part_in_dispatch(backend, phi_kind):
    x, phi, y, mask = make_inputs(3, 12, 8, 5, phi_kind, "mask")
    before = shared_form(x, phi, y, mask)[0]
    x2 = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    assert torch.equal(shared_form(x2, phi, y, mask)[0], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_shared_logits_low_precision_earned(backend, mask_kind, dtype):
    x, phi, y, mask = make_inputs(4, 67, 31, 16, "phi2d", mask_kind, dtype=dtype)
    slots, out = shared_form(x, phi, y, mask)
    assert slots.dtype == out.dtype == dtype
    assert_earned_dtype(slots, naive_soft_dispatch(x, phi, mask), same_dtype_soft_dispatch(x, phi, mask))
    assert_earned_dtype(out, naive_soft_combine(x, phi, y, mask), same_dtype_soft_combine(x, phi, y, mask))


@pytest.mark.parametrize("mask_kind", ["nomask", "fullrow"])
@pytest.mark.parametrize("phi_kind", PHI)
def test_gradcheck_shared_logits(backend, phi_kind, mask_kind):
    x, phi, y, mask = make_inputs(2, 5, 3, 4, phi_kind, mask_kind)
    assert torch.autograd.gradcheck(lambda x, phi, y: shared_form(x, phi, y, mask),
                                    (x.requires_grad_(), phi.requires_grad_(), y.requires_grad_()))


# --- the native backend's chunks ----------------------------------------------------------------------
# csrc/soft_moe.cpp makes the logits at most ops.soft_moe.NATIVE_CHUNK at a time: Bb batch rows by C tokens by all S
# slots. Lowering the setting forces a small problem through each way of cutting it; B, N, S = 3, 11, 5.
CHUNKS = [
    pytest.param(1, id="C1"),                # one token at a time (fewer logits than one token's slots)
    pytest.param(4 * 5, id="C4"),            # 4 tokens of one row: 4, 4, 3 (a ragged last chunk)
    pytest.param(10 * 5, id="C10"),          # 10 tokens, then 1
    pytest.param(2 * 11 * 5, id="Bb2"),      # whole rows, two at a time: 2 rows, then 1
    pytest.param(3 * 11 * 5, id="one-chunk"),
]


@pytest.fixture
def native_chunk(monkeypatch):
    """Runs the ops on the native backend with the chunk setting given to the returned function."""
    if not _backend.NATIVE:
        pytest.skip(f"moe_kernels._C is not built ({_backend._native_error})")
    with moe_kernels.use_backend("native"):
        yield lambda chunk: monkeypatch.setattr(soft_moe_ops, "NATIVE_CHUNK", chunk)


def chunk_edge_mask(B, N):
    """Row 0 fully masked; row 1 real only after its first 6 tokens (the running maximum starts on masked
    chunks); row 2 real only in its first 4 tokens (masked chunks come after real ones); rows past 2 random."""
    mask = torch.rand(B, N) > 0.3
    mask[0] = False
    mask[1, :6] = False
    mask[1, 6] = True
    mask[2, 4:] = False
    mask[2, 0] = True
    return mask


@pytest.mark.parametrize("slot_masked", [False, True], ids=["no-slot-mask", "slot-mask"])
@pytest.mark.parametrize("phi_kind", PHI)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_native_chunks_match_naive(native_chunk, chunk, phi_kind, slot_masked):
    B, N, D, S = 3, 11, 6, 5
    native_chunk(chunk)
    x, phi, y, _ = make_inputs(B, N, D, S, phi_kind, "nomask")
    mask = chunk_edge_mask(B, N)
    smask = make_slot_mask(B, S) if slot_masked else None
    leaves = [t.requires_grad_() for t in (x, phi, y)]
    g_slots, g_out = torch.randn(B, S, D, dtype=F64), torch.randn(B, N, D, dtype=F64)
    slots = soft_dispatch(x, phi, mask, smask)
    out = soft_combine(x, phi, y, mask, smask)
    assert_close64(slots, naive_soft_dispatch(x, phi, mask, smask), "dispatch vs naive loop")
    assert_close64(out, naive_soft_combine(x, phi, y, mask, smask), "combine vs naive loop")
    if not slot_masked:  # the fully masked row 0: every token weighs the same in every slot
        assert_close64(slots[0], x[0].mean(0).expand(S, D), "fully masked row")
    for name, fast, naive, grad, wrt in (
            ("dispatch", slots, naive_soft_dispatch(x, phi, mask, smask), g_slots, leaves[:2]),
            ("combine", out, naive_soft_combine(x, phi, y, mask, smask), g_out, leaves)):
        got = torch.autograd.grad(fast, wrt, grad)
        want = torch.autograd.grad(naive, wrt, grad)
        for arg, a, b in zip(("x", "phi", "y"), got, want):
            assert_close64(a, b, f"{name} grad of {arg} vs naive autograd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [pytest.param(16 * 7, id="C7"), pytest.param(16 * 67, id="one-row")])
def test_native_chunks_low_precision_earned(native_chunk, chunk, dtype):
    # the running maximum and sums of dispatch's online softmax stay in float32 across chunks
    native_chunk(chunk)
    x, phi, y, mask = make_inputs(4, 67, 31, 16, "phi2d", "fullrow", dtype=dtype)
    out = soft_dispatch(x, phi, mask)
    assert_earned_dtype(out, naive_soft_dispatch(x, phi, mask), same_dtype_soft_dispatch(x, phi, mask))
    out = soft_combine(x, phi, y, mask)
    assert_earned_dtype(out, naive_soft_combine(x, phi, y, mask), same_dtype_soft_combine(x, phi, y, mask))


@pytest.mark.parametrize("B, N, S", [pytest.param(2, 0, 3, id="no-tokens"), pytest.param(2, 4, 0, id="no-slots"),
                                     pytest.param(0, 4, 3, id="no-rows")])
def test_empty_sizes(backend, B, N, S):
    # softmaxes over nothing: every output and gradient is an empty sum (zero), as the reference gives
    x = torch.randn(B, N, 5, dtype=F64, requires_grad=True)
    phi = torch.randn(S, 5, dtype=F64, requires_grad=True)
    y = torch.randn(B, S, 5, dtype=F64, requires_grad=True)
    slots, out = soft_dispatch(x, phi), soft_combine(x, phi, y)
    assert slots.shape == (B, S, 5) and out.shape == (B, N, 5)
    grads = torch.autograd.grad(slots.sum() + out.sum(), (x, phi, y), allow_unused=True)
    for t in (slots, out, *grads):
        assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("mask_kind", ["nomask", "mask"])
@pytest.mark.parametrize("phi_kind", PHI)
def test_zero_width_tokens(backend, phi_kind, mask_kind):
    # D = 0: every logit is an empty dot product (zero), so each slot averages no features and each token takes
    # the mean of the slots' outputs (y keeps its own width); the gradients of x and phi are [.., 0]. The native
    # ops once raised here (a reshape to [-1, 0]) where the reference answers.
    B, N, S = 2, 5, 3
    x, phi, _, mask = make_inputs(B, N, 0, S, phi_kind, mask_kind)
    y = torch.randn(B, S, 4, dtype=F64, requires_grad=True)
    x.requires_grad_()
    phi.requires_grad_()
    slots, out = soft_dispatch(x, phi, mask), soft_combine(x, phi, y, mask)
    assert slots.shape == (B, S, 0) and out.shape == (B, N, 4)
    assert_close64(out, y.detach().mean(1, keepdim=True).expand(B, N, 4), "combine: the mean of the slots")
    assert_close64(out, ref.soft_combine(x, phi, y, mask), "vs reference")
    grad_out = torch.randn(B, N, 4, dtype=F64)
    gx, gphi, gy = torch.autograd.grad((out * grad_out).sum() + slots.sum(), (x, phi, y))
    assert gx.shape == x.shape and gphi.shape == phi.shape
    assert_close64(gy, (grad_out.sum(1, keepdim=True) / S).expand(B, S, 4), "grad of y")


def peak_bytes(fn):
    """The most bytes that fn held allocated at once while it ran: the CPU allocator's events, in time order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def soft_forward_backward(N, S, D=64):
    """Dispatch and combine, forward and backward, on fp32 inputs made outside the measured call."""
    x = torch.randn(1, N, D, requires_grad=True)
    phi = (torch.randn(S, D) / math.sqrt(D)).requires_grad_()
    y = torch.randn(1, S, D, requires_grad=True)
    mask = make_mask(1, N, "mask")
    g_slots, g_out = torch.randn(1, S, D), torch.randn(1, N, D)

    def run():
        slots, out = soft_dispatch(x, phi, mask), soft_combine(x, phi, y, mask)
        torch.autograd.grad((slots * g_slots).sum() + (out * g_out).sum(), (x, phi, y))

    return run


@pytest.mark.slow
def test_native_memory_is_not_quadratic():
    if not _backend.NATIVE:
        pytest.skip(f"moe_kernels._C is not built ({_backend._native_error})")
    # the measure sees logits when they are made: the reference holds several [N, S] at N = S = 1024
    with moe_kernels.use_backend("reference"):
        assert peak_bytes(soft_forward_backward(1024, 1024)) > 2 * 1024 * 1024 * 4
    # B = 1, N = S = 8192, D = 64: one [N, S] fp32 tensor is 256 MiB; the native path holds chunks of it, one set
    # per thread at work (2 here: 42 MiB seen in all)
    N = S = 8192
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with moe_kernels.use_backend("native"):
            peak = peak_bytes(soft_forward_backward(N, S))
    finally:
        torch.set_num_threads(threads)
    assert peak < N * S * 4 / 4, f"native soft dispatch+combine forward+backward peaked at {peak / 2**20:.1f} MiB"


# --- bad input --------------------------------------------------------------------------------------
def _bad_cases():
    """(id, change to the good keyword arguments, exception, message pattern naming the argument, which ops)."""
    both, combine = ("dispatch", "combine"), ("combine",)
    PHI_SHAPE = r"^phi must be \[S, D\] or \[B, S, D\]"  # noqa: N806
    return [
        ("x-rank2", lambda k: k.update(x=k["x"][0]), ValueError, r"^x must have 3 dimensions", both),
        ("x-int", lambda k: k.update(x=k["x"].long()), TypeError, r"^x must have dtype", both),
        ("phi-wrong-D", lambda k: k.update(phi=k["phi"][:, :-1]), ValueError, PHI_SHAPE, both),
        ("phi3d-wrong-B", lambda k: k.update(phi=k["phi"].expand(3, 4, 5)), ValueError, PHI_SHAPE, both),
        ("phi-rank4", lambda k: k.update(phi=k["phi"][None, None]), ValueError, r"^phi must have \(2, 3\) dimensions",
         both),
        ("phi-dtype", lambda k: k.update(phi=k["phi"].double()), TypeError, r"share a dtype.*phi torch\.float64", both),
        ("mask-shape", lambda k: k.update(mask=k["mask"][:, :-1]), ValueError, r"^mask must have shape \(2, 6\)", both),
        ("mask-transposed", lambda k: k.update(mask=k["mask"].t()), ValueError, r"^mask must have shape", both),
        ("mask-float", lambda k: k.update(mask=k["mask"].float()), TypeError, r"^mask must have dtype", both),
        ("mask-int", lambda k: k.update(mask=k["mask"].int()), TypeError, r"^mask must have dtype", both),
        ("slot_mask-shape", lambda k: k.update(slot_mask=k["slot_mask"][:, :-1]), ValueError,
         r"^slot_mask must have shape \(2, 4\)", both),
        ("slot_mask-float", lambda k: k.update(slot_mask=k["slot_mask"].float()), TypeError,
         r"^slot_mask must have dtype", both),
        ("y-wrong-S", lambda k: k.update(y=k["y"][:, :-1]), ValueError, r"^y must have shape \(2, 4, \*\)", combine),
        ("y-wrong-B", lambda k: k.update(y=k["y"][:1]), ValueError, r"^y must have shape", combine),
        ("y-rank2", lambda k: k.update(y=k["y"][0]), ValueError, r"^y must have 3 dimensions", combine),
        ("y-dtype", lambda k: k.update(y=k["y"].double()), TypeError, r"share a dtype.*y torch\.float64", combine),
    ]


CASES = [pytest.param(op, *c[1:4], id=f"{op}-{c[0]}") for c in _bad_cases() for op in c[4]]


@pytest.mark.parametrize("op, change, exc, match", CASES)
def test_bad_input_raises_naming_the_argument(backend, op, change, exc, match):
    kwargs = dict(x=torch.randn(2, 6, 5), phi=torch.randn(4, 5), y=torch.randn(2, 4, 5), mask=torch.rand(2, 6) > 0.3,
                  slot_mask=torch.rand(2, 4) > 0.3)
    fn = soft_dispatch if op == "dispatch" else soft_combine
    if op == "dispatch":
        kwargs.pop("y")
    fn(**kwargs)  # the unchanged arguments are fine
    change(kwargs)
    with pytest.raises(exc, match=match):
        fn(**kwargs)


@pytest.mark.parametrize("phi_kind", PHI)
def test_forward_ops_logsumexp_matches_the_reference(backend, phi_kind):
    # the forward ops' second output: each query row's logsumexp of its masked logits (what a flash-style
    # backward recomputes the softmax from), whatever backend computed it; fully masked token row and slot row
    B, N, D, S = 3, 11, 7, 5
    x, phi, y, mask = make_inputs(B, N, D, S, phi_kind, "fullrow")
    smask = make_slot_mask(B, S)
    _, lse_d = torch.ops.moe_kernels.soft_dispatch(x, phi, mask, smask)
    _, lse_c = torch.ops.moe_kernels.soft_combine(x, phi, y, mask, smask)
    logits = same_dtype_logits(x, phi, mask, smask)                     # [B, N, S], float64
    torch.testing.assert_close(lse_d, torch.logsumexp(logits, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_c, torch.logsumexp(logits, 2), rtol=1e-12, atol=1e-12)
