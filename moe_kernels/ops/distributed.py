"""Expert parallelism over torch.distributed, the op level (GShard, DeepSpeed-MoE, Megatron, torchtitan): the expert
MLP with its experts sharded across a process group, token rows exchanged with all-to-all. NCCL on GPUs, gloo on
CPUs. The model-level walker that shards the layers of a model is moe_kernels.distributed.

Rank r of a group of W keeps the contiguous block r of the E experts (experts r*E/W .. (r+1)*E/W - 1); the router
stays replicated. A forward routes locally, sends each routed (token, slot) row once to the rank owning its expert,
runs the local experts with the fused expert MLP, sends the results back, and combines each token's k rows with its
routing weights in slot order. The backward runs the same exchanges in reverse.

One host sync per layer call: all-to-all takes its split sizes as Python ints, so the per-rank row counts (exchanged
on the device first) are read once.
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import expert_mlp as _expert_mlp
from .expert_mlp import check_moe_mlp_inputs
from .permutation import Sorted, permute, sort_by_expert, unpermute


def group_info(process_group=None) -> tuple:
    """(the group, its size W, this process's rank in it); the default group when process_group is None."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised (dist.init_process_group)")
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def local_block(num_experts: int, process_group=None) -> range:
    """The global ids of the experts this rank keeps: block r of E // W. ValueError unless W divides E."""
    _, W, r = group_info(process_group)
    if num_experts % W:
        raise ValueError(f"num_experts={num_experts} must be divisible by the process group's size {W}: "
                         f"each rank keeps E / W experts")
    n = num_experts // W
    return range(r * n, (r + 1) * n)


# --- the exchange ----------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """rows [sum(send), D] -> [sum(recv), D]: send[d] rows go to rank d, recv[s] rows come from rank s (in rank
    order). The gradient goes back along the same paths."""

    @staticmethod
    def forward(ctx, rows, send, recv, group):
        # group as the caller gave it (None: the default one), not resolved: a graph kept alive must not keep the
        # process group alive past destroy_process_group (gloo's worker threads would then outlive the interpreter)
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty(sum(recv), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def exchange(rows: Tensor, send: list, recv: list, process_group=None) -> Tensor:
    """rows: [sum(send), D] -> [sum(recv), D] with all_to_all_single, differentiable."""
    group_info(process_group)   # torch.distributed must be initialised
    return _AllToAll.apply(rows, list(send), list(recv), process_group)


class Plan(NamedTuple):
    """Where this rank's routed rows go and what it receives."""
    sorted: Sorted   # the (token, slot) pairs sorted by global expert: destination ranks in order
    send: list           # [W] rows sent to each rank
    recv: list           # [W] rows received from each rank
    local_ids: Tensor    # [sum(recv), 1] local expert of each received row (rows from rank 0 first)


def plan(experts: Tensor, num_local: int, process_group=None) -> Plan:
    """experts: [T, k] global ids (outside [0, E) never sent; E = num_local * W) -> the Plan of the exchange."""
    group, W, _ = group_info(process_group)
    E = num_local * W
    s = sort_by_expert(experts, E)
    send_counts = (s.offsets[1:] - s.offsets[:-1]).view(W, num_local).long()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()   # the layer's one host sync
    local_ids = torch.arange(num_local, device=experts.device).repeat(W)
    local_ids = torch.repeat_interleave(local_ids, recv_counts.reshape(-1), output_size=sum(recv))
    return Plan(s, send, recv, local_ids.view(-1, 1))


