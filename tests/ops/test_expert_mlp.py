"""moe_kernels.ops.moe_mlp: the transformers v5 experts contract, composed of sort_by_expert, permute,
grouped_mm and unpermute.

Oracles: a naive loop over tokens and their k slots calling a per-expert MLP written with explicit
matrix-vector products in float64 (capacity decided by its own slot-major counting loop), and
moe_kernels.reference.moe_mlp (the spec). Lower precision passes on the earned tolerance against plain
PyTorch in the same dtype written the way transformers' eager experts loop is. Also: gradcheck with dropped
pairs and sentinels, determinism, NaN isolation, strides, bad input.
"""
import math

import pytest
import torch

import moe_kernels
from moe_kernels import _backend
from moe_kernels import reference as ref
from moe_kernels.ops import moe_mlp
from moe_kernels.reference.activations import ACTIVATIONS
from tests.helpers import (GLU_SPECS, assert_close64, assert_earned_dtype, assert_earned_max, assert_grads_close64, naive_glu,
                           num_threads, poison_, rand_experts, reordered_sum_atol, torch_glu)

F64 = torch.float64


# --- independent oracles ------------------------------------------------------------------------------
def naive_kept(experts, E, capacity):
    """kept[t][j]: pair (t, j) reaches its expert. Ids outside [0, E) never do; with a capacity each expert takes
    pairs in priority order, all first choices (slot 0, in token order) before any second choice, and so on."""
    T, k = experts.shape
    kept = [[False] * k for _ in range(T)]
    taken = [0] * E
    for j in range(k):
        for t in range(T):
            e = int(experts[t, j])
            if 0 <= e < E and (capacity is None or taken[e] < capacity):
                kept[t][j] = True
                taken[e] += 1
    return kept


def naive_expert(x_t, e, gate_up, down, gate_up_bias, down_bias, activation, gated):
    """Expert e's MLP on one token vector, float64."""
    h = gate_up[e] @ x_t
    if gate_up_bias is not None:
        h = h + gate_up_bias[e]
    y = down[e] @ naive_glu(h, activation, gated)
    if down_bias is not None:
        y = y + down_bias[e]
    return y


