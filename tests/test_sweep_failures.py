"""A failing sweep job is recorded in its folder and the sweep runs the others; the sweep's exit status and
malora-report name the failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from malora_train.commands.report import main as report_main
from malora_train.errors import ConfigError
from malora_train.sweep.callbacks import FailedJobs
from malora_train.sweep.jobs import run_sweep_job


def read_failure(job_dir: Path) -> dict:
    return json.loads((job_dir / "failure.json").read_text())


# -- one job -----------------------------------------------------------------------------------------------
def test_a_user_error_is_recorded_in_one_line_without_raising(tmp_path: Path) -> None:
    def job() -> dict:
        raise ConfigError("adapter.rank=0 must be >= 1")

    assert run_sweep_job(job, tmp_path / "job", ["adapter.rank=0"]) == "failed: adapter.rank=0 must be >= 1"
    assert read_failure(tmp_path / "job") == {"status": "failed", "error": "adapter.rank=0 must be >= 1",
                                              "error_type": "ConfigError", "overrides": ["adapter.rank=0"]}


def test_an_unexpected_error_is_recorded_with_its_traceback(tmp_path: Path) -> None:
    def job() -> dict:
        raise RuntimeError("CUDA out of\nmemory")

    assert run_sweep_job(job, tmp_path, []) == "failed: CUDA out of memory"
    record = read_failure(tmp_path)
    assert (record["error"], record["error_type"]) == ("CUDA out of memory", "RuntimeError")
    assert "Traceback" in record["traceback"] and "in job" in record["traceback"]


def test_a_job_that_succeeds_returns_its_accuracy_and_clears_an_earlier_failure(tmp_path: Path) -> None:
    (tmp_path / "failure.json").write_text("{}")
    assert run_sweep_job(lambda: {"status": "completed", "eval_after_average": 61.5}, tmp_path, []) == 61.5
    assert not (tmp_path / "failure.json").exists()
    assert (run_sweep_job(lambda: {"status": "interrupted"}, tmp_path, [])
            == "interrupted without a final evaluation")


def test_ctrl_c_still_ends_the_sweep(tmp_path: Path) -> None:
    def job() -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep_job(job, tmp_path, [])
    assert not (tmp_path / "failure.json").exists()


# -- the sweep's exit status -------------------------------------------------------------------------------
def test_failed_jobs_gives_the_sweep_a_one_line_error_naming_new_failures(tmp_path: Path, capsys) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    old = tmp_path / "0_seed=0"
    old.mkdir()
    (old / "failure.json").write_text(json.dumps({"error": "from an earlier sweep"}))
    callback = FailedJobs()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)  # nothing new: no exit
    for num in (1, 2, 3, 4):
        (tmp_path / f"{num}_seed={num}").mkdir()
        (tmp_path / f"{num}_seed={num}" / "failure.json").write_text(json.dumps({"error": f"boom {num}"}))
    with pytest.raises(SystemExit) as stop:
        callback.on_multirun_end(config)
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"malora-train: error: 4 sweep jobs failed: 1_seed=1 (boom 1); 2_seed=2 (boom 2); "
                    f"3_seed=3 (boom 3); and 1 more; the other jobs ran; `malora-report {tmp_path}` "
                    "lists them")


# -- a real sweep --------------------------------------------------------------------------------------------
def test_a_failing_job_does_not_stop_a_local_sweep(tmp_path: Path, train_cli, tiny_training_overrides,
                                                   capsys) -> None:
    sweep_dir = tmp_path / "multirun"
    status = train_cli("-m", *tiny_training_overrides, "trainer.max_steps=2", "data.eval_per_task=2",
                       "adapter.rank=0,4", "adapter=molora", f"hydra.sweep.dir={sweep_dir}")
    assert status == 2
    [failed] = sweep_dir.glob("0_*")
    [completed] = sweep_dir.glob("1_*")
    record = read_failure(failed)
    assert (record["error"], record["error_type"]) == ("adapter.rank=0 must be >= 1", "ConfigError")
    assert "adapter.rank=0" in record["overrides"] and not (failed / "summary.json").exists()
    assert json.loads((completed / "summary.json").read_text())["status"] == "completed"
    assert not (completed / "failure.json").exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malora-train:")]
    assert len(errors) == 1 and errors[0].startswith("malora-train: error: 1 sweep job failed: "
                                                     f"{failed.name} (adapter.rank=0 must be >= 1)")

    report_main([str(sweep_dir)])
    report = capsys.readouterr().out
    assert "0 (+1 failed)" in report and "failed: adapter.rank=0 must be >= 1" in report


def test_a_key_the_adapter_does_not_read_is_unknown_when_its_job_is_composed(
        tmp_path: Path, train_cli, tiny_training_overrides, capsys) -> None:
    """The LoRA job's config has no ``lam``: the sweep stops there with one line naming the key (here, at the
    first job, before anything ran)."""
    sweep_dir = tmp_path / "multirun"
    assert train_cli("-m", *tiny_training_overrides, "trainer.max_steps=1", "data.eval_per_task=2",
                     "adapter=lora,malora", "adapter.lam=0.25", "adapter.rank=2",
                     f"hydra.sweep.dir={sweep_dir}") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malora-train:")]
    assert errors == ["malora-train: error: adapter.lam: no such config key for adapter=lora "
                      "(read by malora)"]
    assert not list(sweep_dir.glob("*/summary.json"))
