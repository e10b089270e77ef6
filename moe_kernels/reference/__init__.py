"""The math of every op family in plain PyTorch: the spec, the test oracle, the CPU fallback."""
from .activations import ACTIVATIONS, act, act_backward, act_grad, glu, glu_backward
from .dense import dense_moe
from .expert_mlp import moe_mlp
from .grouped_gemm import grouped_mm, grouped_mm_backward
from .permutation import permute, permute_backward, sort_by_expert, unpermute, unpermute_backward
from .routing import load_balancing_loss, router_z_loss, topk_route, topk_route_backward
from .soft_moe import (soft_combine, soft_combine_backward, soft_combine_forward, soft_dispatch, soft_dispatch_backward,
                       soft_dispatch_forward)
