"""Tune the expert MLP's grouped GEMMs on this GPU and write the data files its launchers read:
    configs/gemm_engines-{device}-{dtype}.json             {"E{E}-D{D}-H{H}": {role: {rows: engine}}}: the fastest
                                                           engine of each GEMM role (moe_kernels.triton.engines)
    configs/{kernel}-E{E}-N{N}-K{K}-{device}-{dtype}.json  {rows: tile}: grouped_gemm, grouped_gemm_tn (pointer
                                                           kernels, 5 ints), grouped_gemm_tma, grouped_gemm_tn_tma
                                                           (6 ints)

    python -m moe_kernels.tools.tune_gemm [--model NAME ...] [--tokens T ...] [--budget SECONDS] [--out DIR]
                                          [--prune RATIO] [--dtype bfloat16] [--dry-run]

For each model shape and token count (default: each model at the benchmark suite's training size and at decode
size 64; the backward roles at training sizes only) each role's GEMM is timed (triton.testing.do_bench, median) on
every engine that applies, as moe_kernels.triton.expert_mlp runs it:
    torch, tma  rows in expert order: up and dw_up take the token rows of x, dh and dw_down those of dOut, each
                materialised by permutation.permute, whose time is charged to the role (dh and dw_down share one
                copy, so those two are chosen together); down and dx read rows already in expert order
    triton      gathers the rows inside its loads
up includes the activation pass where the engine does not fuse it (glu_forward after grouped_mm, and after the
pointer kernel when the pre-activation is saved for the backward, i.e. at training sizes; the TMA kernel saves it in
its epilogue then).
Three rounds, most useful first: every engine at its default tile on every shape (the engine file is complete after
it), then the TMA kernels' tile candidates, then the pointer kernels'; an engine more than --prune times slower than
the best one at a role is not tile-tuned there. After --budget seconds the rest is skipped with a note and the files
hold what was measured. A candidate that fails to compile or run, or spills registers, is skipped. Written files
are merged into any file of the same name in --out.
Decode (after round 1): each model's forward at DECODE_STEPS tokens (up to its largest decode-size run) through
ops.moe_mlp, bf16 weights, timed with the split kernels and with the two-launch decode
(moe_kernels.triton.expert_mlp_decode, MOE_KERNELS_DECODE=fused); the faster is written as role "decode" of the
engine file, {tokens: "fused" | "split"}, which the decode steps then follow; the two-launch output must agree
with the split kernels' (within 2% of the largest output; NaN in the same places) or "split" is written.
--dry-run: the whole pipeline on small shapes on the CPU under TRITON_INTERPRET=1 (fp16), with a fake timer.
"""
import argparse
import dataclasses
import json
import os
import time
import zlib
from typing import Callable, Optional

import torch

