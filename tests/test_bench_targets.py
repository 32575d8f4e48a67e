"""`make bench-loop` (`bench_loop.py --targets`): issue 24's targets table from its three parts' reports, the
parts' commands, and the whole suite on the CPU with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from script_modules import script_module

REPO = Path(__file__).resolve().parents[1]
CAPTURED = "captured (each step replayed as CUDA graphs)"
EAGER = "eager (trainer.cuda_graphs=false)"


def loop_row(adapter: str, mode: str, tokens_per_s: float, step_s: float, processes: int = 1,
             overrides: tuple[str, ...] = (), peak: float | None = None) -> dict:
    return {"adapter": adapter, "mode": mode, "processes": processes, "overrides": list(overrides),
            "tokens_per_s": tokens_per_s, "step_s": step_s, "peak_memory_gb": peak,
            "step_path": CAPTURED if mode in ("default", "compile+graphs") else EAGER}


def reports() -> tuple[dict, dict, dict]:
    """The three parts' reports: a 135M loop, a 7B loop and bench.py's 7B step, with round numbers."""
    loop = {"rows": [loop_row("lora", "default", 120_000, 0.030),
                     loop_row("molora", "default", 90_000, 0.040),
                     loop_row("malora", "default", 88_000, 0.042),
                     loop_row("lora", "eager", 61_000, 0.06), loop_row("molora", "eager", 44_000, 0.08),
                     loop_row("malora", "eager", 40_000, 0.08),
                     loop_row("malora", "default", 150_000, 0.05, processes=2),
                     loop_row("molora", "compile+graphs", 125_000, 0.029),
                     loop_row("malora", "compile+graphs", 110_000, 0.033)],
            "baselines": [{"mode": "peft-compiled", "tokens_per_s": 40_000},
                          {"mode": "hf", "tokens_per_s": 4_000}]}
    selective = ("trainer.gradient_checkpointing=selective",)
    big = {"rows": [loop_row("molora", "default", 10_000, 0.30), loop_row("malora", "default", 10_000, 0.30,
                                                                            peak=37.2),
                    loop_row("molora", "default", 7_000, 0.44, overrides=selective),
                    loop_row("malora", "default", 7_600, 0.40, overrides=selective, peak=25.3)]}
    step = {"rows": [{"scenario": "main", "method": m, "impl": "fast", "step_s": s, "error": ""}
                     for m, s in (("floor", 0.25), ("lora", 0.28), ("molora", 0.31), ("malora", 0.30))]}
    return loop, big, step


def test_each_target_is_read_from_its_parts_report_and_judged() -> None:
    with script_module("bench_targets") as bench_targets:
        rows = {t.row: t for t in bench_targets.targets(*reports())}
    assert rows["no speed flag, 135M, MALoRA"].measured == "88,000 tok/s (captured)"
    assert rows["no speed flag, 135M, MALoRA"].verdict == "met"
    eager = [rows[f"eager {a}, 135M"].verdict for a in ("malora", "molora", "lora")]
    assert eager == ["met", "missed", "met"]
    # the faster captured MALoRA row: with trainer.compile
    captured = rows["captured MALoRA, 135M"]
    assert (captured.measured, captured.verdict) == ("110,000 tok/s with trainer.compile",
                                                     "missed")
    assert (rows["MALoRA / compiled HF + PEFT LoRA r64"].measured, rows[
        "MALoRA / compiled HF + PEFT LoRA r64"].verdict) == ("2.75x with trainer.compile", "met")
    assert rows["2 processes, MALoRA, 135M"].verdict == "met"  # ran, captured
    checkpointing = rows["7B MALoRA, selective checkpointing / none"]
    assert (checkpointing.measured, checkpointing.verdict) == ("0.76x; peak 37.2 -> 25.3 GB", "met")
    assert rows["7B eager MALoRA step / frozen floor (bench.py)"].measured == "1.20x"
    assert rows["7B eager MALoRA step / frozen floor (bench.py)"].verdict == "met"
    pairs = {where: rows[f"MALoRA / MoLoRA step, {where}"] for where in (
        "135M no speed flag", "135M eager", "135M with trainer.compile", "7B no speed flag",
        "7B eager (bench.py)")}
    assert {w: (t.measured, t.verdict) for w, t in pairs.items()} == {
        "135M no speed flag": ("1.05x", "missed"), "135M eager": ("1.00x", "met"),
        "135M with trainer.compile": ("1.14x", "missed"),
        "7B no speed flag": ("1.00x", "met"), "7B eager (bench.py)": ("0.97x", "met")}


def test_a_part_that_did_not_run_leaves_its_targets_unmeasured() -> None:
    loop, big, _ = reports()
    loop["rows"][2] = {**loop["rows"][2], "error": "RuntimeError: out of memory"}  # the default MALoRA row
    with script_module("bench_targets") as bench_targets:
        rows = {t.row: t for t in bench_targets.targets(loop, big, None)}
        table = bench_targets.markdown(list(rows.values()), with_verdicts=True)
    assert rows["no speed flag, 135M, MALoRA"].verdict == "not measured"
    # the captured row falls back on the compiled one
    assert rows["captured MALoRA, 135M"].measured == "110,000 tok/s with trainer.compile"
    assert rows["7B eager MALoRA step / frozen floor (bench.py)"].verdict == "not measured"
    assert rows["MALoRA / MoLoRA step, 7B eager (bench.py)"].verdict == "not measured"
    assert rows["eager malora, 135M"].verdict == "met"  # the other rows are unaffected
    assert "| eager malora, 135M | 40,000 tok/s | >= 40,000 | met |" in table


def test_the_parts_commands_give_the_data_overrides_to_the_7b_runs_only() -> None:
    with script_module("bench_targets") as bench_targets:
        parts = bench_targets.parts("cuda", 12, 5, ["data.root=/d", "model.tokenizer=/t"], Path("/o/t.json"))
    loop, big, step = parts
    assert [p.json for p in parts] == [Path("/o/t.loop_135m.json"), Path("/o/t.loop_7b.json"),
                                       Path("/o/t.step_7b.json")]
    assert loop.command[-2:] == ["data.root=/d", "model.tokenizer=/t"]
    assert big.command[-1] == "data.root=/d" and "model.tokenizer=/t" not in big.command
    assert "--model" in big.command and big.command[big.command.index("--model") + 1] == "llama2_7b"
    assert "--checkpointing" in big.command and "--processes" in loop.command
    assert loop.command[loop.command.index("--modes") + 1] == "default,eager,compile+graphs"
    assert step.command[1].endswith("bench.py") and "llama2_7b" in step.command
    with script_module("bench_targets") as bench_targets:  # a CPU cannot capture
        cpu_loop = bench_targets.parts("cpu", 2, 1, [], Path("/o/t.json"))[0]
    assert cpu_loop.command[cpu_loop.command.index("--modes") + 1] == "default,eager"


def test_make_bench_loop_prints_the_targets_table_from_one_command(tmp_path: Path) -> None:
    """The whole suite on the CPU (the tiny model for both sizes): three processes, one table, the JSON."""
    out = tmp_path / "targets.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_loop.py"), "--targets", "--device", "cpu",
         "--steps", "2", "--warmup", "1", "--json", str(out), "--", "data.train_per_task=16",
         "data.cache=false"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(p["name"], p["exit_status"]) for p in report["parts"]] == [
        ("loop_135m", 0), ("loop_7b", 0), ("step_7b", 0)]
    assert all(Path(p["json"]).is_file() for p in report["parts"])
    measured = {t["row"]: t["measured"] for t in report["targets"]}
    # all but the captured-with-compile pair, which a CPU does not run
    compiled_pair = "MALoRA / MoLoRA step, tiny (135M part) with trainer.compile"
    assert len(measured) == 14 and measured.pop(compiled_pair) == "not measured"
    assert "not measured" not in " ".join(measured.values())
    assert measured["2 processes, MALoRA, tiny (135M part)"].endswith("tok/s (eager)")
    assert "| no speed flag, tiny (135M part), MALoRA |" in result.stdout
    assert "- (CPU smoke run)" in result.stdout


def test_parts_finish_a_suite_cut_short_from_the_earlier_parts_reports(tmp_path: Path, capsys) -> None:
    """``--parts step_7b``: only bench.py runs; the loops' rows come from the reports an earlier run left
    beside ``--json``."""
    loop, big, _ = reports()
    out = tmp_path / "targets.json"
    (tmp_path / "targets.loop_135m.json").write_text(json.dumps(loop))
    (tmp_path / "targets.loop_7b.json").write_text(json.dumps(big))
    with script_module("bench_targets") as bench_targets:
        rows = {t.row: t for t in bench_targets.run("cpu", 2, 1, [], out, only=["step_7b"])}
    printed = capsys.readouterr().out
    earlier = tmp_path / "targets.loop_135m.json"
    assert f"== loop_135m: not run; its report from an earlier run: {earlier}" in printed
    assert rows["no speed flag, tiny (135M part), MALoRA"].measured == "88,000 tok/s (captured)"
    assert rows["tiny (7B part) eager MALoRA step / frozen floor (bench.py)"].measured != "not measured"
    report = json.loads(out.read_text())
    assert [(p["name"], p["exit_status"]) for p in report["parts"]] == [
        ("loop_135m", None), ("loop_7b", None), ("step_7b", 0)]


def test_parts_are_checked_in_one_line() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_loop.py"), "--targets", "--parts",
                             "loop_9b"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--parts: unknown loop_9b (choose from loop_135m" in result.stderr
