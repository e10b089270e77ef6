"""transformers integration: `experts_implementation="moe_kernels"` for transformers 5.x MoE models, and the
conversion of transformers v4-style sparse MoE blocks to `SparseMoE`.

transformers 5.x runs the experts of its MoE models through an interface. An experts module decorated with
`transformers.integrations.moe.use_experts_implementation` looks `config._experts_implementation` up in
`ALL_EXPERTS_FUNCTIONS` (an `ExpertsInterface`; its classmethod `register(name, fn)` adds to every instance)
and calls `fn(self, hidden_states [T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D]`, where `self`
holds
  gate_up_proj [E, 2H, D] when `has_gate`, else up_proj [E, H, D]; down_proj [E, D, H]
      (stored as [E, D, 2H|H] and [E, H, D] when `is_transposed`);
  gate_up_proj_bias [E, 2H] (or up_proj_bias [E, H]) and down_proj_bias [E, D] when `has_bias`;
  act_fn, and `_apply_gate(h)`: by default `gate, up = h.chunk(2, -1); act_fn(gate) * up` (gate first);
  has_post_expert_norm: a norm applied to each expert's output before the routing weight.
Expert ids outside [0, E) are the expert-parallel sentinel and contribute zero. A model accepts an
experts_implementation only if it is "eager" or a key of ALL_EXPERTS_FUNCTIONS (checked when the model is
built, loaded or switched), so `register()` runs before any of those.

transformers is imported only when a function here needs it; importing moe_kernels never does.
"""
import functools
import math
import re
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import distributed
from ..nn.dtensor import is_dtensor, local_parameters
from ..nn.lora import weight_and_lora
from ..nn.source_layout import Piece, keep_source_layout
from ..nn.sparse import SparseMoE
from ..ops.expert_mlp import check_experts_weights, check_lora, project
from ..reference import quantized as ref_quantized
from ..reference.activations import ACTIVATIONS, Activation, glu

NAME = "moe_kernels"
# the first transformers whose models accept any name registered in ALL_EXPERTS_FUNCTIONS (5.0-5.6 accept only
# a fixed list: eager, grouped_mm, batched_mm, deepgemm)
MIN_TRANSFORMERS = (5, 7)


# --- transformers, imported on use --------------------------------------------------------------------------
def _hf_moe():
    """transformers.integrations.moe, or an ImportError saying what is missing."""
    need = ".".join(map(str, MIN_TRANSFORMERS))
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"moe_kernels.integrations.transformers needs transformers>={need} (pip install "
                          f"'transformers>={need},<6'), which is not installed") from exc
    version = getattr(transformers, "__version__", "0")
    try:
        from transformers.integrations import moe
        moe.ExpertsInterface
        found = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    except (ImportError, AttributeError, ValueError) as exc:
        found, error = (0,), exc
    else:
        error = None
    if found < MIN_TRANSFORMERS:
        raise ImportError(f"moe_kernels.integrations.transformers needs transformers>={need}, whose models accept an "
                          "experts implementation registered in transformers.integrations.moe.ExpertsInterface; "
                          f"found transformers {version}") from error
    return moe


