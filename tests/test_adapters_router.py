"""The top-K router and its auxiliary losses (balance, z) against hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters import ADAPTER_CLASSES
from malora_train.adapters.router import Routing, balance_loss, top_k_route, z_loss
from malora_train.config import AdapterConfig, RouterConfig

NUM_EXPERTS = 8


def _logits(tokens: int = 64, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_gates_sum_to_one_on_exactly_the_k_most_probable_experts(top_k: int) -> None:
    logits = _logits()
    routing = top_k_route(logits, top_k, renormalize=True)
    torch.testing.assert_close(routing.probs, torch.softmax(logits.double(), -1).float())
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(64), rtol=0, atol=1e-6)
    chosen = routing.gates != 0
    assert (chosen.sum(-1) == top_k).all()
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter(-1, routing.top_idx, True))
    # every chosen probability is at least every unchosen one
    lowest_chosen = routing.probs.masked_fill(~chosen, 2.0).min(-1).values
    highest_unchosen = routing.probs.masked_fill(chosen, -1.0).max(-1).values
    assert (lowest_chosen >= highest_unchosen).all()
    expected = torch.where(chosen, routing.probs / (routing.probs * chosen).sum(-1, keepdim=True), 0.0)
    torch.testing.assert_close(routing.gates, expected, rtol=1e-6, atol=0)


def test_without_renormalisation_gates_are_the_softmax_probabilities_on_the_top_k() -> None:
    routing = top_k_route(_logits(), 2, renormalize=False)
    chosen = routing.gates != 0
    assert (chosen.sum(-1) == 2).all()
    assert torch.equal(routing.gates, torch.where(chosen, routing.probs, 0.0))
    assert (routing.gates.sum(-1) < 1).all()


def test_dense_routing_gates_every_expert_with_its_probability() -> None:
    routing = top_k_route(_logits(), NUM_EXPERTS)
    assert torch.equal(routing.gates, routing.probs)
    assert routing.top_idx.shape == (64, NUM_EXPERTS)


def _mixture_layer(jitter_noise: float = 0.0):
    cfg = AdapterConfig(kind="molora", rank=2, num_experts=NUM_EXPERTS, dropout=0.0,
                        router=RouterConfig(jitter_noise=jitter_noise))
    torch.manual_seed(0)
    layer = ADAPTER_CLASSES["molora"](nn.Linear(16, 8), cfg, context=None)
    with torch.no_grad():
        layer.router.normal_(0.0, 1.0)
    return layer


def test_router_logits_stay_float32_under_bf16_autocast() -> None:
    layer = _mixture_layer()
    x = torch.randn(32, 16)
    exact = x.double() @ layer.router.detach().double().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.route(x)
        out = layer(x)
        bf16_logits = F.linear(x, layer.router)
    assert bf16_logits.dtype == torch.bfloat16  # autocast is really on
    assert routing.logits.dtype == routing.probs.dtype == routing.gates.dtype == torch.float32
    torch.testing.assert_close(routing.logits.double(), exact, rtol=0, atol=1e-5)
    assert (bf16_logits.double() - exact).abs().max() > 1e-3  # a bf16 router would fail the line above
    assert out.shape == (32, 8) and torch.isfinite(out).all()


def test_jitter_noise_only_in_training() -> None:
    layer = _mixture_layer(jitter_noise=0.3)
    x = torch.randn(32, 16)
    clean = F.linear(x, layer.router)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval().route(x).logits, clean, rtol=0, atol=1e-6)
        layer.train()
        first, second = layer.route(x).logits, layer.route(x).logits
    assert (first - clean).abs().max() > 1e-2 and (first - second).abs().max() > 1e-2
    quiet = _mixture_layer(jitter_noise=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(quiet.route(x).logits, clean, rtol=0, atol=1e-6)


# -- auxiliary losses -----------------------------------------------------------------------------

def _manual_balance(logits: torch.Tensor, top_k: int, mask: list[bool]) -> float:
    """N * sum_i f_i * P_i over the unmasked tokens: f_i the share of (token, slot) pairs sent to i."""
    kept = [t for t in range(logits.shape[0]) if mask[t]]
    assigned = [0] * NUM_EXPERTS
    prob_sum = [0.0] * NUM_EXPERTS
    for t in kept:
        row = [float(v) for v in logits[t]]
        exp = [math.exp(v - max(row)) for v in row]
        probs = [e / sum(exp) for e in exp]
        for expert in sorted(range(NUM_EXPERTS), key=lambda e: -probs[e])[:top_k]:
            assigned[expert] += 1
        for expert in range(NUM_EXPERTS):
            prob_sum[expert] += probs[expert]
    share = [a / (len(kept) * top_k) for a in assigned]
    mean_prob = [p / len(kept) for p in prob_sum]
    return NUM_EXPERTS * sum(f * p for f, p in zip(share, mean_prob))


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_matches_its_formula_and_ignores_masked_tokens(top_k: int) -> None:
    logits = _logits(40, seed=3, dtype=torch.float64)
    mask = [t % 3 != 0 for t in range(40)]
    routing = top_k_route(logits, top_k)
    got = balance_loss(routing, torch.tensor(mask))
    assert got == pytest.approx(_manual_balance(logits, top_k, mask), rel=1e-6)
    unmasked = balance_loss(routing, None)
    assert unmasked == pytest.approx(_manual_balance(logits, top_k, [True] * 40), rel=1e-6)
    assert abs(got.item() - unmasked.item()) > 1e-4


def test_balance_loss_gradient_flows_through_the_mean_probabilities() -> None:
    """f is a count (no gradient); d L / d logits = N * sum_i f_i * d P_i / d logits."""
    logits = _logits(20, seed=4, dtype=torch.float64).requires_grad_()
    routing = top_k_route(logits, 2)
    (grad,) = torch.autograd.grad(balance_loss(routing), logits)
    share = torch.zeros(NUM_EXPERTS, dtype=torch.float64)
    for row in routing.top_idx.tolist():
        for expert in row:
            share[expert] += 1 / (20 * 2)
    probs = torch.softmax(logits, -1)
    (expected,) = torch.autograd.grad(NUM_EXPERTS * (share * probs.mean(0)).sum(), logits)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)  # the shares are float32 counts


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_is_one_for_a_uniform_router(top_k: int) -> None:
    tokens = 4 * NUM_EXPERTS
    probs = torch.full((tokens, NUM_EXPERTS), 1 / NUM_EXPERTS)
    # token t's slots go to experts (K t), (K t + 1), ... mod N: every expert gets the same share
    top_idx = (top_k * torch.arange(tokens).unsqueeze(1) + torch.arange(top_k)) % NUM_EXPERTS
    uniform = Routing(probs.log(), probs, probs, top_idx)
    assert balance_loss(uniform).item() == pytest.approx(1.0, rel=1e-6)
    # the same through route(): near-uniform logits that break ties so token t picks expert t mod N first
    logits = 1e-4 * F.one_hot(torch.arange(tokens) % NUM_EXPERTS, NUM_EXPERTS).float()
    assert balance_loss(top_k_route(logits, 1)).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_of_a_collapsed_router_is_n_over_k(top_k: int) -> None:
    logits = torch.zeros(24, NUM_EXPERTS)
    logits[:, 5] = 60.0  # every token to expert 5 with probability 1
    routing = top_k_route(logits, top_k)
    assert (routing.top_idx[:, 0] == 5).all()
    assert balance_loss(routing).item() == pytest.approx(NUM_EXPERTS / top_k, rel=1e-6)


def test_z_loss_matches_its_formula() -> None:
    logits = _logits(30, seed=5, dtype=torch.float64) * 3
    mask = [t % 4 != 1 for t in range(30)]
    kept = [t for t in range(30) if mask[t]]
    expected = sum(math.log(sum(math.exp(float(v)) for v in logits[t])) ** 2 for t in kept) / len(kept)
    routing = top_k_route(logits, 2)
    assert z_loss(routing, torch.tensor(mask)).item() == pytest.approx(expected, rel=1e-12)
    everything = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / 30
    assert z_loss(routing).item() == pytest.approx(everything, rel=1e-12)


@pytest.mark.parametrize("init", ["normal", "kaiming"])
def test_router_init_is_normal_with_init_std_or_kaiming(init):
    from malora_train.adapters.molora import MoLoRALinear
    from malora_train.config import MoLoRAConfig, RouterConfig

    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 64)
    layer = MoLoRALinear(base, MoLoRAConfig(num_experts=16, router=RouterConfig(init=init, init_std=0.005)))
    std = layer.router.detach().std().item()
    expected = 0.005 if init == "normal" else 1024 ** -0.5  # kaiming: N(0, 1/in_features)
    assert std == pytest.approx(expected, rel=0.05)
    assert layer.router.detach().mean().abs().item() < 0.1 * expected


def test_router_settings_are_checked():
    from malora_train.config import MoLoRAConfig, RouterConfig
    from malora_train.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter.router.init='xavier' is not one of normal, kaiming"):
        MoLoRAConfig(router=RouterConfig(init="xavier"))
    with pytest.raises(ConfigError, match="adapter.router.lr_scale=0.0 must be > 0"):
        MoLoRAConfig(router=RouterConfig(lr_scale=0.0))