MODELS = {  # name: D, H, E, k (the published models' shapes)
    "Mixtral": (4096, 14336, 8, 2),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "OLMoE": (2048, 1024, 64, 8),
    "DeepSeek-V3": (7168, 2048, 256, 8),
}
TRAIN_TOKENS = {"Mixtral": 16384, "Qwen3-30B-A3B": 32768, "OLMoE": 16384, "DeepSeek-V3": 4096}  # the suite's
DECODE_TOKENS = 64
DECODE_STEPS = (1, 8, 64)    # token counts the decode round times (those up to the decode-size run)
TRAIN_MIN = 1024            # token counts from which the backward roles are tuned and up saves its pre-activation
DEFAULT_BUDGET = 180.0       # seconds: with start-up and the files, ~200 s for the default runs
ROLES = ("up", "down", "dh", "dx", "dw_up", "dw_down")
ROWS_OF = {"up": "x", "dw_up": "x", "dh": "g", "dw_down": "g"}    # rows the torch and tma engines materialise
# Every candidate compiles without spills under Triton 3.9 for sm_80 and sm_90 (sm_90 only for TMA, within its
# shared memory) with the flag sets aot_check compiles a tuned file's configs with; *_SPILL: not for that role.
# pointer kernels: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CANDIDATES = [
    (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4),
    (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
]
# the gated up (two accumulators) and dH (an fp32 output) spill with these
SPILL = {role: {(64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
                (128, 128, 64, 8, 4)} for role in ("up", "dh")}
TN_CANDIDATES = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                 (128, 128, 32, 8, 4), (64, 256, 64, 8, 3)]
# TMA kernels: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize); BLOCK_N counts output columns
TMA_CANDIDATES = [
    (128, 128, 64, 4, 3, 1), (128, 128, 64, 4, 4, 1), (128, 256, 64, 4, 3, 1), (128, 256, 64, 4, 2, 1),
    (128, 128, 64, 8, 3, 0), (128, 128, 64, 8, 4, 0), (128, 64, 64, 4, 3, 1), (128, 64, 64, 4, 4, 1),
]
# gated 128x256 spills; dH's fp32 output tile of 128x256 at 3 stages overflows shared memory
TMA_SPILL = {"up": {(128, 256, 64, 4, 3, 1), (128, 256, 64, 4, 2, 1)}, "dh": {(128, 256, 64, 4, 3, 1)}}
TN_TMA_CANDIDATES = [(128, 128, 64, 4, 3, 1), (128, 128, 64, 4, 4, 1), (128, 256, 64, 4, 3, 1),
                     (128, 128, 64, 8, 3, 0), (128, 64, 64, 4, 3, 1)]
# aot_check's flag sets of each role's GEMM (the "_flags" of the tile files)
FLAGS = {"grouped_gemm": {"up": "up+up_pre", "down": "down_sorted", "dh": "dh", "dx": "dgrad"},
         "grouped_gemm_tn": {"dw_up": "gather-x", "dw_down": "gather-dy"},
         "grouped_gemm_tma": {"up": "up+up_save", "down": "down", "dh": "dh", "dx": "dx"},
         "grouped_gemm_tn_tma": {"dw_up": "tn", "dw_down": "tn"}}

# --dry-run: small shapes (D = 2H in "tiny": up and dx share their tile files), interpreter-sized tiles
DRY_MODELS = {"tiny": (32, 16, 4, 2), "tiny-E5": (16, 24, 5, 3)}
DRY_TOKENS = {"tiny": 24, "tiny-E5": 16}
DRY_CANDIDATES = {"grouped_gemm": [(16, 16, 16, 4, 1), (32, 16, 16, 4, 2)],
                  "grouped_gemm_tn": [(16, 16, 16, 4, 1), (16, 32, 16, 4, 2)],
                  "grouped_gemm_tma": [(16, 16, 16, 4, 2, 1), (32, 16, 16, 4, 2, 0)],
                  "grouped_gemm_tn_tma": [(16, 16, 16, 4, 2, 1), (16, 32, 16, 4, 2, 0)]}


@dataclasses.dataclass
class Gemm:
    """One role's GEMM on one engine: fn() runs it as the expert MLP does; the tile fields are None for torch."""
    fn: Callable
    kernel: Optional[str] = None    # the tile file's kernel
    N: int = 0
    K: int = 0
    env: Optional[str] = None       # the env var that pins its tile
    default: Optional[Callable] = None   # () -> the tile the launcher picks unpinned
    candidates: tuple = ()


def _candidates(kernel, role, dry):
    if dry:
        return tuple(DRY_CANDIDATES[kernel])
    if kernel == "grouped_gemm":
        return tuple(c for c in CANDIDATES if c not in SPILL.get(role, ()))
    if kernel == "grouped_gemm_tma":
        return tuple(c for c in TMA_CANDIDATES if c not in TMA_SPILL.get(role, ()))
    return tuple(TN_CANDIDATES if kernel == "grouped_gemm_tn" else TN_TMA_CANDIDATES)


def role_flops(role, N, D, H):
    """FLOPs of a role's GEMM over N rows (gated: the up projection is 2H wide)."""
    return 2 * N * D * (2 * H if role in ("up", "dx", "dw_up") else H)


