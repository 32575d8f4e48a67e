"""Smoke test of scripts/bench_generate.py on the tiny model (CPU): every row generates the tokens asked for,
the table and the JSON agree, and the ratio column divides by LoRA's time."""

from __future__ import annotations

import json

import pytest
from script_modules import script_fixture

bench_generate = script_fixture("bench_generate")


def test_generation_benchmark_times_every_kind_against_lora(bench_generate, tmp_path, capsys) -> None:
    out = tmp_path / "generate.json"
    code = bench_generate.main(["--model", "tiny", "--batch", "2", "--prompt-length", "8",
                                "--new-tokens", "4", "--repeats", "1",
                                "--adapters", "frozen,lora,malora,molora,frozen", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"] for row in rows] == ["frozen", "lora", "malora", "molora", "frozen"]
    for row in rows:
        assert row["new_tokens_per_s"] == pytest.approx(2 * 4 / row["median_s"])
        assert row["x_lora"] == pytest.approx(row["median_s"] / rows[1]["median_s"])
    table = capsys.readouterr().out
    assert "| malora |" in table and "| lora |" in table and "x lora" in table


def test_an_unknown_row_is_refused(bench_generate) -> None:
    with pytest.raises(SystemExit, match="--adapters: unknown 'dora'"):
        bench_generate.main(["--model", "tiny", "--adapters", "lora,dora", "--repeats", "1"])
