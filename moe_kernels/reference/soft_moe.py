"""Soft-MoE slot dispatch and combine (Puigcerver et al. 2023), both attention-shaped.

logits[b, n, s] = x[b, n] . phi[b, s]. Dispatch: slots = softmax over tokens n of the logits, applied to x
(queries = slots, keys = values = tokens). Combine: out = softmax over slots s, applied to the expert
outputs y (queries = tokens, keys = slots). A token with mask False, or a slot with slot_mask False, gets
the logit -finfo.max in both (soft-moe-pytorch's semantics: a masked token takes no part in dispatch and in
combine averages the slots; a masked slot gets no weight in combine; a row whose logits are all masked is a
uniform average).
"""
import torch


def _logits(x, phi, mask, slot_mask=None):
    """x: [B, N, D], phi: [S, D] or [B, S, D], mask: [B, N] bool, slot_mask: [B, S] bool -> logits [B, N, S]."""
    logits = torch.matmul(x, phi.transpose(-1, -2))
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(-1), -torch.finfo(logits.dtype).max)
    if slot_mask is not None:
        logits = logits.masked_fill(~slot_mask.unsqueeze(1), -torch.finfo(logits.dtype).max)
    return logits


def _filled(mask, slot_mask):
    """[B, N, S] bool where the logit was filled (its gradient is zero), or None."""
    if mask is None and slot_mask is None:
        return None
    f = ~mask.unsqueeze(-1) if mask is not None else False
    return f | ~slot_mask.unsqueeze(1) if slot_mask is not None else f


def soft_dispatch(x, phi, mask=None, slot_mask=None):
    """-> slots [B, S, D] = softmax_n(logits)^T x."""
    p = _logits(x, phi, mask, slot_mask).softmax(dim=1)
    return torch.matmul(p.transpose(1, 2), x)


def soft_combine(x, phi, y, mask=None, slot_mask=None):
    """y: [B, S, D] -> out [B, N, D] = softmax_s(logits) y."""
    p = _logits(x, phi, mask, slot_mask).softmax(dim=2)
    return torch.matmul(p, y)


def _lse(logits, dim):
    """logsumexp in at least fp32 (float64 stays float64)."""
    return (logits if logits.dtype == torch.float64 else logits.float()).logsumexp(dim)


def soft_dispatch_forward(x, phi, mask=None, slot_mask=None):
    """-> (slots [B, S, D], lse [B, S]): soft_dispatch and the logsumexp over tokens of each slot's logits (fp32,
    float64 for float64), the statistic a flash-style backward recomputes the weights from."""
    logits = _logits(x, phi, mask, slot_mask)
    return torch.matmul(logits.softmax(dim=1).transpose(1, 2), x), _lse(logits, 1)


def soft_combine_forward(x, phi, y, mask=None, slot_mask=None):
    """-> (out [B, N, D], lse [B, N]): soft_combine and the logsumexp over slots of each token's logits."""
    logits = _logits(x, phi, mask, slot_mask)
    return torch.matmul(logits.softmax(dim=2), y), _lse(logits, 2)


def _reduce_phi(g, phi):
    return g.sum(0) if phi.dim() == 2 else g


def soft_dispatch_backward(grad, x, phi, mask=None, slot_mask=None):
    """grad: [B, S, D] -> (grad_x [B, N, D], grad_phi like phi)."""
    p = _logits(x, phi, mask, slot_mask).softmax(dim=1)            # [B, N, S]
    dp = torch.matmul(x, grad.transpose(1, 2))                     # [B, N, S]
    dl = p * (dp - (dp * p).sum(1, keepdim=True))                  # softmax over n
    filled = _filled(mask, slot_mask)
    if filled is not None:
        dl = dl.masked_fill(filled, 0)
    phi_b = phi.expand(x.shape[0], *phi.shape[-2:])
    grad_x = torch.matmul(p, grad) + torch.matmul(dl, phi_b)
    grad_phi = _reduce_phi(torch.matmul(dl.transpose(1, 2), x), phi)
    return grad_x, grad_phi


