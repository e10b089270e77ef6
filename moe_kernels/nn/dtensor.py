"""Expert weights that are DTensors (`distribute_tensor`, torch's and transformers' parallel styles, FSDP2 on a 2-D
mesh) on the fused ops, which take plain tensors.

What the weights' placements mean, and what runs:
- `Replicate()` on every mesh dim: every rank holds all experts. The ops run on `to_local()` views of the weights,
  whose gradients come back to the DTensor parameters as Replicate.
- `Shard(0)` on one mesh dim (the experts dim; `Replicate()` on any others): expert parallelism over that dim, every
  rank of it holding the same tokens (a plain tensor is a replicated one, as DTensor takes it). Rank r runs its
  block of E / W experts (`moe_kernels.ops.distributed.local_block`) on the expert ids shifted into it (ids outside
  the block contribute zero), and the partial outputs are summed over the mesh dim (a `Partial` output redistributed
  to `Replicate`). The gradients of the shared inputs (tokens, routing weights, dense gates), partial in the same
  way, are summed over the mesh dim in the backward; each rank's weight gradient is its block of the whole one.
- Anything else (TP shards of the hidden dim, `Partial`, experts sharded over several mesh dims, E not divisible by
  the mesh dim's size, a mix of DTensors and plain tensors, weights on different meshes or placements, DTensor
  tokens or routing weights) is refused with a ValueError naming the module, the parameter and its placements,
  before the experts run.

The callers check `is_dtensor` first: plain weights (FSDP2 on a 1-D mesh unshards the parameters to plain ones for
the forward) go to the ops directly.
"""
import contextlib
from typing import Callable, NamedTuple, Optional

from torch import Tensor, nn

from .. import ops
from ..ops.distributed import local_block

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:   # a torch built without torch.distributed: no tensor is a DTensor
    class DTensor:  # noqa: D101
        pass

SUPPORTED = ("supported: Replicate() on every mesh dim, or Shard(0) (the experts dim: expert parallelism, the same "
             "tokens on every rank of that mesh dim) on one mesh dim and Replicate() on the others")


def is_dtensor(*tensors) -> bool:
    """Whether any of `tensors` (None allowed) is a DTensor."""
    for t in tensors:
        if isinstance(t, DTensor):
            return True
    return False


def _described(t) -> str:
    if isinstance(t, DTensor):
        return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
    return "a plain tensor"


class LocalExperts(NamedTuple):
    """DTensor expert weights as the fused ops take them."""
    where: str              # the module, for errors
    tensors: tuple          # the weights' local tensors, in the order given (None stays None)
    experts: range          # the global ids of the local experts
    mesh: object            # the weights' DeviceMesh when the experts are sharded over one of its dims, else None
    replicate: tuple        # Replicate() on every mesh dim
    partial: tuple          # Partial() on the sharded mesh dim, Replicate() on the others

    def ids(self, ids: Tensor) -> Tensor:
        """Global expert ids -> local ones (ids outside the local block fall outside [0, E_local): nothing)."""
        return ids - self.experts.start if self.experts.start else ids

    def shared(self, t: Optional[Tensor], name: str) -> Optional[Tensor]:
        """An input (`name`: the tokens, routing weights, gates) every rank of the sharded mesh dim holds whole: its
        gradient, partial on each rank (its experts' share), is summed over the mesh dim in the backward."""
        if isinstance(t, DTensor):
            raise ValueError(f"{self.where}: {name} is {_described(t)}; with DTensor expert weights the tokens and "
                             "routing weights are plain tensors (to_local(), as torch's and transformers' parallel "
                             "styles pass them on with use_local_output)")
        if self.mesh is None or t is None:
            return t
        return DTensor.from_local(t, self.mesh, self.replicate, run_check=False).to_local(grad_placements=self.partial)

    def summed(self, out: Tensor) -> Tensor:
        """This rank's partial output (its experts' contributions) summed over the sharded mesh dim."""
        if self.mesh is None:
            return out
        partial = DTensor.from_local(out, self.mesh, self.partial, run_check=False)
        return partial.redistribute(self.mesh, self.replicate).to_local()


def _sharded_dim(placements) -> Optional[int]:
    """The mesh dim of the one Shard(0) among Replicate()s; None: all Replicate(); -1: anything else."""
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not sharded:
        return None
    p = placements[sharded[0]]
    return sharded[0] if len(sharded) == 1 and type(p) is Shard and p.dim == 0 else -1


