"""Smoke test of scripts/bench.py on the tiny model (CPU, a few seconds): the table, the JSON, the
fast-vs-reference agreement check, and that the base model comes back unadapted after every method."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from script_modules import script_fixture

from malora_train.adapters import adapter_layers

bench = script_fixture("bench")


def test_cpu_benchmark_prints_the_table_and_writes_json(bench, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    report = bench.main(["--model", "tiny", "--device", "cpu", "--batch", "2", "--seq", "16", "--steps", "2",
                         "--warmup", "1", "--methods", "floor,lora,malora", "--impl", "fast,reference",
                         "--scenario", "name=ckpt,checkpointing=1,methods=floor+molora,impls=fast",
                         "--json", str(out)])
    table = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"], default=str))
    rows = {(r["scenario"], r["method"], r["impl"]): r for r in report["rows"]}
    assert set(rows) == {("main", "floor", "-"), ("main", "lora", "fast"), ("main", "lora", "reference"),
                         ("main", "malora", "fast"), ("main", "malora", "reference"),
                         ("ckpt", "floor", "-"), ("ckpt", "molora", "fast")}
    for row in rows.values():
        assert not row["error"], row["error"]
        assert row["step_s"] > 0 and len(row["steps_s"]) == 2 and math.isfinite(row["loss"])
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / row["step_s"])
        assert row["peak_bytes"] is None  # no device memory counter on the CPU
        assert f"| {row['scenario']} | {row['method']} | {row['impl']} | {row['step_s']:.4f} |" in table
    assert rows["main", "floor", "-"]["ratio"] == 1.0 and rows["main", "floor", "-"]["trainable"] == 0
    assert rows["main", "lora", "fast"]["trainable"] == rows["main", "lora", "reference"]["trainable"] > 0
    # dropout off, same weights and batch: the two implementations agree to float32 rounding
    for method in ("lora", "malora"):
        check = rows["main", method, "fast"]["check"]
        assert check["loss_rel"] < 1e-5 and check["grad_rel"] < 1e-4, check
    # the same losses at the first step: the base model was restored between methods
    assert rows["main", "lora", "fast"]["loss"] == pytest.approx(rows["main", "lora", "reference"]["loss"],
                                                                 rel=1e-2)


def test_methods_leave_the_base_model_as_they_found_it(bench, make_tiny_model) -> None:
    model = make_tiny_model()
    before = {n: type(m) for n, m in model.named_modules()}
    methods = (("peft_lora", "lora", "hydralora") if importlib.util.find_spec("peft")
               else ("lora", "hydralora"))
    for method in methods:
        attached = bench.Attached(model, method, "fast", seed=0)
        assert attached.trainable()
        attached.detach()
        assert {n: type(m) for n, m in model.named_modules()} == before
        assert not list(adapter_layers(model))
        assert not any(p.requires_grad for p in model.parameters())


def test_bad_arguments_are_one_line_errors(bench) -> None:
    with pytest.raises(SystemExit, match="unknown method or impl: mora"):
        bench.main(["--methods", "floor,mora"])
    with pytest.raises(SystemExit, match="--model nope"):
        bench.main(["--model", "nope", "--methods", "floor"])
    with pytest.raises(SystemExit, match="unknown key 'sequence'"):
        bench.main(["--scenario", "name=x,sequence=4"])


def test_a_reference_out_of_memory_leaves_the_fast_row(bench, monkeypatch) -> None:
    """At 7B HydraLoRA's dense reference does not fit: the agreement check says so, timing goes on."""
    real_set_impl = bench.set_impl

    def set_impl(model, impl):
        if impl == "reference":
            raise torch.OutOfMemoryError("simulated")
        real_set_impl(model, impl)

    monkeypatch.setattr(bench, "set_impl", set_impl)
    report = bench.main(["--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0", "--methods",
                         "hydralora", "--impl", "fast"])
    (row,) = report["rows"]
    assert not row["error"] and row["step_s"] > 0
    assert (row["check"]["error"] == "the reference path ran out of memory"
            and row["check"]["grad_noise"] == 0.0)
