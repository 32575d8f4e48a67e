"""Entry points, a thin dispatcher: ``malora-train`` (a Hydra main: overrides, ``-m`` multirun),
``malora-eval`` and ``malora-inspect`` (composed from the same configs, without creating an output
folder) and ``malora-report``; the work itself is in ``train`` and ``commands``.

Several processes: ``accelerate launch --config_file conf/accelerate/<single|ddp|deepspeed_zero2|
deepspeed_zero3>.yaml [--num_processes N] -m malora_train.cli <overrides>`` (or ``torchrun
--nproc_per_node N -m malora_train.cli ...``). Every rank runs the same Hydra main; they agree on one
run directory, and only rank 0 writes into it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from malora_train.config import CONF_DIR, Config, register_configs
from malora_train.errors import MaloraError, exit_with_error, launch_rank
from malora_train.run_dir import guard_run_dir

log = logging.getLogger("malora_train")
register_configs()


def to_config(cfg: DictConfig) -> Config:
    """The typed config object (dataclasses) the rest of the code takes."""
    return OmegaConf.to_object(cfg)


def _one_line(err: Exception) -> str:
    """Hydra/OmegaConf errors span several lines (message, key, hint): keep them on one."""
    text = str(err)
    if err.__cause__ is not None:
        text += "\n" + str(err.__cause__)
    keep = [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(("To append", "reference_type", "object_type"))]
    return " | ".join(keep) or type(err).__name__


class RunDirGuard(Callback):
    """Registered in ``conf/config.yaml`` (``hydra.callbacks``): refuses an occupied run directory
    before the job starts, so not even Hydra's own files in it are touched."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            guard_run_dir(run_dir, OmegaConf.select(config, "trainer.resume"))
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

    def job() -> dict:
        return train(to_config(cfg), run_dir, resolved_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                     overrides=overrides)

    if hydra_cfg.mode == RunMode.MULTIRUN:  # a failing job is recorded and the sweep goes on
        return run_sweep_job(job, run_dir, overrides)
    try:
        summary = job()
    except MaloraError as err:
        exit_with_error(err)
    return summary.get("eval_after_average") if summary else None


def train_main() -> None:
    import hydra

    from malora_train.train.distributed import agree_on_run_dir

    agree_on_run_dir()
    if launch_rank() != 0:  # Hydra's own files (.hydra/, the log file) are written by rank 0 alone
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_train_job)
    main()


def compose(argv: list[str]) -> Config:
    """Compose ``conf/config.yaml`` with command-line overrides, as ``malora-train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return to_config(hydra_compose(config_name="config", overrides=argv))
    except (HydraException, OmegaConfBaseException) as err:
        exit_with_error(_one_line(err))


def inspect_main(argv: list[str] | None = None) -> None:
    from malora_train.commands.inspect import inspect_command

    cfg = compose(sys.argv[1:] if argv is None else argv)
    try:
        inspect_command(cfg)
    except MaloraError as err:
        exit_with_error(err)


def eval_main(argv: list[str] | None = None) -> None:
    from malora_train.commands.evaluate import eval_command

    argv = sys.argv[1:] if argv is None else argv
    cfg = compose(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        eval_command(cfg, argv)
    except MaloraError as err:
        exit_with_error(err)


def report_main(argv: list[str] | None = None) -> None:
    from malora_train.commands.report import main

    main(argv)


if __name__ == "__main__":  # `accelerate launch -m malora_train.cli ...` runs training
    train_main()
