"""SoftMoE and DynamicSlotsSoftMoE against plain implementations of soft-moe-pytorch's math written here (float64),
and against soft-moe-pytorch itself where it is installed.

SoftMoE:
    x = l2normalize(x) * sqrt(d) * norm.gamma;  slot_embeds = l2normalize(slot_embeds) * sqrt(d) * slot_norm.gamma
    logits = einsum('b n d, e s d -> b n e s');  masked tokens -> -finfo.max
    dispatch = softmax over n;  combine = softmax over all (e s)
    slots = einsum('b n d, b n e s -> b e s d', x, dispatch);  expert e on slots[:, e] (a Python loop)
    out = einsum('b s d, b n s -> b n d', expert outputs [b, (e s), d], combine)
normalize="l2" (the paper): x = l2normalize(x), phi = logit_scale * l2normalize(slot_embeds), same rest.

DynamicSlotsSoftMoE: x normalised as above, padded with zero tokens to a multiple of E (padding masked); group g =
tokens g*E .. g*E+E-1, its (masked) mean projected by to_slot_embeds to E vectors, one per expert, each RMS-normalised:
slot (e, g). A group without a real token masks its slots (logit -finfo.max in both softmaxes). Then as SoftMoE over
the E * (n/E) slots; the padded tokens' outputs are dropped.

Experts: Linear(d, h) + GELU + Linear(h, d), or GEGLU (Linear(d, 2h), gelu(gate) * value). NOTE: our
gate_up_proj puts the gate rows FIRST (soft-moe-pytorch's GEGLU chunk puts them second, so converting its
weights swaps the halves).
"""
import copy
import math
import sys

import pytest
import torch

import moe_kernels

from moe_kernels import DynamicSlotsSoftMoE, SoftMoE
from moe_kernels.integrations.soft_moe_pytorch import convert_module

from moe_kernels.nn import soft as soft_nn

from ..conftest import cpu_backends
from ..helpers import _same_nans, assert_earned, reordered_sum_atol

F64 = torch.float64
# errors seen are ~1e-15 (values and gradients of magnitude ~1): 1e-12 keeps a wide margin, catches real errors
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(params=[(b, path) for b in cpu_backends() for path in ("shared", "flash")],
                ids=lambda p: "-".join(p))
def backend(request, monkeypatch):
    """Each CPU backend, on each of the modules' two slot paths: the [b, n, slots] logits made once and shared by
    dispatch and combine (ops.soft_logits, below SHARED_LOGITS_MAX), or the flash-style ops that never hold them."""
    name, path = request.param
    if path == "flash":
        monkeypatch.setattr(soft_nn, "SHARED_LOGITS_MAX", 0)
    with moe_kernels.use_backend(name):
        yield name


def gelu(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def l2normalize(t):
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps


def rms(t, gamma):
    return l2normalize(t) * math.sqrt(t.shape[-1]) * gamma


def as_tokens(x):
    """[b, n, d], [b, d] or [b, d, h, w] -> ([b, n, d], a function putting [b, n, d] back in x's layout)."""
    shape = x.shape
    if x.dim() == 4:                                   # 'b d h w -> b h w d', pack 'b * d'
        b, d, hh, ww = shape
        return x.permute(0, 2, 3, 1).reshape(b, hh * ww, d), lambda o: o.reshape(b, hh, ww, d).permute(0, 3, 1, 2)
    if x.dim() == 2:                                   # 'b d -> b 1 d'
        return x.unsqueeze(1), lambda o: o[:, 0]
    return x, lambda o: o


def loop_experts(m, slots):
    """slots [b, e, s, d] -> [b, (e s), d]: expert e on slots[:, e], one expert at a time."""
    ex = m.experts
    outs = []
    for e in range(m.num_experts):
        h = slots[:, e] @ ex.gate_up_proj[e].t() + ex.gate_up_bias[e]
        if ex.gated:
            H = ex.hidden_dim
            h = gelu(h[..., :H]) * h[..., H:]           # gate first, then value
        else:
            h = gelu(h)
        outs.append(h @ ex.down_proj[e].t() + ex.down_bias[e])
    return torch.stack(outs, dim=1).flatten(1, 2)


def soft_mix(x, slot_embeds, mask, keep_slots, experts):
    """x [b, n, d], slot_embeds [b, e, s, d], mask [b, n] | None, keep_slots [b, s] | None -> [b, n, d]."""
    logits = torch.einsum("bnd,besd->bnes", x, slot_embeds)
    low = -torch.finfo(logits.dtype).max
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, None, None], low)
    if keep_slots is not None:
        logits = logits.masked_fill(~keep_slots[:, None, None, :], low)
    dispatch = logits.softmax(dim=1)
    combine = logits.flatten(2).softmax(dim=-1)
    slots = torch.einsum("bnd,bnes->besd", x, dispatch)
    return torch.einsum("bsd,bns->bnd", experts(slots), combine)


