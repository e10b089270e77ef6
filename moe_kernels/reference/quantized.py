"""Quantized expert weights in the layouts checkpoints ship, and their dequantisation: the spec every backend's
quantized path computes.

- "fp8": FP8 block-scaled (DeepSeek-V3/R1, Qwen3-FP8). data: float8_e4m3fn [E, N, K]; scale (the checkpoints'
  `weight_scale_inv`, a multiplier) float32 [E, ceil(N / bn), ceil(K / bk)], one per bn x bk block (128 x 128);
  w[e, n, k] = data[e, n, k] * scale[e, n // bn, k // bk].
- "mxfp4": OCP MX FP4 (GPT-OSS). data: uint8 [E, N, K / 2], two e2m1 values a byte along K (element 2i in the low
  nibble, 2i + 1 in the high one); scale: uint8 [E, N, K / 32], one e8m0 exponent per 32 values along K (2^(s - 127);
  255 is NaN); w[e, n, k] = e2m1(data) * 2^(scale[e, n, k // 32] - 127).
"""
import math

import torch

FORMATS = ("fp8", "mxfp4")
FP8_BLOCK = (128, 128)
FP8_MAX = 448.0                 # the largest finite float8_e4m3fn
MX_BLOCK = 32                   # values per e8m0 scale along K
# the 16 e2m1 codes: sign bit 3, exponent bits 1-2, mantissa bit 0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp8_scale_shape(E: int, N: int, K: int, block=FP8_BLOCK) -> tuple:
    return E, math.ceil(N / block[0]), math.ceil(K / block[1])


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, block=FP8_BLOCK, dtype=torch.float64) -> torch.Tensor:
    """data float8_e4m3fn [..., N, K], scale float32 [..., ceil(N/bn), ceil(K/bk)] -> w [..., N, K] in dtype."""
    N, K = data.shape[-2:]
    s = scale.to(dtype).repeat_interleave(block[0], -2)[..., :N, :].repeat_interleave(block[1], -1)[..., :K]
    return data.to(dtype) * s


def e8m0_to_float(scale: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """uint8 e8m0 exponents -> 2^(s - 127) in dtype (NaN at 255)."""
    out = torch.exp2(scale.to(dtype) - 127)
    return torch.where(scale == 255, torch.full_like(out, math.nan), out)


def unpack_e2m1(data: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """uint8 [..., K / 2] -> the e2m1 values [..., K] in dtype (low nibble first)."""
    lut = torch.tensor(E2M1, dtype=dtype, device=data.device)
    codes = torch.stack([data & 0x0F, data >> 4], -1).flatten(-2).long()
    return lut[codes]


def dequantize_mxfp4(data: torch.Tensor, scale: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """data uint8 [..., N, K/2], scale uint8 [..., N, K/32] -> w [..., N, K] in dtype."""
    return unpack_e2m1(data, dtype) * e8m0_to_float(scale, dtype).repeat_interleave(MX_BLOCK, -1)


def dequantize(fmt: str, data: torch.Tensor, scale: torch.Tensor, block=FP8_BLOCK, dtype=torch.float64):
    """The float weight [..., N, K] of a quantized one."""
    if fmt == "fp8":
        return dequantize_fp8(data, scale, block, dtype)
    if fmt == "mxfp4":
        return dequantize_mxfp4(data, scale, dtype)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


# --- quantisation (for layers without a checkpoint) -------------------------------------------------------------
def quantize_fp8(w: torch.Tensor, block=FP8_BLOCK) -> tuple:
    """w [..., N, K] -> (data float8_e4m3fn, scale float32 [..., ceil(N/bn), ceil(K/bk)]): each block scaled so its
    largest magnitude is FP8_MAX (an all-zero block gets scale 1), rounded to nearest."""
    *lead, N, K = w.shape
    bn, bk = block
    Np, Kp = math.ceil(N / bn) * bn, math.ceil(K / bk) * bk
    padded = torch.zeros(*lead, Np, Kp, dtype=torch.float32, device=w.device)
    padded[..., :N, :K] = w.float()
    blocks = padded.view(*lead, Np // bn, bn, Kp // bk, bk)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(*lead, Np, Kp)[..., :N, :K]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantize_mxfp4(w: torch.Tensor) -> tuple:
    """w [..., N, K] (K a multiple of 32) -> (data uint8 [..., N, K/2], scale uint8 [..., N, K/32]): the OCP MX rule,
    scale 2^(floor(log2(amax)) - 2) per 32 values (6 = 1.5 * 2^2 is e2m1's largest), each value rounded to the
    nearest e2m1 (ties to the even code), beyond +-6 saturated."""
    *lead, N, K = w.shape
    if K % MX_BLOCK:
        raise ValueError(f"mxfp4 needs K a multiple of {MX_BLOCK}, got w {tuple(w.shape)}")
    blocks = w.float().reshape(*lead, N, K // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    scaled = blocks / torch.exp2(exp)[..., None]
    grid = torch.tensor(E2M1[:8], dtype=torch.float32, device=w.device)
    mag = scaled.abs().clamp(max=6.0)
    # nearest of the 8 magnitudes; a tie goes to the even code (the one with mantissa bit 0)
    dist = (mag[..., None] - grid).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = (dist == best) & ((torch.arange(8, device=w.device) % 2) == 0)
    code = torch.where(candidates.any(-1), candidates.float().argmax(-1), dist.argmin(-1))
    code = code + 8 * (scaled < 0).long() * (code > 0).long()
    code = code.reshape(*lead, N, K).to(torch.uint8)
    data = code[..., 0::2] | (code[..., 1::2] << 4)
    return data.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def quantize(fmt: str, w: torch.Tensor, block=FP8_BLOCK) -> tuple:
    """(data, scale) of w [..., N, K] in format fmt."""
    if fmt == "fp8":
        return quantize_fp8(w, block)
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
