"""Checks on the whole config before anything is loaded or written: every choice key holds one of its
options, every number is in its range. A typo such as ``eval.scorer=foo`` fails in a second, naming the
key, instead of after training (leaving an occupied run directory behind).

Each part is checked by the module that owns it (data, eval, the loop's numbers); this module only calls them
all, in the order a user reads the config. The adapter's keys were checked when its config object was made
(``malora_train.config.AdapterConfig.validate``).
"""

from __future__ import annotations

import math

from malora_train.adapters.kernels.common import COMPILE_ADAPTERS
from malora_train.config import Config
from malora_train.data.mixture import check_mixture_options
from malora_train.data.tasks import check_options
from malora_train.errors import ConfigError
from malora_train.eval import check_eval_config
from malora_train.models import COMPILE_MODES, COMPILE_SCOPES, DTYPES, SOURCES
from malora_train.train.distributed import mixed_precision
from malora_train.train.metrics import check_logger, check_progress
from malora_train.train.optim import check_optimizer, check_schedule
from malora_train.train.recompute import check_setting as check_recompute_setting
from malora_train.train.step_path import check_setting as check_step_setting

EXPORTS = ("merged",)  # malora-eval eval.export


def check_choice(key: str, value: object, options: tuple[str, ...] | list[str]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")


def check_config(cfg: Config) -> None:
    """Fail on any setting the schema's types let through but the code would reject later."""
    model = cfg.model
    if not model.name_or_path:
        check_choice("model.source", model.source, SOURCES)
    check_choice("model.dtype", model.dtype, ("auto", *DTYPES))
    check_options(cfg.data)
    check_mixture_options([], cfg.data.sampling, cfg.data.temperature, None, None)
    check_trainer(cfg)
    check_eval_config(cfg.eval)
    if cfg.eval.export is not None:
        check_choice("eval.export", cfg.eval.export, EXPORTS)
    check_logger(cfg.logger)  # tracker names, the wandb mode and trackers=[wandb] when it is set


def check_trainer(cfg: Config) -> None:
    trainer = cfg.trainer
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        value = getattr(trainer, key)
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{key}={value} must be >= 1")
    for key in ("max_steps", "save_every", "eval_every", "max_grad_norm", "weight_decay"):
        if getattr(trainer, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(trainer, key)} must be >= 0")
    if trainer.save_every and trainer.keep_last < 1:
        raise ConfigError(f"trainer.keep_last={trainer.keep_last} must be >= 1 when trainer.save_every "
                          "is set")
    if trainer.ddp_bucket_cap_mb is not None and not trainer.ddp_bucket_cap_mb > 0:
        raise ConfigError(f"trainer.ddp_bucket_cap_mb={trainer.ddp_bucket_cap_mb} must be > 0 (or null)")
    if not (math.isfinite(trainer.lr) and trainer.lr > 0):
        raise ConfigError(f"trainer.lr={trainer.lr} must be a finite number > 0")
    if trainer.max_steps == 0 and not trainer.epochs > 0:
        raise ConfigError("set trainer.max_steps > 0 or trainer.epochs > 0")
    check_choice("trainer.compile_mode", trainer.compile_mode, COMPILE_MODES)
    check_choice("trainer.compile_scope", trainer.compile_scope, COMPILE_SCOPES)
    check_choice("trainer.compile_adapters", trainer.compile_adapters, COMPILE_ADAPTERS)
    if trainer.compile and cfg.data.packing is False:
        raise ConfigError("trainer.compile=true needs the fixed shapes of data.packing=true")
    check_progress(trainer.progress, trainer.progress_every)
    check_recompute_setting(trainer.gradient_checkpointing, trainer.checkpointing_keeps)
    check_step_setting(cfg)  # trainer.cuda_graphs: auto, true (and nothing in the config in its way), false
    if not 0 <= trainer.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={trainer.warmup_ratio} must be in [0, 1)")
    check_schedule(trainer)  # a transformers.get_scheduler name and the arguments it takes
    check_optimizer(trainer)  # a torch.optim name and the arguments it takes
    mixed_precision(trainer)
