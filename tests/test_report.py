"""malora-report on a fake Hydra multirun folder: aggregation over seeds, CSV, markdown, plot, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from malora_train.commands.report import Row, Stat, accuracy_figure, main

TASKS = ("boolq", "piqa", "arc_e")
KINDS = {"lora": 1_024, "molora": 4_352}  # trainable parameters per unit of rank
RANKS = (4, 8)
SEEDS = (0, 1)
TRAIN_STEPS = 5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_results(kind: str, rank: int, seed: int) -> dict:
    """Distinct, seed-dependent numbers for one run (what the test expects the report to average)."""
    offset = (0.0 if kind == "lora" else 3.0) + rank * 0.25
    spread = (1.7 if seed else -0.9) * rank / 4
    accuracy = {task: 50.0 + offset + i * 4.0 + spread * (i + 1) for i, task in enumerate(TASKS)}
    return {
        "accuracy": accuracy,
        "average": sum(accuracy.values()) / len(accuracy),
        "tokens_per_s": 1000.0 + 37.0 * seed + (100.0 if kind == "lora" else 0.0),
        "train_time_s": 2.0 + 0.5 * seed + (0.3 if kind == "lora" else 0.0) + 0.01 * rank,
        "final_lm_loss": 1.5 - 0.01 * rank + 0.05 * seed,
        "trainable_params": KINDS[kind] * rank,
    }


def write_run(job_dir: Path, overrides: list[str], kind: str, results: dict | None, steps: int) -> None:
    """A run folder as malora-train writes it; ``results=None`` leaves it without summary.json."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "config.yaml").write_text(yaml.safe_dump({"adapter": {"kind": kind}, "seed": 0}))
    lines = []
    for step in range(1, steps + 1):
        lm_loss = 2.0 - 0.1 * step
        if results is not None and step == steps:
            lm_loss = results["final_lm_loss"]
        lines.append({"step": step, "loss": lm_loss + 0.01, "lm_loss": lm_loss, "aux_loss": 0.01, "lr": 1e-4,
                      "tokens_per_s": 900.0, **{f"loss/{t}": lm_loss for t in TASKS}})
    if results is None:
        partial = '{"step": 4, "lo'  # the job was killed while appending a line
        (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + partial)
        return
    lines.append({"step": steps, **{f"eval/{t}": a for t, a in results["accuracy"].items()},
                  "eval/average": results["average"]})
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "status": "completed", "model": "tiny", "adapter": kind, "steps": steps, "tokens": 12_345,
        "wall_time_s": 12.3, "train_time_s": results["train_time_s"], "tokens_per_s": results["tokens_per_s"],
        "peak_memory_gb": 0.4,
        "trainable_params": results["trainable_params"],
        "total_params": 1_000_000 + results["trainable_params"],
        "trainable_percent": 100 * results["trainable_params"] / 1_000_000,
        "eval_before": {t: 25.0 for t in TASKS}, "eval_before_average": 25.0,
        "eval_after": results["accuracy"], "eval_after_average": results["average"],
        "best_eval_average": results["average"], "best_step": steps,
        "adapter_dir": str(job_dir / "adapter"), "world_size": 1,
    }
    (job_dir / "summary.json").write_text(json.dumps(summary, indent=1))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """multirun/<date>/<time>: lora and molora x rank 4, 8 x seed 0, 1, plus an interrupted molora r=16."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    num = 0
    for kind in KINDS:
        for rank in RANKS:
            for seed in SEEDS:
                overrides = ["model=tiny", f"adapter={kind}", f"adapter.rank={rank}", f"seed={seed}"]
                write_run(root / f"{num}_{','.join(overrides)}", overrides, kind,
                          fake_results(kind, rank, seed), TRAIN_STEPS)
                num += 1
    write_run(root / f"{num}_model=tiny,adapter=molora,adapter.rank=16,seed=0",
              ["model=tiny", "adapter=molora", "adapter.rank=16", "seed=0"], "molora", None, 3)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected(kind: str, rank: int) -> dict[str, tuple[float, float]]:
    """Mean and sample std over the seeds, computed here from the numbers written into the runs."""
    runs = [fake_results(kind, rank, seed) for seed in SEEDS]
    values = {f"acc_{t}": [r["accuracy"][t] for r in runs] for t in TASKS}
    values["acc_average"] = [r["average"] for r in runs]
    values["final_lm_loss"] = [r["final_lm_loss"] for r in runs]
    values["tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    values["step_time_s"] = [r["train_time_s"] / TRAIN_STEPS for r in runs]
    return {name: (statistics.mean(v), statistics.stdev(v)) for name, v in values.items()}


def test_csv_has_one_line_per_configuration_with_mean_and_std_over_seeds(sweep: Path, capsys) -> None:
    main([str(sweep)])
    rows = read_csv(sweep / "report.csv")
    metrics = [f"acc_{t}" for t in TASKS] + ["acc_average", "final_lm_loss", "tokens_per_s", "step_time_s"]
    stats = [f"{m}_{part}" for m in metrics for part in ("mean", "std")]
    assert list(rows[0]) == ["config", "adapter", "seeds", "incomplete", "failed", "trainable_params",
                             "trainable_percent", *stats]
    assert [row["config"] for row in rows] == [
        "model=tiny,adapter=lora,adapter.rank=4", "model=tiny,adapter=lora,adapter.rank=8",
        "model=tiny,adapter=molora,adapter.rank=4", "model=tiny,adapter=molora,adapter.rank=8",
        "model=tiny,adapter=molora,adapter.rank=16"]
    for row in rows[:4]:
        kind, rank = row["adapter"], int(row["config"].rsplit("=", 1)[1])
        assert (row["seeds"], row["incomplete"]) == ("2", "0")
        assert int(row["trainable_params"]) == KINDS[kind] * rank
        for name, (mean, std) in expected(kind, rank).items():
            assert float(row[f"{name}_mean"]) == pytest.approx(mean), name
            assert float(row[f"{name}_std"]) == pytest.approx(std), name
            assert std > 0
    interrupted = rows[4]
    assert (interrupted["adapter"], interrupted["seeds"], interrupted["incomplete"],
            interrupted["failed"]) == ("molora", "0", "1", "0")
    assert interrupted["acc_average_mean"] == interrupted["trainable_params"] == ""


def test_markdown_table_is_written_and_printed_with_the_incomplete_run(sweep: Path, capsys) -> None:
    main([str(sweep)])
    printed = capsys.readouterr().out
    assert printed == (sweep / "report.md").read_text()
    lines = printed.splitlines()
    assert lines[0] == ("| config | adapter | trainable params | seeds | boolq | piqa | arc_e | average | "
                        "final lm_loss | tokens/s | step time (s) |")
    mean, std = expected("lora", 8)["acc_piqa"]
    lora8 = next(line for line in lines if "`adapter=lora,adapter.rank=8`" in line)
    cells = [c.strip() for c in lora8.strip("|").split("|")]
    assert cells[:4] == ["`adapter=lora,adapter.rank=8`", "lora", f"{KINDS['lora'] * 8:,} (0.82%)", "2"]
    assert cells[5] == f"{mean:.2f} ± {std:.2f}"
    assert "`adapter=molora,adapter.rank=16` | molora | – | 0 (+1 incomplete) |" in printed
    assert "Overrides shared by every configuration: `model=tiny`." in lines
    assert ("- `8_model=tiny,adapter=molora,adapter.rank=16,seed=0` "
            "(`model=tiny,adapter=molora,adapter.rank=16,seed=0`): incomplete, last logged step 3") in lines


def write_failure(job_dir: Path, overrides: list[str], error: str) -> None:
    """A sweep job that raised before training: Hydra's overrides and the failure record, nothing else."""
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "failure.json").write_text(json.dumps({"status": "failed", "error": error,
                                                      "error_type": "ConfigError", "overrides": overrides}))