def loop_soft(m, x, mask=None):
    x, restore = as_tokens(x)
    if m.normalize == "rms":
        x = rms(x, m.norm.gamma)
        slot_embeds = rms(m.slot_embeds, m.slot_norm.gamma)
    else:
        x = l2normalize(x)
        slot_embeds = m.logit_scale * l2normalize(m.slot_embeds)
    slot_embeds = slot_embeds.expand(x.shape[0], *slot_embeds.shape)
    return restore(soft_mix(x, slot_embeds, mask, None, lambda slots: loop_experts(m, slots)))


def loop_dynamic(m, x, mask=None):
    x, restore = as_tokens(x)
    b, n, d = x.shape
    E = m.num_experts
    x = rms(x, m.norm.gamma)
    pad = -n % E
    if pad:
        x = torch.cat([x, x.new_zeros(b, pad, d)], dim=1)
        real = mask if mask is not None else torch.ones(b, n, dtype=torch.bool)
        mask = torch.cat([real, torch.zeros(b, pad, dtype=torch.bool)], dim=1)
    G = x.shape[1] // E
    slot_embeds, keep = [], None if mask is None else torch.empty(b, G, dtype=torch.bool)
    for g in range(G):
        group = x[:, g * E:(g + 1) * E]               # [b, E, d]: E consecutive tokens
        if mask is None:
            mean = group.mean(1)
        else:
            w = mask[:, g * E:(g + 1) * E]
            mean = (group * w[..., None]).sum(1) / w.sum(1, keepdim=True).to(x.dtype).clamp_min(1e-5)
            keep[:, g] = w.any(1)
        per_expert = (mean @ m.to_slot_embeds.weight.t()).view(b, E, d)
        slot_embeds.append(rms(per_expert, m.slot_norm.gamma))
    slot_embeds = torch.stack(slot_embeds, dim=2)     # [b, E, G, d]
    out = soft_mix(x, slot_embeds, mask, keep, lambda slots: loop_experts(m, slots))
    return restore(out[:, :n])


def make(dim=8, normalize="rms", **kw):
    m = SoftMoE(dim, normalize=normalize, dtype=F64, **kw)
    with torch.no_grad():  # never the ones they start at: the gains must be applied where they belong
        if normalize == "rms":
            m.norm.gamma.uniform_(0.5, 1.5)
            m.slot_norm.gamma.uniform_(0.5, 1.5)
        else:
            m.logit_scale.uniform_(2.0, 5.0)
    return m


def assert_close(actual, expected, name="output"):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda s: f"{name}: {s}")


CASES = [
    pytest.param(dict(seq_len=16), (2, 16, 8), id="bnd-b2-n16-d8-E4-slots4"),
    # fewer tokens than seq_len, one slot per expert
    pytest.param(dict(num_slots=1, num_experts=3), (3, 5, 8), id="bnd-slots1-E3-n5"),
    pytest.param(dict(num_slots=3, num_experts=5, expert_mult=2, geglu=True), (2, 11, 8), id="geglu-E5-slots3"),
    pytest.param(dict(num_slots=2, normalize="l2"), (2, 9, 8), id="l2-normalize"),
    pytest.param(dict(num_slots=2, normalize="l2", geglu=True), (2, 9, 8), id="l2-geglu"),
    # odd d (7 * 4 * 2/3 = 18.67 -> 18 hidden for GEGLU)
    pytest.param(dict(dim=7, num_slots=2, geglu=True), (2, 6, 7), id="odd-d7-geglu"),
    # [b, d]: a single token (n = 1), every slot is that token
    pytest.param(dict(num_slots=2), (3, 8), id="single-token-bd"),
    # [b, d, h, w]: an image, flattened to h*w tokens and back
    pytest.param(dict(num_slots=2), (2, 8, 3, 5), id="image-b2-d8-h3-w5"),
    pytest.param(dict(num_slots=2, normalize="l2", geglu=True), (1, 8, 4, 3), id="image-l2-geglu"),
]


@pytest.mark.parametrize("cfg, shape", CASES)
def test_forward_matches_loop(cfg, shape, backend):
    cfg = dict(cfg)
    m = make(cfg.pop("dim", shape[1] if len(shape) == 4 else shape[-1]), **cfg)
    x = torch.randn(shape, dtype=F64)
    out = m(x)
    assert out.shape == x.shape
    assert_close(out, loop_soft(m, x))


@pytest.mark.parametrize("cfg", [pytest.param(dict(num_slots=2), id="rms"),
                                 pytest.param(dict(num_slots=3, normalize="l2", geglu=True), id="l2-geglu")])
def test_float32_within_earned_tolerance(cfg, backend):
    """fp32 module vs the loop in fp64, within twice the error of the same loop run in fp32 (+1e-6)."""
    m32 = make(**cfg).float()
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(2, 13, 8)
    mask = torch.rand(2, 13) < 0.7
    mask[:, 0] = True
    out = m32(x, mask=mask)
    assert out.dtype == torch.float32
    assert_earned(out, loop_soft(m64, x.double(), mask), loop_soft(m32, x, mask))


