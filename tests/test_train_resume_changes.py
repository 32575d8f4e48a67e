"""Resumes that never start over and never misreport (issue 26.2, 26.3): checkpoints without a manifest (the
format written before manifests existed) are resumed or refused by name, never ignored; a learning rate
changed at resume is applied to the optimizer and the schedule, as ``config.resumed_step_N.yaml`` says."""

from __future__ import annotations

import logging

import pytest
import yaml

from malora_train.errors import ConfigError
from malora_train.train.checkpoint.resume import resolve_resume


def train_steps(read_metrics, run_dir) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir) if "lm_loss" in row]


def test_resume_auto_over_checkpoints_without_a_manifest_resumes_and_names_them(tmp_path, run_training,
                                                                                 read_metrics, caplog):
    run_dir = tmp_path / "run"
    common = ["trainer.save_every=2", "trainer.keep_last=5", "trainer.eval_after=false"]
    run_training(run_dir, "trainer.max_steps=4", *common)
    for step in (2, 4):  # the format written before manifests existed
        (run_dir / "checkpoints" / f"step_{step}" / "manifest.json").unlink()
    (run_dir / "summary.json").unlink()  # stopped before its end
    # the module's own logger: a test before may have left the package's logger at ERROR (a rank other than 0)
    with caplog.at_level(logging.WARNING, logger="malora_train.train.checkpoint.resume"):
        summary = run_training(run_dir, "trainer.max_steps=6", *common, "trainer.resume=auto")
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert train_steps(read_metrics, run_dir) == [1, 2, 3, 4, 5, 6]  # not started over
    warned = caplog.text
    for step in (2, 4):
        assert f"{run_dir / 'checkpoints' / f'step_{step}'} has no manifest.json" in warned
    assert (run_dir / "config.resumed_step_4.yaml").is_file()


def test_a_checkpoint_without_a_manifest_or_its_files_is_refused_naming_it(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"train": {"step": 3}, "deepspeed": false}')
    with pytest.raises(ConfigError, match=rf"{step}: no manifest, and adapter/adapter_model.safetensors"):
        resolve_resume(tmp_path / "run", "auto")


@pytest.mark.parametrize("how", ["command line", "config.yaml"])
def test_a_learning_rate_changed_at_resume_is_applied(tmp_path, train_cli, tiny_training_overrides,
                                                      read_metrics, how):
    run_dir = tmp_path / "run"
    common = [*tiny_training_overrides, "trainer.save_every=2", "trainer.eval_after=false",
              "trainer.lr_scheduler=constant", "trainer.warmup_ratio=0", f"hydra.run.dir={run_dir}"]
    assert train_cli(*common, "trainer.max_steps=2", "trainer.lr=0.001") == 0
    (run_dir / "summary.json").unlink()  # as if stopped after its checkpoint
    resumed = ["trainer.resume=auto", f"hydra.run.dir={run_dir}", "trainer.max_steps=4"]
    if how == "command line":
        resumed.append("trainer.lr=0.005")
    else:  # edited in the run's own config.yaml, which a resume starts from
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["trainer"]["lr"] = 0.005
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert train_cli(*resumed) == 0
    lrs = {row["step"]: row["lr"] for row in read_metrics(run_dir) if "lm_loss" in row}
    assert lrs[1] == lrs[2] == pytest.approx(0.001)
    assert lrs[3] == lrs[4] == pytest.approx(0.005)  # what config.resumed_step_2.yaml records
    assert yaml.safe_load((run_dir / "config.resumed_step_2.yaml").read_text())["trainer"]["lr"] == 0.005
