"""MoE modules running on the ops layer."""
from .dense import DenseMoE
from .experts import Experts, LinearExperts
from .hybrid import HybridMoE
from .soft import DynamicSlotsSoftMoE, RMSNorm, SoftMoE
from .sparse import SparseMoE

__all__ = ["DenseMoE", "DynamicSlotsSoftMoE", "Experts", "HybridMoE", "LinearExperts", "RMSNorm", "SoftMoE",
           "SparseMoE"]