def register() -> None:
    """Adds "moe_kernels" (`experts_forward`) to transformers' experts implementations, so that
    `from_pretrained(..., experts_implementation="moe_kernels")`, `Config(..., experts_implementation=...)` and
    `model.set_experts_implementation("moe_kernels")` work, and a model whose experts it cannot run is refused
    there (ValueError naming the experts class and why), not at its first forward. Also answers for FP8 experts
    (transformers' FP8 experts interface: `fp8_experts_forward`). Idempotent."""
    _hf_moe().ExpertsInterface.register(NAME, experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
        FP8ExpertsInterface.register(NAME, fp8_experts_forward)
    except (ImportError, AttributeError):
        pass
    _refuse_early()


def check_model(model: nn.Module) -> int:
    """Finds the activation of every experts module of `model` set to run on "moe_kernels" (kept on the module, so
    that a compiled forward only reads it); ValueError naming the first one it cannot run and why. Returns how
    many it checked."""
    n = 0
    for m in model.modules():
        if is_experts_module(m) and getattr(m.config, "_experts_implementation", None) == NAME:
            check_experts(m)
            n += 1
    return n


def _refuse_early() -> None:
    """transformers' models check the experts implementation they are given by name only: PreTrainedModel.post_init
    (the end of every model's construction, from_pretrained included) and set_experts_implementation also run
    check_model, so a family that cannot run is refused when it is set (the previous implementation restored)."""
    from transformers import PreTrainedModel

    if getattr(PreTrainedModel, "_moe_kernels_checks", False):
        return
    post_init, set_impl = PreTrainedModel.post_init, PreTrainedModel.set_experts_implementation

    @functools.wraps(post_init)
    def checked_post_init(self, *args, **kwargs):
        out = post_init(self, *args, **kwargs)
        check_model(self)
        return out

    @functools.wraps(set_impl)
    def checked_set(self, experts_implementation):
        before = self.get_experts_implementation()
        out = set_impl(self, experts_implementation)
        try:
            check_model(self)
        except (TypeError, ValueError):
            set_impl(self, before)
            raise
        return out

    PreTrainedModel.post_init = checked_post_init
    PreTrainedModel.set_experts_implementation = checked_set
    PreTrainedModel._moe_kernels_checks = True


# --- activations --------------------------------------------------------------------------------------------
_ACTIVATIONS: Optional[dict] = None  # activation module type or function -> our name; filled on first use


def _activation_table() -> dict:
    global _ACTIVATIONS
    if _ACTIVATIONS is None:
        table = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity",
                 F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu"}
        try:
            from transformers import activations as hf_act
        except ImportError:
            hf_act = None
        # transformers' ACT2FN classes, by exact type: GELUActivation is erf GELU (both of its forms); GELUTanh,
        # NewGELU, FastGELU (sqrt(2/pi) rounded to 10 digits) and AccurateGELU are the tanh approximation
        for cls_name, name in (("SiLUActivation", "silu"), ("GELUActivation", "gelu"), ("GELUTanh", "gelu_tanh"),
                               ("NewGELUActivation", "gelu_tanh"), ("FastGELUActivation", "gelu_tanh"),
                               ("AccurateGELUActivation", "gelu_tanh"), ("LinearActivation", "identity"),
                               ("ReLUSquaredActivation", "relu2")):
            cls = getattr(hf_act, cls_name, None)
            if cls is not None:
                table[cls] = name
        _ACTIVATIONS = table
    return _ACTIVATIONS


def experts_activation(act_fn) -> str:
    """Our name (one of ACTIVATIONS) of an activation module or function: transformers' ACT2FN silu, swish, gelu,
    gelu_python, gelu_new, gelu_fast, gelu_accurate, gelu_pytorch_tanh, gelu_python_tanh, relu, relu2, linear;
    torch's nn.SiLU, nn.GELU, nn.ReLU, nn.Identity and their functions. ValueError for any other."""
    if type(act_fn) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[act_fn.approximate]
    table = _activation_table()
    key = type(act_fn) if isinstance(act_fn, nn.Module) else act_fn
    try:
        name = table.get(key)
    except TypeError:  # an unhashable callable
        name = None
    if name is None:
        raise ValueError(f"act_fn {act_fn!r} ({type(act_fn).__module__}.{type(act_fn).__qualname__}) has no "
                         f"moe_kernels equivalent: moe_kernels runs {ACTIVATIONS} (transformers' silu, swish, gelu, "
                         "gelu_python, gelu_new, gelu_fast, gelu_accurate, gelu_pytorch_tanh, gelu_python_tanh, relu, "
                         "relu2, linear)")
    return name


# --- transformers 5.x: the experts function -----------------------------------------------------------------
_SPEC = "_moe_kernels_activation"      # the activation spec an experts module runs with, found once and kept on it
_NUMBER = (int, float)


def _numbers(module: nn.Module, names) -> list:
    return sorted({float(v) for n in names for v in [getattr(module, n, None)]
                   if isinstance(v, _NUMBER) and not isinstance(v, bool) and math.isfinite(v) and v > 0})


def _softcaps(act_fn) -> list:
    """The softcap values a gate module holds (Inkling2's act_fn keeps them in submodules)."""
    if not isinstance(act_fn, nn.Module):
        return []
    return sorted({float(v) for m in act_fn.modules() for n, v in vars(m).items()
                   if "softcap" in n and isinstance(v, _NUMBER) and not isinstance(v, bool) and v > 0})


def _spec_candidates(experts: nn.Module, base: Optional[str]):
    """Activation specs an experts module's gate may compute, plainest first: its act_fn's activation as it is,
    then the GLU options its attributes name (limit / swiglu_limit, alpha / swiglu_alpha, softcaps)."""
    yield base
    limits = [None] + _numbers(experts, ("limit", "swiglu_limit"))
    alphas = [1.0] + _numbers(experts, ("alpha", "swiglu_alpha"))
    caps = [None] + _softcaps(getattr(experts, "act_fn", None))
    for name in dict.fromkeys([base, "silu"]):
        if name is None:
            continue
        for interleaved in (False, True):
            for limit in limits:
                for clamp_after in ((False, True) if limit is not None else (False,)):
                    for alpha in alphas if name == "silu" else [1.0]:
                        for offset in (0.0, 1.0):
                            for gcap in caps if name == "silu" else [None]:
                                for ucap in caps:
                                    yield str(Activation(name, alpha, limit, clamp_after, offset, interleaved, gcap,
                                                         ucap))


def _gate_matches(experts: nn.Module, gate_fn, spec: str, limit_scale: float) -> bool:
    """Whether gate_fn(experts, h) is glu(h, spec) on random pre-activations (float64; 1e-5 relative, so a gate that
    computes in float32 still matches), values across the clamps' bounds included."""
    g = torch.Generator().manual_seed(0)
    # on the CPU, also under the meta device from_pretrained builds models on
    h = torch.randn(64, 2 * 8, generator=g, dtype=torch.float64, device="cpu") * limit_scale
    h[0, :4] = limit_scale / 1.5
    h[1, :4] = -limit_scale / 1.5
    try:
        want = gate_fn(experts, h)
        got = glu(h, spec, True)
    except Exception:  # noqa: BLE001 -- a gate that cannot take the probe is not this spec
        return False
    return want.shape == got.shape and torch.allclose(want.double(), got, rtol=1e-5, atol=1e-7, equal_nan=True)


def experts_spec(experts: nn.Module) -> str:
    """The activation spec (moe_kernels.reference.activations) that computes this experts module's activation:
    its act_fn (silu, gelu, relu2, ...), and for a gated module whose `_apply_gate` is its own (GPT-OSS's clamped,
    interleaved SwiGLU with alpha and the +1 on up; the limits of DeepSeek-V4, GLM-5 Next, HY-V4, Bailing,
    Step-3.7; Inkling2's softcaps; ...) the GLU options that compute the same, found by running the gate on probe
    values. Kept on the module after the first call. ValueError naming the class when none does."""
    spec = getattr(experts, _SPEC, None)
    if spec is not None:
        return spec
    where = type(experts).__name__
    gated = getattr(experts, "has_gate", True)
    act_fn = getattr(experts, "act_fn", None)
    try:
        base = experts_activation(act_fn) if act_fn is not None else None
    except ValueError:
        base = None
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if not gated or gate_fn is None:
        if base is None:
            raise ValueError(f"{where}: act_fn {act_fn!r} has no moe_kernels equivalent (moe_kernels runs "
                             f"{ACTIVATIONS})")
        spec = base
    else:
        bounds = _numbers(experts, ("limit", "swiglu_limit")) + _softcaps(act_fn)
        scale = 1.5 * max(bounds + [2.0])
        spec = next((c for c in _spec_candidates(experts, base) if c is not None
                     and _gate_matches(experts, gate_fn, c, scale)), None)
        if spec is None:
            raise ValueError(f"{where}: its _apply_gate computes an activation no moe_kernels epilogue matches "
                             f"(act_fn {type(act_fn).__name__}; tried its activation with the clamps, alpha, offsets, "
                             "softcaps and layouts its attributes allow)")
    object.__setattr__(experts, _SPEC, spec)
    return spec


def post_expert_norm(experts: nn.Module) -> Optional[nn.Module]:
    """The norm a `has_post_expert_norm` experts module applies to each expert's output (before the routing
    weight): its one submodule whose name holds "norm"; None for the others. ValueError when it has none or several."""
    if not getattr(experts, "has_post_expert_norm", False):
        return None
    norms = [m for n, m in experts.named_children() if "norm" in n]
    if len(norms) != 1:
        raise ValueError(f"{type(experts).__name__}: has_post_expert_norm, but {len(norms)} submodules named *norm*")
    return norms[0]


def experts_arguments(experts: nn.Module):
    """A transformers experts module -> (gate_up_proj [E, 2H|H, D], down_proj [E, D, H] (views of its weights),
    the keyword arguments of `ops.moe_mlp`). ValueError for what ops.moe_mlp does not compute."""
    gated, has_bias = getattr(experts, "has_gate", True), getattr(experts, "has_bias", False)
    transposed = getattr(experts, "is_transposed", False)
    up_name = "gate_up_proj" if gated else "up_proj"
    up, up_lora = weight_and_lora(experts, up_name, transposed)
    down, down_lora = weight_and_lora(experts, "down_proj", transposed)
    up_bias = getattr(experts, f"{up_name}_bias") if has_bias else None
    down_bias = experts.down_proj_bias if has_bias else None
    if transposed:
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    return up, down, dict(activation=experts_spec(experts), gated=gated, gate_up_bias=up_bias, down_bias=down_bias,
                          gate_up_lora=up_lora, down_lora=down_lora)


def check_experts(experts: nn.Module) -> None:
    """Raises (ValueError / TypeError naming the module, the argument and the shapes) unless `experts_forward`
    can run this experts module; finds its activation spec on the way."""
    if hasattr(experts, "down_proj_scale_inv"):     # transformers' FP8Experts
        fp8_weights(experts)
        experts_spec(experts)
        return
    up, down, kw = experts_arguments(experts)
    if _is_fp8(up):
        raise ValueError(f"{type(experts).__name__} holds FP8 weights ({up.dtype}) without their scales: run it "
                         "through transformers' FP8 quantization config, or dequantise the model")
    post_expert_norm(experts)
    try:
        check_experts_weights(up, down, kw["gated"], kw["gate_up_bias"], kw["down_bias"])
        check_lora("gate_up_lora", kw["gate_up_lora"], up)
        check_lora("down_lora", kw["down_lora"], down)
    except (TypeError, ValueError) as exc:
        layout = " (transposed from its is_transposed layout)" if getattr(experts, "is_transposed", False) else ""
        raise type(exc)(f"{type(experts).__name__}: {exc}{layout}") from None


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts contract on `ops.moe_mlp`: hidden_states [T, D], top_k_index [T, k] int (ids outside
    [0, E) contribute zero), top_k_weights [T, k] -> [T, D] in hidden_states' dtype. hidden_states are cast to the
    weights' dtype first, as transformers' grouped_mm does under autocast. A post-expert norm runs between the
    expert MLP's pieces (sort, grouped GEMMs, norm, weighted combine). No host syncs here."""
    up, down, kw = experts_arguments(self)
    if is_dtensor(up, down, kw["gate_up_bias"], kw["down_bias"]):   # distribute_tensor, parallel styles, 2-D FSDP2
        return _dtensor_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    x = hidden_states.to(up.dtype)
    norm = post_expert_norm(self)
    if norm is not None:
        s = ops.sort_by_expert(top_k_index, up.shape[0])
        h = project(ops.permute(x, s), up, s.offsets, kw["gate_up_bias"], kw["gate_up_lora"],
                    activation=kw["activation"], gated=kw["gated"])
        y = norm(project(h, down, s.offsets, kw["down_bias"], kw["down_lora"]))
        out = ops.unpermute(y, s, top_k_weights.to(y.dtype))
    elif getattr(self, "moe_kernels_sharded", False):   # by moe_kernels.distributed.expert_parallel: global ids
        if any(kw.pop(name) is not None for name in ("gate_up_lora", "down_lora")):
            raise ValueError(f"{type(self).__name__}: LoRA adapters on expert-parallel experts do not run on "
                             "'moe_kernels' yet; merge the adapter or run the experts unsharded")
        out = distributed.moe_mlp(x, top_k_index, top_k_weights, up, down,
                                  process_group=self.moe_kernels_process_group, **kw)
    else:
        out = ops.moe_mlp(x, top_k_index, top_k_weights, up, down, **kw)
    return out.to(hidden_states.dtype)


def _dtensor_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """experts_forward with DTensor weights (moe_kernels.nn.dtensor): the module's own forward on its local weights,
    with the tokens and routing weights shared over the mesh, the expert ids shifted into the local block and the
    output summed over the mesh dim the experts are sharded over (Shard(0), expert parallelism)."""
    why = None
    if post_expert_norm(self) is not None:
        why = ("its post-expert norm's parameters are replicated, and would get only this rank's experts' share of "
               "their gradient")
    with local_parameters(type(self).__name__, self, shardable=why) as loc:
        out = experts_forward(self, loc.shared(hidden_states, "hidden_states"), loc.ids(top_k_index),
                              loc.shared(top_k_weights, "top_k_weights"))
    return loc.summed(out)


def fp8_weights(experts: nn.Module) -> tuple:
    """The projections of a transformers FP8Experts module (e4m3 weights with fp32 or ue8m0 block scales, dynamic
    activation scheme) as ops.QuantizedWeight, the weights themselves (no copy); ValueError naming the class and
    the reason for what moe_kernels does not run."""
    name = type(experts).__name__
    gated = getattr(experts, "has_gate", True)
    up_name = "gate_up_proj" if gated else "up_proj"
    up, down = getattr(experts, up_name), experts.down_proj
    up_s, down_s = getattr(experts, f"{up_name}_scale_inv"), experts.down_proj_scale_inv
    if up.dtype != torch.float8_e4m3fn or down.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: 'moe_kernels' runs FP8 (e4m3) experts with block scales, got {up.dtype} weights "
                         f"(FP4-packed experts are not supported yet)")
    if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{name}: static activation scales (activation_scheme={experts.activation_scheme!r}) "
                         "are not supported: 'moe_kernels' computes with unquantised activations")
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        raise ValueError(f"{name}: FP8 experts with biases or transposed weights are not supported")
    block = getattr(experts, "block_size", None)
    if block is None:      # one scale per expert and projection: a block covering both projections whole
        block = (max(up.shape[1], down.shape[1]), max(up.shape[2], down.shape[2]))
    scales = []
    for s in (up_s, down_s):
        if s.dtype != torch.float32:    # ue8m0 scales: the powers of two they stand for
            s = ref_quantized.e8m0_to_float(s.view(torch.uint8), torch.float32)
        scales.append(s)
    try:
        return (ops.QuantizedWeight.fp8(up.detach(), scales[0].detach(), tuple(block)),
                ops.QuantizedWeight.fp8(down.detach(), scales[1].detach(), tuple(block)))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None


