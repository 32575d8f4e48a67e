"""The paper's five-task commonsense mixture end to end on the tiny model: training with per-task losses,
the routing heatmap, then ``malora-eval`` on the run with both scorers."""

from __future__ import annotations

import json

import pytest

PAPER_TASKS = ["piqa", "openbookqa", "boolq", "ARC-Challenge", "ARC-Easy"]


@pytest.mark.shared_data
def test_five_task_mixture_trains_and_evaluates_with_both_scorers(
        shared_data_dir, run_training, read_metrics, tmp_path, capsys) -> None:
    from malora_train.cli import eval_main

    run_dir = tmp_path / "run"
    data = [f"data.root={shared_data_dir}", "data.train_per_task=32", "data.eval_per_task=6",
            "data.max_length=512", "data.sampling=uniform"]
    summary = run_training(run_dir, "data=commonsense_intra", *data, "trainer.max_steps=4",
                           "trainer.eval_before=true")

    assert set(summary["eval_after"]) == set(PAPER_TASKS)
    train_rows = [r for r in read_metrics(run_dir) if "lm_loss" in r]
    seen = {task for row in train_rows for task in PAPER_TASKS if f"loss/{task}" in row}
    assert seen == set(PAPER_TASKS), "every task's loss appears in metrics.jsonl"
    assert all(f"tokens/{task}" in train_rows[0] for task in PAPER_TASKS)
    heatmap = run_dir / "routing_heatmap.png"
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    routing = json.loads((run_dir / "routing.json").read_text())
    assert routing["tasks"] == list(summary["eval_after"])

    capsys.readouterr()
    for scorer in ("label_logits", "generate"):
        # the run's own config (tiny model, its data settings), the scorer from the command line
        report = eval_main([f"eval.run_dir={run_dir}", f"eval.scorer={scorer}", "eval.max_new_tokens=12"])
        printed = capsys.readouterr().out
        assert set(report["accuracy"]) == set(PAPER_TASKS)
        for task in PAPER_TASKS:
            assert task in printed
        assert all(0.0 <= acc <= 100.0 for acc in report["accuracy"].values())
    # the label-logit scorer is the one training uses: malora-eval must reproduce the run's own figures
    again = eval_main([str(run_dir)])
    assert again["accuracy"] == pytest.approx(summary["eval_after"])
