"""Expert parallelism over torch.distributed, the model level: `expert_parallel(model)` shards the experts of every
SparseMoE layer and transformers experts module of a model across a process group, and the helpers of a training
step (`sharded_parameters`, `all_reduce_replicated_grads`). The sharded expert MLP itself, and the exchange it runs,
are moe_kernels.ops.distributed (re-exported here).
"""
import torch
import torch.distributed as dist
from torch import nn

from .integrations import transformers as hf
from .integrations.transformers import is_experts_module
from .nn.sparse import SparseMoE
from .ops.distributed import (Plan, capacity_keep, combine, dispatch, exchange, group_info, local_block,
                              local_experts, moe_mlp, plan)

__all__ = ["Plan", "all_reduce_replicated_grads", "capacity_keep", "combine", "dispatch", "exchange", "expert_parallel",
           "group_info", "local_block", "local_experts", "moe_mlp", "plan", "sharded_parameters"]


# --- sharding modules -------------------------------------------------------------------------------------------
_EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def _shard_transformers_experts(experts: nn.Module, process_group) -> None:
    """A transformers experts module keeps its block of experts (every [E, ...] parameter sliced) and routes through
    `moe_mlp` above under the "moe_kernels" experts implementation."""
    E = experts.down_proj.shape[0]
    block = local_block(E, process_group)
    for name in _EXPERT_TENSORS:
        t = getattr(experts, name, None)
        if isinstance(t, torch.Tensor) and t.shape[:1] == (E,):
            setattr(experts, name, nn.Parameter(t.detach()[block.start:block.stop].clone(),
                                                requires_grad=t.requires_grad))
    experts.moe_kernels_process_group = process_group   # None: the default group, looked up at each call
    experts.moe_kernels_sharded = True
    hf.register()
    experts.config._experts_implementation = "moe_kernels"


def expert_parallel(module: nn.Module, process_group=None) -> nn.Module:
    """Shards the experts of `module` across the process group, in place, and returns it: a SparseMoE (or a model
    holding SparseMoE layers, converted transformers blocks included), or transformers experts modules (v5 models,
    which then run the "moe_kernels" experts implementation). Rank r keeps expert block r of E / W (ValueError
    unless W divides E); routers stay replicated. Call it on every rank with the same module."""
    group_info(process_group)   # torch.distributed must be initialised
    found = 0
    for m in list(module.modules()):
        if isinstance(m, SparseMoE):
            m.shard_experts(process_group)
            found += 1
        elif is_experts_module(m):
            _shard_transformers_experts(m, process_group)
            found += 1
    if not found:
        raise ValueError(f"expert_parallel found no SparseMoE and no transformers experts module in "
                         f"{type(module).__name__} (convert the model first: moe_kernels.convert(model))")
    return module


def sharded_parameters(module: nn.Module) -> list:
    """The parameters of `module` that expert_parallel sharded (each rank holds its own block; their gradients
    already sum every rank's tokens)."""
    out = []
    for m in module.modules():
        if isinstance(m, SparseMoE) and m.sharded:
            out += list(m.experts.parameters())
        elif is_experts_module(m) and getattr(m, "moe_kernels_sharded", False):
            out += [p for name, p in m.named_parameters(recurse=False) if name in _EXPERT_TENSORS]
    return out


def all_reduce_replicated_grads(module: nn.Module, process_group=None, average: bool = True) -> None:
    """Data parallelism for everything expert_parallel left whole (routers, shared experts, attention, ...): sums
    (average=True: averages) their gradients over the group, as DistributedDataParallel would; the sharded expert
    gradients are left as they are. Call it after backward on every rank."""
    group, W, _ = group_info(process_group)
    sharded = {id(p) for p in sharded_parameters(module)}
    for p in module.parameters():
        if id(p) not in sharded and p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            if average:
                p.grad.div_(W)
