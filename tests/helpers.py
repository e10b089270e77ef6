"""Helpers shared by the tests: the earned-tolerance comparison, poisoning, random routing."""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

F64 = torch.float64


def _same_nans(fast, ref64, name):
    nan = torch.isnan(ref64)
    assert torch.equal(torch.isnan(fast), nan), f"{name}: NaN where the reference has none, or the reverse"
    return ~nan


def assert_earned(fast, ref64, same_dtype, atol=1e-6, name="output"):
    """flash-attention's rule, elementwise: |fast - ref64| <= 2 * |same_dtype - ref64| + atol, where `same_dtype`
    is plain PyTorch computing the same thing in fast's dtype; NaN exactly where the reference has NaN."""
    ok = _same_nans(fast, ref64, name)
    err = torch.where(ok, fast.double() - ref64, 0).abs()
    bound = 2 * torch.where(ok, same_dtype.double() - ref64, 0).abs() + atol
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed the earned tolerance; "
                           f"max error {err.max().item():.3g}, max bound there {bound[bad].max().item():.3g}")


def assert_earned_max(fast, ref64, same_dtype, atol=1e-6, name="output"):
    """flash-attention's rule over the whole tensor: max |fast - ref64| <= 2 * max |same_dtype - ref64| + atol +
    two rounding steps (half an ulp each) of fast's dtype at the output's largest finite magnitude: the one rounding
    a result in fast's dtype may differ by from the baseline's, whose own rounding of that element can happen to
    be near exact (flash-attention's `fwd_atol`, 2 max |r + 0.3 - 0.3 - r|, estimates the same step from the data
    and can fall short of it on small tensors). For kernels whose summation order or formula differs from torch's
    (tiled K loops, fused epilogues), where the elementwise form fails wherever the baseline happens to round
    exactly. atol may be a tensor (per element); its maximum counts."""
    ok = _same_nans(fast, ref64, name)
    if not ok.any():
        return
    finite = ref64[ok][torch.isfinite(ref64[ok])].abs()
    top = float(finite.max()) if finite.numel() else 0.0
    magnitude = torch.finfo(fast.dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
    if isinstance(atol, torch.Tensor):
        atol = atol.expand_as(ref64)[ok].max()
    err = (fast.double() - ref64).abs()[ok].max()
    bound = 2 * (same_dtype.double() - ref64).abs()[ok].max() + atol + magnitude
    assert err <= bound, f"{name}: max error {err.item():.3g} exceeds the earned {bound.item():.3g}"


class float64_everywhere(TorchFunctionMode):
    """Within it, a float32 that code asks torch for becomes float64 (dtype arguments, `.float()`): a model
    converted with `.double()` is then a float64 oracle all the way through, where library code would upcast to
    float32 (transformers' RMSNorm, attention and router softmax) and so round the reference to fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float:
            return args[0].double()
        up = lambda a: F64 if a is torch.float32 else a  # noqa: E731
        return func(*map(up, args), **{k: up(v) for k, v in (kwargs or {}).items()})


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor that a kernel is about to overwrite with NaN (floats) or a sentinel (ints)."""
    return t.fill_(float("nan") if t.is_floating_point() else -(2**30))


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty fills what it returns with poison for the duration of the block."""
    real = torch.empty

    def empty(*args, **kwargs):
        return poison_(real(*args, **kwargs))

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op thread count set to n for the block: the native ops' parallel paths (experts spread over
    threads, token chunks) run whatever the machine's core count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaNs included (torch.equal says NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return torch.equal(a, b)


def rand_experts(T, k, E, generator=None):
    """[T, k] int64 expert ids, distinct within a token (as top-k gives), uniformly random."""
    if T == 0:
        return torch.empty(0, k, dtype=torch.int64)
    return torch.rand(T, E).argsort(dim=1)[:, :k]


# --- independent oracles of the activations, and the comparisons built on assert_earned ----------------
def naive_act(v, activation, alpha=1.0):
    """The activations from their textbook formulas, on a float64 vector (silu with alpha: v sigmoid(alpha v))."""
    if activation == "silu":
        return v / (1 + torch.exp(-alpha * v))
    if activation == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    if activation == "gelu_tanh":
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    if activation == "relu":
        return torch.where(v > 0, v, torch.zeros_like(v))
    if activation == "identity":
        return v.clone()
    if activation == "relu2":
        return torch.where(v > 0, v, torch.zeros_like(v)) ** 2
    raise AssertionError(activation)


def naive_glu(h, activation, gated):
    """h: pre-activation vector [2H] when gated (gate half then up half, or alternating when the spec says
    interleaved), else [H]; the GLU options of moe_kernels' activation spec strings from their definitions."""
    from moe_kernels.reference.activations import parse_activation

    a = parse_activation(activation)
    if not gated:
        return naive_act(h, a.name, a.alpha)
    if a.interleaved:
        gate, up = h[0::2], h[1::2]
    else:
        gate, up = h[:h.shape[0] // 2], h[h.shape[0] // 2:]
    limit = a.limit
    if limit is not None:
        if not a.clamp_after:
            gate = torch.where(gate > limit, torch.full_like(gate, limit), gate)
        up = torch.where(up > limit, torch.full_like(up, limit), torch.where(up < -limit, torch.full_like(up, -limit), up))
    if a.up_softcap is not None:
        up = a.up_softcap * torch.tanh(up / a.up_softcap)
    if a.gate_softcap is not None:     # silu: the linear factor softcapped, the sigmoid on the gate itself
        g = a.gate_softcap * torch.tanh(gate / a.gate_softcap) / (1 + torch.exp(-a.alpha * gate))
    else:
        g = naive_act(gate, a.name, a.alpha)
    if limit is not None and a.clamp_after:
        g = torch.where(g > limit, torch.full_like(g, limit), g)
    return g * (up + a.up_offset)


# the GLU options of the transformers families, as activation spec strings (moe_kernels.reference.activations)
GLU_SPECS = ["silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]",      # GPT-OSS
             "silu[alpha=1.702,limit=7.0,up_offset=1.0]",                  # MiniMax-M3-VL, OpenAI privacy filter
             "silu[limit=10.0]",                                           # DeepSeek-V4, GLM-5 Next, HY-V4
             "silu[limit=7.0,clamp_after]",                                # Bailing hybrid, Step-3.7
             "silu[gate_softcap=2.0,up_softcap=3.0]",                      # Inkling2's softcapped SwiGLU
             "gelu_tanh[limit=2.0,up_offset=0.5,interleaved]"]             # every option on another activation


def torch_act(h, activation):
    """Plain PyTorch activations, for the same-dtype baseline of the earned tolerance."""
    return {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
            "identity": lambda t: t, "relu2": lambda t: F.relu(t).square()}[activation](h)


def torch_glu(h, activation, gated):
    if not gated:
        return torch_act(h, activation)
    gate, up = h.chunk(2, dim=-1)
    return torch_act(gate, activation) * up


BEYOND_EXP = [-math.inf, -3e38, -1e30, -1e4, -104.0, -90.0, -88.8, -88.6, -87.5, -86.0, -20.0, -1e-3, 0.0, 1e-3,
              20.0, 86.0, 87.5, 88.6, 88.8, 90.0, 104.0, 1e4, 1e30, 3e38, math.inf, math.nan]


def check_beyond_exp_range(activation, gated):
    """grouped_mm on the current backend at float32 pre-activations from -inf to inf (float32's exp overflows past
    88.72): the output and the input gradient are torch's activation of the same values, NaN where torch gives NaN;
    magnitudes under 1e-36 aside, where torch's own exp has already overflowed to a zero that is 1e-37 off. torch's
    float32 kernels differ by ISA (its AVX-512 gelu gives inf at 3e38 and NaN at inf, where float64 and its AVX2
    kernel give 3e38 and inf): torch's float64 value, rounded to float32, is accepted too."""
    from moe_kernels.ops import grouped_mm

    pre = torch.tensor(BEYOND_EXP * 2, dtype=torch.float32)[torch.randperm(2 * len(BEYOND_EXP))]
    a = pre[:, None].clone().requires_grad_()  # 52 rows in one group: a vectorised body and a tail
    w = torch.ones(1, 2 if gated else 1, 1)  # pre = a exactly; gated: the up half equals the gate
    offsets = torch.tensor([0, pre.numel()], dtype=torch.int32)
    out = grouped_mm(a, w, offsets, activation=activation, gated=gated)
    grad_a, = torch.autograd.grad(out, a, torch.ones_like(out))

    def torch_values(dtype):
        x = pre[:, None].to(dtype).requires_grad_()
        want = torch_glu(torch.cat([x, x], 1) if gated else x, activation, gated)
        want_grad, = torch.autograd.grad(want, x, torch.ones_like(want))
        return want.float(), want_grad.float()

    (want, want_grad), (want64, want_grad64) = torch_values(torch.float32), torch_values(F64)
    for name, got, expected, exact in (("out", out, want, want64), ("grad_a", grad_a, want_grad, want_grad64)):
        got, expected, exact = got.flatten(), expected.flatten(), exact.flatten()
        ok = (torch.isclose(got, expected, rtol=1e-5, atol=1e-36, equal_nan=True) |
              torch.isclose(got, exact, rtol=1e-5, atol=1e-36, equal_nan=True))
        bad = sorted({(p, g, e, x) for p, g, e, x, o in zip(pre.tolist(), got.tolist(), expected.tolist(),
                                                            exact.tolist(), ok.tolist()) if not o})
        assert not bad, f"{name}: (pre-activation, got, torch's, torch's in float64) {bad}"


def assert_earned_dtype(fast, ref64, same_dtype, atol=1e-6, name="output"):
    """The earned tolerance. float32: tests/helpers.assert_earned, elementwise, with two roundings of each element
    on top. float16/bfloat16: the same rule taken over the whole tensor, as flash-attention's tests write it
    (assert_earned_max). Elementwise it cannot
    hold in 16 bits: two correct computations that differ by one rounding step (CPU fp16 gelu rounds differently
    in its vectorised body and its scalar tail) fail wherever the baseline happens to round almost exactly."""
    assert fast.dtype == same_dtype.dtype and fast.shape == ref64.shape == same_dtype.shape
    if fast.dtype in (torch.float32, F64):
        # plus two roundings of each element itself: where the baseline happens to land exactly on the float64
        # value, another summation order still rounds its last steps (products, bias, activation) once more
        floor = 2 * torch.finfo(fast.dtype).eps * ref64.abs().nan_to_num(0.0, 0.0, 0.0)
        assert_earned(fast, ref64, same_dtype, atol=atol + floor, name=name)
    else:
        assert_earned_max(fast, ref64, same_dtype, atol=atol, name=name)


def reordered_sum_atol(ref64, dtype, n):
    """sqrt(n) ulps of the largest element: what summing n terms in another order may add under the usual
    rounding model. For outputs of few elements, where the baseline's max error alone is a small-sample
    statistic that the 2x rule cannot lean on."""
    return torch.finfo(dtype).eps * n**0.5 * ref64.abs().max().item() if ref64.numel() else 0.0


def assert_grads_close64(out, want, leaves, names):
    """The gradients of out and of its oracle want (float64) w.r.t. leaves agree, for a random output gradient."""
    grad_out = torch.randn_like(want)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref = torch.autograd.grad(want, leaves, grad_out)
    for name, g, r in zip(names, got, ref):
        assert_close64(g, r, f"grad of {name}")


def assert_close64(actual, expected, name="output"):
    """float64 against float64: only rounding differences are allowed."""
    assert actual.dtype == F64 and expected.dtype == F64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def routing_weight_grad_atol(inputs, grad, activation, gated, dtype):
    """sqrt(n) ulps of the largest sum of |terms| in the routing-weight gradient dL/dw[t, j] = dOut[t] . y_e(x[t])
    = dH . h (+ dOut . b): its terms can cancel to far below the result's own magnitude, so the ulps are taken of
    the terms (float64 of the inputs: x, experts, gate_up_proj, down_proj, biases; grad [T, O])."""
    from moe_kernels.reference.activations import glu

    x, ids, g = inputs["x"].double(), inputs["experts"], grad.double()
    up, down = inputs["gate_up_proj"].double(), inputs["down_proj"].double()
    up_b, down_b = inputs.get("gate_up_bias"), inputs.get("down_bias")
    largest = 0.0
    for e in range(up.shape[0]):
        t = torch.nonzero(ids == e, as_tuple=True)[0]
        if t.numel() == 0:
            continue
        pre = x[t] @ up[e].t() + (up_b[e].double() if up_b is not None else 0)
        terms = ((g[t] @ down[e]) * glu(pre, activation, gated)).abs().sum(-1)
        if down_b is not None:
            terms = terms + (g[t] * down_b[e].double()).abs().sum(-1)
        largest = max(largest, terms.max().item())
    n = up.shape[2] + down.shape[2]
    return torch.finfo(dtype).eps * n**0.5 * largest


def assert_moe_mlp_earned(run, inputs, grad, fast, dtype, n, **kw):
    """`fast` = (out, {name: grad}) of ops.moe_mlp on a fast path; `run(backend, inputs, grad, **kw)` gives the same
    on a backend. Output and every gradient against the float64 reference within the earned tolerance (sqrt(n)
    ulps for the reordered sums; the routing-weight gradient's ulps of its terms)."""
    out, grads = fast
    as64 = {k: (t.to(F64) if t is not None and t.is_floating_point() else t) for k, t in inputs.items()}
    out64, grads64 = run("reference", as64, grad.to(F64), **kw)
    same, grads_same = run("reference", inputs, grad, **kw)
    ulp = lambda ref: reordered_sum_atol(ref, dtype, n)  # noqa: E731
    assert_earned_max(out, out64, same, atol=ulp(out64))
    wtol = routing_weight_grad_atol(inputs, grad, kw.get("activation", "silu"), kw.get("gated", True), dtype)
    for name in grads:
        atol = ulp(grads64[name]) + (wtol if name == "weights" else 0)
        assert_earned_max(grads[name], grads64[name], grads_same[name], atol=atol, name=f"grad {name}")


MOE_MLP_DIFF = ("x", "weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


def run_moe_mlp(backend, inputs, grad, **kw):
    """(out, grads of every differentiable input) of ops.moe_mlp on `backend`; inputs: x, experts, weights,
    gate_up_proj, down_proj and optional biases."""
    import moe_kernels
    from moe_kernels import ops

    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()
              if n in MOE_MLP_DIFF and t is not None}
    args = {n: leaves.get(n, t) for n, t in inputs.items()}
    with moe_kernels.use_backend(backend):
        out = ops.moe_mlp(args.pop("x"), args.pop("experts"), args.pop("weights"), args.pop("gate_up_proj"),
                          args.pop("down_proj"), **args, **kw)
        grads = torch.autograd.grad(out, list(leaves.values()), grad)
    return out.detach(), dict(zip(leaves, grads))
