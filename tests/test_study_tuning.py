"""scripts/study.py's tuned parts (issue 27): the lr chosen per method on the validation split (ties, missing
runs named), an lr_sweep end to end on the tiny model, the rank x experts sweep's overrides and its table and
plot, the router experiment's overrides and its I(task; expert) table, all from fabricated run folders
except the one tiny sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from script_modules import script_fixture

from malora_train.cli import compose
from malora_train.commands import study_tuning as tuning
from malora_train.commands.report import build_report

TINY = ["model=tiny", "trainer.cuda_graphs=false", "trainer.progress=false", "data.train_per_task=32",
        "data.eval_per_task=4", "trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.epochs=0"]


study = script_fixture("study")


def fake_run(folder: Path, overrides: list[str], average: float | None, *, adapter: str = "molora",
             params: int = 1000, step_time: float = 0.5, routing: dict | None = None,
             failed: str | None = None) -> None:
    """A run folder as a sweep job leaves it: its overrides, and a completed summary (or a failure)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if failed:
        (folder / "failure.json").write_text(json.dumps({"error": failed}))
        return
    (folder / "summary.json").write_text(json.dumps({
        "status": "completed", "adapter": adapter, "eval_after": {"a": average, "b": average},
        "eval_after_average": average, "trainable_params": params, "trainable_percent": 1.0,
        "train_time_s": 10 * step_time, "steps": 10, "tokens_per_s": 1000.0}))
    if routing:
        (folder / "routing.json").write_text(json.dumps(routing))


def runs_of(folder: Path):
    rows, _ = build_report(folder, folder)
    return [run for row in rows for run in (*row.runs, *row.unfinished)]


def test_the_lr_with_the_best_validation_average_is_chosen_a_tie_going_to_the_smaller(tmp_path: Path) -> None:
    curves = {"lora": {"2e-4": 50.0, "4e-4": 61.0, "1e-3": 61.0, "2e-3": 40.0},  # a tie: 4e-4
              "molora": {"2e-4": 30.0, "4e-4": 35.0, "1e-3": 52.5, "2e-3": 52.0}}
    for method, curve in curves.items():
        for lr, average in curve.items():
            fake_run(tmp_path / f"{method}-{lr}", [f"+variant={method}", f"trainer.lr={float(lr)}", "seed=0"],
                     average)
    selection = tuning.select_lrs(runs_of(tmp_path), ["lora", "molora"], list(tuning.LRS))
    assert selection["lora"]["lr"] == "4e-4" and selection["molora"]["lr"] == "1e-3"
    assert selection["lora"]["curve"] == curves["lora"]  # 0.0004 in the overrides is the grid's 4e-4
    assert selection["lora"]["spread"] == pytest.approx(21.0) and selection["lora"]["margin"] == 0.0
    assert selection["molora"]["margin"] == pytest.approx(0.5) and selection["molora"]["missing"] == {}
    record = tuning.selection_record(selection, base="bigbench", lrs=list(tuning.LRS), fraction=0.1,
                                     seeds=["0"])
    markdown = tuning.selection_markdown(record)
    assert "| lora | 50.00 | **61.00** | 61.00 | 40.00 | 4e-4 | 21.00 | 0.00 |" in markdown
    assert "| molora | 30.00 | 35.00 | **52.50** | 52.00 | 1e-3 | 22.50 | 0.50 |" in markdown


