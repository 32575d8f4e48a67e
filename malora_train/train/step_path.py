"""Which path a run's training step takes: captured (each micro-batch's forward + backward and the update
replayed as CUDA graphs, ``graphs.StepGraphs``) or eager (every kernel launched from Python).

``trainer.cuda_graphs`` is ``auto`` (the default: captured wherever nothing stands in the way), ``true``
(captured, or a one-line refusal naming what stands in the way) or ``false`` (eager). Everything that
decides it lives here, so the log's first line can say which path runs and, when eager, the one reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from malora_train.config import Config
from malora_train.errors import ConfigError

SETTINGS = ("auto", True, False)


@dataclass(frozen=True)
class StepPath:
    """The chosen path; ``reason`` says why a run is eager (None when captured)."""

    captured: bool
    reason: str | None = None

    def describe(self) -> str:
        if self.captured:
            return "captured (each step replayed as CUDA graphs)"
        return f"eager ({self.reason})"


def check_setting(cfg: Config) -> None:
    """``trainer.cuda_graphs`` holds auto, true or false; with true, nothing in the config stands in the
    way."""
    setting = cfg.trainer.cuda_graphs
    if setting not in SETTINGS:
        raise ConfigError(f"trainer.cuda_graphs={setting!r} is not one of auto, true, false")
    if setting is True and (obstacle := config_obstacle(cfg)):
        raise ConfigError(refusal(obstacle))


def refusal(obstacle: str) -> str:
    return f"trainer.cuda_graphs=true cannot capture this run: {obstacle}; set it to auto or false"


def config_obstacle(cfg: Config) -> str | None:
    """What in the config keeps the step from being captured, or None."""
    trainer, adapter = cfg.trainer, cfg.adapter
    if cfg.data.packing is False:
        return "data.packing=false (a captured step needs the fixed shapes of packed rows)"
    if trainer.skip_nonfinite:
        return "trainer.skip_nonfinite=true (it reads the loss on the host every step)"
    if trainer.mixed_precision == "fp16":
        return "trainer.mixed_precision=fp16 (its loss scaler reads the gradients on the host; bf16 has none)"
    if trainer.compile and trainer.compile_mode in ("reduce-overhead", "max-autotune"):
        return f"trainer.compile_mode={trainer.compile_mode} (it makes CUDA graphs of its own)"
    if adapter.impl == "reference":
        return "adapter.impl=reference (its per-expert loop has data-dependent shapes)"
    return None


def launch_obstacle(device_type: str, deepspeed: bool, dropout: float) -> str | None:
    """What in the launch keeps the step from being captured, or None. Several processes do not: the captured
    step all-reduces the adapters' gradients itself (``graphs.GradientBucket``)."""
    if device_type != "cuda":
        return f"device {device_type}: CUDA graphs need a GPU"
    if deepspeed:
        return "DeepSpeed (its engine runs the backward and the update itself)"
    if dropout > 0 and importlib.util.find_spec("triton") is None:
        return "no Triton (a captured step draws new dropout masks only in the Triton kernels)"
    return None


def choose_step_path(cfg: Config, device_type: str, deepspeed: bool) -> StepPath:
    """The path of this run; ``trainer.cuda_graphs=true`` with anything in the way is refused in one line."""
    setting = cfg.trainer.cuda_graphs
    if setting is False:
        return StepPath(False, "trainer.cuda_graphs=false")
    obstacle = config_obstacle(cfg) or launch_obstacle(device_type, deepspeed, cfg.adapter.dropout)
    if obstacle is None:
        return StepPath(True)
    if setting is True:
        raise ConfigError(refusal(obstacle))
    return StepPath(False, obstacle)