def fp8_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The 'moe_kernels' entry of transformers' FP8 experts interface: the e4m3 weights and their block scales as
    they are, through ops.moe_mlp's quantized path (inference: no gradient flows through it)."""
    up, down = fp8_weights(self)
    out = ops.moe_mlp(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), up, down,
                      activation=experts_spec(self), gated=getattr(self, "has_gate", True))
    return out.to(hidden_states.dtype)


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` dispatches through transformers' experts interface (`@use_experts_implementation`)."""
    return (all(hasattr(module, a) for a in ("has_gate", "is_transposed", "down_proj", "config"))
            and hasattr(module.config, "_experts_implementation"))


# --- transformers v4-style sparse MoE blocks ----------------------------------------------------------------
class SparseMoEBlock(SparseMoE):
    """A transformers v4 sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on the fused ops, in v4's
    calling convention: hidden_states [..., D] -> (out [..., D], router_logits [T, E]).

    Routing as v4: softmax over all E experts in fp32, top-k, renormalised when `renormalize` (v4's
    norm_topk_prob; Mixtral always). In training with jitter_noise > 0 (Mixtral), the input is first scaled by
    uniform noise in [1 - jitter, 1 + jitter]. An optional shared expert (Qwen2-MoE) adds
    sigmoid(shared_expert_gate(x)) * shared_expert(x). The model computes its load-balancing loss from the
    returned router logits, so `aux_loss` stays None.
    """

    def __init__(self, dim, hidden_dim, num_experts, top_k, *, activation="silu", renormalize=True, bias=False,
                 router_bias=False, jitter_noise=0.0, shared_expert=None, shared_expert_gate=None, device=None,
                 dtype=None):
        super().__init__(dim, hidden_dim, num_experts, top_k, activation=activation, renormalize=renormalize,
                         bias=bias, router_bias=router_bias, aux_loss_coef=0.0, device=device, dtype=dtype)
        if (shared_expert is None) != (shared_expert_gate is None):
            raise ValueError("shared_expert and shared_expert_gate go together: got "
                             f"{type(shared_expert).__name__} and {type(shared_expert_gate).__name__}")
        self.jitter_noise = float(jitter_noise)
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate

    def forward(self, hidden_states: torch.Tensor):
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.dim:
            raise ValueError(f"hidden_states must be [..., D] with D = {self.dim}, got {tuple(hidden_states.shape)}")
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        x = hidden_states.reshape(-1, self.dim)
        router_logits = self.router(x)
        r = ops.topk_route(router_logits, self.top_k, renormalize=self.renormalize)
        out = self._routed_experts(x, r.experts, r.weights, None)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        self.aux_loss = None
        return out.view(shape), router_logits

    def extra_repr(self):
        return super().extra_repr() + f", jitter_noise={self.jitter_noise}"


_V4_EXPERT_LAYERS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # (gate, up, down)
# attributes of v4 blocks whose routing is not softmax-top-k (PhiMoE's sparsemixer, DeepSeek's groups and bias)
_V4_OTHER_ROUTING = ("router_jitter_noise", "input_jitter_noise", "e_score_correction_bias", "routed_scaling_factor",
                     "n_group", "topk_group", "moe_statics")


def _v4_block(block: nn.Module):
    """(spec, None) for a v4 sparse MoE block this module runs, (None, why) for a look-alike it cannot run,
    (None, None) for anything else. Recognised by structure: a `gate` and an `experts` nn.ModuleList."""
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0 or gate is None:
        return None, None
    E = len(experts)
    if not isinstance(gate, nn.Linear) or gate.out_features != E:
        return None, f"its gate {type(gate).__name__} is not an nn.Linear with out_features = {E} experts"
    D = gate.in_features
    other = [a for a in _V4_OTHER_ROUTING if hasattr(block, a)]
    if other:
        return None, f"it has {other}: routing other than softmax top-k"
    extra = set(dict(block.named_children())) - {"gate", "experts", "shared_expert", "shared_expert_gate"}
    if extra:
        return None, f"it has submodules {sorted(extra)} besides gate, experts and a shared expert"
    shared, shared_gate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    gate_ok = isinstance(shared_gate, nn.Linear) and shared_gate.weight.shape == (1, D)
    if (shared is None) != (shared_gate is None) or (shared_gate is not None and not gate_ok):
        return None, "a shared expert needs both shared_expert and shared_expert_gate = nn.Linear(D, 1)"
    names = next((n for n in _V4_EXPERT_LAYERS if all(isinstance(getattr(experts[0], a, None), nn.Linear) for a in n)),
                 None)
    if names is None:
        return None, "its experts have neither w1/w2/w3 nor gate_proj/up_proj/down_proj nn.Linear layers"
    H = getattr(experts[0], names[0]).out_features
    has_bias = getattr(experts[0], names[0]).bias is not None
    activation = None
    for i, mlp in enumerate(experts):
        layers = [getattr(mlp, a, None) for a in names]
        shapes = ((H, D), (H, D), (D, H))
        if not all(isinstance(lin, nn.Linear) and lin.weight.shape == s for lin, s in zip(layers, shapes)):
            return None, (f"expert {i}: {'/'.join(names)} must be nn.Linear with weights {shapes} "
                          f"(D = {D} of the gate, H = {H} of expert 0)")
        if any((lin.bias is not None) != has_bias for lin in layers):
            return None, f"expert {i}: its linear layers must all have a bias or all have none, like expert 0's"
        if set(dict(mlp.named_children())) - set(names) - {"act_fn"}:
            return None, f"expert {i} has submodules besides {'/'.join(names)} and act_fn"
        try:
            act = experts_activation(getattr(mlp, "act_fn", None))
        except ValueError as exc:
            return None, f"expert {i}: {exc}"
        if activation not in (None, act):
            return None, f"expert {i} has activation {act!r}, expert 0 {activation!r}"
        activation = act
    top_k = getattr(block, "top_k", getattr(block, "num_experts_per_tok", None))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        return None, f"its top_k (or num_experts_per_tok) must be an int in [1, {E}], got {top_k!r}"
    renormalize = getattr(block, "norm_topk_prob", None)
    if renormalize is None:
        if names[0] != "w1":
            return None, "it has no norm_topk_prob, so whether the top-k weights are renormalised is unknown"
        renormalize = True  # Mixtral
    return dict(dim=D, hidden_dim=H, num_experts=E, top_k=top_k, activation=activation,
                renormalize=bool(renormalize), bias=has_bias, router_bias=gate.bias is not None,
                jitter_noise=float(getattr(block, "jitter_noise", 0.0)), layers=names, shared_expert=shared,
                shared_expert_gate=shared_gate), None


def convert_block(block: nn.Module) -> SparseMoEBlock:
    """A v4 sparse MoE block -> a SparseMoEBlock computing the same, holding its weights: gate_up_proj[e] =
    cat(w1, w3) (gate_proj, up_proj) [2H, D], down_proj[e] = w2 (down_proj) [D, H]; the router reuses the
    gate's parameters and the shared expert is moved over as it is. ValueError saying why for a block it
    cannot run."""
    spec, why = _v4_block(block)
    if spec is None:
        raise ValueError(f"{type(block).__name__} is not a v4 sparse MoE block moe_kernels can run: "
                         f"{why or 'it has no gate and experts nn.ModuleList'}")
    gate_name, up_name, down_name = spec.pop("layers")
    experts = block.experts
    w = getattr(experts[0], gate_name).weight
    new = SparseMoEBlock(**spec, device="meta", dtype=w.dtype)

    def stacked(layer, attr):
        return torch.stack([getattr(getattr(mlp, layer), attr).detach() for mlp in experts])

    def param(data, *layers):
        trainable = any(getattr(mlp, n).weight.requires_grad for mlp in experts for n in layers)
        return nn.Parameter(data, requires_grad=trainable)

    with torch.no_grad():
        new.experts.gate_up_proj = param(torch.cat([stacked(gate_name, "weight"), stacked(up_name, "weight")], 1),
                                         gate_name, up_name)
        new.experts.down_proj = param(stacked(down_name, "weight"), down_name)
        if spec["bias"]:
            new.experts.gate_up_bias = param(torch.cat([stacked(gate_name, "bias"), stacked(up_name, "bias")], 1),
                                             gate_name, up_name)
            new.experts.down_bias = param(stacked(down_name, "bias"), down_name)
    new.router.weight = block.gate.weight
    if block.gate.bias is not None:
        new.router.bias = block.gate.bias
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"convert_block left {left} unset")
    # checkpoints keep the v4 names: the block saves and loads experts.{e}.w1.weight, gate.weight, ...
    H = spec["hidden_dim"]
    pieces = [Piece("gate.weight", "router.weight")] + ([Piece("gate.bias", "router.bias")]
                                                         if block.gate.bias is not None else [])
    for e in range(len(experts)):
        for attr in ("weight", "bias") if spec["bias"] else ("weight",):
            up_target = "experts.gate_up_proj" if attr == "weight" else "experts.gate_up_bias"
            down_target = "experts.down_proj" if attr == "weight" else "experts.down_bias"
            pieces += [Piece(f"experts.{e}.{gate_name}.{attr}", up_target, e, (0, H)),
                       Piece(f"experts.{e}.{up_name}.{attr}", up_target, e, (H, 2 * H)),
                       Piece(f"experts.{e}.{down_name}.{attr}", down_target, e)]
    keep_source_layout(new, pieces)
    return new.train(block.training)


def convert_transformers(model: nn.Module) -> int:
    """Runs the sparse MoE layers of a transformers model on moe_kernels, in place; returns how many layers now do.

    transformers 5.x experts modules (`@use_experts_implementation`): each is checked (`check_experts`: activation,
    gate, layout, weights; nothing is switched if one fails), then the model runs experts_implementation=
    "moe_kernels" (`register()`, then `set_experts_implementation` on a PreTrainedModel, else on the configs of the
    experts found). `model.set_experts_implementation("eager")` switches back.
    v4-style sparse MoE blocks (see `convert_block`) are replaced by SparseMoEBlocks; a block that looks like one
    but cannot run here stays as it is, with a warning saying why.
    """
    if _v4_block(model)[0] is not None:
        raise ValueError(f"model is itself a v4 sparse MoE block ({type(model).__name__}): convert_block(model) "
                         "returns its replacement")
    experts = [m for m in model.modules() if is_experts_module(m)]
    if experts:
        register()
        for m in experts:
            check_experts(m)
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(NAME)
        for m in experts:
            if m.config._experts_implementation != NAME:
                m.config._experts_implementation = NAME
    count = len(experts)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            spec, why = _v4_block(child)
            if spec is not None:
                setattr(parent, name, convert_block(child))
                count += 1
            elif why is not None:
                path = f"{parent_name}.{name}" if parent_name else name
                warnings.warn(f"convert_transformers: {path} ({type(child).__name__}) stays as it is: {why}",
                              stacklevel=2)
    from .transformers_blocks import convert_blocks  # DBRX, JetMoE, Llama 4, SwitchTransformers; NLLB-MoE warns
    count += convert_blocks(model, stacklevel=3)
    return count


# --- moe_kernels.convert(): the recognisers of this integration (registered when convert() imports it) -------------
def _switch_experts(experts: nn.Module) -> nn.Module:
    """A transformers experts module -> itself, running experts_implementation="moe_kernels" (its config's)."""
    register()
    check_experts(experts)
    experts.config._experts_implementation = NAME
    return experts


def _register_converters() -> None:
    from ..convert import register_converter

    register_converter("transformers experts", is_experts_module, _switch_experts)
    register_converter("transformers v4 sparse MoE block", lambda m: _v4_block(m)[0] is not None, convert_block)
    from . import transformers_blocks  # noqa: F401  (registers its recognisers: DBRX, JetMoE, Llama 4, ...)


_register_converters()
