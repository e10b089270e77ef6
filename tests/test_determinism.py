"""Determinism of the public ops and modules, tested as far as the code promises it and no further.

What the code promises (and where):
- every backend: no atomics; a rerun with the same inputs (and, for native, the same thread count) gives the same
  bits, forward and backward (csrc/grouped_gemm.h: "The schedule depends only on the group sizes and the thread
  count, so reruns are bit-identical"; triton/*.py: every output element written by one program).
- native, independent of the thread count: routing ("prob_sum is reduced from per-chunk partial sums in chunk order,
  so the result does not depend on the thread count", csrc/routing.cpp), the counting sort ("the chunk split is
  fixed (not the thread count)", csrc/permutation.cpp) and permute / unpermute (a token's rows summed by one thread
  in slot order, csrc/permutation.cpp). NOT promised across thread counts: grouped_mm and moe_mlp (the expert
  schedule depends on the thread count, and a heavy expert runs one multi-threaded BLAS call) and the soft ops (the
  chunk split is fixed, but their GEMMs run on ATen's threads): those are checked at a fixed thread count only.
- a token's output does not depend on which tokens share its batch or its experts, up to the summation order the
  BLAS picks for a different number of rows; exactly so where the code fixes the order itself (permute is a gather;
  unpermute sums a token's k rows in slot order; topk_route works token by token).
- torch.use_deterministic_algorithms(True) is honoured: the ops run under it (its uninitialised-memory fill
  included) and give the same bits as without it.
- on a GPU, the triton moe_mlp forward and backward are bit-identical across runs (a deterministic combine, no
  atomics).
"""
import copy
import math
import os

import pytest
import torch

import moe_kernels
from moe_kernels import _backend, ops
from moe_kernels import triton as _triton
from moe_kernels.nn import DenseMoE, SoftMoE, SparseMoE
from tests.conftest import TEST_DEVICE, cpu_backends
from tests.helpers import num_threads, rand_experts, same_bits

F64 = torch.float64
TRITON = _triton.AVAILABLE and (os.environ.get("TRITON_INTERPRET") == "1" or TEST_DEVICE == "cuda")
BACKENDS = cpu_backends() + (["triton"] if TRITON else [])


# --- subjects: fixed inputs, one forward and backward, every result as a list of tensors ------------------------
# make(small) -> run(): `small` sizes for the triton interpreter (slow), else sizes that reach the native backend's
# parallel paths (several light experts spread over the threads, a heavy one, routing chunks). run() clones the
# fixed inputs, runs forward and backward, and returns [outputs..., gradients...].
def _grads(out, leaves, grad_out):
    return list(torch.autograd.grad(out, leaves, grad_out, allow_unused=True))


def _moe_mlp(small, dtype=torch.float32):
    T, D, H, E, k = (24, 16, 12, 5, 2) if small else (160, 32, 24, 8, 2)
    x = torch.randn(T, D, dtype=dtype)
    experts = rand_experts(T, k, E)
    experts[: T // 2, 0] = 0                    # one heavy expert (run alone, multi-threaded on native)
    experts[::7, 1] = -1                        # expert-parallel sentinels
    weights = torch.rand(T, k, dtype=dtype)
    gate_up = torch.randn(E, 2 * H, D, dtype=dtype) / math.sqrt(D)
    down = torch.randn(E, D, H, dtype=dtype) / math.sqrt(H)
    biases = torch.randn(E, 2 * H, dtype=dtype), torch.randn(E, D, dtype=dtype)
    grad_out = torch.randn(T, D, dtype=dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down, *biases)]
        out = ops.moe_mlp(leaves[0], experts, *leaves[1:4], gate_up_bias=leaves[4], down_bias=leaves[5],
                          capacity=T // 3)
        return [out] + _grads(out, leaves, grad_out)
    return run


def _grouped_mm(small):
    N, K, M, E = (20, 16, 12, 4) if small else (200, 32, 24, 8)
    a = torch.randn(N + 3, K)
    w, bias = torch.randn(E, 2 * M, K) / math.sqrt(K), torch.randn(E, 2 * M)
    cuts = torch.sort(torch.randint(0, N + 1, (E - 1,))).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([N])]).to(torch.int32)
    grad_out = torch.randn(N + 3, M)        # rows past offsets[E]: zero output, zero gradient

    def run():
        leaves = [t.clone().requires_grad_() for t in (a, w, bias)]
        out = ops.grouped_mm(leaves[0], leaves[1], offsets, leaves[2], activation="gelu", gated=True)
        return [out] + _grads(out, leaves, grad_out)
    return run


