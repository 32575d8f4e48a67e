"""Top-K softmax routing shared by every mixture adapter, and its auxiliary losses.

Notation follows docs/method.md: ``p = softmax(W_g x)`` in float32, ``(g, idx) = TopK(p, K)``, and the
Switch/Mixtral balance loss ``N * sum_i f_i * mean(p_i)`` with padding tokens excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Routing of T tokens over N experts."""

    logits: torch.Tensor  # (T, N) float32
    probs: torch.Tensor  # (T, N) float32 softmax
    gates: torch.Tensor  # (T, N) float32, zero off the top-K
    top_idx: torch.Tensor  # (T, K) int64


def router_logits(x: torch.Tensor, weight: torch.Tensor, jitter_noise: float = 0.0, training: bool = False):
    """``W_g x`` in float32 (float64 for float64 inputs) whatever the autocast state; jitter is
    multiplicative noise on x (Switch)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        if training and jitter_noise > 0:
            x32 = x32 * torch.empty_like(x32).uniform_(1.0 - jitter_noise, 1.0 + jitter_noise)
        return F.linear(x32, weight.to(x32.dtype))


def top_k_route(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax, then keep the K largest probabilities per token (all of them when K = N)."""
    probs = torch.softmax(logits, dim=-1)
    num_experts = probs.shape[-1]
    if top_k >= num_experts:
        top_idx = torch.arange(num_experts, device=probs.device).expand(probs.shape[0], num_experts)
        return Routing(logits, probs, probs, top_idx)
    top_vals, top_idx = probs.topk(top_k, dim=-1)
    if renormalize:
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
    return Routing(logits, probs, gates, top_idx)


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens (dim 0) of ``values``, counting only tokens where ``token_mask`` is true."""
    if token_mask is None:
        return values.mean(dim=0)
    weights = token_mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp_min(1.0)


def assignment_counts(top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, N) float32: how many of each token's K slots went to each expert."""
    counts = torch.zeros(top_idx.shape[0], num_experts, device=top_idx.device, dtype=torch.float32)
    return counts.scatter_add_(-1, top_idx, torch.ones_like(top_idx, dtype=torch.float32))


def balance_loss(routing: Routing, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``N * sum_i f_i * P_i``: 1 for a uniform router, N for one that sends every token to one expert
    (with K = 1; with K slots a fully collapsed router scores N / K)."""
    num_experts = routing.probs.shape[-1]
    top_k = routing.top_idx.shape[-1]
    share = _masked_mean(assignment_counts(routing.top_idx, num_experts), token_mask) / top_k
    mean_prob = _masked_mean(routing.probs, token_mask)
    return num_experts * (share * mean_prob).sum()


def z_loss(routing: Routing, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    return _masked_mean(torch.logsumexp(routing.logits, dim=-1).square(), token_mask)


def entropy(routing: Routing, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean router entropy in nats (log N for a uniform router, 0 for a one-hot one)."""
    per_token = -(routing.probs * torch.log(routing.probs.clamp_min(1e-20))).sum(dim=-1)
    return _masked_mean(per_token, token_mask)