def local_experts(where: str, named: dict, *, shardable: Optional[str] = None) -> LocalExperts:
    """named: {parameter name: the expert tensor [E, ...] or None}, at least one a DTensor -> LocalExperts.
    ValueError naming `where` (the module), the parameter and its placements for what `SUPPORTED` does not cover.
    shardable: None where Shard(0) runs, else why it does not (the error says it)."""
    given = {n: t for n, t in named.items() if t is not None}
    for name, t in given.items():
        if isinstance(t, DTensor) and _sharded_dim(t.placements) == -1:
            raise ValueError(f"{where}: {name} is {_described(t)}; {SUPPORTED}")
    first_name, first = next((n, t) for n, t in given.items() if isinstance(t, DTensor))
    for name, t in given.items():
        if not isinstance(t, DTensor) or t.device_mesh != first.device_mesh or t.placements != first.placements:
            raise ValueError(f"{where}: {name} is {_described(t)}, but {first_name} is {_described(first)}: the expert "
                             f"weights must all be DTensors on one mesh with the same placements ({SUPPORTED})")
    mesh, placements = first.device_mesh, tuple(first.placements)
    dim = _sharded_dim(placements)
    replicate = tuple(Replicate() for _ in placements)
    if dim is None:
        local = tuple(None if t is None else t.to_local(grad_placements=replicate) for t in named.values())
        return LocalExperts(where, local, range(first.shape[0]), None, replicate, replicate)
    if shardable is not None:
        raise ValueError(f"{where}: {first_name} is {_described(first)}; Shard(0) does not run here: {shardable}")
    try:
        block = local_block(first.shape[0], mesh.get_group(dim))
    except ValueError as exc:
        raise ValueError(f"{where}: {first_name} is {_described(first)}: {exc}") from None
    local = tuple(None if t is None else t.to_local(grad_placements=placements) for t in named.values())
    partial = tuple(Partial() if i == dim else Replicate() for i in range(len(placements)))
    return LocalExperts(where, local, block, mesh, replicate, partial)


def run_experts(where: str, fn: Callable, x: Tensor, ids: Tensor, weights: Tensor, named: dict) -> Tensor:
    """fn(x, ids, weights, *the local tensors of named) -> [T, O] on DTensor expert weights: the tokens x [T, D], the
    expert ids [T, k] and the routing weights [T, k] as LocalExperts takes them, the output summed over the sharded
    mesh dim. fn counts the experts from the tensors it is given (E / W of them under Shard(0))."""
    loc = local_experts(where, named)
    out = fn(loc.shared(x, "x"), loc.ids(ids), loc.shared(weights, "weights"), *loc.tensors)
    return loc.summed(out)


def moe_mlp(where: str, x: Tensor, experts: Tensor, weights: Tensor, named: dict, **kwargs) -> Tensor:
    """ops.moe_mlp(x, experts, weights, gate_up_proj, down_proj, gate_up_bias=, down_bias=, **kwargs) on DTensor
    expert weights; named: {name: tensor} of those four, in that order (the module's names, for errors)."""
    def fn(x, ids, w, gate_up_proj, down_proj, gate_up_bias, down_bias):
        return ops.moe_mlp(x, ids, w, gate_up_proj, down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias,
                           **kwargs)

    return run_experts(where, fn, x, experts, weights, named)


def dense_moe(where: str, x: Tensor, gates: Tensor, named: dict, **kwargs) -> Tensor:
    """ops.dense_moe(x, gates [T, E], gate_up_proj, down_proj, gate_up_bias=, down_bias=, **kwargs) on DTensor expert
    weights; named as for moe_mlp. Under Shard(0) each rank mixes its experts' columns of the gates."""
    loc = local_experts(where, named)
    up, down, up_b, down_b = loc.tensors
    gates = loc.shared(gates, "gates")[:, loc.experts.start:loc.experts.stop]
    out = ops.dense_moe(loc.shared(x, "x"), gates, up, down, gate_up_bias=up_b, down_bias=down_b, **kwargs)
    return loc.summed(out)


@contextlib.contextmanager
def local_parameters(where: str, module: nn.Module, *, shardable: Optional[str] = None):
    """Within: the parameters of `module` (its expert weights) and the DTensor parameters of its submodules (a norm's)
    are their local tensors, as transformers' parallel styles run their kernels; yields the LocalExperts, whose `ids`,
    `shared` and `summed` the caller applies around the module's own forward. The parameters are put back on exit."""
    slots = [(m, n, p) for m in module.modules() for n, p in m._parameters.items()
             if p is not None and (m is module or isinstance(p, DTensor))]
    prefix = {m: f"{name}." if name else "" for name, m in module.named_modules()}
    loc = local_experts(where, {prefix[m] + n: p for m, n, p in slots}, shardable=shardable)
    try:
        for (m, n, _), t in zip(slots, loc.tensors):
            m._parameters[n] = t
        yield loc
    finally:
        for m, n, p in slots:
            m._parameters[n] = p
