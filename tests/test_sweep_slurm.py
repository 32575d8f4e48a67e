"""Sweeps on SLURM through hydra-submitit-launcher (``hydra/launcher=slurm``): the batch script the preset
submits, the ranks a task takes from SLURM's environment, and submitit's local executor running each
sweep job as one two-process training on the CPU (the code path of a multi-GPU SLURM job)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from malora_train.sweep.callbacks import export_task_ranks

TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_the_slurm_preset_submits_one_array_job_of_multi_gpu_tasks(tmp_path: Path, monkeypatch, train_cli,
                                                                   capsys) -> None:
    """A fake ``sbatch`` keeps the script it is given and refuses it, so the sweep stops there (submitit
    also looks for ``srun`` before submitting)."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    commands = {"sbatch": f'cp "$1" {script}\necho "sbatch: refused by the test" >&2\nexit 1',
                "srun": "exit 1"}
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep_dir = tmp_path / "multirun"

    status = train_cli("-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                       "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", "model=tiny",
                       "adapter=lora,malora", "seed=0,1",
                       f"hydra.sweep.dir={sweep_dir}")
    assert status == 1 and "refused by the test" in capsys.readouterr().err
    lines = script.read_text().splitlines()
    sbatch = {line for line in lines if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --array=0-3%4",        # one array element per sweep point (2 adapters x 2 seeds)
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",  # one training process per GPU
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=720",
        # SIGTERM before the limit: a checkpoint, not submitit's requeue signal
        "#SBATCH --signal=TERM@120",
        "#SBATCH --open-mode=append",
    } <= sbatch, sbatch
    [srun] = [line for line in lines if line.startswith("srun ")]
    assert srun.endswith(f"-u -m submitit.core._submit {sweep_dir}/.submitit/%j")  # every task runs the job
    assert "export SUBMITIT_EXECUTOR=slurm" in lines


@pytest.fixture
def no_torch_ranks(monkeypatch) -> None:
    for key in TORCH_KEYS:  # set, then removed: monkeypatch restores the test process's own values
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)


def slurm_task(monkeypatch, procid: int, localid: int, ntasks: int = 8, nodes: int = 2) -> None:
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240",
                       "SLURM_ARRAY_TASK_ID": "2", "SLURM_NTASKS": ntasks, "SLURM_JOB_NUM_NODES": nodes,
                       "SLURM_NODEID": procid // (ntasks // nodes), "SLURM_PROCID": procid,
                       "SLURM_LOCALID": localid, "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(key, str(value))


def test_a_task_of_a_two_node_job_takes_its_rank_from_slurm(monkeypatch, no_torch_ranks) -> None:
    slurm_task(monkeypatch, procid=5, localid=1)
    export_task_ranks()
    ranks = {key: os.environ[key] for key in TORCH_KEYS}
    assert {k: ranks[k] for k in TORCH_KEYS[:5]} == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                    "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    for key in TORCH_KEYS:
        monkeypatch.delenv(key)
    slurm_task(monkeypatch, procid=0, localid=0)
    export_task_ranks()
    assert os.environ["MASTER_PORT"] == ranks["MASTER_PORT"]  # every task of the job meets on one port


def test_nothing_is_exported_for_one_task_or_outside_submitit(monkeypatch, no_torch_ranks) -> None:
    slurm_task(monkeypatch, procid=0, localid=0, ntasks=1, nodes=1)
    export_task_ranks()
    assert not any(key in os.environ for key in TORCH_KEYS)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    slurm_task(monkeypatch, procid=3, localid=3)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    export_task_ranks()
    assert not any(key in os.environ for key in TORCH_KEYS)


@pytest.mark.distributed
def test_submitit_runs_each_sweep_job_as_one_two_process_training(tmp_path: Path, train_cli, train_losses,
                                                                  tiny_training_overrides, capsys) -> None:
    sweep_dir = tmp_path / "multirun"
    status = train_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                       "hydra.launcher.timeout_min=20", *tiny_training_overrides, "trainer.max_steps=2",
                       "data.eval_per_task=2", "adapter=lora", "adapter.rank=0,4",
                       f"hydra.sweep.dir={sweep_dir}")
    assert status == 2  # the rank=0 job failed, the other ran
    [failed] = sweep_dir.glob("0_*")
    assert json.loads((failed / "failure.json").read_text())["error"] == "adapter.rank=0 must be >= 1"
    [completed] = sweep_dir.glob("1_*")
    summary = json.loads((completed / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["steps"]) == ("completed", 2, 2)
    assert sorted(train_losses(completed)) == [1, 2]  # rank 0 alone logged each step
