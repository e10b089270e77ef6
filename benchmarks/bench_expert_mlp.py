"""The expert MLP (`ops.moe_mlp`, the heart of SparseMoE): routed SwiGLU experts on given routing, forward and
forward+backward, against its peers and the device's limits.

    python -m benchmarks.bench_expert_mlp [--device cpu|cuda] [--quick | --full] [--only SUBSTRING]

Providers on the same routing and the same weights (transformers v5 layout, gate_up_proj [E, 2H, D],
down_proj [E, D, H]): ours (`auto`: the fused Triton kernels on CUDA, the native C++ op on CPU), ours in bf16 on
CPU (the same weights rounded to bf16), the reference backend, a layer built on torch's grouped_mm with torch's
own permutation (argsort + index_add; the transposed views of the same weights), and transformers' experts
implementations `eager`, `grouped_mm` and `batched_mm` on a MixtralExperts module whose parameters are the same
tensors (batched_mm only where its per-(token, slot) copies of the weights fit in 1 GiB).

LoRA fine-tuning (the `LoRA-r16` cases, forward+backward): PEFT LoRA adapters of rank 16 on both projections
(`target_parameters`) of a MixtralExperts module with frozen base weights, on "moe_kernels" (ours: the adapters as
grouped GEMM pairs through the rank, no dW of the base) against the same PEFT module on transformers' `grouped_mm`
and `eager` experts (PEFT forms the merged weight and its gradient every step).

Quantized weights (the `bf16-w`, `fp8-w` and `mxfp4-w` cases, forward, bf16 activations): the same layer with its
projections in bf16, FP8 block-scaled (e4m3 + 128x128 scales) and MXFP4 (e2m1 + e8m0 per 32), ours against the
reference on the dequantised weights; memory-bound at decode, so GB/s is of the weight bytes the active experts
hold in that format, and % limit is against copying those bytes.
On a GPU the forward of decode cases (T <= 64) also runs "ours two-launch decode": the same op with
MOE_KERNELS_DECODE=fused (moe_kernels.triton.expert_mlp_decode: a schedule launch, then one persistent launch).

Shapes are the published models' (Mixtral, Qwen3-30B-A3B, DeepSeek-V3, OLMoE): real on CUDA, scaled on CPU ("OLMoE/4":
D and H divided by 4, E and k kept). A sweep runs one shape over token counts from decode (T = 1..8) up.
CPU acceptance targets (fp32): T2048-D512-H256-E64-k8 fwd+bwd >= 1.25x transformers grouped_mm, >= 5x eager,
>= 75% of the dense rate; T2048-D512-H1024-E8-k2 >= 85% of the dense rate forward and forward+backward; decode
T4 forward >= 2x the fastest transformers implementation; bf16 at least as fast as fp32; the OLMoE/4 LoRA step
>= 1.5x PEFT on transformers grouped_mm.
GPU targets (bf16): Mixtral T16384 fwd+bwd >= 1.1x the torch grouped_mm layer and fwd >= 85% of the dense cuBLAS
rate; Qwen3-30B-A3B T32768 and OLMoE T16384 fwd+bwd >= 1.3x the grouped_mm layer; every fwd+bwd case >= 1.0x it;
decode (Mixtral T1, T4, T8) forward >= 70% of copy bandwidth; decode T8 and T64 with bf16 / FP8 / MXFP4 weights
>= 85% of the copy rate of their bytes and Mixtral bf16 T1 <= 0.15 ms (ours and the two-launch decode); the OLMoE LoRA step >= 1.2x PEFT on transformers
grouped_mm. Targets are evaluated on a run's rows, never a test.
"""
import torch

from moe_kernels import ops

try:
    from moe_kernels.triton.expert_mlp_decode import DECODE_ENV, DECODE_MAX_TOKENS
except ImportError:         # no Triton: no GPU provider either
    DECODE_ENV, DECODE_MAX_TOKENS = None, 0

from . import common, peers
from .common import Case, Pass, Provider, Work

FAMILY = "expert_mlp"
# name: (D, H, E, k)
MODELS = {"Mixtral": (4096, 14336, 8, 2), "Qwen3-30B-A3B": (2048, 768, 128, 8), "DeepSeek-V3": (7168, 2048, 256, 8),
          "OLMoE": (2048, 1024, 64, 8)}
