"""PEFT LoRA adapters on expert weights (`LoraConfig(target_parameters=[...gate_up_proj, ...down_proj])`), read as
the fused ops take them: the frozen base weight and the adapter's factors (`ops.LoRA`), applied as a grouped GEMM
pair through the rank, never as the merged [E, N, K] weight.

PEFT wraps the module holding the parameter in a `ParamWrapper` per targeted parameter. For each forward it
parametrizes the parameter as `W + scaling * lhs @ rhs` (its `_LoraFactorsProxy`, one adapter) or `W + delta`
(several adapters), which reading the parameter would form every step, its gradient too:
- transformers experts modules run inside that forward: `weight_and_lora` reads the parametrization instead;
- moe_kernels' own modules read the wrapped Experts directly: `unwrap_lora` finds the wrappers and their factors.
PEFT itself is not imported.
"""
from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..ops.expert_mlp import LoRA


def _lora(lhs: Tensor, rhs: Tensor, scaling: float, transposed: bool) -> LoRA:
    """The LoRA of delta = scaling * lhs @ rhs in a weight's stored layout, for the weight as [E, N, K]
    (`transposed`: stored [E, K, N], whose delta^T = rhs^T @ lhs^T)."""
    if transposed:
        return LoRA(lhs.transpose(1, 2), rhs.transpose(1, 2), float(scaling))
    return LoRA(rhs, lhs, float(scaling))


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
    return plist.original, _lora(*found, transposed)


def _is_param_wrapper(module: nn.Module) -> bool:
    return (type(module).__module__.startswith("peft.") and hasattr(module, "parameter_name")
            and hasattr(module, "get_delta_factors") and hasattr(module, "base_layer"))


def unwrap_lora(module: nn.Module) -> tuple[nn.Module, dict]:
    """(the module PEFT's ParamWrappers wrap, {parameter name: its LoRA} of the adapters active on it); (module, {})
    when it is not wrapped. A wrapper whose adapters are disabled or merged adds nothing (the weight holds what it
    should). ValueError for what the fused path does not run: several active adapters on one parameter."""
    loras = {}
    while _is_param_wrapper(module):
        active = [a for a in module.active_adapters if a in module.lora_A]
        if active and not module.disable_adapters and not module.merged:
            if len(active) > 1:
                raise ValueError(f"{module.parameter_name}: {len(active)} active LoRA adapters ({active}) on one "
                                 "expert weight; moe_kernels runs one at a time (set_adapter, or merge the others)")
            lhs, rhs, scaling = module.get_delta_factors(active[0])
            loras[module.parameter_name] = _lora(lhs, rhs, scaling, getattr(module.get_base_layer(), "is_transposed",
                                                                          False))
        module = module.base_layer
    return module, loras