def capacity_keep(experts: Tensor, num_experts: int, capacity_factor: float, min_capacity: Optional[int] = None,
                  max_capacity: Optional[int] = None, process_group=None) -> tuple:
    """experts: [T, k] -> (experts with the pairs beyond capacity set to -1, the capacity as a 0-d int64 tensor).

    The capacity counts the tokens of every rank: C = ceil(capacity_factor * T_all * k / E), clamped to
    [min_capacity, max_capacity], and each expert keeps its first C pairs in the order one device would over the
    ranks' batches concatenated in rank order: all first choices (rank 0's tokens, then rank 1's, ...), then all
    second choices, and so on. Computed on the device from one all-gather of per-(slot, expert) counts."""
    group, W, r = group_info(process_group)
    T, k = experts.shape
    E = num_experts
    ids = experts.long()
    valid = (ids >= 0) & (ids < E)
    # group of each pair: (slot j, expert e) as j * (E + 1) + e, with E for ids outside [0, E); slot-major order
    key = (torch.where(valid, ids, E) + torch.arange(k, device=ids.device) * (E + 1)).t().reshape(-1)
    counts = torch.bincount(key, minlength=k * (E + 1))
    everyone = counts.new_empty(W * (counts.numel() + 1))
    dist.all_gather_into_tensor(everyone, torch.cat([counts, counts.new_full((1,), T)]), group=group)
    everyone = everyone.view(W, -1)
    per_rank = everyone[:, :-1].view(W, k, E + 1)
    total = per_rank.sum(0)
    # pairs of the same expert ahead of this rank's slot-j pairs: every rank's slots < j, then slot j of ranks < r
    ahead = (total.cumsum(0) - total + per_rank[:r].sum(0)).reshape(-1)
    _, perm = torch.sort(key, stable=True)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(key.numel(), device=ids.device)
    within = position - (counts.cumsum(0) - counts)[key]           # rank among this rank's pairs of the group
    T_all = everyone[:, -1].sum().double()
    capacity = torch.ceil(T_all * capacity_factor * k / E)         # the same IEEE operations as math.ceil(cf*T*k/E)
    if min_capacity is not None:
        capacity = capacity.clamp(min=min_capacity)
    if max_capacity is not None:
        capacity = capacity.clamp(max=max_capacity)
    capacity = capacity.long()
    keep = (ahead[key] + within < capacity).view(k, T).t()
    return torch.where(keep & valid, ids, -1).to(experts.dtype), capacity


def dispatch(x: Tensor, p: Plan, process_group=None) -> Tensor:
    """x: [T, D] -> the rows this rank's experts process, [sum(p.recv), D]: each routed row sent once."""
    return exchange(permute(x, p.sorted)[:sum(p.send)], p.send, p.recv, process_group)


def local_experts(rows: Tensor, p: Plan, gate_up_proj: Tensor, down_proj: Tensor, **kwargs) -> Tensor:
    """The received rows [R, D] through this rank's experts (the fused expert MLP, weight 1) -> [R, O]."""
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    return _expert_mlp.moe_mlp(rows, p.local_ids, ones, gate_up_proj, down_proj, **kwargs)


def combine(back: Tensor, p: Plan, weights: Tensor) -> Tensor:
    """The expert outputs returned to this rank, [sum(p.send), O] -> [T, O]: each token's k rows weighted and
    summed in slot order (pairs not sent contribute zero)."""
    T, k = weights.shape
    back = torch.cat([back, back.new_zeros(T * k - back.shape[0], back.shape[1])])
    return unpermute(back, p.sorted, weights)


def moe_mlp(x: Tensor, experts: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor, *,
            process_group=None, activation: str = "silu", gated: bool = True, gate_up_bias: Optional[Tensor] = None,
            down_bias: Optional[Tensor] = None) -> Tensor:
    """`moe_kernels.ops.moe_mlp` with the experts sharded: x: [T, D] this rank's tokens, experts: [T, k] global ids in
    [0, E = W * E_local) (others contribute zero), weights: [T, k], gate_up_proj: [E_local, 2H|H, D] and down_proj:
    [E_local, O, H] this rank's block of experts -> [T, O]. Every rank of the group must call it (T may be 0)."""
    # checked here, before any collective: a rank raising after the exchange has begun would hang the others
    check_moe_mlp_inputs(x, experts, weights, gate_up_proj, down_proj, activation, gated, gate_up_bias, down_bias)
    p = plan(experts, gate_up_proj.shape[0], process_group)
    y = local_experts(dispatch(x, p, process_group), p, gate_up_proj, down_proj, activation=activation,
                      gated=gated, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return combine(exchange(y, p.recv, p.send, process_group), p, weights)