SCALED = {  # CPU shapes: D and H divided, E and k kept (Mixtral's H by 14 keeps H = 2 D)
    "OLMoE/4": (512, 256, 64, 8), "Mixtral/8": (512, 1024, 8, 2), "Qwen3-30B-A3B/16": (128, 48, 128, 8),
    "DeepSeek-V3/16": (448, 128, 256, 8), "OLMoE/16": (128, 64, 64, 8)}
DECODE = (1, 4, 8)
ALL = ("fwd", "fwd+bwd")

# (shape name, tokens, passes, sweep name or None) per device and size; "quick" runs alone, "full" adds to
# "default".
SHAPES = {
    "cpu": {
        "quick": [("OLMoE/16", 128, ALL, None), ("OLMoE/16", 2, ("fwd",), None)],
        "default": [*[("OLMoE/4", T, ("fwd",), "OLMoE/4") for T in (*DECODE, 64, 256, 1024)],
                    ("OLMoE/4", 2048, ALL, "OLMoE/4"),            # (a) the OLMoE-like target
                    ("Mixtral/8", 2048, ALL, None),               # (b) the Mixtral-like target
                    ("Qwen3-30B-A3B/16", 2048, ALL, None),
                    ("DeepSeek-V3/16", 1024, ("fwd",), None),
                    ("OLMoE/4 LoRA-r16", 2048, ("fwd+bwd",), None),
                    *[(f"{shape} {fmt}-w", T, ("fwd",), f"{shape} {fmt}-w") for fmt in ("bf16", "fp8", "mxfp4")
                      for shape, Ts in (("OLMoE/4", (1, 4, 8, 2048)), ("Mixtral/8", (4, 2048))) for T in Ts]],
        "full": [("OLMoE/4", 4096, ALL, "OLMoE/4"), *[("Mixtral/8", T, ("fwd",), "Mixtral/8") for T in (1, 4, 64, 512)],
                 ("Mixtral/8", 8192, ALL, "Mixtral/8"), ("DeepSeek-V3/16", 4096, ALL, None),
                 ("Qwen3-30B-A3B/16", 4, ("fwd",), None)],
    },
    "cuda": {
        "quick": [("Qwen3-30B-A3B", 1024, ALL, None), ("Qwen3-30B-A3B", 8, ("fwd",), None)],
        "default": [*[("Mixtral", T, ("fwd",), "Mixtral") for T in (*DECODE, 64, 1024)],
                    ("Mixtral", 16384, ALL, "Mixtral"), ("Qwen3-30B-A3B", 32768, ALL, None),
                    *[("Qwen3-30B-A3B", T, ("fwd",), "Qwen3-30B-A3B") for T in (1, 8, 64)],
                    ("OLMoE", 16384, ALL, None), ("DeepSeek-V3", 4096, ALL, None),
                    ("OLMoE LoRA-r16", 16384, ("fwd+bwd",), None),
                    *[(f"{shape} {fmt}-w", T, ("fwd",), f"{shape} {fmt}-w") for fmt in ("bf16", "fp8", "mxfp4")
                      for shape in ("Mixtral", "Qwen3-30B-A3B", "DeepSeek-V3") for T in (1, 8, 64)]],
        "full": [("Mixtral", 4096, ALL, "Mixtral"), ("Qwen3-30B-A3B", 8192, ALL, "Qwen3-30B-A3B"),
                 ("DeepSeek-V3", 16384, ("fwd",), None), ("DeepSeek-V3", 8, ("fwd",), None)],
    },
}


LORA = " LoRA-r"   # a shape name with it: the LoRA fine-tuning case of that shape at that rank
WEIGHTS = "-w"     # "<shape> <format>-w": the quantized-weights case of that shape in that format


def dims(name):
    name = name.split(LORA)[0].split(" ")[0]
    return MODELS.get(name) or SCALED[name]


def cases(device: str, size: str) -> list:
    shapes = SHAPES[device]["quick"] if size == "quick" else SHAPES[device]["default"] + (
        SHAPES[device]["full"] if size == "full" else [])
    out = []
    for name, T, passes, sweep in shapes:
        D, H, E, k = dims(name)
        make = build
        if LORA in name:
            make = (lambda device, dtype, T, D, H, E, k, r=int(name.split(LORA)[1]):
                    build_lora(device, dtype, T, D, H, E, k, r))
        elif name.endswith(WEIGHTS):
            make = (lambda device, dtype, T, D, H, E, k, fmt=name.split(" ")[-1][:-len(WEIGHTS)]:
                    build_quantized(device, T, D, H, E, k, fmt))
        out.append(Case(FAMILY, f"{name} T{T}-D{D}-H{H}-E{E}-k{k}", passes,
                        lambda device, dtype, T=T, D=D, H=H, E=E, k=k, make=make: make(device, dtype, T, D, H, E, k),
                        sweep=f"{FAMILY} {sweep}" if sweep else None, tokens=T))
    return out


