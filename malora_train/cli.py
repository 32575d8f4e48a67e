"""Entry points, a thin dispatcher: ``malora-train`` (a Hydra main: overrides, ``-m`` multirun),
``malora-eval`` and ``malora-inspect`` (composed from the same configs, without creating an output
folder) and ``malora-report``; the work itself is in ``train`` and ``commands``. Every command answers
``--help``, and every user error (a Hydra override included) is one line and exit status 2.

Several processes: ``accelerate launch --config_file <configs>/accelerate/<single|ddp|deepspeed_zero2|
deepspeed_zero3>.yaml [--num_processes N] -m malora_train.cli <overrides>`` (or ``torchrun
--nproc_per_node N -m malora_train.cli ...``). Every rank runs the same Hydra main; they agree on one
run directory, and only rank 0 locks it and writes into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from malora_train.commands.composition import (
    HELP_FLAGS,
    compose_config,
    describe_hydra_error,
    job_config,
    parse_command_line,
    quote_path_value,
    resumed_run_dir,
    run_config,
    to_config,
)
from malora_train.config import CONF_DIR, Config, register_configs
from malora_train.errors import MaloraError, exit_with_error, launch_rank
from malora_train.run_dir import guard_run_dir, lock_run_dir, run_stamp, unlock_all_run_dirs

log = logging.getLogger("malora_train")
register_configs()
if not OmegaConf.has_resolver("malora.run_stamp"):  # the default run folder's name (conf/config.yaml)
    OmegaConf.register_new_resolver("malora.run_stamp", run_stamp)


class RunDirGuard(Callback):
    """Registered in ``conf/config.yaml`` (``hydra.callbacks``): before Hydra writes anything into the run
    directory, check the config, lock the directory, say so and stop when a resumed run is already
    complete, and refuse a directory that holds another run."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from malora_train.train.checkpoint.resume import finished_message, finished_run
        from malora_train.train.preflight import check_config

        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            cfg = to_config(job_config(config, run_dir,
                                       list(OmegaConf.select(config, "hydra.overrides.task"))))
            check_config(cfg)
            finished = finished_run(run_dir, cfg.trainer)
            if finished is not None:  # said before the lock: nothing in the directory is touched
                if launch_rank() == 0:
                    print(finished_message(run_dir, finished), flush=True)
                sys.exit(0)
            if launch_rank() == 0:
                note = lock_run_dir(run_dir)  # held until the command ends (train_main releases it)
                if note:
                    print(note, file=sys.stderr, flush=True)
            guard_run_dir(run_dir, cfg.trainer.resume)
        except MaloraError as err:
            exit_with_error(err)


def _train_job(cfg: DictConfig) -> float | str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from malora_train.sweep.jobs import run_sweep_job
    from malora_train.train.loop import train

    if launch_rank() != 0:  # rank 0 reports; the others speak up only for errors
        log.setLevel(logging.ERROR)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)

    single = hydra_cfg.mode != RunMode.MULTIRUN

    def job() -> dict:
        # resuming: the run's own config, the command line on top
        job_cfg = job_config(cfg, run_dir, overrides)
        # a single run is the whole process: after a signal's stop, a repeated signal cannot kill it while it
        # ends (a sweep gets its handlers back for the next job, and Ctrl-C there still ends the sweep)
        return train(to_config(job_cfg), run_dir, resolved_yaml=OmegaConf.to_yaml(job_cfg, resolve=True),
                     overrides=overrides, hold_signals=single)

    if not single:  # a failing job is recorded and the sweep goes on
        return run_sweep_job(job, run_dir, overrides)
    try:
        summary = job()
    except MaloraError as err:
        exit_with_error(err)
    except Exception as err:  # said here: Hydra would print its own line about the job first
        _report_collective_failure(err)
        raise
    return summary.get("eval_after_average") if summary else None


# Hydra's flags that take the next argument as their value (--info's value is optional: it stays put)
VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
               "--package", "-p", "--experimental-rerun", "--shell-completion", "-sc")


