"""MoLoRA in MALoRA's sparse form: N LoRA experts behind a top-K router,
``y = W0 x + (alpha/r) sum_{t in TopK} g_t B_t A_t dropout(x)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import MixtureAdapterLinear, RoutingContext
from malora_train.adapters.registry import register_adapter
from malora_train.config import MoLoRAConfig


@register_adapter
class MoLoRALinear(MixtureAdapterLinear):
    """Tensors: router (N, in), lora_A (N*r, in) (expert t: rows [t*r, (t+1)*r)), lora_B (out, N*r)."""

    kind = "molora"
    tensor_kinds = {"router": "router", "lora_A": "expert down", "lora_B": "expert up"}

    def __init__(self, base: nn.Linear, cfg: MoLoRAConfig, context: RoutingContext | None = None) -> None:
        super().__init__(base, cfg, context)
        # experts' down-projections stacked: rows [t*r, (t+1)*r) belong to expert t
        self.lora_A = self.param_factory(self.num_experts * self.expert_rank, self.in_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.is_meta:
            return
        self.reset_router()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan_in = in_features, as per expert

    def expert_down(self, expert: int) -> torch.Tensor:
        return self.lora_A[expert * self.expert_rank:(expert + 1) * self.expert_rank]

    def rank_space(self, xd: torch.Tensor) -> torch.Tensor:
        return F.linear(xd, self.lora_A).view(xd.shape[0], self.num_experts, self.expert_rank)

    def expert_forward(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.expert_down(expert))
