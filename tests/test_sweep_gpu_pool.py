"""``hydra/launcher=gpu_pool`` on the CPU, where the "GPUs" are worker slots: jobs run in parallel, one
slot each (``CUDA_VISIBLE_DEVICES``), the next job waits for a free slot, and a job that fails or whose
process dies fails alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from cli_runner import run_entry_point


def job_folders(sweep_dir: Path) -> dict[int, Path]:
    return {int(path.name.split("_", 1)[0]): path for path in sweep_dir.iterdir() if path.name[0].isdigit()}


def gpu_of(job: Path) -> str:
    return str(yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["env_set"]
               ["CUDA_VISIBLE_DEVICES"])


def started(job: Path) -> int:
    return (job / ".hydra" / "config.yaml").stat().st_mtime_ns  # written as the job starts


def ended(job: Path) -> int:
    outcome = job / "summary.json" if (job / "summary.json").exists() else job / "failure.json"
    return outcome.stat().st_mtime_ns


@pytest.mark.distributed
def test_jobs_run_in_parallel_one_gpu_each_and_wait_for_a_free_one(tmp_path: Path, train_cli,
                                                                    tiny_training_overrides) -> None:
    sweep_dir = tmp_path / "multirun"
    status = train_cli("-m", "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[0,1]", *tiny_training_overrides,
                       "trainer.max_steps=2", "data.eval_per_task=2", "adapter=lora", "adapter.rank=0,2,4",
                       f"hydra.sweep.dir={sweep_dir}")
    assert status == 2  # rank 0 failed, the others ran
    jobs = job_folders(sweep_dir)
    assert json.loads((jobs[0] / "failure.json").read_text())["error"] == "adapter.rank=0 must be >= 1"
    for num in (1, 2):
        assert json.loads((jobs[num] / "summary.json").read_text())["status"] == "completed"

    gpus = {num: gpu_of(job) for num, job in jobs.items()}
    start = {num: started(job) for num, job in jobs.items()}
    end = {num: ended(job) for num, job in jobs.items()}
    assert (gpus[0], gpus[1]) == ("0", "1")  # the first two jobs start at once, one GPU each
    assert start[1] < end[0]  # and run side by side
    assert start[2] >= min(end[0], end[1])  # the third waits for a free GPU ...
    assert gpus[2] in {gpus[num] for num in (0, 1) if end[num] <= start[2]}  # ... and takes the one freed


def die_when_x_is_one(cfg) -> None:
    """A task function for the test below: its process dies without a word for x=1."""
    if cfg.x == 1:
        os._exit(3)
    (Path(cfg.out) / f"done_{cfg.x}").touch()


def run_app(monkeypatch, config_dir: Path, argv: list[str]) -> int:
    import hydra

    app = hydra.main(config_path=str(config_dir), config_name="config", version_base=None)(die_when_x_is_one)
    return run_entry_point(monkeypatch, "app", app, argv)


def test_a_job_whose_process_dies_fails_alone(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 0\nout: ''\n")
    status = run_app(monkeypatch, tmp_path / "conf", ["-m", "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[7]",
                                                      "x=1,2", f"out={tmp_path}",
                                                      f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert status == 1
    assert (tmp_path / "done_2").exists()  # the job after it ran, on the same (only) GPU
    assert f"job #0 (x=1 out={tmp_path}) ended without a result (exit code 3)" in capsys.readouterr().err


def test_without_a_visible_gpu_the_sweep_stops_with_one_line(monkeypatch, train_cli, capsys) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert train_cli("-m", "hydra/launcher=gpu_pool", "model=tiny", "seed=0,1") == 2  # a user error
    err = capsys.readouterr().err
    assert "hydra/launcher=gpu_pool: no GPU is visible; name them with hydra.launcher.gpus=[0,1,...]" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("visible", ["2,3", " 5 "])
def test_the_default_gpus_are_the_visible_ones(monkeypatch, visible: str) -> None:
    from hydra_plugins.malora_gpu_pool.gpu_pool_launcher import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == [gpu.strip() for gpu in visible.split(",")]
