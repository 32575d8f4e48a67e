"""A run never overwrites another: a run directory that already holds a run's outputs needs
``trainer.resume``. Checked twice: by a Hydra callback before Hydra writes ``.hydra/`` and its log
into the directory, and again by the trainer (which ``train()`` callers reach without Hydra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from malora_train.errors import ConfigError

# what a run writes itself (Hydra's .hydra/ and log are left out: with several ranks, rank 0's Hydra may
# already have written them when another rank checks)
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "adapter", "checkpoints")


def guard_run_dir(run_dir: Path, resume: str | None) -> None:
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not resume:
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run ({', '.join(existing)}); set "
                          "trainer.resume=auto to continue it or choose another hydra.run.dir")


class RunDirGuard(Callback):
    """Registered in ``conf/config.yaml`` (``hydra.callbacks``): refuses an occupied run directory
    before the job starts, so not even Hydra's own files in it are touched."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            guard_run_dir(run_dir, OmegaConf.select(config, "trainer.resume"))
        except ConfigError as err:
            from malora_train.cli import fail

            fail(err)