@pytest.mark.parametrize("shape", [(2, 9, 8), (2, 8, 3, 4)], ids=["bnd", "image"])
def test_noncontiguous_input(shape, backend):
    m = make(num_slots=2)
    x = torch.randn(tuple(reversed(shape)), dtype=F64).permute(*reversed(range(len(shape))))
    assert x.shape == shape and not x.is_contiguous()
    assert_close(m(x), loop_soft(m, x))


@pytest.mark.parametrize("cfg, shape", [
    pytest.param(dict(num_slots=2), (2, 10, 8), id="rms-bnd"),
    pytest.param(dict(num_slots=2, normalize="l2", geglu=True), (2, 10, 8), id="l2-geglu-bnd"),
    pytest.param(dict(num_slots=2, geglu=True), (2, 8, 3, 3), id="rms-geglu-image"),
])
def test_gradients_match_loop(cfg, shape, backend):
    m = make(**cfg)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    g = torch.randn(shape, dtype=F64)
    named = list(m.named_parameters())
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((m(x) * g).sum(), wrt)
    want = torch.autograd.grad((loop_soft(m, x) * g).sum(), wrt)
    for name, a, b in zip(["x"] + [n for n, _ in named], got, want):
        assert_close(a, b, name=f"grad {name}")
        assert a.abs().max() > 0, f"grad {name} is zero"


@pytest.mark.parametrize("normalize", ["rms", "l2"])
def test_mask(normalize, backend):
    """Masked tokens take no part in dispatch; their own output averages all slots. The last batch element is
    fully masked (the edge: dispatch falls back to a uniform mean of its tokens, as in soft-moe-pytorch)."""
    m = make(num_slots=2, normalize=normalize)
    b, n = 3, 12
    x = torch.randn(b, n, 8, dtype=F64, requires_grad=True)
    mask = torch.rand(b, n) < 0.6
    mask[0, 0] = mask[1, 1] = True   # at least one real token in the first two
    mask[1, 2] = False               # and at least one masked one
    mask[2] = False
    out = m(x, mask=mask)
    ref = loop_soft(m, x, mask)
    assert_close(out, ref)
    # a masked token's value does not reach any real token's output
    g = torch.randn_like(out)
    wrt = [x] + list(m.parameters())
    got = torch.autograd.grad((out * g).sum(), wrt)
    want = torch.autograd.grad((ref * g).sum(), wrt)
    for name, a, c in zip(["x"] + [n for n, _ in m.named_parameters()], got, want):
        assert_close(a, c, name=f"grad {name}")
    x2 = x.detach().clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 8, dtype=F64) * 3
    out2 = m(x2, mask=mask)
    assert_close(out2[0][mask[0]], out[0][mask[0]], name="real tokens after changing masked ones")
    assert_close(out2[1][mask[1]], out[1][mask[1]], name="real tokens after changing masked ones")


def test_all_true_mask_is_no_mask(backend):
    m = make(num_slots=2)
    x = torch.randn(2, 7, 8, dtype=F64)
    assert_close(m(x, mask=torch.ones(2, 7, dtype=torch.bool)), m(x))


def test_shapes_and_hidden_width():
    """soft-moe-pytorch's sizes: num_slots = seq_len // num_experts, hidden = int(d * mult) (GELU) or
    int(d * mult * 2 / 3) (GEGLU, whose first Linear is twice that wide)."""
    m = SoftMoE(12, seq_len=30, num_experts=4, expert_mult=3)
    assert m.num_slots == 7 and m.slot_embeds.shape == (4, 7, 12)
    assert m.experts.gate_up_proj.shape == (4, 36, 12) and m.experts.down_proj.shape == (4, 12, 36)
    g = SoftMoE(12, num_slots=5, num_experts=3, expert_mult=3, geglu=True)
    assert g.slot_embeds.shape == (3, 5, 12)
    assert g.experts.gate_up_proj.shape == (3, 2 * 24, 12) and g.experts.down_proj.shape == (3, 12, 24)
    assert g.experts.gate_up_bias.shape == (3, 48) and g.experts.down_bias.shape == (3, 12)


def test_dropout_only_in_training():
    m = make(num_slots=2, dropout=0.5)
    x = torch.randn(2, 9, 8, dtype=F64)
    assert_close(m.eval()(x), loop_soft(m, x))
    m.train()
    assert not torch.allclose(m(x), loop_soft(m, x), **TOL)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(), r"seq_len.*num_slots", id="neither"),
    pytest.param(dict(seq_len=16, num_slots=4), r"seq_len.*num_slots", id="both"),
    pytest.param(dict(seq_len=3, num_experts=4), r"num_slots", id="seq_len<num_experts"),
    pytest.param(dict(num_slots=0), r"num_slots", id="num_slots=0"),
    pytest.param(dict(num_slots=2, normalize="layer"), r"normalize", id="bad-normalize"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftMoE(8, **kwargs)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 7), (2, 7, 3, 3), (2, 3, 4, 5, 8)],
                         ids=["bnd-wrong-d", "bd-wrong-d", "image-wrong-d", "5d"])
