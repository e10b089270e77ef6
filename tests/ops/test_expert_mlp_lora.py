"""ops.moe_mlp with LoRA adapters on its projections (ops.LoRA): against the reference's merged weight
(w + scale * B @ A) in float64 on every backend, forward and every gradient; a frozen base weight gets no gradient
and its dW GEMM is skipped; the earned tolerance in float32; edge shapes; bad adapters refused by name; and
grouped_mm's backward without grad_w (the op, opcheck, each backend)."""
import pytest
import torch

import moe_kernels
from moe_kernels import ops
from moe_kernels.ops import grouped_gemm as ops_grouped_gemm
from moe_kernels.reference import expert_mlp as ref_mlp
from tests.helpers import assert_close64, assert_earned_max, rand_experts, reordered_sum_atol
from tests.ops.test_grouped_gemm import make_inputs

F64 = torch.float64


def _inputs(T, D, H, E, k, r, gated=True, dtype=F64, bias=False, experts=None):
    H2 = 2 * H if gated else H
    t = dict(x=torch.randn(T, D, dtype=F64), experts=rand_experts(T, k, E) if experts is None else experts,
             weights=torch.rand(T, k, dtype=F64) + 0.05,
             gate_up_proj=torch.randn(E, H2, D, dtype=F64) / D ** 0.5, down_proj=torch.randn(E, D, H, dtype=F64) / H ** 0.5,
             up_A=torch.randn(E, r, D, dtype=F64) / D ** 0.5, up_B=torch.randn(E, H2, r, dtype=F64),
             down_A=torch.randn(E, r, H, dtype=F64) / H ** 0.5, down_B=torch.randn(E, D, r, dtype=F64))
    if bias:
        t.update(gate_up_bias=torch.randn(E, H2, dtype=F64), down_bias=torch.randn(E, D, dtype=F64))
    return {n: v.to(dtype) if v.is_floating_point() else v for n, v in t.items()}


def _run(fn, inputs, grad, scales=(0.5, 2.0), frozen=True, **kw):
    """(out, {name: grad}) of fn (ops.moe_mlp or the reference) with LoRA on both projections; the base weights
    frozen (no gradient asked) unless not `frozen`."""
    trainable = ["x", "weights", "up_A", "up_B", "down_A", "down_B", "gate_up_bias", "down_bias"]
    if not frozen:
        trainable += ["gate_up_proj", "down_proj"]
    t = {n: v.detach().clone().requires_grad_(n in trainable) for n, v in inputs.items() if v.is_floating_point()}
    leaves = {n: v for n, v in t.items() if v.requires_grad}
    out = fn(t["x"], inputs["experts"], t["weights"], t["gate_up_proj"], t["down_proj"],
             gate_up_bias=t.get("gate_up_bias"), down_bias=t.get("down_bias"),
             gate_up_lora=ops.LoRA(t["up_A"], t["up_B"], scales[0]),
             down_lora=ops.LoRA(t["down_A"], t["down_B"], scales[1]), **kw)
    # the reference's loop over experts builds no graph when no token reaches one (T = 0): its gradients are zero
    grads = (torch.autograd.grad(out, list(leaves.values()), grad, allow_unused=True) if out.requires_grad
             else [None] * len(leaves))
    return out.detach(), {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(leaves.items(), grads)}


def _check_float64(backend, inputs, grad, **kw):
    """ops.moe_mlp on `backend` against the reference's merged weights in float64: the output and every gradient."""
    with moe_kernels.use_backend(backend):
        out, grads = _run(ops.moe_mlp, inputs, grad, **kw)
    want, want_grads = _run(ref_mlp.moe_mlp, inputs, grad, **kw)
    assert out.shape == want.shape
    assert_close64(out, want, "out")
    assert set(grads) == set(want_grads)
    for name in grads:
        assert_close64(grads[name], want_grads[name], f"grad {name}")


CASES = [pytest.param(dict(activation="silu", gated=True), id="swiglu"),
         pytest.param(dict(activation="gelu", gated=False), id="gelu-plain"),
         pytest.param(dict(activation="silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", gated=True),
                      id="gpt-oss")]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trained"])
@pytest.mark.parametrize("kw", CASES)
def test_lora_moe_mlp_float64_matches_merged_reference(backend, kw, frozen, bias):
    # 29 tokens (not a multiple of a block), 5 experts, k = 2, rank 3
    inputs = _inputs(29, 12, 10, 5, 2, 3, gated=kw["gated"], bias=bias)
    _check_float64(backend, inputs, torch.randn(29, 12, dtype=F64), frozen=frozen, **kw)


@pytest.mark.parametrize("case", ["one-expert", "empty-experts", "rank-1", "T=1", "T=0", "dropped-ids", "k=E"])
def test_lora_moe_mlp_edge_shapes(backend, case):
    T, D, H, E, k, r = 11, 8, 6, 4, 2, 3
    experts = None
    if case == "one-expert":
        experts = torch.full((T, 1), 2)
        k = 1
    elif case == "empty-experts":
        experts = rand_experts(T, k, 2)      # experts 2 and 3 get nothing
    elif case == "rank-1":
        r = 1
    elif case in ("T=1", "T=0"):
        T = int(case[-1])
        experts = rand_experts(T, k, E)
    elif case == "dropped-ids":            # ids outside [0, E) contribute zero (the expert-parallel sentinel)
        experts = rand_experts(T, k, E)
        experts[::3, 0] = E
    elif case == "k=E":
        k = E
    _check_float64(backend, _inputs(T, D, H, E, k, r, experts=experts), torch.randn(T, D, dtype=F64))


