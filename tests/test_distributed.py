"""Expert parallelism over gloo, 2 and 4 processes started here (127.0.0.1, a free port, a bounded wait).

Each process group runs every scenario once (one start-up per world size); each scenario is then its own test.
Oracle: the unsharded layer on the ranks' batches concatenated in rank order (float64, and float32 for the
earned tolerance). On every rank, the sharded layer's output and input gradient on its own tokens equal the oracle's
rows; each local expert's weight gradient equals the oracle's (all ranks' tokens); the router gradients summed over
ranks equal the oracle's.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from moe_kernels import SparseMoE
from moe_kernels import distributed as ep
from tests.helpers import F64, assert_earned_max, reordered_sum_atol
from tests.processes import check_scenario, run_scenarios

D, H, K = 16, 12, 2
TIMEOUT_S = 240


# --- what every rank runs ------------------------------------------------------------------------------------------
def _counts(W, pattern):
    """Tokens per rank. uneven: all different; empty: every other rank has none (rank 1 included)."""
    base = [7, 12, 5, 9]
    if pattern == "empty":
        base = [7, 0, 12, 0]
    return base[:W]


def _batches(counts, dtype=F64):
    return [torch.randn(c, D, dtype=dtype) for c in counts]


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _check(got32, ref64, ref32, name):
    assert_earned_max(got32, ref64, ref32, atol=1e-6 + reordered_sum_atol(ref64, torch.float32, D * H), name=name)


def _compare_layer(full64, sharded32, xs, gs, rank, W, group):
    """The sharded layer on this rank's tokens against the unsharded one on all ranks' tokens."""
    full32 = copy.deepcopy(full64).float()
    x64 = torch.cat(xs).requires_grad_()
    x32 = torch.cat(xs).float().requires_grad_()
    (full64(x64) * torch.cat(gs)).sum().backward()
    out64 = full64(x64.detach())
    (full32(x32) * torch.cat(gs).float()).sum().backward()
    out32 = full32(x32.detach())
    lo, hi = sum(x.shape[0] for x in xs[:rank]), sum(x.shape[0] for x in xs[:rank + 1])

    mine = xs[rank].float().requires_grad_()
    out = sharded32(mine)
    (out * gs[rank].float()).sum().backward()
    _check(out.detach(), out64[lo:hi].detach(), out32[lo:hi].detach(), "output")
    _check(mine.grad, x64.grad[lo:hi], x32.grad[lo:hi], "grad x")

    block = ep.local_block(full64.num_experts, group)
    ref64, ref32, got = _grads(full64), _grads(full32), _grads(sharded32)
    for name, g in got.items():
        if name.startswith("experts.") or ".experts." in name:
            _check(g, ref64[name][block.start:block.stop], ref32[name][block.start:block.stop], f"grad {name}")
        else:   # replicated: this rank's tokens only; summed over the ranks, all of them
            dist.all_reduce(g, group=group)
            _check(g, ref64[name], ref32[name], f"grad {name} summed over ranks")
    return full64, sharded32


def _layer(E, **kwargs):
    return SparseMoE(D, H, E, K, router_bias=True, aux_loss_coef=0.0, dtype=F64, **kwargs)


def scenario_uneven(rank, W, group):
    """Different token counts on every rank."""
    counts = _counts(W, "uneven")
    full = _layer(3 * W)
    xs, gs = _batches(counts), _batches(counts)
    _compare_layer(full, ep.expert_parallel(copy.deepcopy(full).float(), group), xs, gs, rank, W, group)


def scenario_empty_rank(rank, W, group):
    """Ranks with no tokens still take part in every exchange."""
    counts = _counts(W, "empty")
    full = _layer(2 * W, bias=True, activation="gelu")
    xs, gs = _batches(counts), _batches(counts)
    _compare_layer(full, ep.expert_parallel(copy.deepcopy(full).float(), group), xs, gs, rank, W, group)


def scenario_one_rank(rank, W, group):
    """Every token routed to the experts of the last rank."""
    counts = _counts(W, "uneven")
    full = _layer(2 * W)
    with torch.no_grad():
        full.router.weight.mul_(0.01)
        full.router.bias.zero_()[-2:] = 10.0
    xs, gs = _batches(counts), _batches(counts)
    _, sharded = _compare_layer(full, ep.expert_parallel(copy.deepcopy(full).float(), group), xs, gs, rank, W, group)
    routed = sharded.expert_stats()["routed"]
    assert routed[:-2].sum() == 0 and routed[-2:].sum() == counts[rank] * K, routed


def scenario_capacity(rank, W, group):
    """capacity_factor counts the tokens of all ranks; drops match the unsharded layer on the whole batch."""
    counts = _counts(W, "empty")
    full = _layer(2 * W, capacity_factor=0.75, min_capacity=2)
    with torch.no_grad():
        full.router.bias[0] = 2.0   # an expert that overflows
    xs, gs = _batches(counts), _batches(counts)
    _, sharded = _compare_layer(full, ep.expert_parallel(copy.deepcopy(full).float(), group), xs, gs, rank, W, group)
    want = full.expert_stats()
    got = sharded.expert_stats()
    assert got["capacity"] == want["capacity"] == full.capacity(sum(counts))
    assert want["dropped"] > 0, "the scenario must drop pairs"
    for name in ("routed", "usage", "dropped"):
        total = got[name].clone()
        dist.all_reduce(total, group=group)
        assert torch.equal(total, want[name]), (name, total, want[name])


def scenario_built_sharded(rank, W, group):
    """SparseMoE(..., process_group=group) holds only its block; gathered, the blocks make the unsharded layer."""
    torch.manual_seed(1000 + rank)   # each rank initialises its own block
    sharded = SparseMoE(D, H, 2 * W, K, aux_loss_coef=0.0, process_group=group)
    assert sharded.experts.gate_up_proj.shape[0] == 2 and sharded.num_experts == 2 * W
    dist.broadcast(sharded.router.weight.data, src=0, group=group)
    full = _layer(2 * W)
    with torch.no_grad():
        full.router.weight.copy_(sharded.router.weight)
        full.router.bias.zero_()
        for name in ("gate_up_proj", "down_proj"):
            local = getattr(sharded.experts, name).data
            parts = [torch.empty_like(local) for _ in range(W)]
            dist.all_gather(parts, local, group=group)
            getattr(full.experts, name).copy_(torch.cat(parts))
    torch.manual_seed(2000)
    counts = _counts(W, "uneven")
    xs, gs = _batches(counts), _batches(counts)
    full.router.bias.requires_grad_(False)
    _compare_layer(full, sharded, xs, gs, rank, W, group)


class _FirstOutput(torch.nn.Module):
    """A transformers v4 block returns (out, router_logits): the output alone."""

    def __init__(self, block):
        super().__init__()
        self.block, self.num_experts = block, block.num_experts

    def forward(self, x):
        return self.block(x)[0]


def scenario_v4_block(rank, W, group):
    """A converted transformers v4 sparse MoE block (the SparseMoE subclass convert() puts in v4 models)."""
    from moe_kernels.integrations.transformers import SparseMoEBlock

    full = _FirstOutput(SparseMoEBlock(D, H, 2 * W, K, dtype=F64))
    counts = _counts(W, "uneven")
    xs, gs = _batches(counts), _batches(counts)
    sharded = copy.deepcopy(full).float()
    ep.expert_parallel(sharded, group)
    _compare_layer(full, sharded, xs, gs, rank, W, group)


def _tiny_mixtral(E):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
                                        num_experts_per_tok=K, max_position_embeddings=32)
    torch.manual_seed(3000)
    return transformers.MixtralForCausalLM(config).eval()


def scenario_transformers_mixtral(rank, W, group):
    """A tiny transformers Mixtral (v5 experts interface) with its experts sharded: logits and gradients."""
    model = _tiny_mixtral(2 * W)
    torch.manual_seed(4000)
    lengths = [5, 9, 3, 6][:W]
    ids = [torch.randint(0, 64, (1, n)) for n in lengths]
    ref = copy.deepcopy(model)
    for i in ids:   # the unsharded model over every rank's sequence: gradients of all ranks' tokens
        ref(i).logits.sum().backward()
    want = ref(ids[rank]).logits
    sharded = ep.expert_parallel(copy.deepcopy(model), group)
    got = sharded(ids[rank]).logits
    got.sum().backward()
    torch.testing.assert_close(got, want)
    block = ep.local_block(2 * W, group)
    want_grads = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            torch.testing.assert_close(p.grad, want_grads[name].grad[block.start:block.stop], msg=name)


def scenario_transformers_sentinel(rank, W, group):
    """transformers' own expert parallelism: every rank sees every token, keeps its block of experts, and ids
    outside it become the sentinel E_local (contributing zero); the sum over ranks is the unsharded output."""
    from moe_kernels.integrations import transformers as hf

    model = _tiny_mixtral(2 * W)
    experts = model.model.layers[0].mlp.experts
    hf.register()
    model.config._experts_implementation = "moe_kernels"
    torch.manual_seed(5000)
    T, E = 11, 2 * W
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    want = experts(x, idx, w)
    block = ep.local_block(E, group)
    local = copy.deepcopy(experts)
    with torch.no_grad():
        local.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[block.start:block.stop].clone())
        local.down_proj = torch.nn.Parameter(experts.down_proj[block.start:block.stop].clone())
    mine = (idx >= block.start) & (idx < block.stop)
    local_idx = torch.where(mine, idx - block.start, len(block))
    got = local(x, local_idx, w)
    dist.all_reduce(got, group=group)
    torch.testing.assert_close(got, want)


def scenario_default_group(rank, W, group):
    """expert_parallel with no group shards over the default one, looked up at each call: neither the layer nor its
    autograd graph holds a process group."""
    full = SparseMoE(D, H, 2 * W, K, aux_loss_coef=0.0, dtype=F64)
    counts = _counts(W, "uneven")
    xs, gs = _batches(counts), _batches(counts)
    sharded = ep.expert_parallel(copy.deepcopy(full).float())
    assert sharded.sharded and sharded.process_group is None
    out = sharded(xs[rank].float().requires_grad_())
    seen, groups, stack = set(), [], [out.grad_fn]
    while stack:   # every node of the graph: none keeps a process group
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        groups += [v for v in vars(n).values() if isinstance(v, dist.ProcessGroup)] if hasattr(n, "__dict__") else []
        stack += [f for f, _ in n.next_functions]
    assert not groups, groups
    _compare_layer(full, sharded, xs, gs, rank, W, group)


def scenario_errors(rank, W, group):
    """E not divisible by W; resizing a sharded layer; a model with nothing to shard."""
    with pytest.raises(ValueError, match=rf"num_experts={2 * W + 1} must be divisible by the process group's size {W}"):
        ep.expert_parallel(SparseMoE(D, H, 2 * W + 1, K), group)
    sharded = ep.expert_parallel(SparseMoE(D, H, 2 * W, K), group)
    with pytest.raises(RuntimeError, match="sharded over a process group"):
        sharded.add_experts(1)
    with pytest.raises(ValueError, match="found no SparseMoE"):
        ep.expert_parallel(torch.nn.Linear(D, D), group)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}


@pytest.fixture(scope="module", params=[2, 4], ids=["W2", "W4"])
def world(request):
    """Runs every scenario on W processes; -> (W, {scenario: [result of each rank]})."""
    W = request.param
    return W, run_scenarios(SCENARIOS, W, TIMEOUT_S)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_expert_parallel(world, scenario):
    W, results = world
    check_scenario(results, scenario, W)
