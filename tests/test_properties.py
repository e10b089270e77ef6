"""Property tests: for shapes, options and dtypes that hypothesis draws, every op of the public API on every
fast backend equals the float64 reference within the earned tolerance, forward and backward.

The rule (flash-attention's, tensor-wide): max |fast - ref64| <= 2 * max |same - ref64| + sqrt(n) fp32 ulps of
the largest magnitude in the computation, where `same` is the reference backend in fast's dtype and n the longest
sum an element takes (what summing in another order, in fp32, may add: samples.eps_allowance). Exact outputs (expert ids, counts, sort order) equal the reference's.
A failing example hypothesis prints goes into REGRESSIONS, which runs on every backend each time.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels import _backend

from .helpers import assert_earned_max
from .samples import ACTIVATIONS, F64, PROGRAMS, eps_allowance, largest_magnitude, materialise, run_with_grads

FAST_BACKENDS = (["native"] if _backend.NATIVE else []) + (
    ["triton"] if torch.cuda.is_available() or _backend._triton_usable("cpu") else [])
# triton runs on the GPU when there is one (the references then run there too), else in the interpreter
DEVICE = {"native": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
# bf16 tl.dot is wrong in the Triton interpreter: triton runs fp16 and fp32 here, bf16 too on a GPU
DTYPES = {"native": ["float32", "bfloat16", "float16"],
          "triton": ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_available() else [])}
# the interpreter runs each Triton program in Python: small shapes and few examples there;
# MOE_KERNELS_PROPERTY_EXAMPLES=N multiplies the counts by N for a longer hunt
_MORE = int(os.environ.get("MOE_KERNELS_PROPERTY_EXAMPLES", "1"))
EXAMPLES = {"native": 25 * _MORE, "triton": (10 if torch.cuda.is_available() else 5) * _MORE}


def _dims(draw, small):
    """T from 0 to a few hundred (a few dozen in the interpreter), D and H odd and even, E up to 64, k up to E."""
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 24 if small else 300)))
    E = draw(st.integers(1, 8 if small else 64))
    k = draw(st.integers(1, min(E, max(1, (96 if small else 1200) // max(T, 1)))))
    D = draw(st.integers(1, 16 if small else 48))
    H = draw(st.integers(1, 12 if small else 40))
    return dict(T=T, E=E, k=k, D=D, H=H)


@st.composite
def program_params(draw, name, small):
    p = _dims(draw, small)
    if name == "topk_route":
        p.update(score=draw(st.sampled_from(["softmax", "sigmoid"])), renormalize=draw(st.booleans()),
                 groups=draw(st.sampled_from([None, 2, 4])))
    elif name == "permute":
        p.update(layout=draw(st.sampled_from(["random", "one"])),
                 capacity=draw(st.one_of(st.none(), st.integers(0, max(1, p["T"])))))
    elif name in ("grouped_mm", "moe_mlp", "dense_moe"):
        p.update(gated=draw(st.booleans()), bias=draw(st.booleans()), activation=draw(st.sampled_from(ACTIVATIONS)))
        if name == "moe_mlp":
            p.update(layout=draw(st.sampled_from(["random", "one", "sentinel"])),
                     capacity=draw(st.one_of(st.none(), st.integers(0, max(1, p["T"])))))
        if name == "dense_moe":
            p["T"] = min(p["T"], 64 if small else 160)
    elif name == "soft_moe":
        p.update(B=draw(st.integers(1, 3)), slots=draw(st.integers(1, 4)), mask=draw(st.booleans()),
                 E=min(p["E"], 16))
    return p


def check_program(name, backend, p, dtype_name, seed):
    """The property for one drawn example; False when the example decides nothing (a near-tie, below)."""
    program = PROGRAMS[name]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    # every run sees the same values: the inputs rounded to dtype (the float64 run measures the computation's
    # error, not the rounding of its inputs)
    device = DEVICE[backend]
    inputs = {n: (v.to(dtype).to(F64) if v.is_floating_point() else v).to(device) if isinstance(v, torch.Tensor)
              else v for n, v in program.make(p, gen).items()}
    with moe_kernels.use_backend("reference"):
        outs64, exact64, _ = run_with_grads(program, materialise(inputs, F64), ())
        cotangents = [torch.randn(o.shape, dtype=F64, generator=gen).to(dtype).to(F64).to(device) for o in outs64]
        outs64, exact64, grads64 = run_with_grads(program, materialise(inputs, F64), cotangents)
        same, exact_same, grads_same = run_with_grads(program, materialise(inputs, dtype), cotangents)
    with moe_kernels.use_backend(backend):
        fast, exact_fast, grads_fast = run_with_grads(program, materialise(inputs, dtype), cotangents)
    # exact outputs: the same as the reference in this dtype; where float64 decides a near-tie the other way
    # (routing in 16 bits), the drawn example says nothing about the fast path and is skipped
    if not all(torch.equal(a, b) for a, b in zip(exact_same, exact64)):
        return False
    for i, (a, b) in enumerate(zip(exact_fast, exact_same)):
        assert torch.equal(a, b), f"{name}: exact output {i} differs from the reference"
    accumulate = eps_allowance(largest_magnitude(inputs, cotangents, outs64, grads64), program.reduction(p))

    def check(f, r, s, what):
        # in the dtype the reference gives (routing weights are fp32 for 16-bit logits); plus one ulp of that
        # dtype at the largest element: storing the result rounds it, which a baseline of few elements may dodge
        assert f.dtype == s.dtype and f.shape == r.shape, f"{name}: {what} is {f.dtype} {tuple(f.shape)}"
        own = torch.finfo(f.dtype).eps * r.abs().max().item() if r.numel() and f.dtype != F64 else 0.0
        assert_earned_max(f, r, s, atol=accumulate + own, name=f"{name}: {what}")

    for i, (f, r, s) in enumerate(zip(fast, outs64, same)):
        check(f, r, s, f"output {i}")
    assert grads_fast.keys() == grads64.keys(), f"{name}: gradients for {sorted(grads_fast)}, want {sorted(grads64)}"
    for leaf, r in grads64.items():
        check(grads_fast[leaf], r, grads_same[leaf], f"grad of {leaf}")
    return True


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_matches_float64_reference(name, backend):
    if backend == "triton" and not PROGRAMS[name].triton:
        pytest.skip(f"the triton backend does not implement {name}'s ops")

    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(p=program_params(name, small=backend == "triton" and DEVICE[backend] == "cpu"), dtype_name=st.sampled_from(DTYPES[backend]),
           seed=st.integers(0, 2**32 - 1))
    def check(p, dtype_name, seed):
        assume(check_program(name, backend, p, dtype_name, seed))

    check()


# Examples that failed once, and the edge shapes every backend must keep passing: (program, params, dtype, seed).
REGRESSIONS = [
    # native: gated identity overwrote the saved pre-activation of an expert of more than 4 rows (wrong gradients)
    ("moe_mlp", dict(T=5, E=1, k=1, D=1, H=1, gated=True, bias=False, activation="identity", layout="random",
                     capacity=None), "float32", 0),
    ("moe_mlp", dict(T=0, E=4, k=2, D=8, H=4, gated=True, bias=True, activation="silu", layout="random",
                     capacity=None), "float32", 1),
    ("moe_mlp", dict(T=1, E=7, k=7, D=5, H=3, gated=True, bias=False, activation="gelu", layout="random",
                     capacity=None), "float32", 2),
    ("moe_mlp", dict(T=17, E=13, k=1, D=6, H=5, gated=False, bias=True, activation="relu", layout="one",
                     capacity=None), "float16", 3),
    ("moe_mlp", dict(T=23, E=5, k=3, D=7, H=4, gated=True, bias=True, activation="gelu_tanh", layout="sentinel",
                     capacity=3), "float32", 4),
    ("grouped_mm", dict(T=0, E=3, D=4, H=3, gated=True, bias=True, activation="silu"), "float32", 5),
    ("grouped_mm", dict(T=29, E=1, D=9, H=5, gated=False, bias=True, activation="identity"), "float16", 6),
    ("permute", dict(T=19, E=11, k=11, D=3, layout="one", capacity=2), "float32", 7),
    ("permute", dict(T=0, E=2, k=1, D=4, layout="random", capacity=None), "float32", 8),
    ("topk_route", dict(T=1, E=1, k=1, score="softmax", renormalize=True, groups=None), "float32", 9),
    ("topk_route", dict(T=37, E=8, k=3, score="sigmoid", renormalize=False, groups=4), "float32", 10),
    ("soft_moe", dict(B=2, T=1, D=5, E=3, slots=2, mask=True), "float32", 11),
    ("soft_moe", dict(B=1, T=0, D=4, E=2, slots=1, mask=False), "float32", 12),
    ("dense_moe", dict(T=0, E=3, k=1, D=4, H=3, gated=True, bias=False, activation="silu"), "float32", 13),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}")
def test_regressions(case, backend):
    name, p, dtype_name, seed = case
    if backend == "triton" and (not PROGRAMS[name].triton or dtype_name not in DTYPES["triton"]):
        pytest.skip(f"triton does not run {name} in {dtype_name} here")
    assert check_program(name, backend, p, dtype_name, seed), "a near-tie: the example decides nothing, replace it"
