"""Soft MoE (`moe_kernels.nn.SoftMoE`: `ops.soft_dispatch`, the experts, `ops.soft_combine`) at several sequence
lengths, and DynamicSlotsSoftMoE (about as many slots as tokens: where memory quadratic in the sequence shows),
forward and forward+backward.

    python -m benchmarks.bench_soft_moe [--device cpu|cuda] [--quick | --full] [--only SUBSTRING]

Providers on the same weights: soft-moe-pytorch's SoftMoE, ours converted from it
(`SoftMoE.from_soft_moe_pytorch`: the same weights, copied into our layout) under `auto`, and the same module under
the reference backend. Without soft-moe-pytorch, ours is built directly and the peer is skipped.
FLOP model: the [B, N, S] logits once and the two mixes (three GEMMs of 2*B*N*S*D forward, six backward), plus
the GELU experts on the B*S slots (dynamic slots: S = N padded to a multiple of E, plus the slot-embedding
projection). That is the work of soft-moe-pytorch and of ours below its logits budget on CPU
(`SoftMoE.shared_logits_max`); the flash-style ops (GPU, long sequences) make the logits twice forward and four
times backward, so their rate on this model understates the GEMM rate they reach.
Agreement: 16-bit providers are checked against an fp32 oracle (the reference backend in fp32 on the same
bf16-representable inputs and weights) with common.run_pass's earned tolerance: at these sizes the 16-bit
reference (logits over D features rounded to 8 bits) is the less accurate result, so it cannot be the yardstick.
"""
import copy

import torch

import moe_kernels

from . import common, peers
from .common import Case, Pass, Provider, Work

FAMILY = "soft_moe"
SHAPES = {  # (B, N, D, E, slots per expert (None: dynamic slots), expert_mult)
    "cpu": {"quick": [(2, 64, 64, 4, 8, 2), (1, 70, 64, 4, None, 2)],
            "default": [(4, 256, 256, 8, 32, 4), (4, 1024, 256, 8, 32, 4), (4, 1024, 512, 16, 64, 4),
                        (1, 4096, 256, 16, None, 4)],
            "full": [(4, 4096, 256, 8, 32, 4), (1, 16384, 256, 8, 32, 4), (1, 8192, 512, 16, None, 4)]},
    "cuda": {"quick": [(4, 1024, 512, 16, 16, 4)],
             "default": [(8, 1024, 1024, 32, 32, 4), (8, 4096, 1024, 32, 32, 4), (2, 4096, 1024, 32, None, 4)],
             "full": [(2, 16384, 1024, 32, 32, 4), (8, 256, 1024, 32, 32, 4), (1, 16384, 1024, 32, None, 4)]},
}


def cases(device: str, size: str) -> list:
    shapes = SHAPES[device]["quick"] if size == "quick" else SHAPES[device]["default"] + (
        SHAPES[device]["full"] if size == "full" else [])
    return [Case(FAMILY, label(B, N, D, E, S), ("fwd", "fwd+bwd"),
                 lambda device, dtype, a=(B, N, D, E, S, mult): build(device, dtype, *a),
                 sweep=f"{FAMILY} B{B}-D{D}-E{E}-S{S}" if S else None, tokens=B * N)
            for B, N, D, E, S, mult in shapes]


def label(B, N, D, E, S):
    if S is None:
        return f"DynamicSlotsSoftMoE B{B}-N{N}-D{D}-E{E}"
    return f"SoftMoE B{B}-N{N}-D{D}-E{E}-S{S}"


def build(device, dtype, B, N, D, E, S, mult):
    """S None: DynamicSlotsSoftMoE."""
    torch.manual_seed(0)
    package = peers.soft_moe_pytorch()
    ours_cls = moe_kernels.SoftMoE if S else moe_kernels.DynamicSlotsSoftMoE
    kw = dict(num_slots=S) if S else {}
    if package is not None:
        theirs_cls = package.SoftMoE if S else package.DynamicSlotsSoftMoE
        theirs = theirs_cls(D, num_experts=E, expert_mult=mult, **kw).to(device=device, dtype=dtype)
        ours = ours_cls.from_soft_moe_pytorch(theirs)
    else:
        theirs = None
        ours = ours_cls(D, num_experts=E, expert_mult=mult, device=device, dtype=dtype, **kw)
    H = ours.experts.hidden_dim
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    grad = torch.randn(B, N, D, device=device, dtype=dtype)
    slots = E * S if S else -(-N // E) * E
    # the logits, the slot mix, the token mix, then the experts' two GEMMs (and the slot-embedding projection)
    gemms = [(B * N, slots, D), (B * slots, D, N), (B * N, D, slots),
             *common.mlp_gemms(B * slots, D, H, gated=False)]
    if not S:
        gemms.append((B * slots // E, E * D, D))

    def pass_of(backward: bool) -> Pass:
        def provider(name, kind, module, backend=None):
            forward = module if backend is None else common.under(backend, module)
            fn = common.pass_fn(forward, (x,), tuple(module.parameters()), backward=backward, grad=grad)
            return Provider(name, fn, kind, dtype)

        provs = [provider(name, "ours", ours, backend) for name, backend in
                 common.ours_backends("soft_dispatch", device)]
        provs.append(provider("reference", "reference", ours, "reference"))
        if theirs is not None:
            provs.append(provider("soft-moe-pytorch", "peer", theirs))
        oracle = None
        if dtype in (torch.float16, torch.bfloat16):
            ours32 = copy.deepcopy(ours).float()
            oracle = common.pass_fn(common.under("reference", ours32), (x.float(),), tuple(ours32.parameters()),
                                    backward=backward, grad=grad.float())
        return Pass(provs, Work(common.gemm_flops(gemms, backward), gemms), oracle=oracle)
    return pass_of


def main(argv=None):
    from .__main__ import main as run_suite
    run_suite(argv, families=(FAMILY,))


if __name__ == "__main__":
    main()