def _setup(T, D, H, E, k, dtype, device, train, dry=False, seed=0):
    """(perms {"x"|"g": fn}, {role: {engine: Gemm}} for the engines that apply, flops {role: int}) on random
    routing of T tokens."""
    from ..triton import engines, expert_mlp as em, grouped_gemm as gg, grouped_gemm_tma as gt
    from ..triton import permutation as perm

    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype)  # noqa: E731
    x, g = rnd(T, D), rnd(T, D)
    weights, experts = torch.softmax(torch.randn(T, E, generator=gen, device=device), -1).topk(k, -1)
    order, inverse, offsets, token, scale = em._routing_rows(experts, weights, E, None)
    N, MW = T * k, 2 * H
    w_up, w_down = rnd(E, MW, D) / D**0.5, rnd(E, D, H) / H**0.5
    xs, gs = perm.permute(x, order, inverse), perm.permute(g, order, inverse)
    h, hs, dh_pre = rnd(N, H), rnd(N, H), rnd(N, MW)
    dev = torch.device(device)
    glu = lambda p: em.glu_forward(p, offsets, None, "silu", True)  # noqa: E731
    f32 = torch.float32

    def ptr(fn, role, N_, K_, rows, gated=False, fp32_out=False):
        return Gemm(fn, "grouped_gemm", N_, K_, gg.CONFIG_ENV,
                    lambda: gg.gemm_config(rows, E, dtype, gated, fp32_out, N=N_, K=K_, device=dev),
                    _candidates("grouped_gemm", role, dry))

    def tma(fn, role, N_, K_, rows, gated=False):
        return Gemm(fn, "grouped_gemm_tma", N_, K_, gt.TMA_CONFIG_ENV,
                    lambda: gt.tma_config(rows, E, N_, K_, dtype, gated, dev), _candidates("grouped_gemm_tma", role, dry))

    def tn(fn, role, M_, K_, rows):
        return Gemm(fn, "grouped_gemm_tn", M_, K_, gg.TN_CONFIG_ENV,
                    lambda: gg.tn_config(rows, E, M_, K_, dtype, dev), _candidates("grouped_gemm_tn", role, dry))

    def tn_tma(fn, role, M_, K_, rows):
        return Gemm(fn, "grouped_gemm_tn_tma", M_, K_, gt.TN_TMA_CONFIG_ENV,
                    lambda: gt.tn_tma_config(rows, E, M_, K_, dtype, dev),
                    _candidates("grouped_gemm_tn_tma", role, dry))

    if train:
        up_triton = ptr(lambda: glu(gg.grouped_gemm(x, w_up, offsets, gather=token)), "up", MW, D, N)
    else:
        up_triton = ptr(lambda: gg.grouped_gemm(x, w_up, offsets, gather=token, activation="silu", gated=True), "up",
                        MW, D, N, gated=True)
    gemms = {
        "up": {"torch": Gemm(lambda: glu(engines.torch_gemm(xs, w_up, offsets))),
               "tma": tma(lambda: gt.grouped_gemm_tma(xs, w_up, offsets, activation="silu", gated=True, save_pre=train),
                          "up", MW, D, N, gated=True),
               "triton": up_triton},
        "down": {"torch": Gemm(lambda: engines.torch_gemm(h, w_down, offsets)),
                 "tma": tma(lambda: gt.grouped_gemm_tma(h, w_down, offsets), "down", D, H, N),
                 "triton": ptr(lambda: gg.grouped_gemm(h, w_down, offsets), "down", D, H, N)},
    }
    widths = {"up": (D, MW, H), "down": (H, D), "dh": (D, H), "dw_down": (D, H), "dx": (MW, D), "dw_up": (MW, D)}
    if train:
        gemms.update({
            "dh": {"torch": Gemm(lambda: engines.torch_gemm(gs, w_down, offsets, trans_w=False)),
                   "tma": tma(lambda: gt.grouped_gemm_tma(gs, w_down, offsets, trans_w=False, out_dtype=f32), "dh",
                              H, D, N),
                   "triton": ptr(lambda: gg.grouped_gemm(g, w_down, offsets, gather=token, trans_w=False,
                                                         out_dtype=f32), "dh", H, D, N, fp32_out=True)},
            "dx": {"torch": Gemm(lambda: engines.torch_gemm(dh_pre, w_up, offsets, trans_w=False)),
                   "tma": tma(lambda: gt.grouped_gemm_tma(dh_pre, w_up, offsets, trans_w=False), "dx", D, MW, N),
                   "triton": ptr(lambda: gg.grouped_gemm(dh_pre, w_up, offsets, trans_w=False), "dx", D, MW, N)},
            "dw_up": {"torch": Gemm(lambda: engines.torch_gemm_tn(xs, dh_pre, offsets, E)),
                      "tma": tn_tma(lambda: gt.grouped_gemm_tn_tma(xs, dh_pre, offsets, E), "dw_up", MW, D, N),
                      "triton": tn(lambda: gg.grouped_gemm_tn(x, dh_pre, offsets, E, gather_x=token), "dw_up", MW, D,
                                   N)},
            "dw_down": {"torch": Gemm(lambda: engines.torch_gemm_tn(hs, gs, offsets, E)),
                        "tma": tn_tma(lambda: gt.grouped_gemm_tn_tma(hs, gs, offsets, E), "dw_down", D, H, N),
                        "triton": tn(lambda: gg.grouped_gemm_tn(hs, g, offsets, E, gather_dy=token), "dw_down", D, H,
                                     N)},
        })
    gemms = {role: {eng: gm for eng, gm in by.items() if engines.applies(eng, dev, dtype, widths[role])}
             for role, by in gemms.items()}
    flops = {role: role_flops(role, N, D, H) for role in gemms}
    perms = {"x": lambda: perm.permute(x, order, inverse), "g": lambda: perm.permute(g, order, inverse)}
    return perms, gemms, flops


