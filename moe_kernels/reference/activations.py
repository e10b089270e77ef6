"""Activations of the expert MLPs and their derivatives (used by every backward that recomputes them)."""
import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "identity":
        return h
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def act_grad(h: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(h) / dh, elementwise."""
    if activation == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(h * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * h * h) * (1 / math.sqrt(2 * math.pi))
        return cdf + h * pdf
    if activation == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (h + 0.044715 * h**3)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * 0.044715 * h * h)
    if activation == "relu":
        return (h <= 0).logical_not().to(h.dtype)  # 1 at NaN, as torch's threshold_backward passes the gradient
    if activation == "identity":
        return torch.ones_like(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def glu(h: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """h: [..., 2H] (gate first, then up) when gated, else [..., H] -> [..., H]."""
    if not gated:
        return act(h, activation)
    gate, up = h.chunk(2, dim=-1)
    return act(gate, activation) * up


def act_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(h), elementwise; relu selects as torch's threshold_backward does (0 where h <= 0, grad
    elsewhere), so an infinite gradient at a negative h gives 0, not 0 * inf."""
    if activation == "relu":
        return torch.where(h <= 0, torch.zeros_like(grad), grad)
    return grad * act_grad(h, activation)


def glu_backward(grad: torch.Tensor, h: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """Gradient of `glu` w.r.t. its pre-activation h, given the gradient of its output."""
    if not gated:
        return act_backward(grad, h, activation)
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([act_backward(grad * up, gate, activation), grad * act(gate, activation)], dim=-1)
