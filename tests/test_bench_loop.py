"""`make bench-loop` on the CPU: the real Trainer's steps for each adapter and the HF + PEFT baseline on the
same examples, a table and JSON (the GPU figures in BENCHMARKS.md come from the same script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from script_modules import script_module

REPO = Path(__file__).resolve().parents[1]


def test_bench_loop_reports_every_run_beside_the_baseline(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_loop.py"), "--device", "cpu", "--adapters",
         "lora,malora", "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--rows", "2", "--length",
         "128", "--baseline", "peft-compiled,hf-peft", "--also", "adapter.shared_input=false",
         "--processes", "2", "--checkpointing", "true,selective", "--json", str(out), "--",
         "data.train_per_task=16", "data.cache=false"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    checkpointing = ["trainer.gradient_checkpointing=true"]
    selective = ["trainer.gradient_checkpointing=selective"]
    assert [(r["adapter"], r["overrides"], r["processes"]) for r in report["rows"]] == [
        ("lora", [], 1), ("malora", [], 1), ("lora", ["adapter.shared_input=false"], 1),
        ("malora", ["adapter.shared_input=false"], 1),  # --also: every adapter again, in the same process
        ("lora", checkpointing, 1), ("malora", checkpointing, 1),  # --checkpointing likewise, per setting
        ("lora", selective, 1), ("malora", selective, 1),
        ("lora", [], 2), ("malora", [], 2)]  # --processes 2: every adapter as two processes
    assert report["rows"][3]["name"] == "malora-train malora [adapter.shared_input=false]"
    assert report["rows"][9]["name"] == "malora-train malora x2 processes"
    # two processes: a step of twice the rows (packed as one global batch, so the fill differs a little)
    assert report["rows"][8]["tokens_per_step"] > 1.8 * report["rows"][0]["tokens_per_step"]
    assert all(r["step_path"] == "eager (trainer.cuda_graphs=false)" for r in report["rows"])
    rows = {row["adapter"]: row for row in report["rows"][:2]}
    assert all("error" not in r for r in report["rows"])
    for row in report["rows"]:
        assert row["tokens_per_s"] > 0 and row["max_over_median"] >= 1 and row["tokens_per_step"] > 0
        assert (len(row["step_times_s"]) == 2
                and max(row["step_times_s"]) / row["step_s"] == row["max_over_median"])
        assert len(row["host_step_times_s"]) == 2 and all(t > 0 for t in row["host_step_times_s"])
        assert row["graphs_after_step"] == [0, 0]  # the CPU takes the eager path
        assert set(row["phases"]) == {"data", "forward", "backward", "optimizer", "bookkeeping"}
        assert row["phases"]["forward"]["host_ms"] > 0
        assert row["trainable_params"] > 0
    assert rows["malora"]["trainable_params"] != rows["lora"]["trainable_params"]
    compiled, trainer = report["baselines"]
    assert (compiled["name"] == "PEFT LoRA r64, plain loop, torch.compile, packed"
            and compiled["tokens_per_s"] > 0)
    assert trainer["name"] == "HF Trainer + PEFT LoRA r64" and trainer["tokens_per_s"] > 0
    table = result.stdout.splitlines()
    assert any(line.startswith("malora-train malora") for line in table)
    assert any(line.startswith("HF Trainer + PEFT LoRA r64") for line in table)


def test_bench_loop_refuses_bad_arguments_in_one_line() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_loop.py"), "--modes", "fastest"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--modes: unknown fastest" in result.stderr


def test_a_bare_run_on_a_gpu_measures_the_table_of_benchmarks_md() -> None:
    with script_module("bench_loop") as bench_loop:
        gpu = bench_loop.parse_args(["--device", "cuda"])
        overrides = bench_loop.overrides_for(gpu, "malora", "graphs")
        cpu = bench_loop.parse_args(["--device", "cpu", "--modes", "eager", "--model", "tiny"])
    assert (gpu.model, gpu.data, gpu.modes, gpu.baseline) == ("smollm2_135m_shape", "commonsense_intra",
                                                              "default,eager", "peft-compiled,hf-peft")
    assert overrides[-1] == "trainer.cuda_graphs=true"
    with script_module("bench_loop") as bench_loop:
        default = bench_loop.overrides_for(gpu, "malora", "default")
    assert not any("cuda_graphs" in o or "compile" in o for o in default)  # a bare run: no speed flag
    assert (cpu.model, cpu.data, cpu.baseline) == ("tiny", "synthetic", "none")
