"""The composite path (plain torch ops, what torch.compile traces) computes what the fast path computes."""

from __future__ import annotations

import pytest
import torch
from adapter_specs import kind_config
from torch import nn

from malora_train.adapters import ADAPTER_CLASSES, adapter_kinds
from malora_train.config import RouterConfig


@pytest.mark.parametrize("kind", adapter_kinds())
def test_composite_path_matches_fast_path_values_and_gradients(kind: str) -> None:
    torch.manual_seed(0)
    cfg = kind_config(kind, rank=3, num_experts=4, dropout=0.0, shared_rank=6, expert_rank=3,
                      router=RouterConfig(top_k=2))
    base = nn.Linear(12, 10).double().requires_grad_(False)
    kwargs = {}
    if kind != "lora":
        kwargs["context"] = None
    layer = ADAPTER_CLASSES[kind](base, cfg, **kwargs).double()
    for param in layer.parameters():
        if param.requires_grad:
            nn.init.normal_(param, std=0.3)
    x = torch.randn(5, 12, dtype=torch.float64)
    out = base(x).detach()

    def run(path):
        layer.zero_grad()
        y = path(x, out)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}

    y_fast, g_fast = run(layer.fast_forward)
    y_comp, g_comp = run(layer.composite_forward)
    torch.testing.assert_close(y_comp, y_fast, rtol=0, atol=1e-12)
    for name in g_fast:
        torch.testing.assert_close(g_comp[name], g_fast[name], rtol=0, atol=1e-12)
