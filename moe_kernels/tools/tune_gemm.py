"""Tune the tile configs of the expert MLP's grouped GEMMs (forward, dX and dW) on this GPU and write them as the
data files `moe_kernels/triton/configs/{grouped_gemm,grouped_gemm_tn}-E{E}-N{N}-K{K}-{device}-{dtype}.json`
({rows: config}; the launcher takes the entry of the nearest number of rows).

    python -m moe_kernels.tools.tune_gemm [--model Mixtral Qwen3-30B-A3B ...] [--tokens 64 1024 8192]
                                          [--dtype bfloat16] [--out DIR]

Forward: "up" gathers token rows and applies the gated activation ([T*k, D] x [E, 2H, D] -> [T*k, H]); "down"
scales each row by its routing weight and scatters it. Backward: the dX GEMMs with W untransposed, and the
variable-K dW GEMMs (grouped_gemm_tn). Each candidate is timed
with triton.testing.do_bench (median) on random routing; a candidate that fails to compile or run (shared
memory, registers) is skipped. The default config's time is printed beside the best one.
"""
import argparse
import json
import os

import torch

MODELS = {  # name: D, H, E, k (DESIGN.md's shapes)
    "Mixtral": (4096, 14336, 8, 2),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "DeepSeek-V3": (7168, 2048, 256, 8),
    "OLMoE": (2048, 1024, 64, 8),
}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CANDIDATES = [
    (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4),
    (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
]


# the aot_check flags of each GEMM (moe_kernels/triton/grouped_gemm.py _FLAGS; the dW kernel's gather-scale set)
FLAGS = {"up": "up", "down": "down", "dgrad-down": "dh", "dgrad-up": "dgrad", "wgrad-down": "gather-scale",
         "wgrad-up": "gather-scale"}
TN_CANDIDATES = [
    (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 8, 3),
]


def _gemms(T, D, H, E, k, dtype):
    """The grouped GEMMs of the expert MLP's forward and backward on random routing:
    {name: (fn, kernel, N, K, rows)}; kernel "grouped_gemm" (N: output width, K: reduction) or "grouped_gemm_tn"
    (dw [E, N, K] over `rows` sorted rows)."""
    from ..triton import expert_mlp as em
    from ..triton import grouped_gemm as gg

    dev = "cuda"
    x = torch.randn(T, D, device=dev, dtype=dtype)
    logits = torch.randn(T, E, device=dev)
    weights, experts = torch.softmax(logits, -1).topk(k, -1)
    order, _, offsets, token, scale = em._routing_rows(experts, weights, E, None)
    w_up = torch.randn(E, 2 * H, D, device=dev, dtype=dtype) / D**0.5
    w_down = torch.randn(E, D, H, device=dev, dtype=dtype) / H**0.5
    h = torch.randn(T * k, H, device=dev, dtype=dtype)
    h2 = torch.randn(T * k, 2 * H, device=dev, dtype=dtype)
    g = torch.randn(T, D, device=dev, dtype=dtype)
    N = T * k
    G, TN = "grouped_gemm", "grouped_gemm_tn"
    return {
        "up": (lambda: gg.grouped_gemm(x, w_up, offsets, gather=token, activation="silu", gated=True), G, 2 * H, D, N),
        "down": (lambda: gg.grouped_gemm(h, w_down, offsets, row_scale=scale, scatter=order, num_out_rows=N),
                 G, D, H, N),
        "dgrad-down": (lambda: gg.grouped_gemm(g, w_down, offsets, gather=token, trans_w=False,
                                               out_dtype=torch.float32), G, H, D, N),
        "dgrad-up": (lambda: gg.grouped_gemm(h2, w_up, offsets, trans_w=False), G, D, 2 * H, N),
        "wgrad-down": (lambda: gg.grouped_gemm_tn(h, g, offsets, E, gather_dy=token, row_scale=scale), TN, D, H, N),
        "wgrad-up": (lambda: gg.grouped_gemm_tn(x, h2, offsets, E, gather_x=token), TN, 2 * H, D, N),
    }


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
    """Bytes of registers spilled by the kernels that fn() launches (compiled by this machine's Triton)."""
    from ..triton import grouped_gemm as gg

    names = ("_grouped_gemm_kernel", "_grouped_gemm_tn_kernel")
    spies = {n: _Spy(getattr(gg, n)) for n in names}
    try:
        for n, spy in spies.items():
            setattr(gg, n, spy)
        fn()
    finally:
        for n, spy in spies.items():
            setattr(gg, n, spy.kernel)
    return max((getattr(k, "n_spills", 0) or 0 for spy in spies.values() for k in spy.launched), default=0)


def _time(fn, cfg, env):
    import triton.testing

    old = os.environ.get(env)
    try:
        if cfg is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = ",".join(map(str, cfg))
        spilled = _spills(fn)
        if spilled and cfg is not None:
            print(f"    {cfg}: skipped (spills {spilled} B)")
            return None
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as exc:  # noqa: BLE001 -- a config the chip cannot run is skipped, not fatal
        print(f"    {cfg}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None
    finally:
        if old is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = old


def tune(models, tokens, dtype, out_dir):
    from ..triton.grouped_gemm import CONFIG_ENV, TN_CONFIG_ENV, config_file

    device = torch.cuda.get_device_name()
    tables, report = {}, []
    for model in models:
        D, H, E, k = MODELS[model]
        for T in tokens:
            for name, (fn, kernel, N, K, rows) in _gemms(T, D, H, E, k, dtype).items():
                if name not in ("up", "down") and T < 1024:
                    continue  # backward GEMMs: training batches only
                env, cands = (CONFIG_ENV, CANDIDATES) if kernel == "grouped_gemm" else (TN_CONFIG_ENV, TN_CANDIDATES)
                default = _time(fn, None, env)
                times = {cfg: _time(fn, cfg, env) for cfg in cands}
                times = {c: t for c, t in times.items() if t is not None}
                best = min(times, key=times.get)
                flops = 2 * rows * N * K
                report.append((model, T, name, best, times[best], default, flops / times[best] / 1e9))
                print(f"{model} T={T} {name}: best {best} {times[best]:.3f} ms ({flops / times[best] / 1e9:.0f} "
                      f"TFLOP/s), default {default if default is None else f'{default:.3f} ms'}", flush=True)
                table = tables.setdefault(config_file(E, N, K, device, dtype, kernel), {"_flags": FLAGS[name]})
                table[rows] = list(best)
    os.makedirs(out_dir, exist_ok=True)
    for path, table in tables.items():
        dest = os.path.join(out_dir, os.path.basename(path))
        with open(dest, "w") as f:
            flags = table.pop("_flags")
            json.dump({"_flags": flags, **{str(m): cfg for m, cfg in sorted(table.items())}}, f, indent=1)
        print("wrote", dest)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m moe_kernels.tools.tune_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["Mixtral", "Qwen3-30B-A3B"], choices=sorted(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=[64, 1024, 8192])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "triton", "configs"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("tuning needs a CUDA GPU")
    report = tune(a.model, a.tokens, getattr(torch, a.dtype), a.out)
    print("\n| model | T | GEMM | best config | ms | default ms | TFLOP/s |\n|---|---|---|---|---|---|---|")
    for model, T, name, best, t, default, tf in report:
        print(f"| {model} | {T} | {name} | {','.join(map(str, best))} | {t:.3f} | "
              f"{'-' if default is None else f'{default:.3f}'} | {tf:.0f} |")


if __name__ == "__main__":
    main()
