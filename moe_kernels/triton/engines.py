"""Which engine runs each grouped GEMM of the expert MLP, and the torch engine itself.

Roles (the six grouped GEMMs of moe_kernels.triton.expert_mlp):
    up       token rows @ gate_up_proj[e]^T -> pre-activation / activation   [N, D] x [E, 2H, D]
    down     h @ down_proj[e]^T -> expert outputs in expert order             [N, H] x [E, O, H]
    dh       dOut rows @ down_proj[e]                                         [N, O] x [E, O, H]
    dx       dH_pre @ gate_up_proj[e]                                         [N, 2H] x [E, 2H, D]
    dw_up    dH_pre^T token rows -> grad of gate_up_proj                      [E, 2H, D]
    dw_down  dOut rows^T (w * h) -> grad of down_proj                         [E, O, H]
Engines:
    torch    torch.nn.functional.grouped_mm (CUTLASS, TMA and warp-specialised, on sm_90/sm_100 in bf16) on rows
             materialised in expert order; our kernels do the rest (permutation, activation, combine)
    tma      this package's persistent TMA / wgmma / warp-specialised kernels (grouped_gemm_tma), Hopper, 16-bit,
             on rows materialised in expert order
    triton   this package's pointer kernels: any GPU, fp32/fp16/bf16, token rows gathered inside the loads (no
             materialised copy; cp.async-pipelined by Triton's software pipeliner)
An engine "applies" where its kernels take the operands (device, dtype, 16-byte row widths, bias); triton always
applies. The choice, per role, device, dtype and shape, in order:
    1. MOE_KERNELS_GEMM_ENGINE: one engine for every role ("torch") or per role ("dh=tma,dw_up=torch"), where it
       applies;
    2. the tuned data file configs/gemm_engines-{device}-{dtype}.json, written by moe_kernels.tools.tune_gemm
       from measurements ({"E{E}-D{D}-H{H}": {role: {rows: engine}}}, the entry of the nearest number of rows on a
       log scale);
    3. the default: torch where it applies on a GPU and the experts average at least DEFAULT_MIN_ROWS rows (its
       tiles are 128 rows: decode-sized groups waste them, and there the pointer kernels measured faster), else
       triton.
Whether the torch engine materialises token rows or the triton engine gathers them is thereby also a per-shape
choice recorded as data.
"""
import functools
import json
import math
import logging
import os

import torch
import triton
import triton.language as tl

from . import grouped_gemm_tma as _tma
from .grouped_gemm import CONFIG_DIR, _device_name

ROLES = ("up", "down", "dh", "dx", "dw_up", "dw_down")
ENGINES = ("torch", "tma", "triton")
ENGINE_ENV = "MOE_KERNELS_GEMM_ENGINE"
DEFAULT_MIN_ROWS = 64
_log = logging.getLogger(__name__)
# role -> (engine, shape key, rows) of the last choice made in this process (moe_kernels.backends() reports it)
LAST: dict = {}


def _forced() -> dict:
    """{role: engine} from MOE_KERNELS_GEMM_ENGINE (empty when unset)."""
    text = os.environ.get(ENGINE_ENV, "").strip()
    if not text:
        return {}
    if "=" not in text:
        if text not in ENGINES:
            raise ValueError(f"{ENGINE_ENV} must be one of {ENGINES} or 'role=engine,...', got {text!r}")
        return dict.fromkeys(ROLES, text)
    out = {}
    for part in text.split(","):
        role, _, engine = part.partition("=")
        role, engine = role.strip(), engine.strip()
        if role not in ROLES or engine not in ENGINES:
            raise ValueError(f"{ENGINE_ENV}: each entry must be role=engine with role in {ROLES} and engine in "
                             f"{ENGINES}, got {part!r}")
        out[role] = engine
    return out


def engine_file(device_name: str, dtype: torch.dtype) -> str:
    return os.path.join(CONFIG_DIR, f"gemm_engines-{device_name.replace(' ', '_')}-"
                                    f"{str(dtype).replace('torch.', '')}.json")


@functools.lru_cache(maxsize=None)
def _load_engines(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return {shape: {role: {int(m): eng for m, eng in table.items()} for role, table in roles.items()}
            for shape, roles in data.items() if not shape.startswith("_")}


# torch.nn.functional.grouped_mm (torch 2.9+), torch._grouped_mm before it
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _torch_applies(device, dtype, widths, bias, tensors=()) -> bool:
    if bias or _GROUPED_MM is None:
        return False
    if device.type == "cuda":
        # CUTLASS kernels for bf16 on sm_90 and sm_100 only: any other dtype or GPU (ROCm included) takes torch's
        # per-group loop, which syncs on the offsets
        if (dtype != torch.bfloat16 or torch.version.hip is not None
                or torch.cuda.get_device_capability(device)[0] not in (9, 10)):
            return False
    size = torch.empty((), dtype=dtype).element_size()
    return (all(w * size % 16 == 0 for w in widths)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors if t is not None))