# --- timing ---------------------------------------------------------------------------------------------------------
class _Spy:
    """Stands in for a @triton.jit kernel in its module and keeps the compiled kernels that launches return."""

    def __init__(self, kernel):
        self.kernel, self.launched = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            compiled = launch(*args, **kwargs)
            self.launched.append(compiled)
            return compiled
        return run


def _spills(fn):
    """Bytes of registers spilled by the GEMM kernels that fn() launches (compiled by this machine's Triton)."""
    from ..triton import grouped_gemm as gg, grouped_gemm_tma as gt

    spies = [(mod, n, _Spy(getattr(mod, n))) for mod, n in (
        (gg, "_grouped_gemm_kernel"), (gg, "_grouped_gemm_tn_kernel"), (gt, "_grouped_gemm_tma_kernel"),
        (gt, "_grouped_gemm_tn_tma_kernel"))]
    try:
        for mod, n, spy in spies:
            setattr(mod, n, spy)
        fn()
    finally:
        for mod, n, spy in spies:
            setattr(mod, n, spy.kernel)
    return max((getattr(k, "n_spills", 0) or 0 for *_, spy in spies for k in spy.launched), default=0)


def do_bench(fn, label):
    """Median ms of fn() on the GPU."""
    import triton.testing

    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")


def fake_timer(fn, label):
    """--dry-run: a time from the label alone (deterministic), after one call of fn."""
    return 0.5 + zlib.crc32(label.encode()) % 1000 / 1000


class _Pinned:
    """Pins (cfg) or unpins (None) a tile env var for the duration."""

    def __init__(self, env, cfg):
        self.env, self.cfg = env, cfg

    def __enter__(self):
        self.old = os.environ.get(self.env) if self.env else None
        if self.env:
            if self.cfg is None:
                os.environ.pop(self.env, None)
            else:
                os.environ[self.env] = ",".join(map(str, self.cfg))

    def __exit__(self, *exc):
        if self.env:
            if self.old is None:
                os.environ.pop(self.env, None)
            else:
                os.environ[self.env] = self.old


