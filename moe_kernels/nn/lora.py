"""PEFT LoRA adapters on expert weights (`LoraConfig(target_parameters=[...gate_up_proj, ...down_proj])`).

PEFT wraps the experts module and, for each forward, parametrizes the targeted parameter as `W + scaling * lhs @ rhs`
(its `_LoraFactorsProxy`, one adapter) or `W + delta` (several adapters). Reading the parameter would form that
[E, N, K] weight every step, and its gradient too. Here the parametrization is read instead: the base weight and
the adapter's factors, which the fused path applies as a grouped GEMM pair through the rank (`ops.LoRA`). Other
parametrizations are read as their value. PEFT itself is not imported.
"""
from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..ops.expert_mlp import LoRA


def _factors(module: nn.Module):
    """(lhs, rhs, scaling) of PEFT's single-adapter LoRA parametrization, or None for anything else."""
    cls = type(module)
    if cls.__name__ != "_LoraFactorsProxy" or not cls.__module__.startswith("peft."):
        return None
    lhs, rhs, scaling = getattr(module, "lhs", None), getattr(module, "rhs", None), getattr(module, "scaling", None)
    if not (isinstance(lhs, Tensor) and isinstance(rhs, Tensor) and lhs.dim() == rhs.dim() == 3):
        return None
    return lhs, rhs, float(scaling)


def weight_and_lora(module: nn.Module, name: str, transposed: bool = False) -> tuple[Tensor, Optional[LoRA]]:
    """module.<name> as the fused ops take it: (the base weight, its LoRA) while PEFT's LoRA parametrization of one
    adapter is active on it, else (the attribute's value, None). The LoRA is for the weight as [E, N, K]: with
    `transposed` (a weight stored [E, K, N]) its factors are transposed to match."""
    if not parametrize.is_parametrized(module, name):
        return getattr(module, name), None
    plist = module.parametrizations[name]
    found = _factors(plist[0]) if len(plist) == 1 else None
    if found is None:
        return getattr(module, name), None
    lhs, rhs, scaling = found               # delta = scaling * lhs @ rhs in the stored layout
    if transposed:                          # delta^T = rhs^T @ lhs^T
        return plist.original, LoRA(lhs.transpose(1, 2), rhs.transpose(1, 2), scaling)
    return plist.original, LoRA(rhs, lhs, scaling)
