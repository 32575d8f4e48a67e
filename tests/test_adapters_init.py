"""Initialisation: every adapter starts as the base model (B = 0), and MALoRA's SVD-based start
(docs/method.md) is reproduced from the same kaiming draws."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from malora_train.adapters import (
    AdaptedCausalLM,
    adapter_kinds,
    adapter_layers,
    parameter_report,
)
from malora_train.adapters.malora import MALoRALinear
from malora_train.config import AdapterConfig, MALoRAConfig
from malora_train.errors import ConfigError

PAPER_IN, PAPER_OUT = 64, 48


def _paper_malora(beta: float, seed: int) -> tuple[MALoRALinear, MALoRAConfig]:
    """The paper's MALoRA (r=8, N=8, lam=0.5 -> d=32, r-bar=12) on an in=64 layer, built after ``seed``."""
    cfg = AdapterConfig(kind="malora", rank=8, num_experts=8, lam=0.5, beta=beta)
    base = nn.Linear(PAPER_IN, PAPER_OUT)
    torch.manual_seed(seed)
    return MALoRALinear(base, cfg, context=None), cfg


@pytest.mark.parametrize("beta", [1.0, 1.25])
def test_malora_init_reproduces_the_kaiming_draws_in_one_shared_subspace(beta: float) -> None:
    layer, cfg = _paper_malora(beta, seed=11)
    num_experts, d, r_bar = 8, 32, 12
    assert (*cfg.sizes(), cfg.effective_rank(), cfg.effective_alpha()) == (d, r_bar, r_bar, 24.0)

    # the same draws, in the code's order: router ~ N(0, init_std), then K_t (d x n) for t = 0..N-1
    torch.manual_seed(11)
    router = torch.empty(num_experts, PAPER_IN).normal_(0.0, cfg.router.init_std)
    draws = [nn.init.kaiming_uniform_(torch.empty(d, PAPER_IN), a=math.sqrt(5)) for _ in range(num_experts)]
    assert torch.equal(layer.router.detach(), router)

    assert torch.count_nonzero(layer.lora_B) == 0
    shared = layer.shared_A.detach().double()
    assert shared.shape == (d, PAPER_IN)
    torch.testing.assert_close(shared @ shared.t(), beta**2 * torch.eye(d, dtype=torch.float64), rtol=0,
                               atol=1e-5)

    coeff = layer.coeff_P.detach().double()
    assert coeff.shape == (num_experts * r_bar, d)
    for expert, draw in enumerate(draws):
        effective_a = coeff[expert * r_bar:(expert + 1) * r_bar] @ shared  # A_t = P_t S_A
        head = draw[:r_bar].double()
        if expert == 0:  # S_A spans K_0's rows, so A_0 is exactly the first r-bar rows of K_0
            torch.testing.assert_close(effective_a, head, rtol=0, atol=1e-5)
        # every A_t has the Gram matrix (so the row norms) of K_t's first r-bar rows
        torch.testing.assert_close(effective_a @ effective_a.t(), head @ head.t(), rtol=0, atol=1e-5)
        torch.testing.assert_close(effective_a.norm(dim=1), head.norm(dim=1), rtol=1e-5, atol=0)
    assert not torch.allclose(coeff[r_bar:2 * r_bar] @ shared, draws[1][:r_bar].double(), atol=1e-3)


@pytest.mark.parametrize("shape", [(8, 32, 576), (8, 32, 1536), (2, 16, 4096), (3, 48, 64)])
def test_wide_svd_is_an_svd(shape) -> None:
    """K = U diag(S) V^T with orthonormal U and rows of V^T, S descending and equal to LAPACK's singular
    values."""
    from malora_train.adapters.malora import wide_svd

    torch.manual_seed(0)
    k = torch.empty(shape)
    for draw in k:
        nn.init.kaiming_uniform_(draw, a=math.sqrt(5))
    k = k.double()
    u, s, vh = wide_svd(k)
    eye = torch.eye(shape[1], dtype=torch.float64).expand(shape[0], -1, -1)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, k, rtol=0, atol=1e-12)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.transpose(-1, -2), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, torch.linalg.svdvals(k), rtol=0, atol=1e-12)


def test_malora_beta_scales_the_shared_subspace_against_the_coefficients() -> None:
    small, _ = _paper_malora(1.0, seed=3)
    large, _ = _paper_malora(1.25, seed=3)
    torch.testing.assert_close(large.shared_A, 1.25 * small.shared_A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(large.coeff_P, small.coeff_P / 1.25, rtol=1e-6, atol=1e-7)


def test_malora_shared_rank_larger_than_the_input_is_a_config_error() -> None:
    """S_A (d x n) cannot have d orthogonal rows when d > n: a clear error, not a shape crash."""
    cfg = AdapterConfig(kind="malora", shared_rank=16, expert_rank=4)
    with pytest.raises(ConfigError, match="adapter.shared_rank"):
        MALoRALinear(nn.Linear(12, 10), cfg, context=None)


@pytest.mark.parametrize("kind", adapter_kinds())
def test_adapted_model_equals_the_base_model_at_step_zero(kind: str, make_tiny_model) -> None:
    input_ids = torch.randint(3, 260, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = make_tiny_model(0)(input_ids).logits
        adapted = AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind=kind)).eval()
        got = adapted.model(input_ids).logits
    assert all(torch.count_nonzero(layer.lora_B) == 0 for _, layer in adapter_layers(adapted.model))
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("freeze_shared", "freeze_coeff"), [(False, False), (True, False), (False, True),
                                                             (True, True)])
def test_malora_freeze_switches(freeze_shared: bool, freeze_coeff: bool, make_tiny_model) -> None:
    cfg = AdapterConfig(kind="malora", freeze_shared=freeze_shared, freeze_coeff=freeze_coeff)
    model = AdaptedCausalLM.from_base(make_tiny_model(0), cfg)
    layers = [layer for _, layer in adapter_layers(model.model)]
    assert layers and all(isinstance(layer, MALoRALinear) for layer in layers)
    for layer in layers:
        assert layer.shared_A.requires_grad is not freeze_shared
        assert layer.coeff_P.requires_grad is not freeze_coeff
        assert layer.router.requires_grad and layer.lora_B.requires_grad
    frozen = sum(layer.shared_A.numel() * freeze_shared + layer.coeff_P.numel() * freeze_coeff
                 for layer in layers)
    everything = sum(sum(getattr(layer, n).numel() for n in layer.tensor_kinds) for layer in layers)
    assert parameter_report(model.model)["trainable"] == everything - frozen
