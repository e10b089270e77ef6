"""A converted module keeps the checkpoint layout of the layer it replaced: its `state_dict()` holds the original
layer's keys and tensors (per-expert Linear weights, v4 names, a `gate` where ours says `router`), and its
`load_state_dict()` takes a checkpoint in either layout. A model saved after `moe_kernels.convert()` therefore loads
into its original class, and a checkpoint of the original class loads into the converted model; nobody has to
rename anything.

The layout is a list of `Piece`s, one per tensor of the original layer's state dict, each saying where it lives in
the fused module: a whole tensor (`target`), or row `index` of a stacked [E, ...] tensor, optionally only the rows
`rows` of that slice (a gate_up_proj holds the gate rows then the up rows), optionally transposed. Tensors of the
fused module that no piece covers stay in its state dict under their own names (none, for the converters of this
package: every fused tensor comes from the original). A module whose experts are resized or sharded after conversion
no longer matches the original's layout and saves in its own.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    source: str                                   # key in the original layer's state dict
    target: str                                   # key of the fused module's tensor that holds it
    index: Optional[int] = None                   # the expert: row `index` of the stacked target
    rows: Optional[tuple] = None                  # (start, stop) along the first remaining dim
    transpose: bool = False                       # the source is the transpose of that slice

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The part of the target tensor this piece is, in the source's shape."""
        if self.index is not None:
            t = t[self.index]
        if self.rows is not None:
            t = t[self.rows[0]:self.rows[1]]
        return t.t() if self.transpose else t


def keep_source_layout(module: nn.Module, pieces: list) -> nn.Module:
    """Makes `module` save and load the layout of `pieces` (see the module docstring); returns it."""
    targets = {p.target for p in pieces}
    own = set(dict(module.named_parameters())) | set(dict(module.named_buffers()))
    missing = targets - own
    if missing:
        raise ValueError(f"the layout names tensors {sorted(missing)} the module does not have")
    module._moe_kernels_source_layout = list(pieces)
    module.register_state_dict_post_hook(_to_source)
    module.register_load_state_dict_pre_hook(_from_source)
    return module


def source_layout(module: nn.Module) -> Optional[list]:
    """The pieces a converted module saves in, or None for a module that keeps its own layout."""
    return getattr(module, "_moe_kernels_source_layout", None)


def _to_source(module, state_dict, prefix, local_metadata):
    pieces = source_layout(module)
    if not pieces:
        return
    targets = {p.target for p in pieces}
    if not all(prefix + t in state_dict for t in targets) or not _still_covers(pieces, state_dict, prefix):
        return      # a partial state dict, or a module resized or sharded since: saved in its own layout
    with torch.no_grad():
        for p in pieces:
            t = state_dict[prefix + p.target]
            whole = p.index is None and p.rows is None and not p.transpose
            # a slice is saved as a tensor of its own (safetensors stores no views, torch.save would keep the stack)
            state_dict[prefix + p.source] = t if whole else p.view(t).clone(memory_format=torch.contiguous_format)
    for t in targets - {p.source for p in pieces}:
        del state_dict[prefix + t]


def _still_covers(pieces, state_dict, prefix) -> bool:
    """Whether the pieces still cover each of their tensors exactly once over (a layer whose experts were added,
    removed or sharded after conversion has more or fewer rows than the original had)."""
    covered = {}
    for p in pieces:
        t = state_dict[prefix + p.target]
        if p.index is not None and not 0 <= p.index < t.shape[0]:
            return False
        if p.rows is not None and p.rows[1] > (t[p.index] if p.index is not None else t).shape[0]:
            return False
        covered[p.target] = covered.get(p.target, 0) + p.view(t).numel()
    return all(n == state_dict[prefix + target].numel() for target, n in covered.items())


def _from_source(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    pieces = source_layout(module)
    if not pieces or not any(prefix + p.source in state_dict for p in pieces):
        return      # a checkpoint in the fused layout: loaded as it is
    own = dict(module.named_parameters(recurse=True))
    own.update(module.named_buffers(recurse=True))
    by_target = {}
    for p in pieces:
        by_target.setdefault(p.target, []).append(p)
    for target, parts in by_target.items():
        if all(prefix + p.source not in state_dict for p in parts):
            continue    # missing_keys will name the target
        current = own[target]
        whole = [p for p in parts if p.index is None and p.rows is None and not p.transpose]
        if whole:
            value = state_dict.pop(prefix + whole[0].source)
        else:
            value = torch.empty(current.shape, dtype=current.dtype, device="cpu" if current.is_meta else current.device)
            for p in parts:
                src = state_dict.pop(prefix + p.source, None)
                if src is None:
                    error_msgs.append(f"missing {prefix + p.source} for {prefix + target}")
                    continue
                dst = p.view(value)
                if dst.shape != src.shape:
                    error_msgs.append(f"size mismatch for {prefix + p.source}: the checkpoint holds "
                                      f"{tuple(src.shape)}, the converted layer {tuple(dst.shape)}")
                    continue
                dst.copy_(src)
        state_dict[prefix + target] = value
