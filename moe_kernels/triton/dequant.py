"""Dequantisation of quantized expert weights in registers: the decoders of the checkpoint formats and the
dequantised fp32 weight tile the quantized GEMMs (moe_kernels.triton.quantized) and the fused decode
(moe_kernels.triton.expert_mlp_decode) feed to tl.dot.

Spec: moe_kernels.reference.quantized (layouts, dequantisation). No fp8 type is used, so they compile for sm_80
as for sm_90.
"""
import triton
import triton.language as tl

FMT_CODE = {"fp8": 0, "mxfp4": 1}
MX_GROUP = 32            # mxfp4 values per scale along K


# --- decoding ------------------------------------------------------------------------------------------------------
@triton.jit
def _e4m3_over_256(b):
    """uint8 e4m3fn codes -> their values / 256 in fp32 (NaN at 0x7F / 0xFF): sign, exponent and mantissa bits
    placed into an fp16 (exponent bias 15 instead of 7, so the value is 2^-8 of the code's, subnormals included)."""
    u = b.to(tl.uint16)
    h = (((u & 0x7F) << 7) | ((u & 0x80) << 8)).to(tl.float16, bitcast=True)
    return tl.where((u & 0x7F) == 0x7F, float("nan"), h.to(tl.float32))


@triton.jit
def _e2m1(c):
    """4-bit e2m1 codes (uint32) -> fp32: magnitude codes 2..7 are exponent bits 1-2 and mantissa bit 0 of an fp32
    with bias 1 (so (em << 22) + (126 << 23)); code 1 is 0.5 and code 0 is 0; bit 3 is the sign."""
    em = c & 7
    mag = tl.where(em >= 2, (em << 22) + (126 << 23), em * (126 << 23))
    return (mag | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0(s):
    """uint8 e8m0 exponents -> 2^(s - 127) in fp32 (2^-127 a subnormal at 0, NaN at 255)."""
    u = s.to(tl.uint32)
    f = tl.where(u == 0, 0x00400000, u << 23).to(tl.float32, bitcast=True)
    return tl.where(u == 255, float("nan"), f)


@triton.jit
def _weight_tile(w_e, ws_e, rows, row_ok, s_rows, k0, K, BK_S, FORMAT: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dequantised fp32 tile [BLOCK_N, BLOCK_K] of weight rows `rows` (one expert's data w_e and scales ws_e),
    columns k0 + [0, BLOCK_K); zero where masked. fp8: s_rows = (rows // bn) * ceil(K / bk) indexes the scale rows;
    SCALE_PER_TILE: bk is a multiple of BLOCK_K (one scale per row of the tile)."""
    if FORMAT == 0:
        k = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (k < K)[None, :]
        b = tl.load(w_e + rows.to(tl.int64)[:, None] * K + k[None, :], mask=ok, other=0)
        if SCALE_PER_TILE:
            s = tl.load(ws_e + s_rows + k0 // BK_S, mask=row_ok, other=0.0)[:, None]
        else:
            s = tl.load(ws_e + s_rows[:, None] + k[None, :] // BK_S, mask=ok, other=0.0)
        return _e4m3_over_256(b) * (s * 256.0)
    else:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_e + rows.to(tl.int64)[:, None] * (K // 2) + j[None, :],
                    mask=row_ok[:, None] & (j < K // 2)[None, :], other=0).to(tl.uint32)
        codes = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))       # element 2i low, 2i + 1 high
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(ws_e + rows.to(tl.int64)[:, None] * (K // 32) + g[None, :],
                    mask=row_ok[:, None] & (g < K // 32)[None, :], other=0)
        s = tl.reshape(tl.broadcast_to(_e8m0(s)[:, :, None], (BLOCK_N, BLOCK_K // 32, 32)), (BLOCK_N, BLOCK_K))
        return _e2m1(codes) * s