def test_a_method_with_missing_runs_gets_no_choice_and_they_are_named(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", ["+variant=lora", "trainer.lr=2e-4", "seed=0"], 50.0)
    fake_run(tmp_path / "b", ["+variant=lora", "trainer.lr=1e-3", "seed=0"], None,
             failed="CUDA out of memory")
    selection = tuning.select_lrs(runs_of(tmp_path), ["lora", "hydralora"], ["2e-4", "1e-3", "2e-3"])
    lora = selection["lora"]
    assert lora["lr"] is None and lora["curve"] == {"2e-4": 50.0, "1e-3": None, "2e-3": None}
    assert lora["missing"] == {"1e-3": "failed: CUDA out of memory", "2e-3": "no run"}
    assert selection["hydralora"]["lr"] is None and len(selection["hydralora"]["missing"]) == 3
    record = tuning.selection_record(selection, base="commonsense", lrs=["2e-4", "1e-3", "2e-3"],
                                     fraction=0.1, seeds=["0"])
    markdown = tuning.selection_markdown(record)
    assert "- lora, lr 1e-3: failed: CUDA out of memory" in markdown and "- lora, lr 2e-3: no run" in markdown
    assert "| lora | 50.00 | – | – | none | 0.00 | – |" in markdown
    with pytest.raises(Exception, match="no tuned lr for lora: .* --lr lora=LR"):
        tuning.chosen_lrs(["lora"], {}, record, "lr_selection.json")
    assert tuning.chosen_lrs(["lora"], {"lora": "1e-3"}, record, "x") == {"lora": "1e-3"}


def test_lr_sweep_runs_end_to_end_on_the_tiny_model(study, tmp_path: Path, capsys) -> None:
    argv = ["lr_sweep", "--part", "synthetic", "--out", str(tmp_path), "--lrs", "1e-3,4e-3", "--seeds", "0",
            "--validation-fraction", "0.25", *TINY, "+variant=lora,molora",
            f"data.cache_dir={tmp_path / 'tokenized'}"]
    assert study.main(argv) == 0
    part = tmp_path / "lr_sweep_synthetic"
    validation = sorted((part / "validation").glob("*/summary.json"))
    tuned = sorted((part / "tuned").glob("*/summary.json"))
    assert len(validation) == 4 and len(tuned) == 2
    for summary in validation:  # recorded: the split it scored and the share it held out
        data = yaml.safe_load((summary.parent / "config.yaml").read_text())["data"]
        assert (data["validation_fraction"], data["eval_split"]) == (0.25, "validation")
    record = json.loads((part / tuning.SELECTION_FILE).read_text())
    assert record["lrs"] == ["1e-3", "4e-3"] and set(record["methods"]) == {"lora", "molora"}
    for method, entry in record["methods"].items():
        assert entry["lr"] in ("1e-3", "4e-3") and not entry["missing"]
        [run] = [s.parent for s in tuned if f"variant-{method}__" in s.parent.name]
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        [lr] = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.lr=")]
        assert float(lr) == float(entry["lr"]) and "data.eval_split=test" in overrides
    report = (part / "report.md").read_text()
    assert "learning rate chosen per method" in report and "## Tuned lr" in report
    assert "make study PART=synthetic writes it" in report  # no shared-lr part here
    out = capsys.readouterr().out
    assert f"wrote {part / tuning.SELECTION_FILE}" in out
    # a rerun trains nothing and reports the same choice
    assert study.main([*argv, "--report-only"]) == 0
    assert json.loads((part / tuning.SELECTION_FILE).read_text()) == record
    # packed for a repository (both stages' raw files in one archive), the report is rebuilt the same from
    # what a clone holds: no archive, no report
    report_before = (part / "report.md").read_bytes()
    assert study.main(["lr_sweep", "--part", "synthetic", "--out", str(tmp_path), "--pack"]) == 0
    assert not [p for p in part.rglob("*") if p.name in ("metrics.jsonl", "routing.json")]
    assert len(list(part.rglob("report_inputs.json"))) == 6
    assert study.main(["lr_sweep", "--part", "synthetic", "--out", str(tmp_path), "--verify-raw"]) == 0
    (part / "raw_files.tar.xz").unlink()
    (part / "report.md").unlink()
    assert study.main([*argv, "--report-only"]) == 0
    assert (part / "report.md").read_bytes() == report_before
    assert json.loads((part / tuning.SELECTION_FILE).read_text()) == record


def test_lr_sweep_with_jobs_runs_each_methods_sweeps_as_processes_at_once(study, tmp_path: Path,
                                                                          capsys) -> None:
    """--jobs 2: the validation and tuned sweeps one a method, two processes at once, the same run folders and
    choice as in one process."""
    argv = ["lr_sweep", "--part", "synthetic", "--out", str(tmp_path), "--lrs", "1e-3,4e-3", "--seeds", "0",
            "--jobs", "2", *TINY, "+variant=lora,molora", f"data.cache_dir={tmp_path / 'tokenized'}"]
    assert study.main(argv) == 0
    part = tmp_path / "lr_sweep_synthetic"
    for stage, runs in (("validation", 4), ("tuned", 2)):
        assert len(list((part / stage).glob("*/summary.json"))) == runs
        logs = sorted((part / "jobs" / stage).glob("*.log"))
        assert [log.name for log in logs] == ["0.log", "1.log"]
    out = capsys.readouterr().out
    assert out.count("job 0: -m malora_train.cli -m +experiment=paper_synthetic") == 2  # each stage's first
    record = json.loads((part / tuning.SELECTION_FILE).read_text())
    assert all(entry["lr"] and not entry["missing"] for entry in record["methods"].values())


def test_processes_at_once_report_the_worst_exit_status_and_the_failures_log(study, tmp_path: Path,
                                                                             capsys) -> None:
    import sys

    # job 0 runs long: with 2 slots, jobs 1 and 2 finish in the other slot meanwhile
    commands = [[sys.executable, "-c", f"import time; time.sleep({delay}); print('job says {k}'); "
                 f"open(r'{tmp_path / 'order'}', 'a').write('{k}'); raise SystemExit({k})"]
                for k, delay in ((0, 3), (3, 0), (2, 0))]
    assert study.run_processes(commands, 2, tmp_path / "logs") == 3
    assert (tmp_path / "order").read_text() == "320"  # a freed slot took the next job before job 0 ended
    assert (tmp_path / "logs" / "1.log").read_text().strip() == "job says 3"
    err = capsys.readouterr().err
    assert f"study.py: job 1 exited with status 3 ({tmp_path / 'logs' / '1.log'}):\n  job says 3" in err
    assert "job 2 exited with status 2" in err and "job 0 exited" not in err


def test_rank_experts_sweeps_n_by_r_at_each_methods_tuned_lr(study, tmp_path: Path) -> None:
    assert tuning.rank_experts_overrides("molora", "1e-3", ["0", "1"], 0.1) == [
        "+variant=molora", "trainer.lr=1e-3", "adapter.num_experts=4,8,16", "adapter.rank=4,8,16", "seed=0,1",
        "data.validation_fraction=0.1", "data.eval_split=test"]
    for n in tuning.NUM_EXPERTS:  # each point composes; MALoRA sized from the same budget
        for r in tuning.EXPERT_RANKS:
            cfg = compose(["+experiment=paper_bigbench", "+variant=malora_intra", f"adapter.num_experts={n}",
                           f"adapter.rank={r}"])
            assert (cfg.adapter.num_experts, cfg.adapter.rank, cfg.adapter.lam) == (n, r, 0.5)
    selection = tmp_path / "lr_sweep_bigbench" / tuning.SELECTION_FILE
    selection.parent.mkdir()
    chosen = {"molora": {"lr": "1e-3"}, "malora_intra": {"lr": "2e-3"}}
    selection.write_text(json.dumps({"validation_fraction": 0.2, "methods": chosen}))
    args = study.parse_args(["rank_experts", "--out", str(tmp_path)])
    assert study.tuned_lrs(args, ["molora", "malora_intra"]) == ({"molora": "1e-3", "malora_intra": "2e-3"},
                                                                  0.2)
    args = study.parse_args(["rank_experts", "--out", str(tmp_path / "none"), "--lr", "molora=5e-4"])
    assert study.tuned_lrs(args, ["molora"]) == ({"molora": "5e-4"}, 0.1)
    with pytest.raises(Exception, match="lr_selection.json not found: run the lr sweep first"):
        study.tuned_lrs(args, ["molora", "malora_intra"])


def test_rank_experts_report_and_plot_from_fabricated_runs(study, tmp_path: Path, capsys) -> None:
    part = tmp_path / "rank_experts"
    for method, adapter in (("molora", "molora"), ("malora_intra", "malora")):
        for n in (4, 8):
            for r in (4, 8):
                for seed in (0, 1):
                    fake_run(part / f"{method}-{n}-{r}-{seed}",
                             ["+experiment=paper_bigbench", f"+variant={method}", "trainer.lr=1e-3",
                              f"adapter.num_experts={n}", f"adapter.rank={r}", f"seed={seed}"],
                             40.0 + n + r + seed, adapter=adapter, params=1000 * n * r, step_time=0.01 * n)
    assert study.main(["rank_experts", "--report-only", "--out", str(tmp_path)]) == 0
    markdown = (part / "rank_experts.md").read_text()
    assert "| malora_intra | 8 | 4 | d=16, r̄=6 | 32,000 | 2 | 52.50 ± 0.71 | 0.080 ± 0.000 |" in markdown
    assert "| molora | 4 | 8 | – | 32,000 | 2 | 52.50 ± 0.71 | 0.040 ± 0.000 |" in markdown
    lines = (part / "rank_experts.csv").read_text().splitlines()
    assert lines[0].startswith("method,adapter,num_experts,rank") and len(lines) == 9
    assert (part / "rank_experts.png").read_bytes()[:4] == b"\x89PNG"
    assert (part / "report.md").is_file() and (part / "accuracy_vs_params.png").is_file()  # malora-report's
    assert f"wrote {part / 'rank_experts.md'}" in capsys.readouterr().out


def routing_report(concentrated: bool) -> dict:
    """Two tasks over four experts in two decoder layers: alike, or one expert pair a task in layer 1."""
    alike = [[0.25] * 4, [0.25] * 4]
    apart = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]] if concentrated else alike
    layers = {"model.layers.0.self_attn.q_proj": alike, "model.layers.1.self_attn.q_proj": apart}
    return {"tasks": ["a", "b"], "num_experts": 4, "top_k": 2, "tokens": {"a": 10, "b": 10},
            "average": alike, "layers": layers}