def soft_combine_backward(grad, x, phi, y, mask=None, slot_mask=None):
    """grad: [B, N, D] -> (grad_x, grad_phi, grad_y)."""
    p = _logits(x, phi, mask, slot_mask).softmax(dim=2)            # [B, N, S]
    grad_y = torch.matmul(p.transpose(1, 2), grad)
    dp = torch.matmul(grad, y.transpose(1, 2))                     # [B, N, S]
    dl = p * (dp - (dp * p).sum(2, keepdim=True))                  # softmax over s
    filled = _filled(mask, slot_mask)
    if filled is not None:
        dl = dl.masked_fill(filled, 0)
    phi_b = phi.expand(x.shape[0], *phi.shape[-2:])
    grad_x = torch.matmul(dl, phi_b)
    grad_phi = _reduce_phi(torch.matmul(dl.transpose(1, 2), x), phi)
    return grad_x, grad_phi, grad_y


# --- the shared-logits form: the [B, N, S] logits made once, read by both mixes ------------------------------
# soft_dispatch(x, phi) == soft_dispatch_logits(soft_logits(x, phi), x), and likewise for combine; the gradient of
# the logits from both mixes is summed before the two GEMMs that take it back to x and phi.
def soft_logits(x, phi, mask=None, slot_mask=None):
    """-> logits [B, N, S] = x . phi^T, masked entries -finfo(dtype).max."""
    return _logits(x, phi, mask, slot_mask)


def soft_logits_backward(grad, x, phi, mask=None, slot_mask=None):
    """grad: [B, N, S] -> (grad_x [B, N, D], grad_phi like phi); filled logits take no gradient."""
    filled = _filled(mask, slot_mask)
    if filled is not None:
        grad = grad.masked_fill(filled, 0)
    B, N, S = grad.shape
    D = x.shape[-1]
    if phi.dim() == 2:  # one GEMM each over the whole batch (K = B*N for grad_phi), no [B, S, D] to sum
        flat = grad.reshape(B * N, S)
        return torch.matmul(flat, phi).view(B, N, D), torch.matmul(flat.t(), x.reshape(B * N, D))
    return torch.matmul(grad, phi), torch.matmul(grad.transpose(1, 2), x)


def _softmax(logits, dim):
    """softmax along dim, computed in at least fp32, in logits' dtype. A fully filled row is the uniform average."""
    return torch.softmax(logits, dim, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32).to(logits.dtype)


def _softmax_backward(p, dp, dim):
    """The logits' gradient p * (dp - sum_j p_j dp_j) of a softmax p along dim, in place of dp."""
    return dp.sub_((p * dp).sum(dim, keepdim=True)).mul_(p)


def soft_dispatch_logits(logits, x):
    """logits: [B, N, S], x: [B, N, D] -> slots [B, S, D] = softmax_n(logits)^T x."""
    return torch.matmul(_softmax(logits, 1).transpose(1, 2), x)


def soft_dispatch_logits_backward(grad, logits, x):
    """grad: [B, S, D] -> (grad_logits [B, N, S], grad_x [B, N, D])."""
    p = _softmax(logits, 1)
    return _softmax_backward(p, torch.matmul(x, grad.transpose(1, 2)), 1), torch.matmul(p, grad)


def soft_combine_logits(logits, y):
    """logits: [B, N, S], y: [B, S, Dy] -> out [B, N, Dy] = softmax_s(logits) y."""
    return torch.matmul(_softmax(logits, 2), y)


def soft_combine_logits_backward(grad, logits, y):
    """grad: [B, N, Dy] -> (grad_logits [B, N, S], grad_y [B, S, Dy])."""
    p = _softmax(logits, 2)
    return _softmax_backward(p, torch.matmul(grad, y.transpose(1, 2)), 2), torch.matmul(p.transpose(1, 2), grad)
