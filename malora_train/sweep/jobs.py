"""One job of a sweep: a failure is recorded in the job's folder instead of ending the sweep.

Hydra's sweepers end a sweep at a job's exception (the basic sweeper re-raises it, Optuna's stops the
study, the submitit launcher stops collecting results) and ``sys.exit`` ends it at once. A sweep job
therefore catches the error, writes ``failure.json`` (the one-line error, its type, the overrides, and
the traceback of an unexpected error) and returns a line saying so instead of an accuracy: Optuna records
a trial whose value is not a number as failed, logs the line, and goes on (the preset allows any failure
rate). ``callbacks.FailedJobs`` turns the failures into the sweep's exit status. Ctrl-C still ends the sweep.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from malora_train.errors import MaloraError, launch_rank
from malora_train.run_dir import FAILURE_FILE, write_json_atomic

log = logging.getLogger(__name__)

def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def record_failure(run_dir: Path, err: Exception, overrides: list[str]) -> None:
    """Log ``err`` (a user error in one line, anything else with its traceback) and write failure.json."""
    record: dict[str, Any] = {"status": "failed", "error": one_line(err), "error_type": type(err).__name__,
                              "overrides": overrides}
    if isinstance(err, MaloraError):
        log.error("job failed: %s", record["error"])
    else:
        record["traceback"] = "".join(traceback.format_exception(err))
        log.error("job failed: %s: %s", record["error_type"], record["error"], exc_info=err)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / FAILURE_FILE, record)


def run_sweep_job(train_job: Callable[[], dict[str, Any] | None], run_dir: Path,
                  overrides: list[str]) -> float | str:
    """Run ``train_job`` (one training run into ``run_dir``); its final average accuracy, or without one
    a line saying why (``failed: <error>``, ``interrupted without a final evaluation``).

    An exception is recorded (by rank 0) and not raised; a failure record from an earlier attempt in the
    same folder is removed first, so failure.json always describes the latest attempt."""
    main = launch_rank() == 0
    if main:
        (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    try:
        summary = train_job()
    except Exception as err:  # any failure of one job is that job's alone
        if main:
            record_failure(run_dir, err, overrides)
        else:
            log.error("job failed on rank %d: %s", launch_rank(), one_line(err))
        return f"failed: {one_line(err)}"
    value = (summary or {}).get("eval_after_average")
    if value is None:
        return f"{(summary or {}).get('status', 'ended')} without a final evaluation"
    return float(value)
