"""Activations of the expert MLPs and their derivatives (used by every backward that recomputes them).

An activation is named by a spec string: a base activation (ACTIVATIONS) and, for gated experts, the GLU variants
the MoE families use, in brackets:

    "silu"                                        act(gate) * up                    (Mixtral, Qwen, DeepSeek, ...)
    "silu[alpha=1.702,limit=7,up_offset=1,interleaved]"
                                                  GPT-OSS: gate and up interleaved (gate in the even rows of
                                                  gate_up_proj), gate <= 7, -7 <= up <= 7,
                                                  gate * sigmoid(1.702 gate) * (up + 1)
    "silu[limit=10]"                              DeepSeek-V4 / GLM-5 Next / HY-V4: the same clamps, silu, no offset
    "silu[limit=7,clamp_after]"                   Bailing hybrid / Step-3.7: the gate's clamp after the activation
    "silu[gate_softcap=20,up_softcap=30]"         Inkling2: c tanh(gate / c) * sigmoid(gate) * c' tanh(up / c')
    "relu2"                                       Nemotron-H: relu(x)^2

Options: alpha (silu only: a(g) = g * sigmoid(alpha g)), limit (gate clamped from above, up to [-limit, limit]),
clamp_after (the gate's clamp applied to act(gate) instead of gate), up_offset (up + up_offset), interleaved
(gate and up columns alternate instead of gate half then up half), gate_softcap (silu only: the linear factor g of
g * sigmoid(alpha g) softcapped to c tanh(g / c), the sigmoid seeing g itself), up_softcap (up softcapped alike). The clamps' gradients follow torch.clamp: they
pass where the input lies within the bounds, bounds included. Options other than alpha need gated experts.
"""
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity", "relu2")
_OPTION = re.compile(r"(alpha|limit|up_offset|gate_softcap|up_softcap)=([-+0-9.eE]+(?:inf)?)|(clamp_after|interleaved)")


@dataclass(frozen=True)
class Activation:
    """A parsed activation spec (see the module docstring); str() gives its canonical spec string."""
    name: str
    alpha: float = 1.0
    limit: Optional[float] = None
    clamp_after: bool = False
    up_offset: float = 0.0
    interleaved: bool = False
    gate_softcap: Optional[float] = None
    up_softcap: Optional[float] = None

    @property
    def plain(self) -> bool:
        """No option: the base activation alone (gate half first when gated)."""
        return self == Activation(self.name)

    def __str__(self):
        opts = ([f"alpha={self.alpha!r}"] if self.alpha != 1.0 else []) + (
            [f"limit={self.limit!r}"] if self.limit is not None else []) + (
            ["clamp_after"] if self.clamp_after else []) + (
            [f"up_offset={self.up_offset!r}"] if self.up_offset != 0.0 else []) + (
            ["interleaved"] if self.interleaved else []) + (
            [f"gate_softcap={self.gate_softcap!r}"] if self.gate_softcap is not None else []) + (
            [f"up_softcap={self.up_softcap!r}"] if self.up_softcap is not None else [])
        return self.name + (f"[{','.join(opts)}]" if opts else "")


_PARSED: dict = {}     # spec string -> Activation (a plain dict: torch.compile traces through it without a warning)


def parse_activation(spec) -> Activation:
    """The Activation of a spec string (or an Activation, returned as it is); ValueError naming what is wrong."""
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str) and spec in _PARSED:
        return _PARSED[spec]
    act = _parse(spec)
    _PARSED[spec] = act
    return act


def _parse(spec) -> Activation:
    if not isinstance(spec, str):
        raise ValueError(f"activation must be a string, one of {ACTIVATIONS} with optional [options], got {spec!r}")
    m = re.fullmatch(r"\s*([a-z_0-9]+)\s*(?:\[(.*)\])?\s*", spec)
    if m is None or m.group(1) not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, optionally with [alpha=, limit=, clamp_after, "
                         f"up_offset=, interleaved], got {spec!r}")
    name, kwargs = m.group(1), {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        opt = _OPTION.fullmatch(part)
        if opt is None:
            raise ValueError(f"activation {spec!r}: unknown option {part!r} (alpha=, limit=, clamp_after, up_offset=, "
                             "interleaved)")
        if opt.group(3):
            kwargs[opt.group(3)] = True
        else:
            try:
                kwargs[opt.group(1)] = float(opt.group(2))
            except ValueError:
                raise ValueError(f"activation {spec!r}: {opt.group(1)} must be a number, got {opt.group(2)!r}") from None
    act = Activation(name, **kwargs)
    if (act.alpha != 1.0 or act.gate_softcap is not None) and name != "silu":
        raise ValueError(f"activation {spec!r}: alpha and gate_softcap apply to silu only")
    for cap in (act.gate_softcap, act.up_softcap):
        if cap is not None and not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"activation {spec!r}: a softcap must be a finite number > 0")
    if act.limit is not None and not (act.limit > 0 and math.isfinite(act.limit)):
        raise ValueError(f"activation {spec!r}: limit must be a finite number > 0")
    if not math.isfinite(act.alpha) or not math.isfinite(act.up_offset):
        raise ValueError(f"activation {spec!r}: alpha and up_offset must be finite")
    if act.clamp_after and act.limit is None:
        raise ValueError(f"activation {spec!r}: clamp_after needs a limit")
    return act


