"""Top-k routing: scores, correction bias, group-limited selection, renormalisation, loss statistics.

The spec of `moe_kernels.ops.topk_route`. Scores are taken in fp32 (fp64 stays fp64).
"""
import torch

SCORES = ("softmax", "sigmoid")
EPS = 1e-20  # DeepSeek-V3's guard in the renormalisation; below one ulp of any real denominator


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    """logits [T, E] -> scores [T, E] in the compute dtype."""
    z = logits.to(compute_dtype(logits.dtype))
    return z.softmax(-1) if score == "softmax" else z.sigmoid()


def loss_probs(s: torch.Tensor, score: str) -> torch.Tensor:
    """The per-token distribution over experts that the load-balancing loss averages."""
    return s if score == "softmax" else s / (s.sum(-1, keepdim=True) + EPS)


def select_experts(s: torch.Tensor, k: int, bias=None, num_groups=None, topk_groups=None) -> torch.Tensor:
    """Indices [T, k] of the chosen experts, by descending score; ties go to the lower index. `bias` shifts
    only the choice; with groups, only experts of the `topk_groups` groups with the largest sum of their
    top-2 (biased) scores may be chosen (ties again to the lower group index)."""
    choice = s if bias is None else s + bias.to(s.dtype)
    if num_groups is not None and num_groups > 1:
        T, E = choice.shape
        grouped = choice.view(T, num_groups, E // num_groups)
        group_score = grouped.topk(min(2, E // num_groups), dim=-1).values.sum(-1)  # [T, G]
        top_groups = _topk_stable(group_score, topk_groups)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    return _topk_stable(choice, k)


def _topk_stable(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row, ties to the lower index (torch.topk leaves ties open)."""
    return torch.sort(v, dim=-1, descending=True, stable=True).indices[:, :k].contiguous()


def topk_route(logits, k, *, score="softmax", renormalize=True, bias=None, num_groups=None, topk_groups=None,
               scale=1.0):
    """logits: [T, E] -> (weights [T, k] fp32/fp64, experts [T, k] int64, counts [E] int32,
    prob_sum [E] (sum over tokens of the load-balancing probabilities), lse [T] (logsumexp of logits))."""
    s = scores(logits, score)
    experts = select_experts(s, k, bias, num_groups, topk_groups)
    weights = s.gather(1, experts)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + EPS)
    weights = weights * scale
    E = logits.shape[1]
    counts = torch.bincount(experts.flatten(), minlength=E).to(torch.int32)
    prob_sum = loss_probs(s, score).sum(0)
    lse = torch.logsumexp(logits.to(s.dtype), dim=-1)
    return weights, experts, counts, prob_sum, lse


def topk_route_backward(grad_weights, grad_prob_sum, grad_lse, logits, experts, score, renormalize, scale):
    """Gradient of topk_route's weights, prob_sum and lse w.r.t. the logits [T, E]."""
    z = logits.to(compute_dtype(logits.dtype))
    s = z.softmax(-1) if score == "softmax" else z.sigmoid()
    grad_s = torch.zeros_like(s)
    if grad_weights is not None:
        g = grad_weights.to(s.dtype) * scale
        p = s.gather(1, experts)
        if renormalize:
            Z = p.sum(-1, keepdim=True) + EPS
            g = g / Z - (g * p).sum(-1, keepdim=True) / (Z * Z)
        grad_s.scatter_add_(1, experts, g)
    if grad_prob_sum is not None:
        gp = grad_prob_sum.to(s.dtype).expand_as(s)
        if score == "softmax":
            grad_s = grad_s + gp
        else:
            Z = s.sum(-1, keepdim=True) + EPS
            grad_s = grad_s + gp / Z - (gp * s).sum(-1, keepdim=True) / (Z * Z)
    if score == "softmax":
        grad_z = s * (grad_s - (grad_s * s).sum(-1, keepdim=True))
    else:
        grad_z = grad_s * s * (1 - s)
    if grad_lse is not None:
        grad_z = grad_z + grad_lse.to(s.dtype).unsqueeze(-1) * z.softmax(-1)
    return grad_z.to(logits.dtype)


def load_balancing_loss(counts, prob_sum, num_tokens):
    """Switch/transformers load-balancing loss E * sum_e (count_e / T) * mean_t p_te (k at perfect balance)."""
    E = prob_sum.shape[0]
    T = max(num_tokens, 1)
    return E * (counts.to(prob_sum.dtype) / T * (prob_sum / T)).sum()


def entropy_loss(prob_sum, num_tokens, eps=1e-10):
    """sum_e mean_p_e * log(mean_p_e + eps), mean_p = prob_sum / T: the negative entropy of the mean routing
    distribution (AdvancedMoELayer of the MoE guide); lowest, -log E, when every expert gets the same share."""
    mean_p = prob_sum / max(num_tokens, 1)
    return (mean_p * torch.log(mean_p + eps)).sum()


def router_z_loss(lse):
    """ST-MoE router z-loss mean_t logsumexp(logits_t)^2."""
    return (lse * lse).mean() if lse.numel() else lse.sum()