def _permute_unpermute(small):
    T, D, E, k = (20, 8, 4, 2) if small else (300, 24, 8, 3)
    experts = rand_experts(T, k, E)
    x, y, w = torch.randn(T, D), torch.randn(T * k, D), torch.rand(T, k)
    g_perm, g_unperm = torch.randn(T * k, D), torch.randn(T, D)

    def run():
        s = ops.sort_by_expert(experts, E, capacity=T * k // E)
        leaves = [t.clone().requires_grad_() for t in (x, y, w)]
        p, u = ops.permute(leaves[0], s), ops.unpermute(leaves[1], s, leaves[2])
        return [s.order, s.inverse, s.offsets, p, u] + _grads((p, u), leaves, (g_perm, g_unperm))
    return run


def _topk_route(small):
    T, E = (40, 8) if small else (700, 16)   # native: several 128-token chunks of partial sums
    logits = torch.randn(T, E)
    bias = torch.randn(E)
    g_w, g_p, g_l = torch.randn(T, 4), torch.randn(E), torch.randn(T)

    def run():
        z = logits.clone().requires_grad_()
        r = ops.topk_route(z, 4, score="sigmoid", bias=bias, num_groups=4, topk_groups=2, scale=2.5)
        grad = torch.autograd.grad((r.weights, r.prob_sum, r.lse), z, (g_w, g_p, g_l))
        return [r.weights, r.experts, r.counts, r.prob_sum, r.lse, *grad]
    return run


def _module(name, small):
    if name == "SparseMoE":
        m = SparseMoE(16, 12, 8, 2, capacity_factor=1.25, bias=True, num_shared_experts=1, z_loss_coef=1e-3)
        x = torch.randn(2, 12 if small else 80, 16)
    elif name == "DenseMoE":
        m = DenseMoE(16, 12, 5)
        x = torch.randn(2, 12 if small else 80, 16)
    else:
        m = SoftMoE(16, num_slots=3, num_experts=4, expert_mult=2)
        x = torch.randn(3, 8 if small else 40, 16)
    m.train()     # SparseMoE: the aux loss joins the backward (no noise or jitter is configured: deterministic)
    grad_out = torch.randn_like(x)

    def run():
        mod = copy.deepcopy(m)
        xl = x.clone().requires_grad_()
        out = mod(xl)
        loss = (out * grad_out).sum() + (mod.aux_loss if getattr(mod, "aux_loss", None) is not None else 0)
        return [out] + _grads(loss, [xl] + list(mod.parameters()), None)
    return run


def _soft_ops(small):
    B, N, S, D = (2, 9, 4, 8) if small else (3, 50, 12, 24)
    x, phi, y = torch.randn(B, N, D), torch.randn(B, S, D), torch.randn(B, S, D)
    mask = torch.rand(B, N) > 0.2
    g_d, g_c = torch.randn(B, S, D), torch.randn(B, N, D)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, phi, y)]
        d = ops.soft_dispatch(leaves[0], leaves[1], mask)
        c = ops.soft_combine(leaves[0], leaves[1], leaves[2], mask)
        return [d, c] + _grads((d, c), leaves, (g_d, g_c))
    return run


SUBJECTS = {
    "moe_mlp": _moe_mlp, "grouped_mm": _grouped_mm, "permute_unpermute": _permute_unpermute,
    "topk_route": _topk_route, "soft_ops": _soft_ops,
    "SparseMoE": lambda small: _module("SparseMoE", small), "DenseMoE": lambda small: _module("DenseMoE", small),
    "SoftMoE": lambda small: _module("SoftMoE", small),
}
KERNEL = {"moe_mlp": "moe_mlp_fused", "grouped_mm": "grouped_mm", "permute_unpermute": "unpermute",
          "topk_route": "topk_route", "soft_ops": "soft_dispatch", "SparseMoE": "moe_mlp_fused",
          "DenseMoE": "dense_moe", "SoftMoE": "soft_dispatch"}