def test_failed_jobs_are_listed_with_their_error_and_counted(sweep: Path, capsys) -> None:
    overrides = ["model=tiny", "adapter=molora", "adapter.rank=0", "seed=0"]
    job = f"9_{','.join(overrides)}"
    write_failure(sweep / job, overrides, "adapter.rank=0 must be >= 1")
    write_failure(sweep / "10_x", [*overrides[:3], "seed=1"], "adapter.rank=0 must be >= 1")
    main([str(sweep)])
    printed = capsys.readouterr().out
    assert "`adapter=molora,adapter.rank=0` | molora | – | 0 (+2 failed) |" in printed
    assert "`adapter=molora,adapter.rank=16` | molora | – | 0 (+1 incomplete) |" in printed
    assert "Runs not aggregated (3, failed or without a completed summary.json):" in printed
    assert (f"- `{job}` (`{','.join(overrides)}`): failed: adapter.rank=0 must be >= 1, nothing logged"
            in printed)
    failed = next(r for r in read_csv(sweep / "report.csv") if r["config"].endswith("adapter.rank=0"))
    assert (failed["seeds"], failed["incomplete"], failed["failed"]) == ("0", "0", "2")


def test_a_completed_run_wins_over_a_later_refused_attempt(sweep: Path, capsys) -> None:
    job = sweep / "0_model=tiny,adapter=lora,adapter.rank=4,seed=0"
    write_failure(job, ["model=tiny", "adapter=lora", "adapter.rank=4", "seed=0"], "already holds a run")
    main([str(sweep)])
    assert "already holds a run" not in capsys.readouterr().out
    assert read_csv(sweep / "report.csv")[0]["seeds"] == "2"


def test_plot_is_a_valid_png(sweep: Path, tmp_path: Path, capsys) -> None:
    import matplotlib.image

    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    png = out / "accuracy_vs_params.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    assert not (sweep / "report.md").exists()


def plot_row(rank: int, params: int, average: float) -> Row:
    overrides = [f"adapter.rank={rank}", "trainer.lr=0.0001"]
    return Row(overrides=overrides, distinct=overrides, adapter="lora", runs=[], unfinished=[],
               trainable_params=params, trainable_percent=None, accuracy={}, average=Stat(average, None),
               final_lm_loss=Stat(None, None), tokens_per_s=Stat(None, None))


