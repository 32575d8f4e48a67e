"""MALoRA (Wang et al. 2025): experts share one down-projection subspace S_A (d x n) and get
rank-expanded up-projections. With P_t (r-bar x d) and B_t (m x r-bar):

    z = S_A dropout(x)          (once per token, shared)
    y = W0 x + (alpha / r-bar) * sum_{t in TopK} g_t B_t (P_t z)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import MixtureAdapterLinear
from malora_train.adapters.registry import register_adapter
from malora_train.config import AdapterConfig
from malora_train.errors import ConfigError


def malora_sizes(rank: int, num_experts: int, lam: float, shared_rank: int | None,
                 expert_rank: int | None) -> tuple[int, int]:
    """(d, r-bar) from a MoLoRA budget: d = lam r N, r-bar = r + (1 - lam) r, unless given directly."""
    if not 0 < lam <= 1:
        raise ConfigError(f"adapter.lam={lam} must be in (0, 1]")
    d = shared_rank if shared_rank is not None else round(lam * rank * num_experts)
    r_bar = expert_rank if expert_rank is not None else round(rank + (1 - lam) * rank)
    if d < 1 or r_bar < 1:
        raise ConfigError(f"adapter.shared_rank (d={d}) and adapter.expert_rank (r-bar={r_bar}) must be >= 1")
    if r_bar > d:
        raise ConfigError(
            f"adapter.expert_rank (r-bar={r_bar}) must not exceed adapter.shared_rank (d={d}): "
            "an expert cannot have more rank than the shared subspace"
        )
    return d, r_bar


@register_adapter
class MALoRALinear(MixtureAdapterLinear):
    """Tensors: router (N, in), shared_A (d, in), coeff_P (N*r_bar, d) (P_t: rows [t*r_bar, (t+1)*r_bar)),
    lora_B (out, N*r_bar)."""

    kind = "malora"
    tensor_kinds = {"router": "router", "shared_A": "shared subspace", "coeff_P": "expert down",
                    "lora_B": "expert up"}
    config_keys = ("lam", "shared_rank", "expert_rank", "beta", "freeze_shared", "freeze_coeff")

    @classmethod
    def expert_rank_of(cls, cfg: AdapterConfig) -> int:
        return malora_sizes(cfg.rank, cfg.num_experts, cfg.lam, cfg.shared_rank, cfg.expert_rank)[1]

    @classmethod
    def layer_kwargs(cls, cfg: AdapterConfig) -> dict[str, Any]:
        kwargs = super().layer_kwargs(cfg)
        if cfg.beta <= 0:
            raise ConfigError(f"adapter.beta={cfg.beta} must be > 0")
        shared_rank, _ = malora_sizes(cfg.rank, cfg.num_experts, cfg.lam, cfg.shared_rank, cfg.expert_rank)
        kwargs.update(shared_rank=shared_rank, beta=cfg.beta)
        return kwargs

    def apply_freezing(self, cfg: AdapterConfig) -> None:
        """The ablations: S_A frozen (``adapter.freeze_shared``), P_t frozen (``adapter.freeze_coeff``)."""
        self.shared_A.requires_grad_(not cfg.freeze_shared)
        self.coeff_P.requires_grad_(not cfg.freeze_coeff)

    def __init__(self, base: nn.Linear, *, shared_rank: int, beta: float, **kwargs) -> None:
        super().__init__(base, **kwargs)
        if shared_rank > self.in_features:
            raise ConfigError(f"adapter.shared_rank (d={shared_rank}) must not exceed the input size "
                              f"{self.in_features} of the adapted layer")
        self.shared_rank = shared_rank
        self.beta = beta
        self.shared_A = self.param_factory(shared_rank, self.in_features)
        # experts' coefficient matrices stacked: rows [t*r, (t+1)*r) are P_t
        self.coeff_P = self.param_factory(self.num_experts * self.expert_rank, shared_rank)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """METHOD.md: K_t ~ kaiming-uniform (d x n), U_t S_t V_t = SVD(K_t),
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
    of the singular vectors, which any SVD may choose) at a fraction of LAPACK's cost for MALoRA's d x n draws
    (180 layers x 8 experts were 15 s of a SmolLM2 start-up). In float64 the squared condition number of
    kaiming draws costs nothing measurable; a matrix less than twice as wide as tall goes to LAPACK."""
    if 2 * k.shape[-2] > k.shape[-1]:
        return torch.linalg.svd(k, full_matrices=False)
    eigenvalues, eigenvectors = torch.linalg.eigh(k @ k.transpose(-1, -2))
    s = eigenvalues.flip(-1).clamp_min(0).sqrt()
    u = eigenvectors.flip(-1)
    vh = (u.transpose(-1, -2) @ k) / s.unsqueeze(-1)
    return u, s, vh