TWO_LAUNCH = "ours two-launch decode"


def _two_launch_decode(device, T, backward):
    """Whether a pass also runs the two-launch decode step (MOE_KERNELS_DECODE=fused): GPU forward, T <= 64."""
    return device != "cpu" and not backward and 0 < T <= DECODE_MAX_TOKENS


def build(device, dtype, T, D, H, E, k):
    """The inputs and weights of one shape, and the function giving the providers of each pass on them."""
    torch.manual_seed(0)
    x = torch.randn(T, D, device=device, dtype=dtype)
    r = ops.topk_route(torch.randn(T, E, device=device), k)
    w_up = (torch.randn(E, 2 * H, D, device=device, dtype=dtype) / D**0.5).requires_grad_()
    w_down = (torch.randn(E, D, H, device=device, dtype=dtype) / H**0.5).requires_grad_()
    grad = torch.randn(T, D, device=device, dtype=dtype)
    active = int(torch.unique(r.experts).numel())  # a host sync, outside every timed region
    experts, weights = r.experts, r.weights

    def forward_ours(inp, up, down):
        return ops.moe_mlp(inp, experts, weights, up, down)

    def pass_of(backward: bool) -> Pass:
        def provider(name, kind, forward, inputs, params, g=grad):
            return Provider(name, common.pass_fn(forward, inputs, params, backward=backward, grad=g), kind,
                            inputs[0].dtype)

        provs = [provider(name, "ours", common.under(backend, forward_ours), (x, w_up, w_down), ())
                 for name, backend in common.ours_backends("moe_mlp_fused", device)]
        if _two_launch_decode(device, T, backward):
            provs.append(provider(TWO_LAUNCH, "ours", common.with_env(DECODE_ENV, "fused", common.under(
                "triton", forward_ours)), (x, w_up, w_down), ()))
        notes = []
        if device == "cpu" and dtype == torch.float32:
            up16, down16 = (w.detach().to(torch.bfloat16).requires_grad_() for w in (w_up, w_down))
            provs.append(provider("ours bf16", "ours", common.under("auto", forward_ours),
                                  (x.to(torch.bfloat16), up16, down16), (), grad.to(torch.bfloat16)))
        provs.append(provider("reference", "reference", common.under("reference", forward_ours), (x, w_up, w_down),
                              ()))
        grouped_mm = peers.torch_grouped_mm()
        if grouped_mm is not None:
            def forward_grouped_mm(inp, up, down):
                return peers.grouped_mm_layer(inp, experts, weights, up.transpose(1, 2), down.transpose(1, 2),
                                              grouped_mm)
            provs.append(provider("torch grouped_mm", "peer", forward_grouped_mm, (x, w_up, w_down), ()))
        for impl in peers.EXPERTS_IMPLEMENTATIONS:
            need = peers.batched_mm_bytes(T, k, D, H, D, x.element_size())
            if impl == "batched_mm" and need > peers.BATCHED_MM_MAX_BYTES:
                notes.append(f"transformers batched_mm not run: its per-(token, slot) weight copies need "
                             f"{need / 2**30:.1f} GiB (limit {peers.BATCHED_MM_MAX_BYTES / 2**30:.0f} GiB)")
                continue
            module = peers.transformers_experts(w_up, w_down, impl)
            if module is None:
                break
            provs.append(provider(f"transformers {impl}", "peer", lambda inp, m=module: m(inp, experts, weights),
                                  (x,), tuple(module.parameters())))
        gemms = common.mlp_gemms(T * k, D, H)
        # forward: at least the active experts' weights are read, x read and the output written
        nbytes = None if backward else (lambda dt: (active * 3 * H * D + 2 * T * D) * dt.itemsize)
        return Pass(provs, Work(common.gemm_flops(gemms, backward), gemms, nbytes), notes=notes)
    return pass_of


