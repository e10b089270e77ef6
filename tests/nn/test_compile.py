"""torch.compile(module, fullgraph=True) of SparseMoE, DenseMoE, SoftMoE and DynamicSlotsSoftMoE: one graph (fullgraph raises on any
graph break), forward and backward equal eager. float64 inputs: the compiled and eager runs differ only by the
summation order inductor may pick around the custom ops (~1e-16 relative), so 1e-12 catches any real error."""
import pytest
import torch

from moe_kernels import DenseMoE, DynamicSlotsSoftMoE, SoftMoE, SparseMoE

from ..conftest import cpu_backends

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)

MODULES = {
    "sparse": lambda: (SparseMoE(16, 12, 5, 2, bias=True), (11, 16)),
    "sparse-capacity-groups-sigmoid": lambda: (
        SparseMoE(16, 12, 8, 3, score="sigmoid", correction_bias=True, num_groups=4, topk_groups=2,
                  capacity_factor=1.0, z_loss_coef=1e-3), (13, 16)),
    "dense": lambda: (DenseMoE(16, 12, 5), (3, 7, 16)),
    "soft": lambda: (SoftMoE(16, num_experts=4, num_slots=3, expert_mult=2), (2, 9, 16)),
    # 9 tokens padded to 12: the padding mask and the slot mask are made inside the graph
    "dynamic-slots": lambda: (DynamicSlotsSoftMoE(16, num_experts=4, expert_mult=2, geglu=True), (2, 9, 16)),
}


def _fwd_bwd(m, x, g):
    out = m(x)
    loss = (out * g).sum()
    if getattr(m, "aux_loss", None) is not None:
        loss = loss + m.aux_loss
    return (out, *torch.autograd.grad(loss, [x] + list(m.parameters())))


@pytest.mark.slow  # dynamo traces and compiles (inductor: a C++ build per graph)
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
@pytest.mark.parametrize("name", list(MODULES))
def test_compile_fullgraph_forward_backward_match_eager(name, compiler, backend):
    if compiler == "inductor" and backend != cpu_backends()[-1]:
        pytest.skip("inductor runs on the fastest CPU backend only (its C++ builds are slow on 2 cores)")
    torch._dynamo.reset()
    m, shape = MODULES[name]()
    m = m.to(F64).train()
    compiled = torch.compile(m, backend=compiler, fullgraph=True)
    for scale in (1, 2):  # a second size: the recompiled (or dynamic) graph must be right too
        shape_s = (shape[0] * scale,) + shape[1:]
        x = torch.randn(shape_s, dtype=F64, requires_grad=True)
        g = torch.randn(shape_s, dtype=F64)
        got = _fwd_bwd(compiled, x, g)
        want = _fwd_bwd(m, x, g)
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, **TOL, msg=lambda s, i=i: f"{name} {compiler} output/grad {i}: {s}")
