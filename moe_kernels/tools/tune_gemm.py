"""Tune the tile configs of the expert MLP's two forward grouped GEMMs on this GPU and write them as the data
files `moe_kernels/triton/configs/grouped_gemm-E{E}-N{N}-K{K}-{device}-{dtype}.json` ({rows M: config}; the
launcher takes the entry of the nearest M).

    python -m moe_kernels.tools.tune_gemm [--model Mixtral Qwen3-30B-A3B ...] [--tokens 64 1024 8192]
                                          [--dtype bfloat16] [--out DIR]

GEMM1 gathers token rows and applies the gated activation ([T*k, D] x [E, 2H, D] -> [T*k, H]); GEMM2 scales
each row by its routing weight and scatters it ([T*k, H] x [E, D, H] -> [T*k, D]). Each candidate is timed
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


def _gemms(T, D, H, E, k, dtype):
    """The two forward GEMMs of the expert MLP on random routing: {name: (fn, N, K)}."""
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
    return {
        "up": (lambda: gg.grouped_gemm(x, w_up, offsets, gather=token, activation="silu", gated=True), 2 * H, D),
        "down": (lambda: gg.grouped_gemm(h, w_down, offsets, row_scale=scale, scatter=order, num_out_rows=T * k),
                 D, H),
    }


def _time(fn, cfg):
    import triton.testing

    from ..triton.grouped_gemm import CONFIG_ENV

    old = os.environ.get(CONFIG_ENV)
    try:
        if cfg is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = ",".join(map(str, cfg))
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as exc:  # noqa: BLE001 -- a config the chip cannot run is skipped, not fatal
        print(f"    {cfg}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None
    finally:
        if old is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = old


def tune(models, tokens, dtype, out_dir):
    from ..triton.grouped_gemm import config_file

    device = torch.cuda.get_device_name()
    tables, report = {}, []
    for model in models:
        D, H, E, k = MODELS[model]
        for T in tokens:
            for name, (fn, N, K) in _gemms(T, D, H, E, k, dtype).items():
                default = _time(fn, None)
                times = {cfg: _time(fn, cfg) for cfg in CANDIDATES}
                times = {c: t for c, t in times.items() if t is not None}
                best = min(times, key=times.get)
                flops = 2 * T * k * N * K
                report.append((model, T, name, best, times[best], default, flops / times[best] / 1e9))
                print(f"{model} T={T} {name}: best {best} {times[best]:.3f} ms ({flops / times[best] / 1e9:.0f} "
                      f"TFLOP/s), default {default if default is None else f'{default:.3f} ms'}", flush=True)
                path = config_file(E, N, K, device, dtype)
                tables.setdefault(path, {})[T * k] = list(best)
    os.makedirs(out_dir, exist_ok=True)
    for path, table in tables.items():
        dest = os.path.join(out_dir, os.path.basename(path))
        with open(dest, "w") as f:
            json.dump({str(m): cfg for m, cfg in sorted(table.items())}, f, indent=1)
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