def naive_moe_mlp(x, experts, weights, gate_up, down, gate_up_bias=None, down_bias=None, *, activation="silu",
                  gated=True, capacity=None):
    """out[t] = sum over kept slots j of weights[t, j] * expert_{experts[t, j]}(x[t]), in float64."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    x, weights, gate_up, down, gate_up_bias, down_bias = map(d, (x, weights, gate_up, down, gate_up_bias, down_bias))
    T, k = experts.shape
    E = gate_up.shape[0]
    kept = naive_kept(experts, E, capacity)
    out = poison_(torch.empty(T, down.shape[1], dtype=F64))  # every row must be written below
    for t in range(T):
        acc = torch.zeros(down.shape[1], dtype=F64)
        for j in range(k):
            if kept[t][j]:
                e = int(experts[t, j])
                acc = acc + weights[t, j] * naive_expert(x[t], e, gate_up, down, gate_up_bias, down_bias, activation,
                                                         gated)
        out[t] = acc
    return out


def same_dtype_moe_mlp(x, experts, weights, gate_up, down, gate_up_bias=None, down_bias=None, *, activation="silu",
                       gated=True, capacity=None):
    """Plain PyTorch in x's dtype, the way transformers' eager experts loop writes it (index_add_ per expert)."""
    T, k = experts.shape
    E = gate_up.shape[0]
    kept = torch.tensor(naive_kept(experts, E, capacity), dtype=torch.bool).view(T, k)
    out = torch.zeros(T, down.shape[1], dtype=x.dtype)
    for e in range(E):
        tok, slot = torch.nonzero((experts == e) & kept, as_tuple=True)
        h = x[tok] @ gate_up[e].t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        y = torch_glu(h, activation, gated) @ down[e].t()
        if down_bias is not None:
            y = y + down_bias[e]
        out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
    return out


# --- inputs -----------------------------------------------------------------------------------------
def make_routing(T, k, E, layout, id_dtype):
    """experts [T, k]. layout: random (top-k-like, distinct per token), one (every token's slot 0 is the same
    expert; with k=1 all tokens go to one expert), sparse (only even experts chosen: the odd ones are empty),
    sentinel (random, then some pairs set to -1 and some to E, the expert-parallel sentinels)."""
    if layout == "sparse":
        evens = torch.arange(0, E, 2)
        experts = evens[rand_experts(T, k, len(evens))]
    else:
        experts = rand_experts(T, k, E)
    experts = experts.contiguous()
    if layout == "one":
        target = int(torch.randint(E, ()))
        for t in range(T):  # put `target` in slot 0, keeping the ids of a token distinct
            row = experts[t].tolist()
            row.remove(target) if target in row else row.pop()
            experts[t] = torch.tensor([target] + row)
    if layout == "sentinel" and T * k >= 2:
        flat = experts.view(-1)
        pick = torch.randperm(T * k)[: max(2, T * k // 4)]
        flat[pick[0::2]] = -1
        flat[pick[1::2]] = E
    return experts.to(id_dtype)


def make_inputs(T, D, H, E, k, layout, *, gated=True, with_bias=True, dtype=F64, id_dtype=torch.int64,
                out_dim=None):
    """Projections scaled by 1/sqrt(fan-in) as in a real layer; routing weights positive, like a softmax's.
    out_dim: the output width O of down_proj [E, O, H] (D by default)."""
    O = D if out_dim is None else out_dim
    x = torch.randn(T, D, dtype=F64)
    gate_up = torch.randn(E, 2 * H if gated else H, D, dtype=F64) / math.sqrt(D)
    down = torch.randn(E, O, H, dtype=F64) / math.sqrt(H)
    gate_up_bias = torch.randn(E, 2 * H if gated else H, dtype=F64) if with_bias else None
    down_bias = torch.randn(E, O, dtype=F64) if with_bias else None
    weights = torch.rand(T, k, dtype=F64) + 0.05
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    experts = make_routing(T, k, E, layout, id_dtype)
    return cast(x), experts, cast(weights), cast(gate_up), cast(down), cast(gate_up_bias), cast(down_bias)


# (T, D, H, E, k, layout, capacity)
SHAPES = [
    pytest.param(37, 15, 9, 7, 3, "random", None, id="T37-D15-H9-E7-k3"),            # prime E, odd D and H
    pytest.param(1, 8, 4, 4, 2, "random", None, id="T1-D8-H4-E4-k2"),                # T=1 (decode)
    pytest.param(0, 8, 4, 4, 2, "random", None, id="T0-D8-H4-E4-k2"),                # T=0: an empty batch
    pytest.param(20, 6, 5, 5, 1, "random", None, id="T20-D6-H5-E5-k1"),              # k=1
    pytest.param(12, 6, 4, 4, 4, "random", None, id="T12-D6-H4-E4-k4"),              # k=E: every token visits every expert
    pytest.param(9, 5, 3, 1, 1, "random", None, id="T9-D5-H3-E1-k1"),                # E=1
    pytest.param(16, 8, 6, 13, 1, "one", None, id="T16-D8-H6-E13-k1-one"),           # prime E=13, all tokens to one expert
    pytest.param(15, 7, 5, 6, 2, "one", None, id="T15-D7-H5-E6-k2-one"),             # one expert gets every token's slot 0
    pytest.param(24, 7, 5, 6, 2, "sparse", None, id="T24-D7-H5-E6-k2-sparse"),       # empty experts (the odd ones)
    pytest.param(30, 8, 4, 5, 2, "sentinel", None, id="T30-D8-H4-E5-k2-sentinel"),   # ids -1 and E contribute zero
    pytest.param(30, 8, 4, 5, 2, "random", 5, id="T30-D8-H4-E5-k2-cap5"),            # capacity 5: the rest dropped
    pytest.param(31, 8, 4, 5, 3, "sentinel", 4, id="T31-D8-H4-E5-k3-sentinel-cap4"),  # sentinels and capacity together
    pytest.param(10, 8, 4, 5, 2, "random", 0, id="T10-D8-H4-E5-k2-cap0"),            # capacity 0: every pair dropped
]
GATED = [pytest.param(False, id="plain"), pytest.param(True, id="gated")]
BIAS = [pytest.param(False, id="nobias"), pytest.param(True, id="bias")]
IDS = [pytest.param(torch.int32, id="ids32"), pytest.param(torch.int64, id="ids64")]


def call(inputs, **kw):
    x, experts, weights, gate_up, down, gate_up_bias, down_bias = inputs
    return moe_mlp(x, experts, weights, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias, **kw)


def spec(inputs, **kw):
    x, experts, weights, gate_up, down, gate_up_bias, down_bias = inputs
    return ref.moe_mlp(x, experts, weights, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias, **kw)


# --- forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("id_dtype", IDS)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("T, D, H, E, k, layout, capacity", SHAPES)
def test_forward_float64_matches_naive_and_reference(backend, T, D, H, E, k, layout, capacity, gated, with_bias,
                                                     id_dtype):
    inputs = make_inputs(T, D, H, E, k, layout, gated=gated, with_bias=with_bias, id_dtype=id_dtype)
    kw = dict(activation="silu", gated=gated, capacity=capacity)
    out = call(inputs, **kw)
    assert out.shape == (T, D) and out.dtype == F64
    assert_close64(out, naive_moe_mlp(*inputs, **kw), "vs naive loop")
    assert_close64(out, spec(inputs, **kw), "vs reference")
    if capacity == 0:
        assert bool((out == 0).all())  # nothing reaches an expert, not even its bias


ACTIVATION_CASES = ([pytest.param(a, g, id=f"{a}-{'gated' if g else 'plain'}") for g in (False, True)
                     for a in ACTIVATIONS]
                    + [pytest.param(spec, True, id=spec) for spec in GLU_SPECS])


@pytest.mark.parametrize("activation,gated", ACTIVATION_CASES)
def test_forward_every_activation(backend, activation, gated):
    # prime E, odd D and H, sentinels and a capacity that drops pairs
    inputs = make_inputs(29, 9, 7, 7, 2, "sentinel", gated=gated)
    kw = dict(activation=activation, gated=gated, capacity=7)
    out = call(inputs, **kw)
    assert_close64(out, naive_moe_mlp(*inputs, **kw), "vs naive loop")
    assert_close64(out, spec(inputs, **kw), "vs reference")


@pytest.mark.parametrize("out_dim", [pytest.param(3, id="O3<D"), pytest.param(11, id="O11>D")])
def test_output_width_differs_from_input_width(backend, out_dim):
    # down_proj [E, O, H] with O != D, and a capacity that drops pairs: forward and every gradient
    inputs = make_inputs(21, 7, 5, 4, 2, "random", gated=False, out_dim=out_dim)
    leaves = [inputs[0], *inputs[2:]]
    for t in leaves:
        t.requires_grad_()
    kw = dict(activation="relu", gated=False, capacity=8)
    out = call(inputs, **kw)
    assert out.shape == (21, out_dim)
    want = naive_moe_mlp(*inputs, **kw)
    assert_close64(out, want, "vs naive loop")
    assert_grads_close64(out, want, leaves, ("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"))


def test_sentinels_and_dropped_pairs_contribute_exactly_nothing(backend):
    # a token all of whose pairs are sentinels or dropped gets an exact zero row, whatever the biases
    inputs = make_inputs(8, 6, 4, 3, 2, "random")
    experts = inputs[1]
    experts[2] = torch.tensor([-1, 3])  # token 2: both sentinels
    experts[5] = torch.tensor([3, -1])  # token 5: both sentinels, the other order
    out = call(inputs)
    assert bool((out[2] == 0).all()) and bool((out[5] == 0).all())
    assert_close64(out, naive_moe_mlp(*inputs), "vs naive loop")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("weights_fp32", [False, True], ids=["w-same", "w-fp32"])
@pytest.mark.parametrize("gated", GATED)
def test_forward_low_precision_earned(backend, gated, weights_fp32, dtype):
    # prime E, odd D and H, sentinels and a dropping capacity; routing weights in x's dtype or in fp32 (a router's).
    # T*D = 3968 outputs: a tensor-wide maximum error of a 16-bit result is a stable statistic only on this many
    inputs = list(make_inputs(128, 31, 15, 7, 3, "sentinel", gated=gated, dtype=dtype))
    if weights_fp32:
        inputs[2] = inputs[2].float()
    kw = dict(activation="silu", gated=gated, capacity=40)
    out = call(inputs, **kw)
    assert out.dtype == dtype
    assert_earned_dtype(out, naive_moe_mlp(*inputs, **kw), same_dtype_moe_mlp(*inputs, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gated", GATED)
def test_forward_decode_low_precision_earned(backend, gated, dtype):
    # decode: 4 tokens over 32 experts, a row or two per expert (groups this small stream the weights in their own
    # dtype on the native backend); D = 1000 gives T*D = 4000 outputs, a stable tensor-wide maximum error. Taken
    # over the tensor in every dtype: GEMM1 sums D = 1000 products in an order of its own, so elementwise a correct
    # result fails wherever the baseline happens to round almost exactly
    inputs = make_inputs(4, 1000, 15, 32, 4, "random", gated=gated, dtype=dtype)
    out = call(inputs, gated=gated)
    assert out.dtype == dtype
    assert_earned_max(out, naive_moe_mlp(*inputs, gated=gated), same_dtype_moe_mlp(*inputs, gated=gated))


# --- backward ---------------------------------------------------------------------------------------
def grad_inputs(gated, with_bias):
    """Small float64 leaves: T=6, k=2, E=3 with sentinels -1 and E and a capacity that drops a pair."""
    x, _, weights, gate_up, down, gate_up_bias, down_bias = make_inputs(6, 3, 2, 3, 2, "random", gated=gated,
                                                                         with_bias=with_bias)
    experts = torch.tensor([[0, 1], [1, -1], [0, 2], [3, 0], [0, 1], [2, 1]])  # expert 0 is asked 4 times, keeps 3
    leaves = tuple(t.requires_grad_() for t in (x, weights, gate_up, down, gate_up_bias, down_bias) if t is not None)
    assert not all(a for row in naive_kept(experts, 3, 3) for a in row)  # something is dropped
    return experts, leaves


@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu_tanh", False)],
                         ids=["silu-gated", "gelu_tanh-plain"])
def test_gradcheck(backend, activation, gated, with_bias):
    experts, leaves = grad_inputs(gated, with_bias)

    def fn(x, weights, gate_up, down, *biases):
        gate_up_bias, down_bias = biases if biases else (None, None)
        return moe_mlp(x, experts, weights, gate_up, down, activation=activation, gated=gated,
                       gate_up_bias=gate_up_bias, down_bias=down_bias, capacity=3)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("gated", GATED)
def test_backward_matches_naive_autograd(backend, gated):
    # prime E, odd D and H, sentinels, a dropping capacity, int32 ids
    inputs = make_inputs(23, 9, 5, 7, 3, "sentinel", gated=gated, id_dtype=torch.int32)
    leaves = [inputs[i].requires_grad_() for i in (0, 2, 3, 4, 5, 6)]
    kw = dict(activation="gelu", gated=gated, capacity=8)
    grad_out = torch.randn(23, 9, dtype=F64)
    got = torch.autograd.grad(call(inputs, **kw), leaves, grad_out)
    want = torch.autograd.grad(naive_moe_mlp(*inputs, **kw), leaves, grad_out)
    for name, g, n in zip(("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), got, want):
        assert_close64(g, n, f"grad of {name}")
    # the weights of pairs that never reached an expert get no gradient
    kept = torch.tensor(naive_kept(inputs[1], 7, 8))
    assert bool((got[1][~kept] == 0).all())


@pytest.mark.parametrize("activation,gated", ACTIVATION_CASES)
def test_backward_every_activation(backend, activation, gated):
    # experts of more than the streaming path's 8 rows (the per-expert epilogues: vectorised silu, relu and identity,
    # ATen's gelu), H = 13 so each row ends in a partial vector
    inputs = make_inputs(40, 9, 13, 3, 2, "sentinel", gated=gated)
    leaves = [inputs[i].requires_grad_() for i in (0, 2, 3, 4, 5, 6)]
    kw = dict(activation=activation, gated=gated)
    grad_out = torch.randn(40, 9, dtype=F64)
    got = torch.autograd.grad(call(inputs, **kw), leaves, grad_out)
    want = torch.autograd.grad(naive_moe_mlp(*inputs, **kw), leaves, grad_out)
    for name, g, n in zip(("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), got, want):
        assert_close64(g, n, f"grad of {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_wide_pre_activations_fp32_earned(backend, activation):
    # pre-activations spread over +-200: the saturating ends of silu's exp (clamped to float32's normal range) and
    # of the gelus, forward and every gradient within the earned float32 tolerance
    T, D = 48, 16
    inputs = list(make_inputs(T, D, 11, 3, 2, "random", dtype=torch.float32))
    inputs[0] = inputs[0] * 50
    kw = dict(activation=activation, gated=True)
    grad_out = torch.randn(T, D, dtype=F64)
    leaf_idx = (0, 2, 3, 4, 5, 6)

    def run(fn, cast):
        ins = [t.detach().to(cast).requires_grad_() if i in leaf_idx else t for i, t in enumerate(inputs)]
        out = fn(*ins, **kw)
        return (out.detach(), *torch.autograd.grad(out, [ins[i] for i in leaf_idx], grad_out.to(out.dtype)))

    fast = run(lambda *a, **k: call(a, **k), torch.float32)
    ref64 = run(naive_moe_mlp, F64)
    same = run(same_dtype_moe_mlp, torch.float32)
    pre = torch.einsum("td,ehd->teh", inputs[0].double(), inputs[3].double())
    assert pre.abs().max() > 100, "the inputs do not reach the saturating range"
    for name, f, r, b in zip(("out", "x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), fast,
                             ref64, same):
        assert bool(f.isfinite().all()), f"{name}: non-finite values from finite inputs"
        assert_earned_max(f, r, b, atol=1e-6 + reordered_sum_atol(r, torch.float32, T * 2), name=name)


def test_empty_batch_backward(backend):
    # T=0: the forward gives [0, D]; every parameter gradient is an exact zero of its own shape
    inputs = make_inputs(0, 8, 4, 4, 2, "random")
    leaves = [inputs[i].requires_grad_() for i in (0, 2, 3, 4, 5, 6)]
    out = call(inputs)
    assert out.shape == (0, 8)
    grads = torch.autograd.grad(out, leaves, torch.randn(0, 8, dtype=F64))
    for leaf, g in zip(leaves, grads):
        assert g.shape == leaf.shape and bool((g == 0).all())


@pytest.mark.skipif(not _backend.NATIVE, reason="the native ops are not built")
def test_native_backward_refuses_an_inverse_past_the_kept_rows():
    # capacity 1 drops pairs, so offsets[E] < T*k and rows [offsets[E], T*k) of the backward's dX scratch are never
    # written. An inverse pointing there once summed an earlier call's leftovers into grad_x (a zero gradient gave
    # 3e6); it is refused, naming the op and the pair.
    C = torch.ops.moe_kernels_C
    T, k, D, H, E = 6, 2, 8, 4, 3
    x = torch.randn(T, D, dtype=F64)
    experts = torch.randint(E, (T, k))
    weights = torch.rand(T, k, dtype=F64)
    up, down = torch.randn(E, 2 * H, D, dtype=F64), torch.randn(E, D, H, dtype=F64)
    out, h_pre, order, inverse, offsets = C.moe_mlp_forward(x, experts, weights, up, down, None, None, "silu", True,
                                                            1, True)
    kept = int(offsets[-1])
    assert kept < T * k
    args = (x, weights, up, down, None, None, h_pre, order)
    C.moe_mlp_backward(torch.randn(T, D, dtype=F64) * 1e6, *args, inverse, offsets, "silu", True)  # fills scratch
    bad = inverse.clone()
    t, j = (int(v) for v in torch.nonzero(bad >= 0)[0])
    bad[t, j] = kept
    with pytest.raises(RuntimeError, match=rf"moe_mlp_backward: inverse\[{t}, {j}\] = {kept} is past the {kept} "
                                           r"rows that hold results"):
        C.moe_mlp_backward(torch.zeros(T, D, dtype=F64), *args, bad, offsets, "silu", True)


# --- determinism, NaN isolation, strides --------------------------------------------------------------
def test_deterministic_forward_and_backward(backend):
    inputs = make_inputs(96, 32, 24, 8, 2, "sentinel", dtype=torch.float32)
    grad_out = torch.randn(96, 32)
    runs = []
    for _ in range(2):
        fresh = [t.detach().clone() if t is not None else None for t in inputs]
        leaves = [fresh[i].requires_grad_() for i in (0, 2, 3, 4, 5, 6)]
        out = call(fresh, capacity=20)
        runs.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


@pytest.mark.parametrize("capacity", [None, 6], ids=["nocap", "cap6"])
def test_nan_in_one_token_stays_in_its_row(backend, capacity):
    inputs = list(make_inputs(20, 8, 4, 5, 2, "sentinel", dtype=torch.float32))
    t = 7
    inputs[1][t] = torch.tensor([0, 1])  # token 7 reaches experts 0 and 1 (slot 0 of a low token: kept under cap6)
    inputs[1][:3] = torch.tensor([2, 3])  # tokens before it do not fill experts 0 and 1
    clean = call(inputs, capacity=capacity)
    inputs[0] = inputs[0].clone()
    inputs[0][t, 3] = float("nan")
    dirty = call(inputs, capacity=capacity)
    others = torch.arange(20) != t
    assert torch.equal(dirty[others], clean[others]), "a NaN in one token leaked into another token's row"
    assert bool(dirty[t].isnan().all())


@pytest.mark.skipif(not _backend.native_available(), reason="native ops not built")
@pytest.mark.parametrize("D,H", [(200, 100), (64, 48)], ids=["widths-not-of-32", "widths-of-16"])
def test_native_bf16_gemms_keep_a_nan_in_its_token(D, H):
    # many rows an expert: the GEMMs go through ATen's bfloat16 matmul, which on CPUs with AMX mixes a NaN row into
    # its neighbour's product when the inner size is not a multiple of 32 (forward: D and H; backward dX: D and 2H)
    T, E, k, t = 96, 3, 2, 1
    x = torch.randn(T, D).bfloat16()
    x[t, 5] = float("nan")
    experts = rand_experts(T, k, E)
    weights = torch.rand(T, k).bfloat16()
    up = (torch.randn(E, 2 * H, D) / math.sqrt(D)).bfloat16().requires_grad_()
    down = (torch.randn(E, D, H) / math.sqrt(H)).bfloat16().requires_grad_()
    xg = x.clone().requires_grad_()
    with moe_kernels.use_backend("native"):
        out = moe_mlp(xg, experts, weights, up, down)
        (dx,) = torch.autograd.grad(out, [xg], torch.randn(T, D).bfloat16())
    others = torch.arange(T) != t
    assert bool(out[t].isnan().all())
    assert not bool(out[others].isnan().any()), "a NaN in one token leaked into another token's output"
    assert not bool(dx[others].isnan().any()), "a NaN in one token leaked into another token's input gradient"


def test_non_contiguous_inputs(backend):
    T, D, H, E, k = 19, 7, 5, 5, 2
    x = torch.randn(D, T, dtype=F64).t()
    experts = make_routing(T, k, E, "sentinel", torch.int64).t().contiguous().t()
    weights = (torch.rand(k, T, dtype=F64) + 0.05).t()
    gate_up = (torch.randn(E, D, 2 * H, dtype=F64) / math.sqrt(D)).transpose(1, 2)
    down = (torch.randn(E, H, D, dtype=F64) / math.sqrt(H)).transpose(1, 2)
    gate_up_bias = torch.randn(2 * H, E, dtype=F64).t()
    down_bias = torch.randn(D, 2 * E, dtype=F64).t()[::2]
    strided = (x, experts, weights, gate_up, down, gate_up_bias, down_bias)
    assert not any(t.is_contiguous() for t in strided)
    dense = tuple(t.contiguous() for t in strided)
    grad_out = torch.randn(T, D, dtype=F64)
    results = []
    for inputs in (strided, dense):
        inputs = [t.detach() for t in inputs]
        leaves = [inputs[i].requires_grad_() for i in (0, 2, 3, 4, 5, 6)]
        out = call(inputs, capacity=6)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu", False), ("relu", True)],
                         ids=["silu-gated", "gelu-plain", "relu-gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_low_precision_earned(backend, dtype, activation, gated):
    # every gradient (x, routing weights, projections, biases) against autograd through the naive loop in float64
    # on the same rounded inputs, within twice the error of autograd through plain PyTorch in the same dtype, taken
    # over each tensor (assert_earned_max), plus what reordering a sum of up to T*k terms may add: the bias
    # gradients have few elements, too few for the baseline's maximum error to be a stable statistic alone
    T, D = 96, 31
    inputs = list(make_inputs(T, D, 15, 7, 3, "sentinel", gated=gated, dtype=dtype))
    kw = dict(activation=activation, gated=gated, capacity=30)
    grad_out = torch.randn(T, D, dtype=F64)
    leaf_idx = (0, 2, 3, 4, 5, 6)

    def grads(fn, cast):
        ins = [t.detach().to(cast).requires_grad_() if i in leaf_idx else t for i, t in enumerate(inputs)]
        out = fn(*ins, **kw)
        return torch.autograd.grad(out, [ins[i] for i in leaf_idx], grad_out.to(out.dtype))

    fast = grads(lambda *a, **k: call(a, **k), dtype)
    ref64 = grads(naive_moe_mlp, F64)
    same = grads(same_dtype_moe_mlp, dtype)
    for name, f, r, b in zip(("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), fast, ref64,
                             same):
        assert_earned_max(f, r, b, atol=1e-6 + reordered_sum_atol(r, dtype, T * 3), name=f"grad of {name}")


FUSED_OPCHECK = [pytest.param(torch.float32, -1, True, id="fp32-bias"),
                 pytest.param(F64, 5, False, id="fp64-cap5-nobias")]


@pytest.mark.parametrize("dtype, capacity, with_bias", FUSED_OPCHECK)
def test_opcheck_fused_ops(backend, dtype, capacity, with_bias):
    # the fused op and its backward under the backend of the fixture (the native C++ op or the reference pieces)
    T, D, H, E, k = 13, 8, 6, 5, 2
    x, experts, weights, gate_up, down, gate_up_bias, down_bias = make_inputs(T, D, H, E, k, "sentinel", dtype=dtype,
                                                                               with_bias=with_bias)
    leaves = [t.requires_grad_() if t is not None else None
              for t in (x, weights, gate_up, down, gate_up_bias, down_bias)]
    x, weights, gate_up, down, gate_up_bias, down_bias = leaves
    args = (x, experts, weights, gate_up, down, gate_up_bias, down_bias, "gelu", True, capacity, True)
    torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_fused.default, args)
    _, h_pre, order, inverse, offsets = torch.ops.moe_kernels.moe_mlp_fused(*args)
    detached = [t.detach() if t is not None else None for t in leaves]
    bwd = (torch.randn(T, D, dtype=dtype), detached[0], *detached[1:], h_pre.detach(), order, inverse, offsets, "gelu",
           True)
    torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_fused_backward.default, bwd)


# --- the native scheduler ------------------------------------------------------------------------------
def skewed_routing(T, k, E, id_dtype):
    """Slot 0 of two thirds of the tokens goes to expert 0 (one heavy group), everything else at random."""
    experts = make_routing(T, k, E, "random", id_dtype)
    heavy = torch.arange(T) < 2 * T // 3
    experts[heavy, 0] = 0
    experts[heavy, 1:] = torch.where(experts[heavy, 1:] == 0, E - 1, experts[heavy, 1:])
    return experts


# (T, D, H, E, k, layout, threads)
SCHEDULES = [
    pytest.param(200, 16, 8, 16, 2, "random", 4, id="T200-E16-k2-spread-over-4-threads"),     # many light experts
    pytest.param(300, 12, 6, 64, 8, "sentinel", 3, id="T300-E64-k8-tiny-groups-3-threads"),   # tiny groups, odd count
    pytest.param(90, 12, 6, 13, 2, "skewed", 4, id="T90-E13-k2-one-heavy-then-light"),        # heavy, then spread
    pytest.param(40, 12, 6, 3, 1, "random", 4, id="T40-E3-k1-few-experts"),                   # each one at a time
    pytest.param(1, 12, 6, 8, 2, "random", 4, id="T1-E8-k2-decode"),                          # two one-row groups
    pytest.param(200, 16, 8, 16, 2, "random", 1, id="T200-E16-k2-one-thread"),                 # the serial path
]


@pytest.mark.skipif(not _backend.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("T, D, H, E, k, layout, threads", SCHEDULES)
def test_native_schedules_match_reference(T, D, H, E, k, layout, threads):
    inputs = list(make_inputs(T, D, H, E, k, "random"))
    if layout != "random":
        inputs[1] = skewed_routing(T, k, E, torch.int64) if layout == "skewed" else make_routing(T, k, E, layout,
                                                                                                   torch.int64)
    leaf_idx = (0, 2, 3, 4, 5, 6)
    grad_out = torch.randn(T, D, dtype=F64)

    def run(backend):
        ins = [t.detach().clone().requires_grad_() if i in leaf_idx else t for i, t in enumerate(inputs)]
        with moe_kernels.use_backend(backend), num_threads(threads):
            out = call(ins, activation="gelu", capacity=T)
            return (out, *torch.autograd.grad(out, [ins[i] for i in leaf_idx], grad_out))

    native, again, reference = run("native"), run("native"), run("reference")
    for name, a, b, r in zip(("out", "x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"),
                             native, again, reference):
        assert torch.equal(a, b), f"{name}: two native runs differ"
        assert_close64(a, r, f"{name} native vs reference")


# --- bad input --------------------------------------------------------------------------------------
def _bad_cases():
    """(id, change to the good keyword arguments, exception, message pattern naming the argument)."""
    return [
        ("x-rank3", lambda k: k.update(x=k["x"][None]), ValueError, r"^x must have 2 dimensions"),
        ("x-D-mismatch", lambda k: k.update(x=k["x"][:, :-1]), ValueError, r"^x: \[T, D\] must have D = 6"),
        ("x-dtype-mismatch", lambda k: k.update(x=k["x"].double()), TypeError, r"share a dtype.*x torch\.float64"),
        ("experts-float", lambda k: k.update(experts=k["experts"].float()), TypeError, r"^experts must have dtype"),
        ("experts-rank1", lambda k: k.update(experts=k["experts"][:, 0]), ValueError, r"^experts must have 2 dimensions"),
        ("experts-T-mismatch", lambda k: k.update(experts=k["experts"][:-1]), ValueError, r"^experts must be \[T, k\]"),
        ("weights-shape", lambda k: k.update(weights=k["weights"][:, :1]), ValueError, r"^weights must have shape"),
        ("weights-int", lambda k: k.update(weights=k["weights"].long()), TypeError, r"^weights must have dtype"),
        ("down-H-mismatch", lambda k: k.update(down_proj=k["down_proj"][..., :-1]), ValueError,
         r"gate_up_proj and down_proj must be \[E, 2H, D\] and \[E, O, H\]"),
        ("down-E-mismatch", lambda k: k.update(down_proj=k["down_proj"][:-1]), ValueError, r"gate_up_proj and down_proj"),
        # an output width O != D is allowed, but down_bias [E, O] must follow it
        ("down-O-vs-down_bias", lambda k: k.update(down_proj=k["down_proj"][:, :-1]), ValueError,
         r"^down_bias must have shape \(3, 5\)"),
        ("gate_up-odd-rows", lambda k: k.update(gate_up_proj=k["gate_up_proj"][:, :-1]), ValueError,
         r"gate_up_proj and down_proj"),
        ("gate_up-rank2", lambda k: k.update(gate_up_proj=k["gate_up_proj"][0]), ValueError,
         r"^gate_up_proj must have 3 dimensions"),
        ("down-dtype", lambda k: k.update(down_proj=k["down_proj"].double()), TypeError, r"share a dtype.*down_proj"),
        ("gate_up_bias-shape", lambda k: k.update(gate_up_bias=k["gate_up_bias"][:, :-1]), ValueError,
         r"^gate_up_bias must have shape"),
        ("down_bias-shape", lambda k: k.update(down_bias=k["down_bias"][None]), ValueError, r"^down_bias must have shape"),
        ("down_bias-dtype", lambda k: k.update(down_bias=k["down_bias"].half()), TypeError, r"share a dtype.*down_bias"),
        ("activation", lambda k: k.update(activation="swiglu"), ValueError, r"^activation must be one of"),
        ("capacity-negative", lambda k: k.update(capacity=-1), ValueError, r"^capacity must be None or an int >= 0"),
        ("capacity-float", lambda k: k.update(capacity=2.5), ValueError, r"^capacity must be None or an int"),
    ]


@pytest.mark.parametrize("change, exc, match", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_input_raises_naming_the_argument(backend, change, exc, match):
    T, D, H, E, k = 5, 6, 4, 3, 2
    kwargs = dict(x=torch.randn(T, D), experts=rand_experts(T, k, E), weights=torch.rand(T, k),
                  gate_up_proj=torch.randn(E, 2 * H, D), down_proj=torch.randn(E, D, H),
                  gate_up_bias=torch.randn(E, 2 * H), down_bias=torch.randn(E, D), activation="silu", capacity=None)
    moe_mlp(**kwargs)  # the unchanged arguments are fine
    change(kwargs)
    with pytest.raises(exc, match=match):
        moe_mlp(**kwargs)