def test_wrong_input_shape(shape):
    m = SoftMoE(8, num_slots=2)
    with pytest.raises(ValueError, match=r"\bx\b") as err:
        m(torch.randn(shape))
    assert str(tuple(shape)) in str(err.value)


def test_wrong_mask_shape():
    m = SoftMoE(8, num_slots=2)
    with pytest.raises(ValueError, match=r"mask"):
        m(torch.randn(2, 5, 8), mask=torch.ones(2, 6, dtype=torch.bool))


# --- SoftMoE: soft-moe-pytorch's other options ------------------------------------------------------------------
def test_use_layernorm_matches_loop(backend):
    """use_layernorm=True: F.layer_norm with the learned gain and a zero bias buffer, for tokens and slots."""
    m = SoftMoE(8, num_slots=2, use_layernorm=True, dtype=F64)
    with torch.no_grad():
        m.norm.gamma.uniform_(0.5, 1.5)
        m.slot_norm.gamma.uniform_(0.5, 1.5)
    assert m.norm.beta.count_nonzero() == 0 and "norm.beta" in m.state_dict()

    def layer_norm(t, gamma):
        c = t - t.mean(-1, keepdim=True)
        return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma

    x = torch.randn(2, 9, 8, dtype=F64)
    slot_embeds = layer_norm(m.slot_embeds, m.slot_norm.gamma).expand(2, *m.slot_embeds.shape)
    want = soft_mix(layer_norm(x, m.norm.gamma), slot_embeds, None, None, lambda slots: loop_experts(m, slots))
    assert_close(m(x), want)


def test_hidden_dim_overrides_expert_mult():
    m = SoftMoE(8, num_slots=2, hidden_dim=5, geglu=True)
    assert m.experts.gate_up_proj.shape == (4, 10, 8) and m.experts.down_proj.shape == (4, 8, 5)


def test_add_noise_adds_gumbel_noise_to_the_logits(backend):
    """add_noise: logits + noise_mult * Gumbel noise (u uniform, -log(-log(u))), drawn over the [b, n, e*s] logits
    in order; the same seed gives the same output, and noise_mult=0 none at all."""
    m = make(num_slots=2)
    x = torch.randn(2, 9, 8, dtype=F64)
    mask = torch.rand(2, 9) < 0.7
    mask[:, 0] = True
    torch.manual_seed(7)
    out = m(x, mask=mask, add_noise=True, noise_mult=0.5)
    torch.manual_seed(7)
    u = torch.zeros(2, 9, m.num_experts, m.num_slots, dtype=F64).uniform_(0, 1)
    gumbel = -torch.log(-torch.log(u))
    xn = rms(x, m.norm.gamma)
    slot_embeds = rms(m.slot_embeds, m.slot_norm.gamma)
    logits = torch.einsum("bnd,esd->bnes", xn, slot_embeds) + 0.5 * gumbel
    logits = logits.masked_fill(~mask[:, :, None, None], -torch.finfo(F64).max)
    slots = torch.einsum("bnd,bnes->besd", xn, logits.softmax(dim=1))
    want = torch.einsum("bsd,bns->bnd", loop_experts(m, slots), logits.flatten(2).softmax(dim=-1))
    assert_close(out, want)
    assert not torch.allclose(out, m(x, mask=mask), **TOL)
    assert_close(m(x, mask=mask, add_noise=True, noise_mult=0.0), m(x, mask=mask))


# --- DynamicSlotsSoftMoE against the loop ----------------------------------------------------------------------
def make_dynamic(dim=8, **kw):
    m = DynamicSlotsSoftMoE(dim, dtype=F64, **kw)
    with torch.no_grad():  # gains away from 1, so that each must be applied where it belongs
        m.norm.gamma.uniform_(0.5, 1.5)
        m.slot_norm.gamma.uniform_(0.5, 1.5)
    return m


def random_mask(shape, full_row=None):
    """About 40% masked, at least one real token per row; row `full_row` fully masked."""
    mask = torch.rand(shape) < 0.6
    mask[:, 0] = True
    if full_row is not None:
        mask[full_row] = False
    return mask


