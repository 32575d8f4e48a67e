"""Hydra callbacks around a sweep's jobs (registered in ``conf/config.yaml`` under ``hydra.callbacks``)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from malora_train.errors import DataError, exit_with_error
from malora_train.run_dir import FAILURE_FILE, read_json_object

SHOWN_FAILURES = 3


def failure_records(sweep_dir: Path) -> dict[Path, int]:
    """Every failure.json below ``sweep_dir``, with its modification time (ns)."""
    if not sweep_dir.is_dir():
        return {}
    return {path: path.stat().st_mtime_ns for path in sweep_dir.rglob(FAILURE_FILE)}


def describe(record: Path, sweep_dir: Path) -> str:
    job = record.parent.relative_to(sweep_dir).as_posix()
    try:
        error = read_json_object(record).get("error", "?")
    except DataError:  # unreadable: the job folder is still worth naming
        error = "?"
    return f"{job} ({error})"


class FailedJobs(Callback):
    """After a sweep, one line naming the jobs that failed during it and exit status 2; the sweep itself
    ran every job (``jobs.run_sweep_job``). Failure records older than the sweep are left out."""

    def __init__(self) -> None:
        self.before: dict[Path, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = failure_records(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        new = sorted(path for path, stamp in failure_records(sweep_dir).items()
                     if self.before.get(path) != stamp)
        if not new:
            return
        shown = "; ".join(describe(path, sweep_dir) for path in new[:SHOWN_FAILURES])
        more = f"; and {len(new) - SHOWN_FAILURES} more" if len(new) > SHOWN_FAILURES else ""
        jobs = "job" if len(new) == 1 else "jobs"
        exit_with_error(f"{len(new)} sweep {jobs} failed: {shown}{more}; the other jobs ran; "
                        f"`malora-report {shlex.quote(str(sweep_dir))}` lists them")


def export_task_ranks() -> None:
    """In a submitit job started as several tasks, export this task's torch.distributed variables
    (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = the first node, MASTER_PORT from the job
    id) so that the tasks train as one run. Nothing outside such a job, or when a launcher set RANK."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    task = TorchDistributedEnvironment()
    if task.world_size > 1:
        # every task sees the node's GPUs and takes cuda:LOCAL_RANK, as under torchrun
        task.export(set_cuda_visible_devices=False)


class TaskRanks(Callback):
    """A sweep job that a launcher started as several tasks (``hydra/launcher=slurm``: one per GPU, on
    ``nodes`` nodes) is one multi-process training: each task takes its rank before the job starts."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        export_task_ranks()