def test_plot_labels_do_not_overlap() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # six configurations within 1% of each other's parameters and 0.3 points of accuracy, and two far away
    rows = [plot_row(8 + i, 10_000 + 10 * i, 50.0 + 0.05 * i) for i in range(6)]
    rows += [plot_row(1, 1_000, 20.0), plot_row(64, 1_000_000, 90.0)]
    fig = accuracy_figure(rows)
    renderer = FigureCanvasAgg(fig).get_renderer()
    [ax] = fig.axes
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert len(boxes) == 8
    overlapping = [(i, j) for i in range(8) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert overlapping == []


def test_no_group_gives_one_row_per_run_without_std(sweep: Path, capsys) -> None:
    main([str(sweep), "--no-group"])
    rows = read_csv(sweep / "report.csv")
    assert len(rows) == len(KINDS) * len(RANKS) * len(SEEDS) + 1
    row = next(r for r in rows if r["config"] == "model=tiny,adapter=molora,adapter.rank=8,seed=1")
    assert float(row["acc_average_mean"]) == pytest.approx(fake_results("molora", 8, 1)["average"])
    assert row["acc_average_std"] == ""
    assert f"{fake_results('molora', 8, 1)['average']:.2f} ± –" in capsys.readouterr().out


def test_overrides_fall_back_to_the_job_folder_name(sweep: Path, capsys) -> None:
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        overrides.unlink()
    main([str(sweep)])
    rows = read_csv(sweep / "report.csv")
    assert rows[0]["config"] == "model=tiny,adapter=lora,adapter.rank=4" and rows[0]["seeds"] == "2"


def test_runs_whose_files_lived_elsewhere_are_one_configuration(sweep: Path, capsys) -> None:
    """The same configuration run on two machines (its data, tokenizer and caches in other folders) is
    one row: seed 1 of lora r=4 gets another data.root, model.tokenizer and data.cache."""
    path = sweep / "1_model=tiny,adapter=lora,adapter.rank=4,seed=1" / ".hydra" / "overrides.yaml"
    path.write_text(yaml.safe_dump(["model=tiny", "adapter=lora", "adapter.rank=4", "seed=1",
                                    "data.root=/elsewhere", "model.tokenizer=/tok", "data.cache=false",
                                    "data.cache_dir=/c"]))
    main([str(sweep)])
    rows = read_csv(sweep / "report.csv")
    assert rows[0]["config"] == "model=tiny,adapter=lora,adapter.rank=4" and rows[0]["seeds"] == "2"
    assert len(rows) == len(KINDS) * len(RANKS) + 1


def test_runs_repeating_a_seed_are_averaged_with_a_warning(sweep: Path, capsys) -> None:
    job = "0_model=tiny,adapter=lora,adapter.rank=4,seed=0"
    shutil.copytree(sweep / job, sweep.parent / "13-00-00" / job)
    main([str(sweep.parent)])
    assert "adapter=lora,adapter.rank=4: several runs with seed=0" in capsys.readouterr().err
    rows = read_csv(sweep.parent / "report.csv")
    assert rows[0]["seeds"] == "3"
    accuracies = [fake_results("lora", 4, seed)["average"] for seed in (0, 0, 1)]
    assert float(rows[0]["acc_average_std"]) == pytest.approx(statistics.stdev(accuracies))


@pytest.mark.parametrize("make_dir", ["empty", "missing"])
def test_a_folder_without_runs_is_a_one_line_error(tmp_path: Path, capsys, make_dir: str) -> None:
    target = tmp_path / "nothing"
    if make_dir == "empty":
        (target / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("malora-report: error:")
    assert str(target) in err


@pytest.mark.parametrize("content", ['{"status": "completed", "eval_after"', "{}"],
                         ids=["truncated", "empty"])
def test_an_unreadable_or_incomplete_summary_is_skipped_and_named(sweep: Path, capsys, content) -> None:
    """One truncated summary.json does not block the report, and a ``{}`` one is not a completed seed: the
    run is listed among those not aggregated, named with what is wrong."""
    name = "0_model=tiny,adapter=lora,adapter.rank=4,seed=0"
    summary = sweep / name / "summary.json"
    summary.write_text(content)
    main([str(sweep)])
    printed = capsys.readouterr().out
    [line] = [line for line in printed.splitlines() if line.startswith(f"- `{name}`")]
    assert ("unreadable summary" in line and str(summary) in line) if content != "{}" else (
        "incomplete (summary.json has no status or steps)" in line)
    rows = read_csv(sweep / "report.csv")
    [lora] = [row for row in rows if row["config"] == "model=tiny,adapter=lora,adapter.rank=4"]
    assert (lora["seeds"], lora["incomplete"]) == ("1", "1")


def test_a_bad_metrics_line_before_the_end_is_named_with_its_number(sweep: Path, capsys) -> None:
    metrics = sweep / "1_model=tiny,adapter=lora,adapter.rank=4,seed=1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(SystemExit):
        main([str(sweep)])
    assert f"{metrics}:2: not a JSON line" in capsys.readouterr().err