def _time(fn, timer, label, env=None, cfg=None):
    """ms of fn() with tile cfg pinned (None: the launcher's own choice); None when it fails to compile or run, or
    (a pinned candidate) spills."""
    try:
        with _Pinned(env, cfg):
            spilled = _spills(fn)
            if spilled and cfg is not None:
                print(f"    {label}: skipped (spills {spilled} B)", flush=True)
                return None
            return timer(fn, label)
    except Exception as exc:  # noqa: BLE001 -- a config the chip cannot run is skipped, not fatal
        print(f"    {label}: skipped ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]})", flush=True)
        return None


class Budget:
    """Wall-clock budget: ok() is False once it is spent (the first refusal prints a note)."""

    def __init__(self, seconds):
        self.seconds, self.start, self.skipped, self.note = seconds, time.monotonic(), 0, None

    def ok(self, what):
        if time.monotonic() - self.start < self.seconds:
            return True
        if self.note is None:
            self.note = f"budget of {self.seconds:.0f} s spent: skipped the rest of the work, from {what}"
            print(f"  {self.note}", flush=True)
        self.skipped += 1
        return False


def _decode_setup(T, D, H, E, k, dtype, device, seed=0):
    """(the layer's forward with the split kernels, with the two-launch decode): ops.moe_mlp on the triton backend,
    random routing of T tokens, weights N(0, 1/fan-in)."""
    import moe_kernels
    from .. import ops
    from ..triton.expert_mlp_decode import DECODE_ENV

    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype)  # noqa: E731
    x, up, down = rnd(T, D), rnd(E, 2 * H, D) * D ** -0.5, rnd(E, D, H) * H ** -0.5
    weights, experts = torch.softmax(torch.randn(T, E, generator=gen, device=device), -1).topk(k, -1)
    weights = weights.to(dtype)

    def run(mode):
        def fn():
            with _Pinned(DECODE_ENV, (mode,)), moe_kernels.use_backend("triton"), torch.no_grad():
                return ops.moe_mlp(x, experts, weights, up, down)
        return fn
    return run("split"), run("fused")


def decode_agrees(fused, split) -> bool:
    """The two-launch decode's output against the split kernels': NaN in the same places, elsewhere within 2% of
    the largest magnitude (both round in the activations' dtype; a broken kernel misses by far more)."""
    nan = split.isnan()
    if not torch.equal(fused.isnan(), nan):
        return False
    f, s = fused[~nan].float(), split[~nan].float()
    return f.numel() == 0 or bool((f - s).abs().max() <= 0.02 * s.abs().max().clamp_min(1e-6))


# --- the choice -----------------------------------------------------------------------------------------------------
def role_cost(role, engine, ms, perm_ms):
    """ms of a role on an engine, with the materialised rows it needs."""
    return ms + (perm_ms.get(ROWS_OF[role], 0.0) if engine != "triton" and role in ROWS_OF else 0.0)


def choose(best, perm_ms):
    """{role: engine} from best {role: {engine: ms}} (GEMM alone) and perm_ms {"x"|"g": ms}: each role its cheapest
    engine with the rows it needs; dh and dw_down together, as one copy of dOut's rows serves both."""
    out = {}
    for role, times in best.items():
        if times and role not in ("dh", "dw_down"):
            out[role] = min(times, key=lambda e: role_cost(role, e, times[e], perm_ms))
    pair = [r for r in ("dh", "dw_down") if best.get(r)]
    if pair:
        def joint(engs):
            t = sum(best[r][e] for r, e in zip(pair, engs))
            return t + (perm_ms.get("g", 0.0) if any(e != "triton" for e in engs) else 0.0)
        combos = [()]
        for r in pair:
            combos = [c + (e,) for c in combos for e in best[r]]
        out.update(zip(pair, min(combos, key=joint)))
    return out