def _applies(backend_name, subject):
    return backend_name == "reference" or backend_name in _backend.IMPLS[KERNEL[subject]]


def _assert_same_bits(a, b, what):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}: result {i} is None in one run only"
            continue
        assert same_bits(u, v), f"{what}: result {i} {tuple(u.shape)} differs"


# (backend, threads): native at 1, 2 and 3 threads (3 on this 2-core machine: more threads than cores, uneven
# bins); reference at 1 and 2; triton once (the interpreter runs the programs one after another)
RUNS = ([("reference", 1), ("reference", 2)] + ([("native", n) for n in (1, 2, 3)] if _backend.NATIVE else []) +
        ([("triton", None)] if TRITON else []))


@pytest.mark.parametrize("backend_name, threads, subject", [
    pytest.param(b, n, s, id=f"{s}-{b}-{n or 'default'}threads") for s in SUBJECTS for b, n in RUNS if _applies(b, s)])
def test_reruns_are_bit_identical(backend_name, threads, subject):
    run = SUBJECTS[subject](small=backend_name == "triton")
    with moe_kernels.use_backend(backend_name), num_threads(threads or torch.get_num_threads()):
        first, second = run(), run()
    _assert_same_bits(first, second, f"{subject} on {backend_name}, {threads} threads")


THREAD_INDEPENDENT = ["topk_route", "permute_unpermute"]


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("subject", THREAD_INDEPENDENT)
def test_native_thread_count_does_not_change_the_bits(subject):
    # only where csrc promises it (see the module docstring): routing, the sort, permute and unpermute
    run = SUBJECTS[subject](small=False)
    with moe_kernels.use_backend("native"):
        results = {}
        for n in (1, 2, 3):
            with num_threads(n):
                results[n] = run()
    _assert_same_bits(results[1], results[2], f"{subject}: 1 vs 2 threads")
    _assert_same_bits(results[1], results[3], f"{subject}: 1 vs 3 threads")


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
def test_native_sort_thread_count_does_not_change_the_bits():
    # more pairs than one 4096-pair chunk of the counting sort, with a capacity
    experts = rand_experts(3000, 3, 16)
    experts[::5, 2] = 16
    with moe_kernels.use_backend("native"):
        runs = []
        for n in (1, 2, 3):
            with num_threads(n):
                runs.append(list(ops.sort_by_expert(experts, 16, capacity=500)))
    _assert_same_bits(runs[0], runs[1], "sort 1 vs 2 threads")
    _assert_same_bits(runs[0], runs[2], "sort 1 vs 3 threads")


# --- a token's result does not depend on its batch ----------------------------------------------------------
# The batch is run whole, in a random order and in two halves (the halves give every expert other rows and other
# row counts). Per token (per sequence for SoftMoE, whose slots mix a sequence's tokens), the results must agree:
# float64: |a - b| <= 1e-12 * max|b|. Only the BLAS's summation order may change with the number of rows it is given;
# for two orders of the <= 64-term dot products here that moves a result by at most about 2 * 64 * eps64 ~ 3e-14 of
# the magnitudes summed, so 1e-12 leaves room for the sums of magnitudes to exceed the output (cancellation) while a
# token leaking into another changes it by O(1). float32 on triton (its kernels run fp32, not float64): the same
# reasoning with eps32 gives 2 * 64 * eps32 ~ 1.5e-5, used as the relative bound.
def _batch_subject(name, dtype):
    """(fn(x) -> per-row results, x): rows are tokens (sequences for SoftMoE)."""
    if name == "moe_mlp":
        T, D, H, E, k = 48, 16, 12, 6, 2
        experts, weights = rand_experts(T, k, E), torch.rand(T, k, dtype=dtype)
        experts[::5, 1] = E                     # a sentinel: the same slots dropped whatever the batch
        gate_up = (torch.randn(E, 2 * H, D) / math.sqrt(D)).to(dtype)
        down = (torch.randn(E, D, H) / math.sqrt(H)).to(dtype)
        x = torch.cat([torch.randn(T, D, dtype=dtype), torch.arange(T, dtype=dtype)[:, None]], 1)

        def fn(xr):   # the last column carries the token's index: its routing rows follow it
            idx = xr[:, -1].long()
            return ops.moe_mlp(xr[:, :-1], experts[idx], weights[idx], gate_up, down)
        return fn, x
    m = {"SparseMoE": lambda: SparseMoE(16, 12, 6, 2, bias=True, num_shared_experts=1),
         "DenseMoE": lambda: DenseMoE(16, 12, 5), "SoftMoE": lambda: SoftMoE(16, num_slots=2, num_experts=3)}[name]()
    m = m.to(dtype).eval()
    x = torch.randn(*((6, 7, 16) if name == "SoftMoE" else (40, 16)), dtype=dtype)
    return m, x