def check_activation(activation, gated: bool = True) -> Activation:
    """The parsed activation; ValueError for an unknown one, or for GLU options on experts that are not gated."""
    act = parse_activation(activation)
    if not gated and (act.limit is not None or act.up_offset or act.interleaved or act.gate_softcap is not None
                      or act.up_softcap is not None):
        raise ValueError(f"activation {activation!r}: limit, up_offset, interleaved and the softcaps need gated experts "
                         "(gated=True)")
    return act


def act(h: torch.Tensor, activation) -> torch.Tensor:
    """The base activation (and alpha) of `activation`, elementwise."""
    a = parse_activation(activation)
    if a.name == "silu":
        if a.gate_softcap is not None:
            return a.gate_softcap * torch.tanh(h / a.gate_softcap) * torch.sigmoid(a.alpha * h)
        return F.silu(h) if a.alpha == 1.0 else h * torch.sigmoid(a.alpha * h)
    if a.name == "gelu":
        return F.gelu(h)
    if a.name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if a.name == "relu":
        return F.relu(h)
    if a.name == "relu2":
        return F.relu(h).square()
    return h


def act_grad(h: torch.Tensor, activation) -> torch.Tensor:
    """d act(h) / dh, elementwise."""
    a = parse_activation(activation)
    if a.name == "silu":
        s = torch.sigmoid(a.alpha * h)
        if a.gate_softcap is not None:
            t = torch.tanh(h / a.gate_softcap)
            return (1 - t * t) * s + a.gate_softcap * t * a.alpha * s * (1 - s)
        return s * (1 + a.alpha * h * (1 - s))
    if a.name == "gelu":
        cdf = 0.5 * (1 + torch.erf(h * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * h * h) * (1 / math.sqrt(2 * math.pi))
        return cdf + h * pdf
    if a.name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (h + 0.044715 * h**3)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * 0.044715 * h * h)
    if a.name == "relu":
        return (h <= 0).logical_not().to(h.dtype)  # 1 at NaN, as torch's threshold_backward passes the gradient
    if a.name == "relu2":
        return 2 * F.relu(h)
    return torch.ones_like(h)


def act_backward(grad: torch.Tensor, h: torch.Tensor, activation) -> torch.Tensor:
    """grad * act'(h), elementwise; relu (and relu^2) select as torch's threshold_backward does (0 where h <= 0,
    the gradient elsewhere), so an infinite gradient at a negative h gives 0, not 0 * inf."""
    name = parse_activation(activation).name
    if name == "relu":
        return torch.where(h <= 0, torch.zeros_like(grad), grad)
    if name == "relu2":       # 2 relu(h) relu'(h): selected as relu's, so an infinite grad at h <= 0 gives 0
        return torch.where(h <= 0, torch.zeros_like(grad), grad * (2 * h))
    return grad * act_grad(h, activation)


def _halves(h: torch.Tensor, a: Activation):
    if a.interleaved:
        return h[..., 0::2], h[..., 1::2]
    return h.chunk(2, dim=-1)


def _join(gate: torch.Tensor, up: torch.Tensor, a: Activation) -> torch.Tensor:
    if a.interleaved:
        return torch.stack([gate, up], dim=-1).flatten(-2)
    return torch.cat([gate, up], dim=-1)


def _within(t: torch.Tensor, low: Optional[float], high: float) -> torch.Tensor:
    """Where torch.clamp passes the gradient: low <= t <= high (NaN: nowhere)."""
    ok = t <= high
    return ok & (t >= low) if low is not None else ok


def glu(h: torch.Tensor, activation, gated: bool) -> torch.Tensor:
    """h: [..., 2H] (gate and up, see the spec's layout) when gated, else [..., H] -> [..., H]."""
    a = check_activation(activation, gated)
    if not gated:
        return act(h, a)
    gate, up = _halves(h, a)
    if a.limit is not None:
        if not a.clamp_after:
            gate = gate.clamp(max=a.limit)
        up = up.clamp(min=-a.limit, max=a.limit)
    if a.up_softcap is not None:
        up = a.up_softcap * torch.tanh(up / a.up_softcap)
    g = act(gate, a)
    if a.limit is not None and a.clamp_after:
        g = g.clamp(max=a.limit)
    return g * (up + a.up_offset) if a.up_offset else g * up


def glu_backward(grad: torch.Tensor, h: torch.Tensor, activation, gated: bool) -> torch.Tensor:
    """Gradient of `glu` w.r.t. its pre-activation h, given the gradient of its output."""
    a = check_activation(activation, gated)
    if not gated:
        return act_backward(grad, h, a)
    gate, up = _halves(h, a)
    zero = torch.zeros_like(grad)
    if a.limit is not None:
        gate_in = gate if a.clamp_after else gate.clamp(max=a.limit)
        up_c = up.clamp(min=-a.limit, max=a.limit)
    else:
        gate_in, up_c = gate, up
    if a.up_softcap is not None:
        t_up = torch.tanh(up_c / a.up_softcap)
        up_c = a.up_softcap * t_up
    g = act(gate_in, a)
    if a.limit is not None and a.clamp_after:
        d_g = torch.where(_within(g, None, a.limit), grad * (up_c + a.up_offset), zero)
        g = g.clamp(max=a.limit)
    else:
        d_g = grad * (up_c + a.up_offset)
    d_gate = act_backward(d_g, gate_in, a)
    d_up = grad * g
    if a.up_softcap is not None:
        d_up = d_up * (1 - t_up * t_up)
    if a.limit is not None:
        if not a.clamp_after:
            d_gate = torch.where(_within(gate, None, a.limit), d_gate, zero)
        d_up = torch.where(_within(up, -a.limit, a.limit), d_up, zero)
    return _join(d_gate, d_up, a)