DYNAMIC_CASES = [
    pytest.param(dict(), (2, 12, 8), id="bnd-n12-E4"),                    # n a multiple of E: no padding
    pytest.param(dict(), (2, 11, 8), id="bnd-n11-E4-padded"),             # 1 zero token of padding
    pytest.param(dict(num_experts=3, geglu=True, expert_mult=2), (2, 7, 8), id="geglu-E3-n7"),
    pytest.param(dict(num_experts=5), (3, 3, 8), id="n3-fewer-tokens-than-E"),  # one group, mostly padding
    pytest.param(dict(num_experts=1), (2, 5, 8), id="E1"),                 # every token its own group
    pytest.param(dict(), (3, 8), id="single-token-bd"),                   # [b, d]: one token, padded to E
    pytest.param(dict(geglu=True), (2, 8, 3, 3), id="image-b2-d8-h3-w3"),  # 9 tokens, padded to 12
]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("cfg, shape", DYNAMIC_CASES)
def test_dynamic_forward_matches_loop(cfg, shape, masked, backend):
    m = make_dynamic(shape[1] if len(shape) == 4 else shape[-1], **cfg)
    x = torch.randn(shape, dtype=F64)
    n = math.prod(shape[2:]) if len(shape) == 4 else (shape[1] if len(shape) == 3 else 1)
    mask = random_mask((shape[0], n)) if masked else None
    out = m(x, mask=mask)
    assert out.shape == x.shape
    assert_close(out, loop_dynamic(m, x, mask))


@pytest.mark.parametrize("cfg, shape", [
    pytest.param(dict(), (3, 11, 8), id="bnd-padded"),
    pytest.param(dict(num_experts=3, geglu=True), (3, 9, 8), id="geglu-unpadded"),
])
def test_dynamic_gradients_match_loop(cfg, shape, backend):
    """Row 2 fully masked: every slot of it masked, dispatch and combine both uniform averages."""
    m = make_dynamic(**cfg)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    mask = random_mask(shape[:2], full_row=2)
    g = torch.randn(shape, dtype=F64)
    named = list(m.named_parameters())
    wrt = [x] + [p for _, p in named]
    got = torch.autograd.grad((m(x, mask=mask) * g).sum(), wrt)
    want = torch.autograd.grad((loop_dynamic(m, x, mask) * g).sum(), wrt)
    for name, a, b in zip(["x"] + [n for n, _ in named], got, want):
        assert_close(a, b, name=f"grad {name}")
        assert a.abs().max() > 0, f"grad {name} is zero"


def test_dynamic_masked_tokens_do_not_reach_real_ones(backend):
    m = make_dynamic()
    x = torch.randn(2, 10, 8, dtype=F64)
    mask = random_mask((2, 10))
    mask[:, 3] = False
    x2 = torch.where(mask[..., None], x, 3 * torch.randn_like(x))
    out, out2 = m(x, mask=mask), m(x2, mask=mask)
    assert_close(out2[mask], out[mask], name="real tokens after changing masked ones")


def test_dynamic_float32_within_earned_tolerance(backend):
    m32 = make_dynamic(geglu=True).float()
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(2, 13, 8)
    mask = random_mask((2, 13))
    out = m32(x, mask=mask)
    assert out.dtype == torch.float32
    assert_earned(out, loop_dynamic(m64, x.double(), mask), loop_dynamic(m32, x, mask))


def test_dynamic_shapes():
    """soft-moe-pytorch's sizes: to_slot_embeds Linear(d, d * E, bias=False), hidden int(d * mult) (GELU) or
    int(d * mult * 2 / 3) (GEGLU)."""
    m = DynamicSlotsSoftMoE(12, num_experts=3, expert_mult=3)
    assert m.to_slot_embeds.weight.shape == (36, 12) and m.to_slot_embeds.bias is None
    assert m.experts.gate_up_proj.shape == (3, 36, 12) and m.experts.down_proj.shape == (3, 12, 36)
    g = DynamicSlotsSoftMoE(12, num_experts=3, expert_mult=3, geglu=True)
    assert g.experts.gate_up_proj.shape == (3, 48, 12) and g.experts.down_bias.shape == (3, 12)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 7), (2, 7, 3, 3)], ids=["bnd-wrong-d", "bd-wrong-d", "image-wrong-d"])
def test_dynamic_wrong_input_shape(shape):
    m = DynamicSlotsSoftMoE(8)
    with pytest.raises(ValueError, match=r"\bx\b") as err:
        m(torch.randn(shape))
    assert str(tuple(shape)) in str(err.value)


def test_dynamic_wrong_mask_shape():
    with pytest.raises(ValueError, match=r"^mask must have shape \(2, 5\)"):
        DynamicSlotsSoftMoE(8)(torch.randn(2, 5, 8), mask=torch.ones(2, 6, dtype=torch.bool))


# --- against soft-moe-pytorch itself ----------------------------------------------------------------------------
def package():
    return pytest.importorskip("soft_moe_pytorch")


