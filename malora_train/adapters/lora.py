"""Plain LoRA (Hu et al. 2021, PEFT conventions): ``y = W0 x + (alpha/r) B A dropout(x)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import AdapterLinear
from malora_train.adapters.registry import register_adapter
from malora_train.config import LoRAConfig


@register_adapter
class LoRALinear(AdapterLinear):
    """Tensors: lora_A (r, in), lora_B (out, r); saved in PEFT's format."""

    kind = "lora"
    tensor_kinds = {"lora_A": "lora down (A)", "lora_B": "lora up (B)"}
    mergeable = True
    peft_format = True

    def __init__(self, base: nn.Linear, cfg: LoRAConfig) -> None:
        super().__init__(base, cfg)
        self.lora_A = self.param_factory(self.expert_rank, self.in_features)
        self.lora_B = self.param_factory(self.out_features, self.expert_rank)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reference_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)