def applies(engine, device, dtype, widths, bias=False, tensors=()) -> bool:
    """Whether `engine` takes a GEMM whose operands have these row widths (elements) on `device`; `tensors`: the
    operands the caller passes as they are (they must be contiguous on 16 bytes; fresh buffers always are)."""
    if engine == "triton":
        return True
    if engine == "torch":
        return _torch_applies(device, dtype, widths, bias, tensors)
    if engine == "tma":
        return _tma.tma_usable(device, dtype, *widths, tensors=tensors)
    return False


def nearest(table: dict, n: int):
    """table[m] of the key m nearest n on a log scale: 2048 is nearer 32768 (16x) than 128 (16x, then the
    larger)."""
    return table[min(table, key=lambda m: (abs(math.log2(max(m, 1) / max(n, 1))), -m))]


def choose(role, device, dtype, shape, rows, widths, bias=False, tensors=()) -> str:
    """The engine of GEMM `role` of the expert MLP with shape (E, D, H) over `rows` sorted rows whose operands
    have these row widths; `bias`: the GEMM adds a bias the engine would have to take; `tensors`: see applies."""
    E, D, H = shape
    key = f"E{E}-D{D}-H{H}"
    ok = lambda name: applies(name, device, dtype, widths, bias, tensors)  # noqa: E731
    engine = _forced().get(role)
    if engine is None or not ok(engine):
        engine = None
        table = _load_engines(engine_file(_device_name(device), dtype)).get(key, {}).get(role)
        if table:
            tuned = nearest(table, rows)
            if ok(tuned):
                engine = tuned
    if engine is None:
        engine = "torch" if device.type == "cuda" and rows >= DEFAULT_MIN_ROWS * E and ok("torch") else "triton"
    LAST[role] = (engine, key, rows)
    return engine


def report() -> dict:
    """What moe_kernels.backends() shows of the engines: the rule, any override, the tuned files, the last
    choice of each role in this process."""
    files = sorted(f for f in os.listdir(CONFIG_DIR) if f.startswith("gemm_engines-")) if os.path.isdir(CONFIG_DIR) \
        else []
    return {
        "roles": {role: (f"{LAST[role][0]} (last run: {LAST[role][1]}, {LAST[role][2]} rows)" if role in LAST
                         else "not run yet") for role in ROLES},
        "override": os.environ.get(ENGINE_ENV) or None,
        "tuned_files": files,
        "default": f"torch grouped_mm where it applies (CUDA sm_90/sm_100, bf16, 16-byte row widths, no bias) with >= "
                   f"{DEFAULT_MIN_ROWS} rows per expert on average, else triton",
    }


# --- the torch engine -------------------------------------------------------------------------------------------
def torch_gemm(a, w, offsets, trans_w=True):
    """a [R, K] sorted rows, w [E, M, K] (trans_w) or [E, K, M] -> [R, M]: rows of expert e times W_e. Rows at or
    past offsets[E] are left unwritten (grouped_mm's contract): every caller masks them."""
    return _GROUPED_MM(a, w.transpose(1, 2) if trans_w else w, offs=offsets[1:])


@triton.jit
def _zero_empty_experts_kernel(dw_ptr, offsets_ptr, SIZE, BLOCK: tl.constexpr):
    """dw[e] = 0 for every expert e without rows, programs (e, j) striding over its SIZE elements; the programs of
    other experts return at once."""
    e = tl.program_id(0)
    if tl.load(offsets_ptr + e + 1) == tl.load(offsets_ptr + e):
        base = dw_ptr + e.to(tl.int64) * SIZE
        for i0 in range(tl.program_id(1) * BLOCK, SIZE, tl.num_programs(1) * BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            tl.store(base + i, tl.zeros((BLOCK,), dw_ptr.dtype.element_ty), mask=i < SIZE)


ZERO_BLOCK = 4096
ZERO_PROGRAMS = 256     # per expert: a few thousand programs in all, whatever the weight's size


def torch_gemm_tn(x, dy, offsets, num_experts):
    """x [R, K], dy [R, M] in expert order -> dw [E, M, K]: dw[e] = dy[rows of e]^T x[rows of e], zero for experts
    without rows (written explicitly: an empty group of the K-grouped CUTLASS GEMM is not documented to be)."""
    dw = _GROUPED_MM(dy.t(), x, offs=offsets[1:])
    E, M, K = dw.shape
    if E and M * K:
        grid = (E, min(triton.cdiv(M * K, ZERO_BLOCK), ZERO_PROGRAMS))
        _zero_empty_experts_kernel[grid](dw, offsets, M * K, BLOCK=ZERO_BLOCK, num_warps=4)
    return dw


AOT_CONFIGS = [
    {"name": f"zero_empty_experts-{ty}", "fn": _zero_empty_experts_kernel,
     "signature": {"dw_ptr": f"*{ty}", "offsets_ptr": "*i32", "SIZE": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": ZERO_BLOCK}, "num_warps": 4, "num_stages": 1}
    for ty in ("bf16", "fp16", "fp32")
]