def randomize_(module):
    """Fresh random weights: gains around 1, every other parameter N(0, 0.5^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("gamma") else 0.5 * torch.randn_like(p))
    return module


def their_grads_in_our_layout(src, grads, geglu):
    """soft-moe-pytorch's parameter gradients {name: grad} -> ours, by our parameter names: the per-expert Linears
    stacked, and GEGLU's (value, gate) halves swapped to (gate, value)."""
    prefix = "experts.experts." if "experts.experts.0.0.weight" in grads else "experts."
    E = sum(1 for n in grads if n.startswith(prefix) and n.endswith(".0.weight"))

    def stack(suffix, swap=False):
        t = torch.stack([grads[f"{prefix}{e}.{suffix}"] for e in range(E)])
        return torch.cat(t.chunk(2, dim=1)[::-1], dim=1) if swap else t

    out = {"experts.gate_up_proj": stack("0.weight", geglu), "experts.gate_up_bias": stack("0.bias", geglu),
           "experts.down_proj": stack("3.weight"), "experts.down_bias": stack("3.bias")}
    renames = {"to_slot_embeds.0.weight": "to_slot_embeds.weight", "to_slot_embeds.2.gamma": "slot_norm.gamma"}
    for name, g in grads.items():
        if not name.startswith(prefix):
            out[renames.get(name, name)] = g
    return out


def outputs_and_grads(module, x, mask, g):
    """(output, {'x': dx, parameter name: gradient}) of sum(module(x, mask) * g)."""
    x = x.detach().requires_grad_()
    named = dict(module.named_parameters())
    out = module(x, mask=mask)
    grads = torch.autograd.grad((out * g).sum(), [x, *named.values()])
    return out.detach(), dict(zip(["x", *named], grads))


def compare_to_package(src, ours, x, mask, geglu):
    """float64: ours equals the package within rounding, output and every gradient."""
    g = torch.randn_like(x)
    want, want_grads = outputs_and_grads(src, x, mask, g)
    got, got_grads = outputs_and_grads(ours, x, mask, g)
    assert_close(got, want)
    want_grads = their_grads_in_our_layout(src, want_grads, geglu)
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in got_grads.items():
        assert_close(grad, want_grads[name], name=f"grad {name}")
        assert grad.abs().max() > 0, f"grad {name} is zero"


def _reorder(t, batch, tokens):
    """t shaped like x ([b, d], [b, n, d] or [b, d, h, w]) or a mask [b, n], its batch and token orders permuted."""
    t = t[batch]
    if tokens is None:
        return t
    if t.dim() == 4:
        return t.flatten(2)[:, :, tokens].view_as(t)
    return t[:, tokens]


def _experts_permuted(src, perm):
    """A copy of a soft-moe-pytorch module with its experts in the order perm: the same layer (the combine softmax
    runs over all slots, whatever their order), its slot sums taken in another order."""
    src = copy.deepcopy(src)
    with torch.no_grad():
        if hasattr(src, "slot_embeds"):
            src.slot_embeds.copy_(src.slot_embeds[perm])
            src.experts.experts = torch.nn.ModuleList([src.experts.experts[e] for e in perm])
        else:
            w = src.to_slot_embeds[0].weight                   # [E * d, d], rows grouped by expert
            w.copy_(w.view(len(perm), -1, w.shape[1])[perm].reshape(w.shape))
            src.experts = torch.nn.ModuleList([src.experts[e] for e in perm])
    return src


def _experts_unpermuted(grads, inv):
    """Our-layout gradients of _experts_permuted(src, perm) put back in the original expert order (inv = perm^-1)."""
    out = dict(grads)
    for name, g in grads.items():
        if name.startswith("experts.") or name == "slot_embeds":
            out[name] = g[inv]
        elif name == "to_slot_embeds.weight":
            out[name] = g.view(len(inv), -1, g.shape[1])[inv].reshape(g.shape)
    return out


def _token_order(n, group):
    """A random token order: any (group None), or one that keeps each full group of `group` consecutive tokens
    together (groups permuted, tokens permuted within each), the trailing partial group in place: for dynamic
    slots (a slot per group mean, the padded group last) the same layer."""
    if group is None:
        return torch.randperm(n)
    full = n // group
    blocks = torch.randperm(full).unsqueeze(1) * group + torch.argsort(torch.rand(full, group), dim=1)
    return torch.cat([blocks.flatten(), torch.arange(full * group, n)])


