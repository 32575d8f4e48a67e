"""Which checkpoint a run resumes from, and whether a completed run has anything left to do."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from malora_train.config import TrainerConfig
from malora_train.errors import ConfigError, DataError
from malora_train.run_dir import (
    ADAPTER_DIR,
    MANIFEST_FILE,
    DamagedCheckpoint,
    completed_summary,
    read_json_object,
    verify_checkpoint,
)
from malora_train.train.checkpoint.deepspeed_engine import DEEPSPEED_DIR
from malora_train.train.checkpoint.folders import checkpoint_root, complete_checkpoints, unlisted_checkpoints

log = logging.getLogger(__name__)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, verified against its manifest. ``auto``: the newest intact checkpoint
    of this run (None on a fresh run; damaged newer ones are skipped with a warning); else the path given."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not (path / MANIFEST_FILE).is_file():
            raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint "
                              f"(no {MANIFEST_FILE} in it)")
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as err:
            raise ConfigError(f"trainer.resume={resume}: damaged checkpoint: {err}") from err
        return path
    unlisted = unlisted_checkpoints(run_dir)
    for _, path in unlisted:
        log.warning("trainer.resume=auto: %s has no %s (written by an earlier version?): its files cannot be "
                    "verified", path, MANIFEST_FILE)
    found = sorted(complete_checkpoints(run_dir) + unlisted)
    problems = []
    for _, path in reversed(found):
        try:
            if (path / MANIFEST_FILE).is_file():
                verify_checkpoint(path)
            else:
                check_unlisted(path)
                log.warning("trainer.resume=auto: resuming from %s, which has no manifest to verify it by",
                            path)
        except DamagedCheckpoint as err:
            problems.append(str(err))
            log.warning("trainer.resume=auto: skipping damaged checkpoint %s (%s)", path.name, err)
            continue
        if problems:
            log.warning("trainer.resume=auto: resuming from %s, the newest intact checkpoint", path)
        return path
    if problems:
        raise ConfigError(f"trainer.resume=auto: every checkpoint in {checkpoint_root(run_dir)} is damaged "
                          f"(newest: {problems[0]}); delete {checkpoint_root(run_dir)} to start over")
    return None


def check_unlisted(path: Path) -> None:
    """What can be checked of a checkpoint without a manifest: its state file reads, and the adapter and
    optimizer files (or DeepSpeed's folder) it needs are there; else DamagedCheckpoint naming what is not."""
    from malora_train.train.checkpoint.checkpointer import STATE_FILE

    try:
        state = read_json_object(path / STATE_FILE)
        int(state["train"]["step"])
    except (DataError, KeyError, TypeError, ValueError) as err:
        raise DamagedCheckpoint(f"{path / STATE_FILE}: no readable training state ({err})") from None
    needed = [DEEPSPEED_DIR] if state.get("deepspeed") else [
        f"{ADAPTER_DIR}/adapter_model.safetensors", "optimizer.json", "optimizer.safetensors"]
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise DamagedCheckpoint(f"{path}: no manifest, and {', '.join(missing)} missing: not a checkpoint "
                                "this version can resume")


def resume_arguments(run_dir: Path) -> str:
    """What continues the run in ``run_dir``, as ``malora-train`` arguments to paste into a shell: the path
    shell-quoted (a folder named ``$(...)`` or with spaces is passed as it is, never run)."""
    return f"trainer.resume=auto {shlex.quote(f'hydra.run.dir={run_dir}')}"


def last_good_hint(run_dir: Path) -> str:
    """Where a failed run can be resumed from, for error messages."""
    found = complete_checkpoints(run_dir)
    return f"last good checkpoint: {found[-1][1]}" if found else "no checkpoint was saved yet"


def finished_run(run_dir: Path, trainer: TrainerConfig) -> dict[str, Any] | None:
    """The summary of a completed run that ``trainer.resume`` asks nothing more of (the same or fewer
    steps or epochs), else None: such a run is left as it is."""
    summary = completed_summary(run_dir) if trainer.resume else None
    if summary is None:
        return None
    if trainer.max_steps > 0:
        return summary if trainer.max_steps <= summary.get("steps", 0) else None
    done_by_epochs = summary.get("max_steps") == 0 and trainer.epochs <= summary.get("epochs", 0)
    return summary if done_by_epochs else None


def finished_message(run_dir: Path, summary: dict[str, Any]) -> str:
    average = summary.get("eval_after_average")
    result = f", eval average {average:.2f}" if isinstance(average, (int, float)) else ""
    return (f"{run_dir} is complete ({summary.get('steps')} steps{result}); nothing to do (raise "
            "trainer.max_steps or trainer.epochs to train further)")


def check_extendable(run_dir: Path, resume_from: Path | None) -> None:
    """A completed run continues only from a checkpoint: starting it afresh would overwrite its results."""
    if resume_from is None and completed_summary(run_dir) is not None:
        raise ConfigError(f"hydra.run.dir={run_dir} holds a completed run without a checkpoint to continue "
                          "from (trainer.save_every was 0); start a new run in another hydra.run.dir")
