"""Module cases of the main job: SparseMoE and SoftMoE, forward and forward+backward, per backend."""
import torch

import moe_kernels
from moe_kernels.nn import SoftMoE, SparseMoE

from . import common

# name, constructor kwargs, input shape; `quick` marks the smallest shape of each case.
CASES = [
    dict(name="SparseMoE T512-D256-H512-E8-k2", kind="sparse", quick=True,
         module=dict(dim=256, hidden_dim=512, num_experts=8, top_k=2), tokens=512),
    dict(name="SparseMoE T1024-D256-H128-E32-k4", kind="sparse",
         module=dict(dim=256, hidden_dim=128, num_experts=32, top_k=4), tokens=1024),
    dict(name="SoftMoE B4-N256-D128-E4-S64", kind="soft", quick=True,
         module=dict(dim=128, num_experts=4, num_slots=64, expert_mult=2), batch=4, seq=256),
    dict(name="SoftMoE B2-N1024-D128-E8-S128", kind="soft",
         module=dict(dim=128, num_experts=8, num_slots=128, expert_mult=2), batch=2, seq=1024),
    # GPU sizes (run with --device cuda only)
    dict(name="SparseMoE T8192-D2048-H768-E128-k8", kind="sparse", gpu=True,
         module=dict(dim=2048, hidden_dim=768, num_experts=128, top_k=8), tokens=8192),
    dict(name="SparseMoE T8192-D4096-H14336-E8-k2", kind="sparse", gpu=True,
         module=dict(dim=4096, hidden_dim=14336, num_experts=8, top_k=2), tokens=8192),
    dict(name="SoftMoE B8-N1024-D1024-E32-S32", kind="soft", gpu=True,
         module=dict(dim=1024, num_experts=32, num_slots=32, expert_mult=4), batch=8, seq=1024),
]


def _build(case, device, dtype):
    if case["kind"] == "sparse":
        m = SparseMoE(**case["module"], device=device, dtype=dtype)
        x = torch.randn(case["tokens"], m.dim, device=device, dtype=dtype)
        a = case["module"]
        flops = lambda bwd: common.sparse_flops(case["tokens"], a["top_k"], a["dim"], a["hidden_dim"], True, bwd)
        limit_shape = (case["tokens"] * a["top_k"], a["hidden_dim"] * 3, a["dim"])
    else:
        m = SoftMoE(**case["module"], device=device, dtype=dtype)
        x = torch.randn(case["batch"], case["seq"], m.dim, device=device, dtype=dtype)
        a = case["module"]
        S = a["num_experts"] * a["num_slots"]
        H = m.experts.hidden_dim
        flops = lambda bwd: common.soft_flops(case["batch"], case["seq"], S, a["dim"], H, False, bwd)
        limit_shape = (case["batch"] * case["seq"], S, a["dim"])
    return m, x, flops, limit_shape


def run_case(case, device, dtype):
    m, x, flops, limit_shape = _build(case, device, dtype)
    xg = x.clone().requires_grad_()
    rows = []
    for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
        def provider(backend):
            def fn():
                with moe_kernels.use_backend(backend):
                    if backward:
                        m(xg).sum().backward()
                    else:
                        with torch.no_grad():
                            m(x)
            return fn

        limit_fn, limit_flops = common.dense_matmul(*limit_shape, dtype, device, backward=backward)
        times = common.timeit({"fused": provider("auto"), "reference": provider("reference"), "limit": limit_fn},
                              device=device)
        limit = limit_flops / times.pop("limit")
        for name, t in times.items():
            rate = flops(backward) / t
            rows.append({"case": case["name"], "kind": case["kind"], "pass": pass_name, "provider": name,
                         "ms": t * 1e3, "gflops": rate / 1e9, "limit_gflops": limit / 1e9,
                         "pct_limit": 100 * rate / limit, "speedup_vs_reference": times["reference"] / t})
    return rows