def _baseline_errors(src32, x, mask, g, ref_out, ref_grads, geglu, token_group, orders=3):
    """The package's own float32 error on this input, output and each gradient, as the max over its natural order
    and `orders` shuffled batch, token and expert orders: mathematically the same layer, its sums taken in other
    orders. One order's max error is a single draw of a heavy-tailed statistic (near-cancelling sums in the norm
    and softmax backwards); ours in any order must stay within twice the worst the package itself makes."""
    n = None if x.dim() == 2 else (x.shape[1] if x.dim() == 3 else math.prod(x.shape[2:]))
    E = len(src32.experts.experts if hasattr(src32, "slot_embeds") else src32.experts)
    worst = {}
    for i in range(orders + 1):
        batch = torch.randperm(x.shape[0]) if i else torch.arange(x.shape[0])
        tokens = None if n is None else (_token_order(n, token_group) if i else torch.arange(n))
        experts = torch.randperm(E) if i else torch.arange(E)
        undo_b, undo_t = batch.argsort(), (None if tokens is None else tokens.argsort())
        out, grads = outputs_and_grads(_experts_permuted(src32, experts), _reorder(x, batch, tokens).float(),
                                       None if mask is None else _reorder(mask, batch, tokens),
                                       _reorder(g, batch, tokens).float())
        grads = _experts_unpermuted(their_grads_in_our_layout(src32, grads, geglu), experts.argsort())
        grads["x"], out = _reorder(grads["x"], undo_b, undo_t), _reorder(out, undo_b, undo_t)
        for name, got in [("output", out), *grads.items()]:
            ref = ref_out if name == "output" else ref_grads[name]
            err = (got.double() - ref).abs().nan_to_num(0).max() if ref.numel() else torch.zeros((), dtype=F64)
            worst[name] = torch.maximum(worst.get(name, err), err)
    return worst


def compare_to_package_fp32(src64, ours32, x, mask, geglu, token_group=None):
    """float32: ours within twice the package's own fp32 error (both against the package in float64, the package's
    taken over several summation orders: _baseline_errors), plus what summing the x.numel() terms of a gradient in
    another order may add (the grouped GEMM, the slot ops). token_group=E where the token order is part of the math
    (dynamic slots average groups of E consecutive tokens): then the baseline's token orders keep the groups."""
    src32 = copy.deepcopy(src64).float()
    g = torch.randn_like(x)
    ref_out, ref_grads = outputs_and_grads(src64, x, mask, g)
    ref_grads = their_grads_in_our_layout(src64, ref_grads, geglu)
    base = _baseline_errors(src32, x, mask, g, ref_out, ref_grads, geglu, token_group)
    got_out, got_grads = outputs_and_grads(ours32, x.float(), mask, g.float())
    assert got_out.dtype == torch.float32

    def check(got, ref, name):
        label = name if name == "output" else f"grad {name}"
        _same_nans(got, ref, label)
        err = (got.double() - ref).abs().nan_to_num(0).max() if ref.numel() else 0.0
        bound = 2 * base[name] + 1e-5 + reordered_sum_atol(ref, torch.float32, x.numel())
        assert err <= bound, f"{label}: max error {float(err):.3g} exceeds the earned {float(bound):.3g}"

    check(got_out, ref_out, "output")
    for name, grad in got_grads.items():
        check(grad, ref_grads[name], name)


SOFT_INPUTS = [pytest.param((2, 11, 16), id="bnd"), pytest.param((3, 16), id="bd"),
               pytest.param((2, 16, 3, 4), id="image")]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SOFT_INPUTS)
@pytest.mark.parametrize("geglu", [False, True], ids=["gelu", "geglu"])
def test_soft_moe_matches_soft_moe_pytorch(geglu, shape, masked, backend):
    smp = package()
    src = randomize_(smp.SoftMoE(16, num_slots=3, num_experts=4, geglu=geglu).double())
    ours = SoftMoE.from_soft_moe_pytorch(src)
    x = torch.randn(shape, dtype=F64)
    n = math.prod(shape[2:]) if len(shape) == 4 else (shape[1] if len(shape) == 3 else 1)
    mask = random_mask((shape[0], n)) if masked and n > 1 else None
    compare_to_package(src, ours, x, mask, geglu)
    compare_to_package_fp32(src, SoftMoE.from_soft_moe_pytorch(copy.deepcopy(src).float()), x, mask, geglu)


def test_soft_moe_with_layernorm_and_noise_matches_soft_moe_pytorch(backend):
    smp = package()
    src = randomize_(smp.SoftMoE(16, seq_len=12, num_experts=3, use_layernorm=True).double())
    with torch.no_grad():
        src.norm.beta.uniform_(-0.5, 0.5)   # a buffer: copied too, though the package never changes it
    ours = SoftMoE.from_soft_moe_pytorch(src)
    x = torch.randn(2, 12, 16, dtype=F64)
    mask = random_mask((2, 12))
    compare_to_package(src, ours, x, mask, geglu=False)
    torch.manual_seed(11)
    want = src(x, mask=mask, add_noise=True, noise_mult=0.3)
    torch.manual_seed(11)
    assert_close(ours(x, mask=mask, add_noise=True, noise_mult=0.3), want, name="noised output")