# --- the tuner ------------------------------------------------------------------------------------------------------
def tune(runs, dtype, out_dir, *, budget=DEFAULT_BUDGET, prune=1.5, device="cuda", timer=do_bench, dry=False,
         train_min=TRAIN_MIN, models=MODELS):
    """runs: [(model, T)]. Times, chooses, writes the files to out_dir; returns the report rows
    (model, T, role, {engine: (ms with its rows, TFLOP/s)}, chosen engine)."""
    from ..triton import engines
    from ..triton.grouped_gemm import _device_name, config_file

    dev_name = _device_name(torch.device(device))
    clock = Budget(budget)
    times = {}      # (model, T) -> role -> engine -> {cfg or None: ms}
    perm_ms = {}    # (model, T) -> {"x"|"g": ms}
    tuned = set()   # (model, T, role, engine) whose tile candidates were timed
    tile_of = {}    # (model, T, role) -> {engine: (kernel, N, K)}
    decode = {}     # model -> {T: (split ms, fused ms or None, choice)}

    def shapes(what, measured_only=False):
        for model, T in runs:
            D, H, E, k = models[model]
            if measured_only and (model, T) not in times or not clock.ok(f"{what} {model} T={T}"):
                continue
            yield model, T, _setup(T, D, H, E, k, dtype, device, T >= train_min, dry)
            if device == "cuda":    # the caller has dropped the shape's tensors
                torch.cuda.empty_cache()

    def best(key, role):
        return {e: min(v.values()) for e, v in times.get(key, {}).get(role, {}).items()}

    def conclude():
        """The choice and the report from what is measured so far, written to out_dir (after every round,
        so that a run cut short keeps what it measured)."""
        report, engine_table, tiles = [], {}, {}
        for model, T in runs:
            key = (model, T)
            if key not in times:
                continue
            D, H, E, k = models[model]
            N = T * k
            roles = {role: best(key, role) for role in ROLES if best(key, role)}
            chosen = choose(roles, perm_ms.get(key, {}))
            for role, b in roles.items():
                cost = {e: role_cost(role, e, t, perm_ms[key]) for e, t in b.items()}
                cells = {e: (c, role_flops(role, N, D, H) / c / 1e9) for e, c in cost.items()}
                report.append((model, T, role, cells, chosen[role]))
                engine_table.setdefault(f"E{E}-D{D}-H{H}", {}).setdefault(role, {})[str(N)] = chosen[role]
            for role in roles:      # tile entries: the kernels whose candidates were timed
                for eng, (kernel, Nk, Kk) in tile_of.get((model, T, role), {}).items():
                    # a default outside the role's candidates (the ungated up's 128x128) spills with the file's flags
                    ok = {c: t for c, t in times[key][role].get(eng, {}).items()
                          if dry or c in _candidates(kernel, role, dry)}
                    if (model, T, role, eng) in tuned and ok:
                        tiles.setdefault((kernel, E, Nk, Kk), {}).setdefault(N, {})[role] = ok
        for model, steps in decode.items():
            D, H, E, k = models[model]
            engine_table.setdefault(f"E{E}-D{D}-H{H}", {})["decode"] = {str(T): c for T, (*_, c) in steps.items()}
        return report, _write(out_dir, engine_table, tiles, dev_name, dtype, config_file, engines.engine_file)

    print(f"round 1: every engine at its default tile ({len(runs)} shapes)", flush=True)
    for model, T, (perms, gemms, _) in shapes("round 1"):
        key = (model, T)
        perm_ms[key] = {}
        for rows, fn in perms.items():
            if clock.ok(f"{model} T={T} permute"):
                t = _time(fn, timer, f"{model} T={T} permute {rows}")
                if t is not None:
                    perm_ms[key][rows] = t
        for role, by in gemms.items():
            for eng, gm in by.items():
                if gm.kernel:
                    tile_of.setdefault((model, T, role), {})[eng] = (gm.kernel, gm.N, gm.K)
                if not clock.ok(f"{model} T={T} {role} {eng}"):
                    continue
                with _Pinned(gm.env, None):
                    cfg = gm.default() if gm.default else None
                t = _time(gm.fn, timer, f"{model} T={T} {role} {eng} default", gm.env)
                if t is not None:
                    times.setdefault(key, {}).setdefault(role, {}).setdefault(eng, {})[cfg] = t
        print(f"  {model} T={T}: " + ", ".join(
            f"{role} " + "/".join(f"{e} {min(v.values()):.3f}" for e, v in by.items())
            for role, by in times.get(key, {}).items()) + " ms", flush=True)
        del perms, gemms

    report, written = conclude()
    print("decode: the split kernels against the two-launch decode", flush=True)
    small = [(m, T) for m, T in runs if T <= DECODE_TOKENS and T < train_min]       # the decode-size runs
    for model in dict.fromkeys(m for m, _ in small):
        D, H, E, k = models[model]
        top = max(T for m, T in small if m == model)
        for T in sorted({t for t in DECODE_STEPS if t <= top} | {top}):
            if not clock.ok(f"decode {model} T={T}"):
                continue
            split, fused = _decode_setup(T, D, H, E, k, dtype, device)
            t_split = _time(split, timer, f"{model} T={T} decode split")
            t_fused = None
            try:
                agrees = decode_agrees(fused(), split())
            except Exception as exc:  # noqa: BLE001 -- a path that fails here is not chosen
                print(f"  {model} T={T}: the two-launch decode failed ({type(exc).__name__}: {exc})", flush=True)
                agrees = False
            if agrees:
                t_fused = _time(fused, timer, f"{model} T={T} decode fused")
            elif t_split is not None:
                print(f"  {model} T={T}: the two-launch decode disagrees with the split kernels: not chosen",
                      flush=True)
            if t_split is None and t_fused is None:
                continue
            choice = "fused" if t_fused is not None and (t_split is None or t_fused < t_split) else "split"
            decode.setdefault(model, {})[T] = (t_split, t_fused, choice)
            ms = lambda t: "-" if t is None else f"{t:.3f}"  # noqa: E731
            print(f"  {model} T={T}: split {ms(t_split)} ms, fused {ms(t_fused)} ms -> {choice}", flush=True)
            del split, fused
            if device == "cuda":
                torch.cuda.empty_cache()
    report, written = conclude()
    for rnd, engine in ((2, "tma"), (3, "triton")):
        print(f"round {rnd}: {engine} tile candidates", flush=True)
        for model, T, (perms, gemms, flops) in shapes(f"round {rnd}", measured_only=True):
            key = (model, T)
            for role, by in gemms.items():
                gm = by.get(engine)
                b = best(key, role)
                if gm is None or engine not in b:
                    continue
                cost = {e: role_cost(role, e, t, perm_ms.get(key, {})) for e, t in b.items()}
                if prune and cost[engine] > prune * min(cost.values()):
                    print(f"  {model} T={T} {role}: {engine} not tuned ({cost[engine]:.3f} ms against "
                          f"{min(cost.values()):.3f})", flush=True)
                    continue
                measured = times[key][role][engine]
                for cfg in gm.candidates:
                    if cfg in measured or not clock.ok(f"{model} T={T} {role} {engine} {cfg}"):
                        continue
                    t = _time(gm.fn, timer, f"{model} T={T} {role} {engine} {cfg}", gm.env, cfg)
                    tuned.add((model, T, role, engine))
                    if t is not None:
                        measured[cfg] = t
                win = min(measured, key=measured.get)
                print(f"  {model} T={T} {role} {engine}: best {win} {measured[win]:.3f} ms "
                      f"({flops[role] / measured[win] / 1e9:.0f} TFLOP/s)", flush=True)
            del perms, gemms
        report, written = conclude()

    if clock.note:
        print(f"note: {clock.note} ({clock.skipped} steps skipped)", flush=True)
    return report, written


