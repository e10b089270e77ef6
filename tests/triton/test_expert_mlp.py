"""The fused expert MLP (moe_mlp on the triton backend: gather-fused GEMM1, weighted scatter GEMM2, fused
backward) against the float64 reference, forward and every gradient, under the Triton interpreter."""
import copy

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels  # noqa: E402
from moe_kernels import _backend  # noqa: E402
from moe_kernels.nn import SparseMoE  # noqa: E402
from tests.helpers import assert_earned_max, assert_moe_mlp_earned, rand_experts, run_moe_mlp  # noqa: E402



def _ids_one_expert(T, k, E):
    ids = rand_experts(T, k, E)
    ids[:, 0] = E - 1  # every token's first choice is the last expert
    return ids


def _ids_sentinel(T, k, E):
    ids = rand_experts(T, k, E)
    ids[::3, 0] = -1   # transformers' expert-parallel sentinels: contribute zero
    ids[1::4, -1] = E
    return ids


def _ids_two_experts(T, k, E):
    ids = torch.stack([torch.zeros(T, dtype=torch.int64), torch.full((T,), 3, dtype=torch.int64)], 1)
    return ids[:, :k]  # experts other than 0 and 3 are empty


# T, D, H, E, k, activation, gated, bias, capacity, make ids
CASES = [
    pytest.param(37, 24, 20, 7, 3, "silu", True, False, None, rand_experts, id="T37-D24-H20-E7-k3-silu"),  # prime E
    pytest.param(1, 16, 16, 4, 1, "silu", True, True, None, rand_experts, id="T1-k1-bias"),                # T=1, k=1
    pytest.param(9, 19, 13, 4, 4, "gelu", True, True, None, rand_experts, id="T9-D19-H13-E4-k=E"),         # odd dims, k=E
    pytest.param(11, 16, 8, 1, 1, "relu", False, False, None, rand_experts, id="E1-relu-plain"),           # E=1
    pytest.param(21, 16, 12, 6, 2, "silu", True, False, None, _ids_one_expert, id="all-to-one"),           # one expert hot
    pytest.param(13, 16, 12, 8, 2, "gelu_tanh", True, False, None, _ids_two_experts, id="empty-experts"),  # 6 empty
    pytest.param(29, 16, 12, 5, 2, "silu", True, True, 3, rand_experts, id="capacity3"),                   # drops
    pytest.param(23, 16, 12, 6, 3, "gelu", False, True, None, _ids_sentinel, id="sentinels-plain-bias"),   # -1 and E
]


def _inputs(T, D, H, E, k, gated, bias, make, dtype, out_dim=None):
    up = 2 * H if gated else H
    O = D if out_dim is None else out_dim  # the output width of down_proj [E, O, H]
    return dict(
        x=torch.randn(T, D, dtype=dtype),
        experts=make(T, k, E),
        weights=torch.rand(T, k, dtype=torch.float32) + 0.1,
        gate_up_proj=torch.randn(E, up, D, dtype=dtype) / D**0.5,
        down_proj=torch.randn(E, O, H, dtype=dtype) / H**0.5,
        gate_up_bias=torch.randn(E, up, dtype=dtype) if bias else None,
        down_bias=torch.randn(E, O, dtype=dtype) if bias else None,
    )


_run = run_moe_mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,D,H,E,k,activation,gated,bias,capacity,make", CASES)
def test_forward_and_gradients_match_reference(T, D, H, E, k, activation, gated, bias, capacity, make, dtype):
    inputs = _inputs(T, D, H, E, k, gated, bias, make, dtype)
    grad = torch.randn(T, D, dtype=dtype)
    kw = dict(activation=activation, gated=gated, capacity=capacity)
    calls = []
    fused = _backend.IMPLS["moe_mlp_fused"]["triton"]
    _backend.IMPLS["moe_mlp_fused"]["triton"] = lambda *a: calls.append(1) or fused(*a)
    try:
        out, grads = _run("triton", inputs, grad, **kw)
    finally:
        _backend.IMPLS["moe_mlp_fused"]["triton"] = fused
    assert calls, "the triton backend did not run the fused expert MLP"
    assert out.dtype == dtype
    # the kernels sum in another order than torch (tiled K loops; the routing-weight gradient is dH . H over H
    # where torch's is dOut . Y over D): chained reductions over D and H
    assert_moe_mlp_earned(_run, inputs, grad, (out, grads), dtype, D + H, **kw)


@pytest.mark.parametrize("out_dim", [pytest.param(5, id="O5<D"), pytest.param(24, id="O24>D")])
def test_output_width_differs_from_input_width(out_dim):
    # down_proj [E, O, H] with O != D: GEMM2 writes O columns, the backward reads O-wide gradients
    T, D, H, E, k = 19, 16, 12, 5, 2
    inputs = _inputs(T, D, H, E, k, False, True, rand_experts, torch.float32, out_dim=out_dim)
    grad = torch.randn(T, out_dim)
    kw = dict(activation="relu", gated=False, capacity=7)
    out, grads = _run("triton", inputs, grad, **kw)
    assert out.shape == (T, out_dim)
    assert_moe_mlp_earned(_run, inputs, grad, (out, grads), torch.float32, D + H + out_dim, **kw)


