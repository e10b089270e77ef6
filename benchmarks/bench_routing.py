"""Routing alone (`ops.topk_route`): router logits -> top-k weights and experts, forward and forward+backward.

    python -m benchmarks.bench_routing [--device cpu|cuda] [--quick | --full] [--only SUBSTRING]

Providers on the same logits: ours (`auto`, and each other backend that applies), the reference backend, and
"torch": the lines transformers' routers run after their linear layer (MixtralTopKRouter: softmax, top-k,
renormalise; DeepseekV3TopkRouter: sigmoid, correction bias, group-limited top-k, renormalise, scale). Routing is
bandwidth-bound: `% limit` is a copy moving the same bytes over our time.
GPU target (the published models' shapes): at T=65,536, E=128, k=8 routing + permutation take under 15% of the time of the
expert GEMMs (compare with the expert_mlp rows of the same run).
"""
import torch

from moe_kernels import ops

from . import common
from .common import Case, Pass, Provider, Work

FAMILY = "routing"
SETTINGS = {  # name: (E, k, topk_route keyword arguments)
    "OLMoE": (64, 8, {}),
    "Qwen3-30B-A3B": (128, 8, {}),
    "DeepSeek-V3": (256, 8, dict(score="sigmoid", num_groups=8, topk_groups=4, scale=2.5)),
}
SHAPES = {  # (setting, tokens)
    "cpu": {"quick": [("DeepSeek-V3", 256), ("OLMoE", 256)],
            "default": [("OLMoE", 4096), ("Qwen3-30B-A3B", 4096), ("DeepSeek-V3", 4096)],
            "full": [("Qwen3-30B-A3B", 16384), ("DeepSeek-V3", 16384), ("Qwen3-30B-A3B", 8)]},
    "cuda": {"quick": [("DeepSeek-V3", 4096), ("Qwen3-30B-A3B", 4096)],
             "default": [("Qwen3-30B-A3B", 65536), ("DeepSeek-V3", 65536), ("Qwen3-30B-A3B", 64)],
             "full": [("OLMoE", 65536), ("DeepSeek-V3", 64)]},
}


def cases(device: str, size: str) -> list:
    shapes = SHAPES[device]["quick"] if size == "quick" else SHAPES[device]["default"] + (
        SHAPES[device]["full"] if size == "full" else [])
    out = []
    for name, T in shapes:
        E, k, kw = SETTINGS[name]
        label = f"{name} T{T}-E{E}-k{k}" + (f" {kw['score']} groups {kw['num_groups']}/{kw['topk_groups']}"
                                             if kw else " softmax")
        out.append(Case(FAMILY, label, ("fwd", "fwd+bwd"),
                        lambda device, dtype, T=T, E=E, k=k, kw=kw: build(device, T, E, k, kw), tokens=T))
    return out


def torch_routing(logits, k, score="softmax", num_groups=None, topk_groups=None, scale=1.0, bias=None):
    """transformers' routers after their linear layer (MixtralTopKRouter, DeepseekV3TopkRouter), as written there."""
    if score == "softmax":
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), idx
    T, E = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, num_groups, E // num_groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, E // num_groups).reshape(-1, E)
    idx = torch.topk(choice.masked_fill(~score_mask.bool(), float("-inf")), k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, idx


def build(device, T, E, k, kw):
    torch.manual_seed(0)
    logits = torch.randn(T, E, device=device)
    bias = 0.1 * torch.randn(E, device=device) if kw.get("score") == "sigmoid" else None
    route_kw = dict(kw, bias=bias) if bias is not None else kw
    grad_dense = torch.randn(T, E, device=device)   # d(loss)/d(gate of expert e): the same whatever the slot order

    def forward_ours(z):
        r = ops.topk_route(z, k, **route_kw)
        return r.weights, r.experts

    def dense(out):
        """The [T, E] gates of (weights, experts): comparable whatever order a provider gives the k slots in."""
        weights, experts = out
        return torch.zeros(T, E, device=device, dtype=weights.dtype).scatter_(1, experts, weights)

    def pass_of(backward: bool) -> Pass:
        def provider(name, kind, forward):
            fn = common.pass_fn(forward, (logits,), backward=backward,
                                grad=lambda out: grad_dense.gather(1, out[1]))
            return Provider(name, fn, kind, torch.float32)

        provs = [provider(name, "ours", common.under(backend, forward_ours))
                 for name, backend in common.ours_backends("topk_route", device)]
        provs.append(provider("reference", "reference", common.under("reference", forward_ours)))
        provs.append(provider("torch", "peer", lambda z: torch_routing(z, k, **route_kw)))
        # forward: read the logits, write weights and ids; backward: read the output gradient (and the logits
        # again), write the logits' gradient
        io = lambda dt: T * E * 4 + T * k * (4 + 8)
        nbytes = (lambda dt: io(dt) + T * k * 4 + 2 * T * E * 4) if backward else io
        return Pass(provs, Work(0, [], nbytes), canon=lambda out: out if backward else dense(out))
    return pass_of


def main(argv=None):
    from .__main__ import main as run_suite
    run_suite(argv, families=(FAMILY,))


if __name__ == "__main__":
    main()
