"""HydraLoRA (Tian et al. 2024): one shared A, N up-projection heads, a dense softmax router,
``y = W0 x + (alpha/r) sum_i p_i B_i A dropout(x)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import MixtureAdapterLinear, RoutingContext
from malora_train.adapters.registry import register_adapter
from malora_train.config import HydraLoRAConfig


@register_adapter
class HydraLoRALinear(MixtureAdapterLinear):
    """Tensors: router (N, in), lora_A (r, in) shared by every head, lora_B (out, N*r)."""

    kind = "hydralora"
    tensor_kinds = {"router": "router", "lora_A": "shared subspace", "lora_B": "expert up"}
    shared_down = True  # every head reads the same z = A dropout(x)

    def __init__(self, base: nn.Linear, cfg: HydraLoRAConfig, context: RoutingContext | None = None) -> None:
        super().__init__(base, cfg, context)
        self.lora_A = self.param_factory(self.expert_rank, self.in_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.is_meta:
            return
        self.reset_router()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def shared_features(self, xd: torch.Tensor) -> torch.Tensor:
        return F.linear(xd, self.lora_A)

    def rank_space(self, xd: torch.Tensor) -> torch.Tensor:
        z = F.linear(xd, self.lora_A)
        return z.unsqueeze(1).expand(z.shape[0], self.num_experts, self.expert_rank)

    def expert_forward(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        return h
