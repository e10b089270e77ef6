"""Permutation alone: `ops.sort_by_expert` (the index-only counting sort of the (token, slot) pairs by expert),
`ops.permute` (gather the rows into expert order) and `ops.unpermute` (each token's weighted sum of its k rows).

    python -m benchmarks.bench_permutation [--device cpu|cuda] [--quick | --full] [--only SUBSTRING]

Providers on the same routing and rows: ours (`auto`, and each other backend that applies), the reference
backend, and "torch": what the grouped_mm layers of transformers and users do (a stable argsort of the flat ids
and cumulative counts; x[order // k]; index_add of the weighted rows). All three are bandwidth-bound: `% limit` is
a copy moving the bytes each must move at least, over our time.
"""
import torch

from moe_kernels import ops

from . import common, peers
from .common import Case, Pass, Provider, Work

FAMILY = "permutation"
OPS = ("sort_by_expert", "permute", "unpermute")
SHAPES = {  # (T, D, E, k)
    "cpu": {"quick": [(256, 128, 64, 8)], "default": [(2048, 512, 64, 8)],
            "full": [(8192, 512, 64, 8), (2048, 512, 8, 2)]},
    "cuda": {"quick": [(4096, 2048, 128, 8)], "default": [(32768, 2048, 128, 8)], "full": [(16384, 4096, 8, 2)]},
}


def cases(device: str, size: str) -> list:
    shapes = SHAPES[device]["quick"] if size == "quick" else SHAPES[device]["default"] + (
        SHAPES[device]["full"] if size == "full" else [])
    out = []
    for T, D, E, k in shapes:
        for op in OPS:
            label = f"{op} T{T}-E{E}-k{k}" if op == "sort_by_expert" else f"{op} T{T}-D{D}-E{E}-k{k}"
            passes = ("fwd",) if op == "sort_by_expert" else ("fwd", "fwd+bwd")
            out.append(Case(FAMILY, label, passes,
                            lambda device, dtype, op=op, T=T, D=D, E=E, k=k: build(device, dtype, op, T, D, E, k),
                            tokens=T))
    return out


def build(device, dtype, op, T, D, E, k):
    torch.manual_seed(0)
    r = ops.topk_route(torch.randn(T, E, device=device), k)
    srt = ops.sort_by_expert(r.experts, E)
    order, _ = peers.torch_sort(r.experts, E)
    x = torch.randn(T, D, device=device, dtype=dtype)
    y = torch.randn(T * k, D, device=device, dtype=dtype)
    s = x.element_size()

    if op == "sort_by_expert":
        forward_ours = lambda experts: tuple(ops.sort_by_expert(experts, E))
        forward_torch = lambda experts: peers.torch_sort(experts, E)
        inputs = (r.experts,)
        # read the ids; write order, inverse and offsets
        nbytes = {False: lambda dt: T * k * (8 + 4 + 4) + (E + 1) * 4}
    elif op == "permute":
        forward_ours = lambda rows: ops.permute(rows, srt)
        forward_torch = lambda rows: peers.torch_permute(rows, order, k)
        inputs, grad = (x,), torch.randn(T * k, D, device=device, dtype=dtype)
        # forward: read x, write T*k rows; backward: read their gradient, write x's
        nbytes = {False: lambda dt: (T + T * k) * D * s, True: lambda dt: 2 * (T + T * k) * D * s}
    else:
        forward_ours = lambda rows, w: ops.unpermute(rows, srt, w)
        forward_torch = lambda rows, w: peers.torch_unpermute(rows, order, w, T)
        inputs, grad = (y, r.weights), torch.randn(T, D, device=device, dtype=dtype)
        # forward: read T*k rows, write T; backward: read the gradient and the rows (for the weights'
        # gradient), write the rows' gradient
        nbytes = {False: lambda dt: (T * k + T) * D * s,
                  True: lambda dt: (T * k + T) * D * s + (T + 2 * T * k) * D * s}

    def pass_of(backward: bool) -> Pass:
        def provider(name, kind, forward):
            fn = common.pass_fn(forward, inputs, backward=backward, grad=None if op == "sort_by_expert" else grad)
            return Provider(name, fn, kind, dtype)

        provs = [provider(name, "ours", common.under(backend, forward_ours))
                 for name, backend in common.ours_backends(op, device)]
        provs.append(provider("reference", "reference", common.under("reference", forward_ours)))
        provs.append(provider("torch", "peer", forward_torch))
        canon = (lambda out: out[0]) if op == "sort_by_expert" else (lambda out: out)   # sort: the order
        return Pass(provs, Work(0, [], nbytes[backward]), canon=canon)
    return pass_of


def main(argv=None):
    from .__main__ import main as run_suite
    run_suite(argv, families=(FAMILY,))


if __name__ == "__main__":
    main()