def _deep_merge(old, new):
    out = dict(old)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge(path, data):
    """Writes data into the JSON file at path, merged into what it holds."""
    if os.path.exists(path):
        with open(path) as f:
            data = _deep_merge(json.load(f), data)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    print("wrote", path, flush=True)
    return path


def pick_tile(by_role):
    """by_role {role: {cfg: ms}} of one (tile file, rows) entry: the config with the least total time among those
    every role measured (roles share a file when their GEMMs have the same E, N, K), else the first role's best."""
    common = set.intersection(*(set(v) for v in by_role.values()))
    if common:
        return min(common, key=lambda c: (sum(v[c] for v in by_role.values()), str(c)))
    first = next(iter(by_role.values()))
    return min(first, key=first.get)


def _write(out_dir, engine_table, tiles, dev_name, dtype, config_file, engine_file):
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if engine_table:
        written.append(_merge(os.path.join(out_dir, os.path.basename(engine_file(dev_name, dtype))), engine_table))
    for (kernel, E, N, K), entries in sorted(tiles.items()):
        roles = sorted({r for by in entries.values() for r in by}, key=ROLES.index)
        data = {"_flags": "+".join(FLAGS[kernel][r] for r in roles)}
        if len(roles) > 1:
            data["_roles"] = "+".join(roles)
        data.update({str(rows): list(pick_tile(by)) for rows, by in sorted(entries.items())})
        written.append(_merge(os.path.join(out_dir, os.path.basename(config_file(E, N, K, dev_name, dtype, kernel))),
                              data))
    return written