BATCH = [pytest.param(b, s, id=f"{s}-{b}") for s in ("moe_mlp", "SparseMoE", "DenseMoE", "SoftMoE")
         for b in BACKENDS if _applies(b, s)]


@pytest.mark.parametrize("backend_name, name", BATCH)
def test_token_result_independent_of_its_batch(backend_name, name):
    dtype = torch.float32 if backend_name == "triton" else F64
    fn, x = _batch_subject(name, dtype)
    n = x.shape[0]
    perm = torch.randperm(n)
    with moe_kernels.use_backend(backend_name), torch.no_grad():
        whole = fn(x)
        permuted = torch.empty_like(whole)
        permuted[perm] = fn(x[perm])
        halves = torch.cat([fn(x[: n // 2]), fn(x[n // 2:])])
    rel = 1e-12 if dtype == F64 else 2 * 64 * torch.finfo(torch.float32).eps
    tol = dict(rtol=0, atol=rel * whole.abs().max().item())
    torch.testing.assert_close(permuted, whole, **tol, msg=lambda m: f"tokens in another order: {m}")
    torch.testing.assert_close(halves, whole, **tol, msg=lambda m: f"tokens in two halves: {m}")


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if _applies(b, "permute_unpermute")])
def test_permute_and_weighted_combine_exact_whatever_the_batch(backend_name):
    # where the code fixes the order itself the results are exact: permute copies rows, and unpermute sums each
    # token's k rows times their weights in slot order. The rows of each (token, slot) pair are fixed values V[t, j];
    # whatever batch a token is in, its combine must give the same bits.
    T, k, D, E = 30, 3, 8, 5
    experts, weights = rand_experts(T, k, E), torch.rand(T, k)
    experts[::4, 2] = -1
    values, x = torch.randn(T, k, D), torch.randn(T, D)

    def combine(idx):
        s = ops.sort_by_expert(experts[idx], E)
        flat = values[idx].reshape(-1, D)
        y = flat[s.order.long()]            # the pair values in the sort's expert order
        return ops.permute(x[idx], s), s, ops.unpermute(y, s, weights[idx])

    with moe_kernels.use_backend(backend_name):
        rows_all, s_all, whole = combine(torch.arange(T))
        perm = torch.randperm(T)
        _, _, permuted = combine(perm)
        half = torch.arange(T // 2, T)
        rows_half, s_half, second_half = combine(half)
    assert same_bits(permuted, whole[perm]), "a token's weighted combine changed with the token order"
    assert same_bits(second_half, whole[half]), "a token's weighted combine changed with its batch"
    # permute: the row of pair (t, j) is x[t] exactly, wherever the pair lands
    kept_all, kept_half = s_all.inverse >= 0, s_half.inverse >= 0
    assert same_bits(rows_all[s_all.inverse[kept_all].long()], x.unsqueeze(1).expand(T, k, D)[kept_all])
    assert same_bits(rows_half[s_half.inverse[kept_half].long()],
                     x[half].unsqueeze(1).expand(len(half), k, D)[kept_half])


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if _applies(b, "topk_route")])
def test_routing_of_a_token_exact_whatever_the_batch(backend_name):
    # topk_route works token by token: a token's weights, experts and logsumexp are the same bits in any batch
    # (prob_sum and counts are sums over the batch and are not compared)
    logits = torch.randn(300, 12)
    kw = dict(score="softmax", num_groups=3, topk_groups=2)
    perm = torch.randperm(300)
    with moe_kernels.use_backend(backend_name):
        whole = ops.topk_route(logits, 3, **kw)
        permuted = ops.topk_route(logits[perm], 3, **kw)
        part = ops.topk_route(logits[:37], 3, **kw)
    for name in ("weights", "experts", "lse"):
        w = getattr(whole, name)
        assert same_bits(getattr(permuted, name), w[perm]), f"{name}: changed with the token order"
        assert same_bits(getattr(part, name), w[:37]), f"{name}: changed with the batch size"


# --- torch.use_deterministic_algorithms(True) ------------------------------------------------------------------
@pytest.fixture
def deterministic_flag_restored():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("backend_name, subject", [
    pytest.param(b, s, id=f"{s}-{b}") for s in SUBJECTS for b in BACKENDS if _applies(b, s)])
def test_deterministic_algorithms_mode_runs_and_gives_the_same_bits(backend_name, subject,
                                                                    deterministic_flag_restored):
    # under the flag torch also fills every torch.empty with NaN (torch.utils.deterministic.fill_uninitialized_memory):
    # a kernel that reads memory it did not write would show here too
    run = SUBJECTS[subject](small=backend_name == "triton")
    with moe_kernels.use_backend(backend_name):
        torch.use_deterministic_algorithms(False)
        free = run()
        torch.use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        strict = run()
    _assert_same_bits(free, strict, f"{subject} on {backend_name} with and without use_deterministic_algorithms")


# --- GPU --------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or not _triton.AVAILABLE, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_moe_mlp_bit_identical_on_gpu(dtype):
    # the fused triton expert MLP: gather-fused GEMM1, GEMM2, a per-token combine in slot order, and a backward with
    # no atomics; two runs on the GPU give the same bits, forward and every gradient
    torch.manual_seed(0)
    T, D, H, E, k = 512, 256, 384, 16, 4
    dev = torch.device("cuda")
    x = torch.randn(T, D, device=dev, dtype=dtype)
    experts = rand_experts(T, k, E).to(dev)
    experts[: T // 2, 0] = 3                    # one heavy expert, several light ones, a few sentinels
    experts[::11, 1] = -1
    weights = torch.rand(T, k, device=dev)
    gate_up = (torch.randn(E, 2 * H, D, device=dev) / math.sqrt(D)).to(dtype)
    down = (torch.randn(E, D, H, device=dev) / math.sqrt(H)).to(dtype)
    grad_out = torch.randn(T, D, device=dev, dtype=dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
        out = ops.moe_mlp(leaves[0], experts, *leaves[1:], capacity=T // 2)
        return [out] + _grads(out, leaves, grad_out)

    with moe_kernels.use_backend("triton"):
        first, second = run(), run()
    torch.cuda.synchronize()
    _assert_same_bits(first, second, f"triton moe_mlp on {torch.cuda.get_device_name()}")


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("fmt", [None, "bf16", "mxfp4"])
def test_native_decode_thread_count_does_not_change_the_bits(fmt):
    # experts of a decode step (at most 8 rows, the streaming kernels) are single-threaded and spread over the
    # threads however unevenly: any thread count gives the same bits, forward
    T, D, H, E, k = 5, 64, 96, 8, 2
    x = torch.randn(T, D, dtype=torch.bfloat16 if fmt else torch.float32)
    ids = rand_experts(T, k, E)
    w = torch.rand(T, k).to(x.dtype)
    up, down = torch.randn(E, 2 * H, D) / 8, torch.randn(E, D, H) / 10
    if fmt == "mxfp4":
        up, down = (ops.QuantizedWeight.quantize(t, fmt) for t in (up, down))
    else:
        up, down = up.to(x.dtype), down.to(x.dtype)
    results = {}
    with moe_kernels.use_backend("native"), torch.no_grad():
        for n in (1, 2, 3):
            with num_threads(n):
                results[n] = [ops.moe_mlp(x, ids, w, up, down)]
    _assert_same_bits(results[1], results[2], f"{fmt} decode: 1 vs 2 threads")
    _assert_same_bits(results[1], results[3], f"{fmt} decode: 1 vs 3 threads")
