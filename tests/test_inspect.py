"""``malora-inspect``: the parameter report, as text and as JSON, built on the meta device."""

from __future__ import annotations

import json

import pytest

from malora_train.cli import inspect_main


def _json_report(capsys, *overrides: str) -> dict:
    inspect_main([*overrides, "inspect.json=true"])
    return json.loads(capsys.readouterr().out)


def test_json_report_has_the_paper_lora_count(capsys) -> None:
    report = _json_report(capsys, "model=llama2_7b", "adapter=lora")
    hidden, ffn, layers, rank = 4096, 11008, 32, 64
    per_layer = rank * (3 * 2 * hidden + 2 * (hidden + ffn) + (ffn + hidden))  # q k v, gate up, down
    assert report["trainable"] == layers * per_layer
    assert report["base"] == 6_738_415_616 and report["total"] == report["base"] + report["trainable"]
    assert report["percent"] == pytest.approx(100 * report["trainable"] / report["base"])
    assert round(report["trainable"] / 1e6, 1) == 143.1


def test_malora_breakdown_by_tensor_kind_and_module_adds_up(capsys) -> None:
    report = _json_report(capsys, "model=llama2_7b", "adapter=malora")
    assert set(report["by_tensor"]) == {"router", "shared subspace", "expert down", "expert up"}
    assert sum(report["by_tensor"].values()) == report["trainable"] == sum(report["by_module"].values())
    assert set(report["by_module"]) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert (report["shared_rank"], report["expert_rank"], report["alpha"]) == (32, 12, 24.0)
    layers, experts = 32, 8
    assert report["by_tensor"]["expert down"] == layers * 6 * experts * 12 * 32  # P_t: r-bar x d per expert


def test_text_report_names_every_part(capsys) -> None:
    inspect_main(["model=tiny", "adapter=molora"])
    text = capsys.readouterr().out
    for part in ("trainable", "base", "total", "by module type", "by tensor kind", "router", "expert up"):
        assert part in text


def test_bad_key_is_a_one_line_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        inspect_main(["adapter.rnak=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "adapter.rnak" in err
