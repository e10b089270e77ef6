"""SoftMoE against a plain implementation of soft-moe-pytorch's math, written here (float64):

    x = l2normalize(x) * sqrt(d) * norm.gamma;  slot_embeds = l2normalize(slot_embeds) * sqrt(d) * slot_norm.gamma
    logits = einsum('b n d, e s d -> b n e s');  masked tokens -> -finfo.max
    dispatch = softmax over n;  combine = softmax over all (e s)
    slots = einsum('b n d, b n e s -> b e s d', x, dispatch);  expert e on slots[:, e] (a Python loop)
    out = einsum('b s d, b n s -> b n d', expert outputs [b, (e s), d], combine)

normalize="l2" (the paper): x = l2normalize(x), phi = logit_scale * l2normalize(slot_embeds), same rest.
Experts: Linear(d, h) + GELU + Linear(h, d), or GEGLU (Linear(d, 2h), gelu(gate) * value). NOTE: our
gate_up_proj puts the gate rows FIRST (soft-moe-pytorch's GEGLU chunk puts them second, so converting its
weights swaps the halves).
"""
import copy
import math

import pytest
import torch

from moe_kernels import SoftMoE

from ..helpers import assert_earned

F64 = torch.float64
# errors seen are ~1e-15 (values and gradients of magnitude ~1): 1e-12 keeps a wide margin, catches real errors
TOL = dict(rtol=1e-12, atol=1e-12)


def gelu(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def l2normalize(t):
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps


def loop_soft(m, x, mask=None):
    shape = x.shape
    if x.dim() == 4:                                   # 'b d h w -> b h w d', pack 'b * d'
        b, d, hh, ww = shape
        x = x.permute(0, 2, 3, 1).reshape(b, hh * ww, d)
    elif x.dim() == 2:                                 # 'b d -> b 1 d'
        x = x.unsqueeze(1)
    d = m.dim
    if m.normalize == "rms":
        x = l2normalize(x) * math.sqrt(d) * m.norm.gamma
        slot_embeds = l2normalize(m.slot_embeds) * math.sqrt(d) * m.slot_norm.gamma
    else:
        x = l2normalize(x)
        slot_embeds = m.logit_scale * l2normalize(m.slot_embeds)
    logits = torch.einsum("bnd,esd->bnes", x, slot_embeds)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, None, None], -torch.finfo(logits.dtype).max)
    dispatch = logits.softmax(dim=1)
    combine = logits.flatten(2).softmax(dim=-1)
    slots = torch.einsum("bnd,bnes->besd", x, dispatch)
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
    y = torch.stack(outs, dim=1).flatten(1, 2)        # 'b e s d -> b (e s) d'
    out = torch.einsum("bsd,bns->bnd", y, combine)
    if len(shape) == 4:
        return out.reshape(b, hh, ww, d).permute(0, 3, 1, 2)
    if len(shape) == 2:
        return out[:, 0]
    return out


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
