"""The implementations a user would otherwise pick, built on the weights of a case. Each returns None (and leaves a
note for the report) when its package is not installed: a missing peer is skipped, never an error.

- transformers 5.x experts implementations `eager`, `grouped_mm`, `batched_mm` on a MixtralExperts module (its
  routers' code is in bench_routing.torch_routing);
- a layer built on torch.nn.functional.grouped_mm (torch._grouped_mm on older torch) with torch's own
  permutation (argsort + index_add), and that permutation alone;
- soft-moe-pytorch's SoftMoE;
- the zoo of MoE layers as people write them (tests/zoo, in this repository): each is the peer of its converted
  copy in bench_modules.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import common

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_MAX_BYTES = 2**30  # batched_mm copies the expert weights of every (token, slot) pair


# --- torch -----------------------------------------------------------------------------------------------------
def torch_grouped_mm():
    """torch.nn.functional.grouped_mm, else torch._grouped_mm, else None."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        common.note(f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm: "
                    "the torch grouped_mm layer is skipped")
    return fn


def torch_sort(experts, num_experts):
    """(order, offsets) of the (token, slot) pairs sorted by expert, as users write it: a stable argsort of the
    flat ids and the cumulative counts."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    return order, offsets


def torch_permute(x, order, k):
    """The rows of x in expert order: x[order // k]."""
    return x[order // k]


def torch_unpermute(y, order, weights, num_tokens):
    """Each token's weighted sum of its k expert-ordered rows, by index_add."""
    k = weights.shape[1]
    scaled = y * weights.reshape(-1)[order, None].to(y.dtype)
    return y.new_zeros(num_tokens, y.shape[1]).index_add_(0, order // k, scaled)


def grouped_mm_layer(x, experts, weights, w_up_t, w_down_t, grouped_mm):
    """A MoE expert layer as users build it from grouped_mm: w_up_t [E, D, 2H] and w_down_t [E, H, D] (the
    transposed views of the transformers layout), SwiGLU with the gate first."""
    order, offsets = torch_sort(experts, w_up_t.shape[0])
    k = experts.shape[1]
    h = grouped_mm(torch_permute(x, order, k), w_up_t, offs=offsets)
    gate, up = h.chunk(2, dim=-1)
    y = grouped_mm(F.silu(gate) * up, w_down_t, offs=offsets)
    return torch_unpermute(y, order, weights, x.shape[0])


# --- transformers ----------------------------------------------------------------------------------------------
def _transformers(what):
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        common.note(f"transformers is not installed: {what} skipped")
        return False


def transformers_experts(w_up, w_down, implementation):
    """A transformers MixtralExperts module whose parameters share storage with w_up [E, 2H, D] and w_down
    [E, D, H] (the same weights, no copy), running `implementation`; None without transformers."""
    if not _transformers("its experts implementations (eager, grouped_mm, batched_mm)"):
        return None
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, H2, D = w_up.shape
    config = MixtralConfig(hidden_size=D, intermediate_size=H2 // 2, num_local_experts=E, hidden_act="silu")
    config._experts_implementation = implementation
    with torch.device("meta"):   # no storage: the parameters are replaced by ours just below
        module = MixtralExperts(config)
    module.gate_up_proj = nn.Parameter(w_up.detach(), requires_grad=w_up.requires_grad)
    module.down_proj = nn.Parameter(w_down.detach(), requires_grad=w_down.requires_grad)
    return module


def peft_lora_experts(w_up, w_down, implementation, r):
    """transformers_experts(w_up, w_down, implementation) with frozen weights and PEFT LoRA adapters of rank r on
    gate_up_proj and down_proj (`target_parameters`; A and B random, seeded: every implementation gets the same
    ones), called as the experts module; None without peft or transformers."""
    try:
        import peft
    except ImportError:
        common.note("peft is not installed: the LoRA fine-tuning case is skipped")
        return None
    module = transformers_experts(w_up.detach(), w_down.detach(), implementation)
    if module is None:
        return None
    if implementation == "moe_kernels":
        from moe_kernels.integrations.transformers import register
        register()
    holder = nn.Module()
    holder.experts = module
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    with torch.random.fork_rng(devices=[w_up.device] if w_up.is_cuda else []):
        torch.manual_seed(1)
        holder = peft.inject_adapter_in_model(config, holder)
    return holder.experts


def batched_mm_bytes(T, k, D, H, O, itemsize):
    """Bytes of the per-(token, slot) weight copies transformers' batched_mm makes."""
    return T * k * (2 * H * D + O * H) * itemsize


# --- soft-moe-pytorch ------------------------------------------------------------------------------------------
def soft_moe_pytorch():
    """The soft_moe_pytorch package, or None."""
    try:
        import soft_moe_pytorch
        return soft_moe_pytorch
    except ImportError:
        common.note("soft-moe-pytorch is not installed: its SoftMoE is skipped")
        return None


# --- the zoo of MoE layers as people write them ---------------------------------------------------------------
def zoo():
    """The package tests.zoo of this repository (its STYLES build each layer at any size, with sample inputs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:   # the suite runs from the repository root; from elsewhere, find tests/ beside it
        sys.path.append(root)
    from tests import zoo as module
    return module
