"""Quantized expert weights (FP8 block-scaled, MXFP4) as inputs of the expert MLP: the container `QuantizedWeight`
and the op moe_kernels::moe_mlp_quantized that `ops.moe_mlp` runs when a projection is one.
Spec: moe_kernels.reference.quantized (layouts, dequantisation) and moe_kernels.reference.expert_mlp."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference import expert_mlp as ref_mlp
from ..reference import quantized as ref_q
from . import _checks


class QuantizedWeight(NamedTuple):
    """An expert projection [E, N, K] as a checkpoint stores it quantized (see moe_kernels.reference.quantized):
    format "fp8": data float8_e4m3fn [E, N, K], scale float32 [E, ceil(N/bn), ceil(K/bk)] (`weight_scale_inv`),
    block (bn, bk); format "mxfp4": data uint8 [E, N, K/2] (two e2m1 a byte, low nibble first), scale uint8
    [E, N, K/32] (e8m0 exponents), block unused. Built from a checkpoint's tensors without a dequantised copy
    (`fp8`, `mxfp4`), or from a float weight (`quantize`)."""
    format: str
    data: Tensor
    scale: Tensor
    block: tuple = ref_q.FP8_BLOCK

    @classmethod
    def fp8(cls, data: Tensor, scale: Tensor, block=ref_q.FP8_BLOCK) -> "QuantizedWeight":
        return check_quantized("weight", cls("fp8", data, scale, tuple(int(b) for b in block)))

    @classmethod
    def mxfp4(cls, data: Tensor, scale: Tensor) -> "QuantizedWeight":
        if hasattr(torch, "float8_e8m0fnu") and scale.dtype == torch.float8_e8m0fnu:
            scale = scale.view(torch.uint8)    # the same exponent bytes
        return check_quantized("weight", cls("mxfp4", data, scale, ref_q.FP8_BLOCK))

    @classmethod
    def quantize(cls, w: Tensor, format: str, block=ref_q.FP8_BLOCK) -> "QuantizedWeight":
        """w [E, N, K] float -> its quantized form (rounded to nearest; see reference.quantized.quantize)."""
        _checks.tensor("w", w, ndim=3, dtypes=_checks.FLOAT_DTYPES)
        data, scale = ref_q.quantize(format, w.detach(), block)
        return check_quantized("w", cls(format, data, scale, tuple(block)))

    @property
    def shape(self) -> tuple:
        """(E, N, K) of the weight it stands for."""
        E, N, K = self.data.shape
        return (E, N, 2 * K) if self.format == "mxfp4" else (E, N, K)

    @property
    def device(self):
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the data and scales (what a pass over the weight reads)."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype=torch.float32) -> Tensor:
        """The float weight [E, N, K] (a full copy: for checks and the reference, not the fast paths)."""
        return ref_q.dequantize(self.format, self.data, self.scale, self.block, dtype)

    def to(self, device) -> "QuantizedWeight":
        return self._replace(data=self.data.to(device), scale=self.scale.to(device))


def check_quantized(name: str, q: QuantizedWeight) -> QuantizedWeight:
    """Validates a QuantizedWeight's format, dtypes and shapes, each error naming `name` and the shapes."""
    if not isinstance(q, QuantizedWeight):
        raise TypeError(f"{name} must be a QuantizedWeight, got {type(q).__name__}")
    if q.format not in ref_q.FORMATS:
        raise ValueError(f"{name}: format must be one of {ref_q.FORMATS}, got {q.format!r}")
    if q.format == "fp8":
        _checks.tensor(f"{name}.data", q.data, ndim=3, dtypes=(torch.float8_e4m3fn,))
        if len(q.block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in q.block):
            raise ValueError(f"{name}: block must be (bn, bk) positive ints, got {q.block!r}")
        _checks.tensor(f"{name}.scale", q.scale, shape=ref_q.fp8_scale_shape(*q.data.shape, q.block),
                       dtypes=(torch.float32,))
    else:
        _checks.tensor(f"{name}.data", q.data, ndim=3, dtypes=(torch.uint8,))
        E, N, K2 = q.data.shape
        if (2 * K2) % ref_q.MX_BLOCK:
            raise ValueError(f"{name}: mxfp4 data [E, N, K/2] needs K a multiple of {ref_q.MX_BLOCK}, got "
                             f"{tuple(q.data.shape)}")
        _checks.tensor(f"{name}.scale", q.scale, shape=(E, N, 2 * K2 // ref_q.MX_BLOCK), dtypes=(torch.uint8,))
    _checks.same_device(**{f"{name}.data": q.data, f"{name}.scale": q.scale})
    return q


# --- the op ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("moe_kernels::moe_mlp_quantized", mutates_args=())
def _moe_mlp_quantized(x: Tensor, experts: Tensor, weights: Tensor, format: str, up_data: Tensor, up_scale: Tensor,
                       down_data: Tensor, down_scale: Tensor, block_n: int, block_k: int,
                       gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], activation: str, gated: bool,
                       capacity: int) -> Tensor:
    """-> out [T, O] in x's dtype."""
    fn = _backend.dispatch("moe_mlp_quantized", x.device.type)
    return fn(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k, gate_up_bias,
              down_bias, activation, gated, None if capacity < 0 else capacity)


@_moe_mlp_quantized.register_fake
def _(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k, gate_up_bias,
      down_bias, activation, gated, capacity):
    return x.new_empty(x.shape[0], down_data.shape[1])


def _reference(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k, gate_up_bias,
               down_bias, activation, gated, capacity):
    """Dequantises the whole weights to x's compute dtype and runs the reference expert MLP."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    up = ref_q.dequantize(format, up_data, up_scale, (block_n, block_k), acc)
    down = ref_q.dequantize(format, down_data, down_scale, (block_n, block_k), acc)
    bias = [None if b is None else b.to(acc) for b in (gate_up_bias, down_bias)]
    out = ref_mlp.moe_mlp(x.to(acc), experts, weights.to(acc), up, down, activation=activation, gated=gated,
                          gate_up_bias=bias[0], down_bias=bias[1], capacity=capacity)
    return out.to(x.dtype)


_backend.register("moe_mlp_quantized", "reference", _reference)


def _native(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k, gate_up_bias,
            down_bias, activation, gated, capacity):
    """The native CPU op: dequantises inside its kernels, a vector at a time (decode) or an expert's rows at a time
    into a per-thread buffer in the GEMM dtype; an activation spec it does not compute runs on the reference."""
    if not _backend.native_takes(activation):
        return _reference(x, experts, weights, format, up_data, up_scale, down_data, down_scale, block_n, block_k,
                          gate_up_bias, down_bias, activation, gated, capacity)
    return torch.ops.moe_kernels_C.moe_mlp_quantized(x, experts, weights, format, up_data, up_scale, down_data,
                                                     down_scale, block_n, block_k, gate_up_bias, down_bias,
                                                     activation, gated, -1 if capacity is None else capacity)


_backend.register("moe_mlp_quantized", "native", _native)

from .. import triton as _triton  # noqa: E402

if _triton.AVAILABLE:
    from ..triton import quantized as _tri_quantized

    _backend.register("moe_mlp_quantized", "triton", _tri_quantized.moe_mlp_quantized)


def moe_mlp_quantized(x: Tensor, experts: Tensor, weights: Tensor, gate_up_proj: QuantizedWeight,
                      down_proj: QuantizedWeight, *, activation: str, gated: bool, gate_up_bias: Optional[Tensor],
                      down_bias: Optional[Tensor], capacity: Optional[int]) -> Tensor:
    """ops.moe_mlp with quantized projections, checked by ops.moe_mlp (check_quantized, one format). Inference:
    no gradient flows into quantized weights, and none through them."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weights, gate_up_bias,
                                                                                   down_bias)):
        raise NotImplementedError("moe_mlp with quantized weights runs inference only: call it under "
                                  "torch.no_grad() / torch.inference_mode(), or dequantize() the weights to train")
    bn, bk = gate_up_proj.block
    if not torch.compiler.is_compiling() and _backend.resolve("moe_mlp_quantized", x.device.type) == "native":
        # eager CPU: the native op itself, without the custom op's Python dispatch (as much as a decode step's
        # kernels on a small layer); traced code keeps the custom op
        return _native(x, experts, weights, gate_up_proj.format, gate_up_proj.data, gate_up_proj.scale,
                       down_proj.data, down_proj.scale, bn, bk, gate_up_bias, down_bias, activation, gated, capacity)
    return _moe_mlp_quantized(x, experts, weights, gate_up_proj.format, gate_up_proj.data, gate_up_proj.scale,
                              down_proj.data, down_proj.scale, bn, bk, gate_up_bias, down_bias, activation, gated,
                              -1 if capacity is None else capacity)