def test_lora_moe_mlp_capacity(backend):
    _check_float64(backend, _inputs(24, 8, 6, 3, 2, 2), torch.randn(24, 8, dtype=F64), capacity=5)


def test_lora_moe_mlp_float32_earned(backend):
    # float32 against float64 within twice the error of the reference's own float32 run (plus reordered sums)
    inputs = _inputs(64, 32, 24, 6, 2, 4)
    grad = torch.randn(64, 32, dtype=F64)
    low = {n: v.float() if v.is_floating_point() else v for n, v in inputs.items()}
    with moe_kernels.use_backend(backend):
        fast = _run(ops.moe_mlp, low, grad.float())
    ref64 = _run(ref_mlp.moe_mlp, inputs, grad)
    same = _run(ref_mlp.moe_mlp, low, grad.float())
    for (name, f), r, s in zip([("out", fast[0]), *fast[1].items()], [ref64[0], *ref64[1].values()],
                               [same[0], *same[1].values()]):
        assert f.dtype == torch.float32
        assert_earned_max(f, r, s, atol=1e-6 + reordered_sum_atol(r, torch.float32, 64 + 32 + 24), name=name)


def test_frozen_base_skips_its_weight_gradient(backend, monkeypatch):
    # the base projections' backward runs without grad_w (no [E, N, K] GEMM); the adapters' with it
    seen = []
    real = ops_grouped_gemm._grouped_mm_backward

    def spy(grad, a, w, offsets, bias, activation, gated, grad_w=True):
        seen.append((tuple(w.shape), grad_w))
        return real(grad, a, w, offsets, bias, activation, gated, grad_w)
    monkeypatch.setattr(ops_grouped_gemm, "_grouped_mm_backward", spy)
    inputs = _inputs(16, 8, 6, 3, 2, 2)
    with moe_kernels.use_backend(backend):
        _run(ops.moe_mlp, inputs, torch.randn(16, 8, dtype=F64))
    base = {(3, 12, 8), (3, 8, 6)}
    assert {s for s, g in seen if s in base} == base and not any(g for s, g in seen if s in base), seen
    assert all(g for s, g in seen if s not in base), seen


def test_lora_bad_adapters_are_refused_by_name():
    i = _inputs(4, 8, 6, 3, 2, 2)
    args = (i["x"], i["experts"], i["weights"], i["gate_up_proj"], i["down_proj"])
    with pytest.raises(ValueError, match=r"gate_up_lora: A must be \[E, r, K\] = \[3, r, 8\].*got A \(3, 2, 7\)"):
        ops.moe_mlp(*args, gate_up_lora=ops.LoRA(i["up_A"][..., :7], i["up_B"]))
    with pytest.raises(ValueError, match=r"down_lora: A must be .*B \[E, N, r\] = \[3, 8, r\]"):
        ops.moe_mlp(*args, down_lora=ops.LoRA(i["down_A"], i["down_B"][:, :, :1]))
    with pytest.raises(TypeError, match="down_lora: expected a moe_kernels.ops.LoRA"):
        ops.moe_mlp(*args, down_lora=(i["down_A"], i["down_B"], 1.0))
    with pytest.raises(TypeError, match=r"gate_up_lora.A|dtype"):
        ops.moe_mlp(*args, gate_up_lora=ops.LoRA(i["up_A"].float(), i["up_B"]))
    with pytest.raises(TypeError, match="gate_up_lora: scale must be a float"):
        ops.moe_mlp(*args, gate_up_lora=ops.LoRA(i["up_A"], i["up_B"], torch.tensor(1.0)))


def test_lora_moe_mlp_compiles_fullgraph():
    inputs = _inputs(16, 8, 6, 3, 2, 2)
    grad = torch.randn(16, 8, dtype=F64)
    torch._dynamo.reset()
    compiled = torch.compile(ops.moe_mlp, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, inputs, grad)
    want, want_grads = _run(ref_mlp.moe_mlp, inputs, grad)
    assert_close64(out, want, "out")
    for name in grads:
        assert_close64(grads[name], want_grads[name], f"grad {name}")


# --- grouped_mm's backward without grad_w -------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_grouped_mm_backward_without_grad_w(backend, gated):
    a, w, offsets, bias = make_inputs(30, 9, 10, 4, "dropped", with_bias=True)
    grad = torch.randn(30, 5 if gated else 10, dtype=F64)
    with moe_kernels.use_backend(backend):
        full = torch.ops.moe_kernels.grouped_mm_backward(grad, a, w, offsets, bias, "silu", gated)
        skip = torch.ops.moe_kernels.grouped_mm_backward(grad, a, w, offsets, bias, "silu", gated, False)
    assert skip[1].numel() == 0 and full[1].shape == w.shape
    assert_close64(skip[0], full[0], "grad_a")
    assert_close64(skip[2], full[2], "grad_bias")
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm_backward, (grad, a, w, offsets, bias, "silu", gated, False))
