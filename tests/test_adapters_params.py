"""Trainable-parameter counts at LLaMA-2-7B shapes (meta device) against docs/method.md's per-layer formulas
and the paper's table."""

from __future__ import annotations

import pytest

from malora_train.adapters import AdaptedCausalLM, parameter_report
from malora_train.config import AdapterConfig
from malora_train.models import load_model

HIDDEN, FFN, LAYERS, VOCAB = 4096, 11008, 32, 32000
# (in n, out m) of the adapted linear layers of one decoder layer: q, k, v, gate, up, down
SHAPES = [(HIDDEN, HIDDEN)] * 3 + [(HIDDEN, FFN)] * 2 + [(FFN, HIDDEN)]
BASE = 2 * VOCAB * HIDDEN + LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN) + HIDDEN  # 6.738B


def lora_count(r: int) -> int:
    return LAYERS * sum(r * (n + m) for n, m in SHAPES)


def molora_count(r: int, experts: int = 8) -> int:
    return LAYERS * sum(experts * r * (n + m) + experts * n for n, m in SHAPES)


def malora_count(r_bar: int, d: int, experts: int = 8) -> int:
    return LAYERS * sum(d * n + experts * r_bar * d + experts * r_bar * m + experts * n for n, m in SHAPES)


# (adapter config, formula, the paper's trainable count in millions, the paper's % of the base model)
PAPER_TABLE = {
    "lora-r64": (dict(kind="lora", rank=64), lora_count(64), 143.1, 2.12),
    "molora-r8": (dict(kind="molora", rank=8), molora_count(8), 151.2, 2.24),
    "molora-r12": (dict(kind="molora", rank=12), molora_count(12), 222.8, 3.31),
    "molora-r16": (dict(kind="molora", rank=16), molora_count(16), 294.3, 4.37),
    "malora": (dict(kind="malora", rank=8, lam=0.5), malora_count(12, 32), 158.9, 2.36),
    "malora-small": (dict(kind="malora", rank=8, expert_rank=8, shared_rank=22), malora_count(8, 22), 109.1,
                     1.62),
}


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_trainable_parameters_at_llama2_7b_shapes(name: str, model_preset_cfg) -> None:
    overrides, expected, paper_millions, paper_percent = PAPER_TABLE[name]
    base = load_model(model_preset_cfg("llama2_7b"), device="meta")
    report = parameter_report(AdaptedCausalLM.from_base(base, AdapterConfig(**overrides)).model)
    assert report["trainable"] == expected
    assert report["base"] == BASE == 6_738_415_616
    assert report["total"] == BASE + expected
    assert report["adapted_layers"] == 6 * LAYERS
    assert round(report["trainable"] / 1e6, 1) == paper_millions
    assert round(report["percent"], 2) == paper_percent


def test_lora_r64_is_exactly_143_130_624() -> None:
    assert lora_count(64) == 143_130_624

