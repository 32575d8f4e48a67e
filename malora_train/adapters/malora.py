"""MALoRA (Wang et al. 2025): experts share one down-projection subspace S_A (d x n) and get
rank-expanded up-projections. With P_t (r-bar x d) and B_t (m x r-bar):

    z = S_A dropout(x)          (once per token, shared)
    y = W0 x + (alpha / r-bar) * sum_{t in TopK} g_t B_t (P_t z)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import MixtureAdapterLinear, RoutingContext
from malora_train.adapters.registry import register_adapter
from malora_train.config import MALoRAConfig
from malora_train.errors import ConfigError


@register_adapter
class MALoRALinear(MixtureAdapterLinear):
    """Tensors: router (N, in), shared_A (d, in), coeff_P (N*r_bar, d) (P_t: rows [t*r_bar, (t+1)*r_bar)),
    lora_B (out, N*r_bar). d and r-bar are ``MALoRAConfig.sizes()``; its ablation switches freeze S_A or P."""

    kind = "malora"
    tensor_kinds = {"router": "router", "shared_A": "shared subspace", "coeff_P": "expert down",
                    "lora_B": "expert up"}

    def __init__(self, base: nn.Linear, cfg: MALoRAConfig, context: RoutingContext | None = None) -> None:
        super().__init__(base, cfg, context)
        shared_rank, _ = cfg.sizes()
        if shared_rank > self.in_features:  # the one check that needs the model
            raise ConfigError(f"adapter.shared_rank (d={shared_rank}) must not exceed the input size "
                              f"{self.in_features} of the adapted layer")
        self.shared_rank = shared_rank
        self.beta = cfg.beta
        self.shared_A = self.param_factory(shared_rank, self.in_features)
        # experts' coefficient matrices stacked: rows [t*r, (t+1)*r) are P_t
        self.coeff_P = self.param_factory(self.num_experts * self.expert_rank, shared_rank)
        self.reset_parameters()
        self.shared_A.requires_grad_(not cfg.freeze_shared)
        self.coeff_P.requires_grad_(not cfg.freeze_coeff)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """docs/method.md: K_t ~ kaiming-uniform (d x n), U_t S_t V_t = SVD(K_t),
        P_t = (U_t S_t)[:r-bar] / beta, S_A = beta V_0, B = 0."""
        if self.shared_A.is_meta:
            return
        self.reset_router()
        d, n, r = self.shared_rank, self.in_features, self.expert_rank
        draws = torch.empty(self.num_experts, d, n, device=self.shared_A.device, dtype=torch.float32)
        for draw in draws:  # one after the other: the same numbers as drawing each K_t on its own
            nn.init.kaiming_uniform_(draw, a=5 ** 0.5)
        u, s, vh = wide_svd(draws.double())
        self.coeff_P.copy_(((u * s.unsqueeze(-2))[:, :r] / self.beta).reshape(-1, d).float())
        self.shared_A.copy_((self.beta * vh[0]).float())

    def shared_features(self, xd: torch.Tensor) -> torch.Tensor:
        return F.linear(xd, self.shared_A)

    def down_projection(self) -> torch.Tensor:
        return self.shared_A

    def coeff_projection(self) -> torch.Tensor:
        return self.coeff_P

    def rank_space(self, xd: torch.Tensor) -> torch.Tensor:
        z = F.linear(xd, self.shared_A)
        return F.linear(z, self.coeff_P).view(xd.shape[0], self.num_experts, self.expert_rank)

    def expert_forward(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.coeff_P[expert * self.expert_rank:(expert + 1) * self.expert_rank])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_rank={self.shared_rank}, beta={self.beta:g}"


def wide_svd(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S (descending), V^T of each wide matrix K (..., d, n), d <= n, full row rank, from the eigen-
    decomposition of its d x d Gram matrix K K^T = U S^2 U^T, then V^T = S^-1 U^T K: an SVD (up to the signs
    of the singular vectors, which any SVD may choose) at a fraction of LAPACK's cost, which matters at
    start-up: one draw per expert and layer. Squaring the condition number is harmless for kaiming draws in
    float64; a matrix less than twice as wide as tall goes to LAPACK."""
    if 2 * k.shape[-2] > k.shape[-1]:
        return torch.linalg.svd(k, full_matrices=False)
    eigenvalues, eigenvectors = torch.linalg.eigh(k @ k.transpose(-1, -2))
    s = eigenvalues.flip(-1).clamp_min(0).sqrt()
    u = eigenvectors.flip(-1)
    vh = (u.transpose(-1, -2) @ k) / s.unsqueeze(-1)
    return u, s, vh
