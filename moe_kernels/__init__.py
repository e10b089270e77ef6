"""moe_kernels: fused Mixture-of-Experts kernels for PyTorch."""
import inspect as _inspect
import types as _types

from . import ops, reference
from ._backend import backends, use_backend
from . import nn
from .nn import DenseMoE, DynamicSlotsSoftMoE, HybridMoE, SoftMoE, SparseMoE
from . import convert as _convert_module
from .convert import register_converter


class _CallableModule(_types.ModuleType):
    """moe_kernels.convert is both the module (moe_kernels.convert.INTEGRATIONS, .register_converter, ...) and the
    function: moe_kernels.convert(model) calls moe_kernels.convert.convert(model)."""

    def __call__(self, *args, **kwargs):
        return self.convert(*args, **kwargs)


_convert_module.__class__ = _CallableModule
_convert_module.__signature__ = _inspect.signature(_convert_module.convert)
convert = _convert_module

__version__ = "0.1.0"
__all__ = ["DenseMoE", "DynamicSlotsSoftMoE", "HybridMoE", "SoftMoE", "SparseMoE", "backends", "convert", "nn", "ops",
           "reference", "register_converter", "use_backend"]
