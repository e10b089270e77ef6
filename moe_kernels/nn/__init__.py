"""MoE modules running on the ops layer."""
from .dense import DenseMoE
from .experts import Experts
from .soft import DynamicSlotsSoftMoE, RMSNorm, SoftMoE
from .sparse import SparseMoE

__all__ = ["DenseMoE", "DynamicSlotsSoftMoE", "Experts", "RMSNorm", "SoftMoE", "SparseMoE"]