def test_sparse_moe_module_runs_the_fused_kernels():
    m = SparseMoE(16, 12, 6, 2, bias=True, capacity_factor=1.5, z_loss_coef=1e-3)
    m64 = copy.deepcopy(m).double()
    x = torch.randn(3, 7, 16)
    results = {}
    for name, module, backend in (("triton", m, "triton"), ("same", m, "reference"), ("ref64", m64, "reference")):
        module.zero_grad()
        with moe_kernels.use_backend(backend):
            y = module(x.to(next(module.parameters()).dtype))
            (y.square().sum() + module.aux_loss).backward()
        results[name] = [y.detach()] + [p.grad.clone() for p in module.parameters()]
    for fast, ref64, same in zip(results["triton"], results["ref64"], results["same"]):
        assert_earned_max(fast, ref64, same)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck_fused_ops(backend):
    T, D, H, E, k = 9, 16, 8, 4, 2
    i = _inputs(T, D, H, E, k, True, True, rand_experts, torch.float32)
    with moe_kernels.use_backend(backend):
        args = (i["x"].requires_grad_(), i["experts"], i["weights"].requires_grad_(),
                i["gate_up_proj"].requires_grad_(), i["down_proj"].requires_grad_(),
                i["gate_up_bias"].requires_grad_(), i["down_bias"].requires_grad_(), "silu", True, -1, True)
        torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_fused.default, args)
        out, h_pre, order, inverse, offsets = torch.ops.moe_kernels.moe_mlp_fused(*args)
        bwd = (torch.randn(T, D), *[a.detach() if torch.is_tensor(a) else a for a in args[:1]], args[2].detach(),
               args[3].detach(), args[4].detach(), args[5].detach(), args[6].detach(), h_pre.detach(), order, inverse,
               offsets, "silu", True)
        torch.library.opcheck(torch.ops.moe_kernels.moe_mlp_fused_backward.default, bwd)


def test_compile_fullgraph_sparse_moe_on_triton():
    m = SparseMoE(16, 12, 5, 2)
    x = torch.randn(11, 16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with moe_kernels.use_backend("triton"):
        y_c = compiled(x)
        g_c = torch.autograd.grad(y_c.sum(), x)[0]
        y_e = m(x)
        g_e = torch.autograd.grad(y_e.sum(), x)[0]
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU (the interpreter gets it wrong)")
@pytest.mark.parametrize("T,D,H,E,k", [(4096, 1024, 1792, 8, 2), (2048, 512, 192, 64, 8), (7, 1024, 1792, 8, 2)],
                         ids=["Mixtral-like", "Qwen3-like", "decode-T7"])
def test_bf16_at_real_sizes_on_gpu(T, D, H, E, k):
    inputs = {n: (t.cuda() if t is not None else None)
              for n, t in _inputs(T, D, H, E, k, True, False, rand_experts, torch.bfloat16).items()}
    grad = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
    assert_moe_mlp_earned(_run, inputs, grad, _run("auto", inputs, grad), torch.bfloat16, D + H)


@pytest.mark.parametrize("activation, gated", [("silu", True), ("silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]",
                                                                True), ("gelu", False)])
def test_lora_adapters_on_triton(activation, gated):
    # ops.moe_mlp with LoRA on both projections (their grouped GEMM pairs on the triton kernels) in float32 against
    # the merged float64 reference within the earned tolerance, forward and every gradient, base weights frozen
    from tests.helpers import reordered_sum_atol
    from tests.ops.test_expert_mlp_lora import _inputs as lora_inputs, _run as lora_run
    from moe_kernels import ops
    from moe_kernels.reference import expert_mlp as ref_mlp

    inputs = lora_inputs(19, 16, 12, 5, 2, 3, gated=gated, bias=True)
    grad = torch.randn(19, 16, dtype=torch.float64)
    low = {n: v.float() if v.is_floating_point() else v for n, v in inputs.items()}
    with moe_kernels.use_backend("triton"):
        fast = lora_run(ops.moe_mlp, low, grad.float(), activation=activation, gated=gated)
    ref64 = lora_run(ref_mlp.moe_mlp, inputs, grad, activation=activation, gated=gated)
    same = lora_run(ref_mlp.moe_mlp, low, grad.float(), activation=activation, gated=gated)
    assert set(fast[1]) == set(ref64[1])
    for (name, f), r, s in zip([("out", fast[0]), *fast[1].items()], [ref64[0], *ref64[1].values()],
                               [same[0], *same[1].values()]):
        assert_earned_max(f, r, s, atol=1e-6 + reordered_sum_atol(r, torch.float32, 16 + 12 + 19 * 2), name=name)