def table(report):
    """The markdown table of the report rows."""
    from ..triton.engines import ENGINES

    lines = ["| model | T | role | " + " | ".join(f"{e} ms (TFLOP/s)" for e in ENGINES) + " | chosen |",
             "|---|---|---|" + "---|" * len(ENGINES) + "---|"]
    for model, T, role, cells, chosen in report:
        cols = [f"{cells[e][0]:.3f} ({cells[e][1]:.3g})" if e in cells else "-" for e in ENGINES]
        lines.append(f"| {model} | {T} | {role} | " + " | ".join(cols) + f" | **{chosen}** |")
    return "\n".join(lines) + ("\n\nTimes include the rows an engine materialises; dh and dw_down share one copy, "
                               "counted once in their joint choice.")


def default_runs(models):
    """Each model at its training size, then each at decode size."""
    return [(m, TRAIN_TOKENS[m]) for m in models] + [(m, DECODE_TOKENS) for m in models]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m moe_kernels.tools.tune_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS) + list(DRY_MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="token counts for every model (default: its training size and 64)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds (default %(default)s)")
    p.add_argument("--prune", type=float, default=1.5,
                   help="no tile tuning of an engine this many times slower than the best (0: tune all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "triton", "configs"))
    p.add_argument("--dry-run", action="store_true", help="small shapes on CPU, interpreter, fake timer")
    a = p.parse_args(argv)
    start = time.monotonic()
    if a.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        models = DRY_MODELS
        names = [m for m in a.model if m in DRY_MODELS] or list(DRY_MODELS)
        runs = [(m, T) for m in names for T in (a.tokens or [DRY_TOKENS[m], 4])]
        report, _ = tune(runs, torch.float16, a.out, budget=a.budget, prune=a.prune, device="cpu", timer=fake_timer,
                         dry=True, train_min=16, models=models)
    else:
        if not torch.cuda.is_available():
            p.error("tuning needs a CUDA GPU (--dry-run checks the pipeline on CPU)")
        if set(a.model) - set(MODELS):
            p.error(f"{sorted(set(a.model) - set(MODELS))}: --dry-run shapes")
        runs = [(m, T) for m in a.model for T in a.tokens] if a.tokens else default_runs(a.model)
        report, _ = tune(runs, getattr(torch, a.dtype), a.out, budget=a.budget, prune=a.prune)
    print(f"\ntune_gemm: {time.monotonic() - start:.0f} s\n\n{table(report)}", flush=True)


if __name__ == "__main__":
    main()
