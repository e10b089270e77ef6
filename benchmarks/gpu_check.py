"""The expert MLP's correctness on every GEMM engine at real sizes: for each engine forced through
MOE_KERNELS_GEMM_ENGINE, forward and backward of ops.moe_mlp (triton backend) against the float64 reference computed
on the same device, as relative RMS errors of the output and of each gradient. A result passes when each error is
at most twice the reference backend's own error in the same dtype plus 1e-3 (the earned tolerance, RMS form).
Cases: Mixtral and Qwen3-30B-A3B dimensions, most experts empty, and pairs dropped by a capacity.

    python -m benchmarks.gpu_check [--small] [--engines torch tma triton]

Prints one line per (case, engine) and a final PASS/FAIL line; exits 1 on a failure. --small: small shapes on CPU
tensors under TRITON_INTERPRET=1 in fp16 (bf16 tl.dot is wrong in the interpreter): the logic without a GPU.
"""
import argparse
import os
import sys
import time

import torch

GRADS = ("x", "weights", "gate_up_proj", "down_proj")
# name: (T, D, H, E, k, routing, capacity); routing "random" or "first-E/8" (every token to the first E/8 experts)
CASES = {
    "gpu": {"Mixtral": (2048, 4096, 14336, 8, 2, "random", None),
            "Qwen3-30B-A3B": (4096, 2048, 768, 128, 8, "random", None),
            "empty-experts": (512, 2048, 768, 128, 8, "first-E/8", None),     # 112 of 128 experts without rows
            "capacity-drop": (1024, 2048, 1024, 64, 8, "random", 64)},        # ~half the pairs dropped
    "small": {"Mixtral-like": (64, 64, 96, 8, 2, "random", None),
              "Qwen3-like": (48, 32, 24, 16, 4, "random", None),
              "empty-experts": (24, 32, 24, 16, 4, "first-E/8", None),
              "capacity-drop": (40, 32, 24, 4, 2, "random", 8)},
}


def rel_rms(a, ref):
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def inputs(T, D, H, E, k, routing, device, seed=0):
    """fp32 inputs on the device (made there: Mixtral's weights take seconds on a CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    pool = max(E // 8, k) if routing == "first-E/8" else E
    experts = torch.rand(T, pool, generator=g, device=device).argsort(dim=1)[:, :k]
    return dict(x=randn(T, D), experts=experts, weights=torch.rand(T, k, generator=g, device=device) + 0.1,
                gate_up_proj=randn(E, 2 * H, D) / D**0.5, down_proj=randn(E, D, H) / H**0.5, grad=randn(T, D))


def run(backend, data, dtype, device, capacity):
    """(out, {name: grad}) of ops.moe_mlp forward and backward on `backend`, inputs cast to dtype (routing weights
    stay fp32 unless dtype is float64)."""
    import moe_kernels
    from moe_kernels import ops

    cast = {n: t.to(device=device, dtype=(dtype if n != "weights" or dtype == torch.float64 else torch.float32))
            for n, t in data.items() if n != "experts"}
    leaves = {n: cast[n].detach().requires_grad_() for n in GRADS}
    with moe_kernels.use_backend(backend):
        out = ops.moe_mlp(leaves["x"], data["experts"], leaves["weights"], leaves["gate_up_proj"],
                          leaves["down_proj"], capacity=capacity)
        grads = torch.autograd.grad(out, list(leaves.values()), cast["grad"])
    return out.detach(), dict(zip(GRADS, grads))


def check_case(name, shape, engines, dtype, device):
    """[(engine, passed, line)] for one case."""
    from moe_kernels.triton import engines as eng

    T, D, H, E, k, routing, capacity = shape
    data = inputs(T, D, H, E, k, routing, device)
    out64, g64 = run("reference", data, torch.float64, device, capacity)
    same, g_same = run("reference", data, dtype, device, capacity)
    refs = {"out": (out64, same), **{f"d{n}": (g64[n], g_same[n]) for n in GRADS}}
    rows = []
    for engine in engines:
        os.environ[eng.ENGINE_ENV] = engine
        eng.LAST.clear()
        try:
            out, grads = run("triton", data, dtype, device, capacity)
            got = {"out": out, **{f"d{n}": grads[n] for n in GRADS}}
            errs = {n: (rel_rms(got[n], r64), rel_rms(s, r64)) for n, (r64, s) in refs.items()}
            ok = all(e <= 2 * s + 1e-3 for e, s in errs.values())
            ran = {role: v[0] for role, v in eng.LAST.items()}
            other = sorted(f"{r}={e}" for r, e in ran.items() if e != engine)
            line = "  ".join(f"{n} {e:.1e} ({s:.1e})" for n, (e, s) in errs.items())
            line += f"  ran {engine}" + (f" except {','.join(other)} (does not apply)" if other else "")
        except Exception as exc:  # noqa: BLE001 -- reported as a failure of this engine, the others still run
            ok, line = False, f"error {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        finally:
            os.environ.pop(eng.ENGINE_ENV, None)
        rows.append((engine, ok, f"{'PASS' if ok else 'FAIL'}  {engine:<6} {name} T{T}-D{D}-H{H}-E{E}-k{k}"
                     f"{f'-cap{capacity}' if capacity else ''}:  {line}"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small shapes on CPU under the interpreter, fp16")
    p.add_argument("--engines", nargs="+", default=["torch", "tma", "triton"], choices=["torch", "tma", "triton"])
    p.add_argument("--cases", nargs="+", default=None, help="names of CASES to run (default: all)")
    a = p.parse_args(argv)
    if a.small:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--small runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtype, cases = "cpu", torch.float16, CASES["small"]
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (--small checks the logic on CPU)")
        device, dtype, cases = "cuda", torch.bfloat16, CASES["gpu"]
    print(f"checking {str(dtype)[6:]} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; relative RMS "
          f"error against float64, (the reference backend's in {str(dtype)[6:]}); pass: <= 2x that + 1e-3",
          flush=True)
    start = time.perf_counter()
    rows = []
    for name, shape in cases.items():
        if a.cases and name not in a.cases:
            continue
        for engine, ok, line in check_case(name, shape, a.engines, dtype, device):
            print(line, flush=True)
            rows.append((engine, ok, line))
        if device == "cuda":
            torch.cuda.empty_cache()
    failed = [line.split(":")[0][6:] for _, ok, line in rows if not ok]
    print(f"gpu_check: {'PASS' if not failed else 'FAIL'} ({len(rows) - len(failed)} of {len(rows)} case x engine "
          f"passed, {time.perf_counter() - start:.0f} s)" + (f"; failed: {'; '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