def flags_first(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's flags (and their values) before the overrides, where Hydra's parser wants
    them: ``model=tiny --config-dir myconf data=math3`` and a ``-m`` in the middle then work as written."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        if not argv[i].startswith("-"):
            overrides.append(argv[i])
        else:
            takes_value = argv[i] in VALUE_FLAGS and i + 1 < len(argv)
            flags.extend(argv[i:i + 2] if takes_value else argv[i:i + 1])
            i += takes_value
        i += 1
    return flags + overrides


EXIT_STOPPED = 130  # a signal ended the command with nothing to save (128 + SIGINT, as a shell says)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM as SIGINT for the block: both raise KeyboardInterrupt, which the command turns into one line
    (its locks released on the way out). A training run installs its own handlers while it runs
    (``loop.StopRequest``: it saves what it trained and exits 0; after a stop it may leave them ignored, and
    then they stay so)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is signal.default_int_handler:
            signal.signal(signal.SIGTERM, previous)


def _stopped(program: str, what: str) -> NoReturn:
    if launch_rank() == 0:
        print(f"{program}: stopped by signal {what}", file=sys.stderr, flush=True)
    sys.exit(EXIT_STOPPED)


def _os_error_line(err: OSError) -> str:
    where = err.filename if err.filename is not None else "a file"
    return f"{where}: {err.strerror or err}"


def train_main() -> None:
    import hydra

    from malora_train.commands.help import help_page

    argv = sys.argv[1:]
    if any(arg in HELP_FLAGS for arg in argv):
        overrides = [arg for arg in argv if "=" in arg and not arg.startswith(("-", "hydra"))]
        print(help_page("malora-train", _help_defaults(overrides)))
        return
    from malora_train.train.distributed import (  # torch: not for --help
        agree_on_run_dir,
        leave_process_group,
    )

    argv = [quote_path_value(arg) for arg in flags_first(argv)]
    try:
        if resumed_run_dir(argv) is not None:  # keep the run's own .hydra/ files (its original overrides)
            argv.append("hydra.output_subdir=null")
    except MaloraError as err:
        exit_with_error(err)
    agree_on_run_dir()
    if launch_rank() != 0:  # Hydra's own files (.hydra/, the log file) are written by rank 0 alone
        argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    sys.argv = [sys.argv[0], *argv]
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_train_job)
    try:
        with _stop_on_signals(), _hydra_errors_raised():
            main()
        leave_process_group()
    except KeyboardInterrupt:  # before the run's own handlers were in place, or after them
        _stopped("malora-train", "before training started or after it ended; nothing to save")
    except (HydraException, OmegaConfBaseException) as err:
        exit_with_error(describe_hydra_error(err))
    except OSError as err:  # Hydra creating the run directory or its files: read-only, disk full
        if err.filename is None:
            _report_unexpected()
        exit_with_error(_os_error_line(err))
    except Exception as err:
        _report_collective_failure(err)
        _report_unexpected()
    finally:
        unlock_all_run_dirs()


@contextlib.contextmanager
def _hydra_errors_raised() -> Iterator[None]:
    """``HYDRA_FULL_ERROR=1`` for the block: Hydra then raises its errors to us (one line each, exit status
    2) instead of printing them; the environment is put back as it was after the block."""
    saved = os.environ.copy()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _report_collective_failure(err: Exception) -> None:
    """A failure between processes: one line on every rank, each naming itself (exit status 1)."""
    from malora_train.train.distributed import collective_failure

    line = collective_failure(err)
    if line is not None:
        print(f"malora-train: error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)


def _report_unexpected() -> NoReturn:
    """A bug, or a launcher's own failure (sbatch refusing a job): its traceback and exit status 1, as
    Hydra itself reports them."""
    traceback.print_exc()
    sys.exit(1)


def _help_defaults(overrides: list[str], config_dirs: list[str] | None = None) -> DictConfig | None:
    """What ``--help`` shows the keys of: the composition of the command line's group options and keys
    (``adapter=lora --help``: LoRA's keys), else the default one, else None (keys without values)."""
    for attempt in (overrides, []):
        try:
            return compose_config(attempt, config_dirs or [])
        except MaloraError:
            continue
    return None


def compose(argv: list[str]) -> Config:
    """Compose ``conf/config.yaml`` with command-line overrides, as ``malora-train`` would."""
    try:
        return to_config(compose_config(argv))
    except MaloraError as err:
        exit_with_error(err)


def _command_config(program: str, argv: list[str], run_dir_argument: bool = False) -> Config | None:
    """The config of ``malora-eval``/``malora-inspect``, or None after printing the help page."""
    from malora_train.commands.help import help_page

    line = parse_command_line(argv, program, run_dir_argument=run_dir_argument)
    if line.help:
        print(help_page(program, _help_defaults(line.overrides, line.config_dirs)))
        return None
    if len(line.paths) > 1:
        raise MaloraError(f"{program} takes one run directory, got {len(line.paths)}: {' '.join(line.paths)}")
    overrides = line.overrides + [quote_path_value(f"eval.run_dir={path}") for path in line.paths]
    composed = compose_config(overrides, line.config_dirs)
    run_dir = OmegaConf.select(composed, "eval.run_dir")
    if run_dir:
        composed = run_config(Path(run_dir), composed, overrides, key="eval.run_dir")
    return to_config(composed)


def inspect_main(argv: list[str] | None = None) -> None:
    try:
        cfg = _command_config("malora-inspect", sys.argv[1:] if argv is None else argv)
        if cfg is not None:
            from malora_train.commands.inspect import inspect_command  # torch: not for --help

            inspect_command(cfg)
    except MaloraError as err:
        exit_with_error(err, program="malora-inspect")


def eval_main(argv: list[str] | None = None) -> dict | None:
    """``malora-eval``. Given ``argv``, the evaluation's result; as the console script (no ``argv``: the
    command line) None, since the script exits with what it returns (``sys.exit(eval_main())``: 0)."""
    argv_given = argv is not None
    try:
        with _stop_on_signals():
            argv = sys.argv[1:] if argv is None else argv
            cfg = _command_config("malora-eval", argv, run_dir_argument=True)
            if cfg is None:
                return None
            from malora_train.commands.evaluate import eval_command  # torch: not for --help

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            result = eval_command(cfg)
    except MaloraError as err:
        exit_with_error(err, program="malora-eval")
    except KeyboardInterrupt:
        _stopped("malora-eval", "(Ctrl-C or SIGTERM); nothing written")
    return result if argv_given else None


def report_main(argv: list[str] | None = None) -> None:
    from malora_train.commands.report import main

    main(argv)


if __name__ == "__main__":  # `accelerate launch -m malora_train.cli ...` runs training
    train_main()
