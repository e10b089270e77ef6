"""moe_kernels: fused Mixture-of-Experts kernels for PyTorch."""
from . import ops, reference
from ._backend import backends, use_backend
from . import nn
from .nn import DenseMoE, DynamicSlotsSoftMoE, SoftMoE, SparseMoE
from .convert import convert, register_converter

__version__ = "0.1.0"
__all__ = ["DenseMoE", "DynamicSlotsSoftMoE", "SoftMoE", "SparseMoE", "backends", "convert", "nn", "ops", "reference",
           "register_converter",
           "use_backend"]