def build_lora(device, dtype, T, D, H, E, k, r):
    """A LoRA fine-tuning step: PEFT adapters of rank r on both projections of a MixtralExperts module (frozen base
    weights, the same for every provider), forward and the backward into x and the adapters."""
    torch.manual_seed(0)
    x = torch.randn(T, D, device=device, dtype=dtype)
    route = ops.topk_route(torch.randn(T, E, device=device), k)
    w_up = torch.randn(E, 2 * H, D, device=device, dtype=dtype) / D**0.5
    w_down = torch.randn(E, D, H, device=device, dtype=dtype) / H**0.5
    grad = torch.randn(T, D, device=device, dtype=dtype)
    experts, weights = route.experts, route.weights

    def pass_of(backward: bool) -> Pass:
        provs, notes = [], []
        for name, kind, impl in (("ours", "ours", "moe_kernels"), ("PEFT + transformers grouped_mm", "peer", "grouped_mm"),
                                 ("PEFT + transformers eager", "peer", "eager")):
            module = peers.peft_lora_experts(w_up, w_down, impl, r)
            if module is None:
                notes.append("peft or transformers is not installed: the LoRA case runs no provider")
                break
            adapters = tuple(p for p in module.parameters() if p.requires_grad)

            def provider(name, kind, forward):
                return Provider(name, common.pass_fn(forward, (x,), adapters, backward=backward, grad=grad), kind, dtype)
            provs.append(provider(name, kind, lambda inp, m=module: m(inp, experts, weights)))
            if impl == "moe_kernels":     # the same module on the reference backend: the check of every provider
                provs.append(provider("reference", "reference",
                                      common.under("reference", lambda inp, m=module: m(inp, experts, weights))))
        # the base GEMMs forward and their dX (no dW: frozen), the adapters' pairs forward, dX and dW
        base = common.mlp_gemms(T * k, D, H)
        low = [(T * k, r, D), (T * k, 2 * H, r), (T * k, r, H), (T * k, D, r)]
        flops = 2 * sum(2 * M * N * K for M, N, K in base) + 3 * sum(2 * M * N * K for M, N, K in low)
        return Pass(provs, Work(flops, base + base + low * 3), notes=notes)
    return pass_of


