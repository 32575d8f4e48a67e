"""Evaluation inside a training run and in malora-eval on the tiny model: a predictions file for every
evaluation, eval.max_examples, the before/after switches, a math task with a rationale scored by the
numeric protocol."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

TASKS = ["sentiment", "category", "case", "compare", "arithmetic"]
FIELDS = {"task", "id", "prompt", "generation", "extracted", "label", "correct", "scorer"}


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_evaluation_writes_its_predictions(tmp_path, run_training, read_metrics):
    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.max_steps=4", "trainer.eval_before=true", "trainer.eval_every=2",
                 "eval.max_examples=3")
    evals = {r["step"]: r for r in read_metrics(run_dir) if "eval/average" in r}
    assert list(evals) == [0, 2, 4]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step_0", "step_2", "step_4"]
    for step, metrics in evals.items():
        rows = read_predictions(run_dir / "eval" / f"step_{step}" / "predictions_label_logits.jsonl")
        # max_examples
        assert [(r["task"], r["id"]) for r in rows] == [(t, i) for t in TASKS for i in range(3)]
        assert all(set(r) == FIELDS and r["scorer"] == "label_logits" and r["generation"] is None
                   for r in rows)
        assert all(r["correct"] == (r["extracted"] == r["label"]) for r in rows)
        for task in TASKS:  # the file and the logged accuracy agree
            correct = sum(r["correct"] for r in rows if r["task"] == task)
            assert metrics[f"eval/{task}"] == pytest.approx(100 * correct / 3)


def test_before_and_after_evaluations_can_be_switched_off(tmp_path, run_training, read_metrics, capsys):
    run_dir = tmp_path / "run"
    summary = run_training(run_dir, "trainer.max_steps=2", "trainer.eval_before=false",
                           "trainer.eval_after=false")
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["eval_after"] is None and summary["eval_after_average"] is None
    assert summary["best_eval_average"] is None
    assert not any("eval/average" in r for r in read_metrics(run_dir))
    assert not (run_dir / "eval").exists() and not (run_dir / "routing.json").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "no evaluation (trainer.eval_before=false, trainer.eval_after=false" in capsys.readouterr().out


MATH = [(f"Tom has {a} bags of {b} apples. How many apples?", f"{a} bags of {b} make {a} * {b}.", a * b)
        for a in range(2, 9) for b in range(3, 6)]


def math_task_overrides(tmp_path: Path) -> list[str]:
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"question": q, "rationale": r, "answer": f"{n:,}"}) + "\n"
                            for q, r, n in MATH))
    task = (f'{{name: math, path: "{path}", prompt_template: "{{question}}", answer_field: answer, '
            'answer_type: number, target_template: "{rationale} The answer is {label}."}')
    return ["data=custom_example", f"data.custom_tasks=[{task}]", "data.eval_fraction=0.25",
            "data.max_length=256"]


def test_a_math_task_with_a_rationale_trains_and_is_scored_by_the_numeric_protocol(tmp_path, run_training,
                                                                                   caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="malora_train"):
        summary = run_training(run_dir, *math_task_overrides(tmp_path), "trainer.max_steps=2",
                               "eval.max_new_tokens=8")
    notes = [r.getMessage() for r in caplog.records if "scored with generate" in r.getMessage()]
    assert notes == ["eval.scorer=label_logits: task math is scored with generate: "
                     "its answers are open numbers"]
    rows = read_predictions(run_dir / "eval" / "step_2" / "predictions_label_logits.jsonl")
    assert len(rows) == 6  # ceil(0.25 * 21) held out
    for row in rows:
        assert row["scorer"] == "generate" and isinstance(row["generation"], str)
        numbers = re.findall(r"-?\d+(?:\.\d+)?", row["generation"].replace(",", ""))
        assert row["extracted"] == (numbers[-1] if numbers else "")
        gold = float(row["label"].replace(",", ""))
        assert row["correct"] == (row["extracted"] != "" and abs(float(row["extracted"]) - gold) <= 1e-3)
    assert summary["eval_after"]["math"] == pytest.approx(100 * sum(r["correct"] for r in rows) / 6)


def test_the_generate_note_is_logged_once_a_run_and_not_at_all_without_evaluation(tmp_path, run_training,
                                                                                   caplog):
    def notes(run: str, *overrides: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="malora_train"):
            run_training(tmp_path / run, *math_task_overrides(tmp_path), "trainer.max_steps=2",
                         "eval.max_new_tokens=2", "eval.max_examples=1", *overrides)
        return [r.getMessage() for r in caplog.records if "scored with generate" in r.getMessage()]

    assert len(notes("all", "trainer.eval_before=true", "trainer.eval_every=1")) == 1
    assert notes("none", "trainer.eval_after=false") == []


def test_a_run_evaluated_only_before_training_says_so_in_its_summary(tmp_path, run_training, capsys):
    summary = run_training(tmp_path / "run", "trainer.max_steps=1", "trainer.eval_before=true",
                           "trainer.eval_after=false", "eval.max_examples=2")
    assert summary["best_eval_average"] is None and summary["eval_before_average"] is not None
    out = capsys.readouterr().out
    assert f"eval average {summary['eval_before_average']:.2f} before training (none after)" in out
    assert "no eval" not in out


def test_malora_eval_writes_report_and_predictions_into_the_run(tmp_path, run_training, caplog):
    from malora_train.cli import eval_main

    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.max_steps=1", "trainer.eval_after=false")
    # the run's saved config (model, data) with the command line on top
    report = eval_main([str(run_dir), "eval.scorer=generate", "eval.max_new_tokens=4", "eval.max_examples=2"])
    assert report["counts"] == {task: {"correct": report["counts"][task]["correct"], "total": 2}
                                for task in TASKS}
    saved = json.loads((run_dir / "eval" / "eval_generate.json").read_text())
    assert saved == report
    rows = read_predictions(run_dir / "eval" / "predictions_generate.jsonl")
    assert [(r["task"], r["id"]) for r in rows] == [(t, i) for t in TASKS for i in range(2)]
    assert all(r["scorer"] == "generate" and isinstance(r["generation"], str) for r in rows)
    for task in TASKS:
        assert sum(r["correct"] for r in rows if r["task"] == task) == report["counts"][task]["correct"]

    caplog.clear()
    argv = [f"eval.adapter_path={run_dir / 'adapter'}", "eval.max_examples=1", "model=tiny",
            "data.train_per_task=64", "data.eval_per_task=8"]
    with caplog.at_level(logging.WARNING, logger="malora_train"):
        eval_main(argv)
    assert "eval.output_dir is not set: the report and predictions are not saved" in caplog.text


def test_a_run_that_fails_before_its_first_step_removes_its_predictions_and_tracker_files(
        tmp_path, run_training, read_metrics, monkeypatch):
    """The evaluation before training and the trackers write before the first step: a fresh run that fails
    then removes those folders too, so the directory is reused without another run's files in it."""
    pytest.importorskip("tensorboard")
    from malora_train.train.loop import Trainer

    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=2", "trainer.eval_before=true", "eval.max_examples=2",
                 "logger.trackers=[tensorboard]"]

    def failing_step(self):
        raise RuntimeError("the first step ran out of memory")

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="first step"):
        run_training(run_dir, *overrides)
    assert sorted(p.name for p in run_dir.iterdir()) == []  # eval/step_0/, logs/, config.yaml, metrics.jsonl
    monkeypatch.undo()
    summary = run_training(run_dir, *overrides)
    assert summary["status"] == "completed"
    assert [r["step"] for r in read_metrics(run_dir) if "eval/average" in r] == [0, 2]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step_0", "step_2"]
