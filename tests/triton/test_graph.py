"""The routing path on the triton backend traces into one graph (torch.compile fullgraph) and matches eager.
On a GPU, it is also captured in a CUDA graph (no host sync)."""
import pytest
import torch

import moe_kernels
from moe_kernels import ops

pytest.importorskip("triton")


def route_and_permute(logits, x, k):
    r = ops.topk_route(logits, k)
    s = ops.sort_by_expert(r.experts, logits.shape[1])
    y = ops.permute(x, s) * 2
    return ops.unpermute(y, s, r.weights), ops.load_balancing_loss(r) + ops.router_z_loss(r)


def _inputs(device=None, T=37, E=7, D=16):
    logits = torch.randn(T, E, device=device, requires_grad=True)
    x = torch.randn(T, D, device=device, requires_grad=True)
    return logits, x


def test_compile_fullgraph_matches_eager():
    logits, x = _inputs()
    compiled = torch.compile(route_and_permute, fullgraph=True, backend="aot_eager")
    with moe_kernels.use_backend("triton"):
        out_c, loss_c = compiled(logits, x, 3)
        grads_c = torch.autograd.grad(out_c.sum() + loss_c, (logits, x))
        out_e, loss_e = route_and_permute(logits, x, 3)
        grads_e = torch.autograd.grad(out_e.sum() + loss_e, (logits, x))
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_of_routing_and_permutation():
    logits, x = _inputs("cuda", T=1024, E=64, D=256)
    static = (logits.detach().clone(), x.detach().clone())
    with moe_kernels.use_backend("triton"):
        route_and_permute(*static, 8)  # warm-up compiles the kernels outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, loss = route_and_permute(*static, 8)
        static[0].copy_(torch.randn_like(static[0]))
        static[1].copy_(torch.randn_like(static[1]))
        g.replay()
        ref_out, ref_loss = route_and_permute(*static, 8)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_cuda_graph_capture_of_sparse_moe_forward_and_backward(capacity_factor):
    """A training step's forward, aux loss and backward of SparseMoE captured whole: no host sync anywhere on the
    path (routing, capacity, permutation, expert GEMMs, combine, their backwards). Replays on new inputs equal
    eager runs of the same module on those inputs."""
    from moe_kernels.nn import SparseMoE

    torch.manual_seed(0)
    m = SparseMoE(dim=256, hidden_dim=384, num_experts=16, top_k=2, capacity_factor=capacity_factor,
                  device="cuda", dtype=torch.bfloat16).train()
    static_x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y = m(static_x)
        loss = y.float().square().mean() + m.aux_loss
        loss.backward()
        return y

    with moe_kernels.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (kernel compilation) outside the capture, as the CUDA docs ask
            for _ in range(2):
                m.zero_grad(set_to_none=True)
                static_x.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        m.zero_grad(set_to_none=True)
        static_x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = step()
        params = dict(m.named_parameters())
        for _ in range(2):
            new_x = torch.randn_like(static_x)
            with torch.no_grad():
                static_x.copy_(new_x)
            graph.replay()
            torch.cuda.synchronize()
            got = (static_y.clone(), static_x.grad.clone(), {n: p.grad.clone() for n, p in params.items()})
            eager_x = new_x.clone().requires_grad_()
            saved = {n: p.grad for n, p in params.items()}
            m.zero_grad(set_to_none=True)
            y = m(eager_x)
            (y.float().square().mean() + m.aux_loss).backward()
            torch.testing.assert_close(got[0], y.detach(), rtol=0, atol=0)
            torch.testing.assert_close(got[1], eager_x.grad, rtol=0, atol=0)
            for n, p in params.items():
                torch.testing.assert_close(got[2][n], p.grad, rtol=0, atol=0, msg=lambda s, n=n: f"grad of {n}: {s}")
                p.grad = saved[n]  # the graph's own gradient buffers, which the next replay writes