def build_quantized(device, T, D, H, E, k, fmt):
    """The forward of the layer with its weights in `fmt` ("bf16", "fp8", "mxfp4") and bf16 activations: ours, and
    the reference backend on the same quantized weights (it dequantises them whole)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    x = torch.randn(T, D, device=device, dtype=dtype)
    route = ops.topk_route(torch.randn(T, E, device=device), k)

    def weight(N, K):
        """[E, N, K] of N(0, 1/K) values in fmt, made 8 experts at a time (DeepSeek-V3's would not fit in fp32)."""
        chunks = [torch.randn(min(8, E - e), N, K, device=device) / K**0.5 for e in range(0, E, 8)]
        if fmt == "bf16":
            return torch.cat([c.to(dtype) for c in chunks])
        parts = [ops.QuantizedWeight.quantize(c, fmt) for c in chunks]
        return parts[0]._replace(data=torch.cat([q.data for q in parts]), scale=torch.cat([q.scale for q in parts]))

    up, down = weight(2 * H, D), weight(D, H)
    per_expert = ((up.numel() + down.numel()) * 2 if fmt == "bf16" else up.nbytes + down.nbytes) // E
    active = int(torch.unique(route.experts).numel())  # a host sync, outside every timed region

    def forward(inp):
        return ops.moe_mlp(inp, route.experts, route.weights.to(dtype), up, down)

    def pass_of(backward: bool) -> Pass:
        runs = [("ours", "ours", common.under("auto", forward)), ("reference", "reference", common.under(
            "reference", forward))]
        if _two_launch_decode(device, T, backward):
            runs.insert(1, (TWO_LAUNCH, "ours", common.with_env(DECODE_ENV, "fused", common.under("triton", forward))))
        provs = [Provider(name, common.pass_fn(fn, (x,), backward=False), kind, dtype) for name, kind, fn in runs]
        gemms = common.mlp_gemms(T * k, D, H)
        # the active experts' weights in this format, x read and the output written
        return Pass(provs, Work(common.gemm_flops(gemms), gemms,
                                lambda dt: active * per_expert + 2 * T * D * dt.itemsize))
    return pass_of


# --- the acceptance targets of the docstring, evaluated on a run's rows ------------------------------------------
def _shape(label):
    """The shape name of a case label: "OLMoE/4" of "OLMoE/4 T2048-D512-...", "OLMoE/4 LoRA-r16" of a LoRA case."""
    return label.rsplit(" ", 1)[0]


def _row(rows, shape, T, pass_name, provider):
    for r in rows:
        if (r["family"] == FAMILY and _shape(r["label"]) == shape and r["tokens"] == T
                and r["pass"] == pass_name and r["provider"] == provider and r.get("seconds")):
            return r
    return None


def targets(rows, device) -> list:
    """[(target, measured, met)] for each target whose case ran (met: None where a provider is missing)."""
    out = []

    def ratio(name, shape, T, pass_name, peers, at_least):
        ours = _row(rows, shape, T, pass_name, "ours")
        found = [r for r in (_row(rows, shape, T, pass_name, p) for p in peers) if r is not None]
        if ours is None:
            return
        if not found:
            out.append((name, "peer not run", None))
            return
        peer = min(found, key=lambda r: r["seconds"])
        x = peer["seconds"] / ours["seconds"]
        ms = lambda v: f"{v:.3g}" if v < 1000 else f"{v:.0f}"  # noqa: E731
        out.append((name, f"{x:.2f}x ({ms(ours['ms'])} vs {ms(peer['ms'])} ms, {peer['provider']})", x >= at_least))

    def share(name, shape, T, pass_name, at_least, provider="ours"):
        r = _row(rows, shape, T, pass_name, provider)
        if r is not None and r.get("pct_limit") is not None:
            out.append((name, f"{r['pct_limit']:.0f}% ({r['bound']})", r["pct_limit"] >= at_least))

    def formats(name, shape, T, fmt, at_least):
        """ours with weights in fmt against ours with bf16 weights, same shape and tokens."""
        mine, base = _row(rows, f"{shape} {fmt}-w", T, "fwd", "ours"), _row(rows, f"{shape} bf16-w", T, "fwd", "ours")
        if mine is not None and base is not None:
            x = base["seconds"] / mine["seconds"]
            out.append((name, f"{x:.2f}x ({mine['ms']:.3g} vs {base['ms']:.3g} ms)", x >= at_least))

    transformers = [f"transformers {impl}" for impl in peers.EXPERTS_IMPLEMENTATIONS]
    if device == "cpu":
        ratio("OLMoE/4 T2048 fwd+bwd >= 1.25x transformers grouped_mm", "OLMoE/4", 2048, "fwd+bwd",
              ["transformers grouped_mm"], 1.25)
        ratio("OLMoE/4 T2048 fwd+bwd >= 5x transformers eager", "OLMoE/4", 2048, "fwd+bwd",
              ["transformers eager"], 5.0)
        share("OLMoE/4 T2048 fwd+bwd >= 75% of the dense rate", "OLMoE/4", 2048, "fwd+bwd", 75)
        share("Mixtral/8 T2048 fwd >= 85% of the dense rate", "Mixtral/8", 2048, "fwd", 85)
        share("Mixtral/8 T2048 fwd+bwd >= 85% of the dense rate", "Mixtral/8", 2048, "fwd+bwd", 85)
        ratio("OLMoE/4 T4 fwd >= 2x the fastest transformers implementation", "OLMoE/4", 4, "fwd", transformers, 2.0)
        ratio("OLMoE/4 LoRA-r16 T2048 fwd+bwd >= 1.5x PEFT on transformers grouped_mm", "OLMoE/4 LoRA-r16", 2048,
              "fwd+bwd", ["PEFT + transformers grouped_mm"], 1.5)
        formats("OLMoE/4 T4 fwd, FP8 weights >= 1.8x bf16 weights", "OLMoE/4", 4, "fp8", 1.8)
        formats("OLMoE/4 T4 fwd, MXFP4 weights >= 3x bf16 weights", "OLMoE/4", 4, "mxfp4", 3.0)
        formats("OLMoE/4 T2048 fwd, FP8 weights >= 0.9x bf16 weights", "OLMoE/4", 2048, "fp8", 0.9)
        pairs = [(r, _row(rows, _shape(r["label"]), r["tokens"], r["pass"], "ours bf16")) for r in rows
                 if r["family"] == FAMILY and r["provider"] == "ours" and r.get("seconds")]
        speedups = [(ours["seconds"] / b["seconds"], f"{_shape(ours['label'])} T{ours['tokens']} {ours['pass']}")
                    for ours, b in pairs if b is not None]
        if speedups:
            worst = min(speedups)
            out.append(("bf16 at least as fast as fp32 (every case)",
                        f"{worst[0]:.2f}x at worst ({worst[1]}), {max(speedups)[0]:.2f}x at best", worst[0] >= 1.0))
    else:
        gm = ["torch grouped_mm"]
        ratio("Mixtral T16384 fwd+bwd >= 1.1x the torch grouped_mm layer", "Mixtral", 16384, "fwd+bwd", gm, 1.1)
        share("Mixtral T16384 fwd >= 85% of the dense cuBLAS rate", "Mixtral", 16384, "fwd", 85)
        ratio("Qwen3-30B-A3B T32768 fwd+bwd >= 1.3x the torch grouped_mm layer", "Qwen3-30B-A3B", 32768, "fwd+bwd",
              gm, 1.3)
        ratio("OLMoE T16384 fwd+bwd >= 1.3x the torch grouped_mm layer", "OLMoE", 16384, "fwd+bwd", gm, 1.3)
        ratio("OLMoE LoRA-r16 T16384 fwd+bwd >= 1.2x PEFT on transformers grouped_mm", "OLMoE LoRA-r16", 16384,
              "fwd+bwd", ["PEFT + transformers grouped_mm"], 1.2)
        ours = [r for r in rows if r["family"] == FAMILY and r["provider"] == "ours" and r["pass"] == "fwd+bwd"
                and r.get("seconds")]
        pairs = [(r, _row(rows, _shape(r["label"]), r["tokens"], "fwd+bwd", gm[0])) for r in ours]
        speedups = [(p["seconds"] / r["seconds"], f"{r['label'].split(' ')[0]} T{r['tokens']}") for r, p in pairs
                    if p is not None]
        name = "every fwd+bwd case >= 1.0x the torch grouped_mm layer"
        if speedups:
            worst, best = min(speedups), max(speedups)
            out.append((name, f"{worst[0]:.2f}x at worst ({worst[1]}), {best[0]:.2f}x at best ({best[1]}); "
                              f"{len(speedups)} cases", worst[0] >= 1.0))
        elif ours:
            out.append((name, "peer not run", None))
        for T in DECODE:
            share(f"Mixtral T{T} fwd >= 70% of copy bandwidth", "Mixtral", T, "fwd", 70)
        for provider, what in (("ours", ""), (TWO_LAUNCH, " (two-launch decode)")):
            for shape in ("Mixtral", "Qwen3-30B-A3B", "DeepSeek-V3"):
                for fmt in ("bf16", "fp8", "mxfp4"):
                    for T in (8, 64):
                        share(f"{shape} {fmt} weights T{T} fwd >= 85% of the copy rate of its weight bytes{what}",
                              f"{shape} {fmt}-w", T, "fwd", 85, provider)
            t1 = _row(rows, "Mixtral bf16-w", 1, "fwd", provider)
            if t1 is not None:
                out.append((f"Mixtral bf16 weights T1 fwd <= 0.15 ms{what}", f"{t1['ms']:.3g} ms", t1["ms"] <= 0.15))
    return out


PEERS = ("torch grouped_mm", "transformers grouped_mm")


def peer_table(rows) -> str:
    """Markdown: each expert_mlp case and pass of a run, ours beside the peers of the GPU targets and the dense
    matmul of the same FLOPs measured in the run (ms, and ours' speed-up over each)."""
    out = ["| case | pass | ours ms | " + " | ".join(f"{p} ms" for p in PEERS) + " | dense ms | TFLOP/s ours |",
           "|---|---|---|" + "---|" * len(PEERS) + "---|---|"]
    for r in rows:
        if r["family"] != FAMILY or r["provider"] != "ours":
            continue
        mine = r.get("ms")
        cells = []
        for p in PEERS + ("dense",):
            peer = (r.get("limit") or {}).get("dense_matmul_ms") if p == "dense" else (
                _row(rows, _shape(r["label"]), r["tokens"], r["pass"], p) or {}).get("ms")
            cells.append("-" if peer is None else f"{peer:.3g}" + (f" ({peer / mine:.2f}x)" if mine else ""))
        tf = f"{r['flops'] / r['seconds'] / 1e12:.0f}" if r.get("seconds") and r.get("flops") else "-"
        out.append(f"| {r['label']} | {r['pass']} | " + (f"{mine:.3g}" if mine else r["status"][:60]) + " | "
                   + " | ".join(cells) + f" | {tf} |")
    return "\n".join(out)


def main(argv=None):
    from .__main__ import main as run_suite
    run_suite(argv, families=(FAMILY,))


if __name__ == "__main__":
    main()
