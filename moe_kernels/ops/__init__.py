"""The ops layer: torch.library custom ops under the `moe_kernels` namespace, each with a fake
implementation, registered autograd and a backend dispatch (see moe_kernels._backend)."""
from .dense import dense_moe
from .expert_mlp import LoRA, moe_mlp
from .grouped_gemm import grouped_mm
from .permutation import Sorted, permute, sort_by_expert, unpermute
from .quantized import QuantizedWeight
from .routing import Routing, entropy_loss, load_balancing_loss, router_z_loss, topk_route
from .soft_moe import soft_combine, soft_combine_logits, soft_dispatch, soft_dispatch_logits, soft_logits

__all__ = ["LoRA", "QuantizedWeight", "Routing", "Sorted", "dense_moe", "entropy_loss", "grouped_mm",
           "load_balancing_loss", "moe_mlp", "permute", "router_z_loss", "soft_combine", "soft_combine_logits", "soft_dispatch", "soft_dispatch_logits",
           "soft_logits", "sort_by_expert", "topk_route", "unpermute"]