def test_router_experiment_overrides_and_its_mutual_information_table(study, tmp_path: Path) -> None:
    overrides = tuning.router_overrides("molora", "1e-3")
    assert overrides == ["+variant=molora", "trainer.lr=1e-3", "adapter.router.lr_scale=1,10",
                         "adapter.router.balance_coef=0.01,0", "adapter.router.init=normal,kaiming", "seed=0",
                         "data.validation_fraction=0.1", "data.eval_split=test"]
    cfg = compose(["+experiment=paper_bigbench", "+variant=molora", "adapter.router.lr_scale=10",
                   "adapter.router.balance_coef=0", "adapter.router.init=kaiming"])
    assert (cfg.adapter.router.lr_scale, cfg.adapter.router.balance_coef, cfg.adapter.router.init) == (
        10.0, 0.0, "kaiming")
    part = tmp_path / "router_specialisation"
    for scale in ("1", "10"):
        overrides = ["+variant=molora", f"adapter.router.lr_scale={scale}", "adapter.router.balance_coef=0",
                     "adapter.router.init=normal", "seed=0"]
        fake_run(part / f"s{scale}", overrides, 50.0, routing=routing_report(scale == "10"))
    assert study.main(["router_specialisation", "--report-only", "--out", str(tmp_path)]) == 0
    markdown = (part / tuning.ROUTER_FILE).read_text()
    assert "| molora | 1 | 0 | normal | 50.00 ± – | 0.000 | 0.000 (0) | 1.00 | 0.000 0.000 |" in markdown
    assert "| molora | 10 | 0 | normal | 50.00 ± – | 0.500 | 1.000 (1) | 1.00 | 0.000 1.000 |" in markdown


def test_the_tuned_parts_refuse_options_of_the_other_parts(study) -> None:
    with pytest.raises(SystemExit):
        study.parse_args(["lr_sweep", "--no-report"])
    assert study.parse_args(["lr_sweep"]).seeds == "0,1,2"
    assert study.tuned_dir("rank_experts", Path("s"), "bigbench") == Path("s/rank_experts")
    assert study.tuned_dir("lr_sweep", Path("s"), "bigbench") == Path("s/lr_sweep_bigbench")
    assert re.fullmatch(r"[a-z_]+", study.tuned_dir("router_specialisation", Path("s"), "synthetic").name)


def test_the_tuned_parts_read_the_presets_methods_in_a_fresh_interpreter() -> None:
    """``study.py lr_sweep`` reads the preset's methods before anything imported the CLI (which registers the
    config schemas): in a process of its own, as ``make study`` starts it (a test in this process would pass
    on the schemas other tests registered)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, 'scripts'); import study; "
            "print(','.join(study.preset_variants('synthetic')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "lora,molora,malora_intra,malora_small,hydralora"