DYNAMIC_INPUTS = [pytest.param((2, 11, 16), id="bnd-n11"), pytest.param((2, 12, 16), id="bnd-n12"),
                  pytest.param((2, 16, 3, 3), id="image-9")]  # the package has no [b, d] case here


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", DYNAMIC_INPUTS)
@pytest.mark.parametrize("geglu", [False, True], ids=["gelu", "geglu"])
def test_dynamic_slots_matches_soft_moe_pytorch(geglu, shape, masked, backend):
    smp = package()
    src = randomize_(smp.DynamicSlotsSoftMoE(16, num_experts=4, geglu=geglu).double())
    ours = DynamicSlotsSoftMoE.from_soft_moe_pytorch(src)
    x = torch.randn(shape, dtype=F64)
    n = math.prod(shape[2:]) if len(shape) == 4 else shape[1]
    mask = random_mask((shape[0], n)) if masked else None
    if masked:
        mask[1, 4:8] = False   # a whole group of row 1 masked: its slots are masked too
    compare_to_package(src, ours, x, mask, geglu)
    ours32 = DynamicSlotsSoftMoE.from_soft_moe_pytorch(copy.deepcopy(src).float())
    compare_to_package_fp32(src, ours32, x, mask, geglu, token_group=ours32.num_experts)


@pytest.mark.parametrize("kind", ["soft", "dynamic"])
def test_from_soft_moe_pytorch_copies_weights(kind):
    """Stacked per-expert Linears; GEGLU's value rows (the package's first half) go second."""
    smp = package()
    if kind == "soft":
        src = smp.SoftMoE(8, num_slots=2, num_experts=3, geglu=True, dropout=0.25, expert_mult=2)
        mlps, ours = src.experts.experts, SoftMoE.from_soft_moe_pytorch(src)
        assert torch.equal(ours.slot_embeds, src.slot_embeds)
    else:
        src = smp.DynamicSlotsSoftMoE(8, num_experts=3, geglu=True, dropout=0.25, expert_mult=2)
        mlps, ours = src.experts, DynamicSlotsSoftMoE.from_soft_moe_pytorch(src)
        assert torch.equal(ours.to_slot_embeds.weight, src.to_slot_embeds[0].weight)
    H = mlps[0][3].in_features
    assert ours.experts.hidden_dim == H == int(8 * 2 * 2 / 3) and ours.experts.gated
    assert ours.dropout.p == 0.25 and ours.training
    for e, mlp in enumerate(mlps):
        value, gate = mlp[0].weight.chunk(2)
        assert torch.equal(ours.experts.gate_up_proj[e][:H], gate)
        assert torch.equal(ours.experts.gate_up_proj[e][H:], value)
        assert torch.equal(ours.experts.down_proj[e], mlp[3].weight)
        assert torch.equal(ours.experts.down_bias[e], mlp[3].bias)
    # the copies are independent parameters
    with torch.no_grad():
        ours.experts.down_proj.add_(1)
    assert not torch.equal(ours.experts.down_proj[0], mlps[0][3].weight)


def test_convert_module():
    smp = package()
    soft, dynamic = smp.SoftMoE(8, num_slots=2).eval(), smp.DynamicSlotsSoftMoE(8)
    new = convert_module(soft)
    assert type(new) is SoftMoE and not new.training
    assert type(convert_module(dynamic)) is DynamicSlotsSoftMoE
    assert convert_module(torch.nn.Linear(8, 8)) is None
    assert convert_module(SoftMoE(8, num_slots=2)) is None     # already fused


def test_moe_kernels_convert_replaces_soft_moe_pytorch_layers_in_a_model():
    smp = package()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), smp.SoftMoE(8, seq_len=6, num_experts=2),
                                smp.DynamicSlotsSoftMoE(8, num_experts=2)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    before = model(x)
    moe_kernels.convert(model, strict=True)
    assert [type(m) for m in model] == [torch.nn.Linear, SoftMoE, DynamicSlotsSoftMoE]
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)


def test_convert_module_without_the_package(monkeypatch):
    # without soft_moe_pytorch imported no module can be one of its instances, and nothing imports it
    monkeypatch.delitem(sys.modules, "soft_moe_pytorch", raising=False)
    assert convert_module(torch.nn.Linear(8, 8)) is None
    assert "soft_moe_pytorch" not in sys.modules


@pytest.mark.parametrize("kind", ["soft", "dynamic"])
def test_slot_path_follows_the_logits_budget(kind, monkeypatch):
    # at most shared_logits_max logits ([b, n, slots]): made once (ops.soft_logits); above: the flash-style ops
    calls = []
    for name in ("soft_logits", "soft_dispatch"):
        fn = getattr(moe_kernels.ops, name)
        monkeypatch.setattr(moe_kernels.ops, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    m = SoftMoE(8, num_slots=3, num_experts=2) if kind == "soft" else DynamicSlotsSoftMoE(8, num_experts=2)
    x = torch.randn(2, 6, 8)
    slots = 6
    for limit, want in ((2 * 6 * slots, "soft_logits"), (2 * 6 * slots - 1, "soft_dispatch")):
        m.shared_logits_max = limit
        calls.clear()
        m(x).sum().backward()
        assert calls == [want], (limit, calls)
