"""What a user sees: a progress bar, ``metrics.jsonl`` (one object per logged step) mirrored to Accelerate's
trackers (wandb, TensorBoard, ...), a loss plot and the summary printed at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from malora_train.config import LoggerConfig
from malora_train.errors import ConfigError
from malora_train.eval import EvalResult, format_accuracy_table, format_expert_shares
from malora_train.run_dir import (
    ADAPTER_DIR,
    EVAL_DIR,
    LOSS_PLOT,
    METRICS_FILE,
    PREDICTIONS_FILE,
    ROUTING_FILE,
    ROUTING_PLOT,
    SUMMARY_FILE,
    WANDB_ID_FILE,
    append_line,
    atomic_write,
    write_text_atomic,
)

log = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}  # where the package's name is not the tracker's


def run_name_from_overrides(overrides: list[str]) -> str:
    """``adapter=lora,adapter.rank=16`` style name; hydra/launcher keys and paths are left out."""
    keep = [o for o in overrides if not o.startswith(("hydra.", "trainer.resume", "logger."))]
    return ",".join(keep) or "default"


def check_logger(cfg: LoggerConfig) -> None:
    """Tracker names Accelerate knows, a valid wandb mode, and no wandb setting that would do nothing."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in cfg.trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"logger.trackers: {name!r} is not an Accelerate tracker; choose from "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    mode = cfg.wandb.mode
    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {', '.join(WANDB_MODES)}")
    if mode in ("online", "offline") and "wandb" not in cfg.trackers:
        raise ConfigError(f"logger.wandb.mode={mode} logs nothing unless logger.trackers names wandb "
                          "(logger.trackers=[wandb])")


def installed_trackers(cfg: LoggerConfig) -> list[str]:
    """The trackers of ``logger.trackers`` whose package is installed; each missing one is named in a
    warning."""
    from accelerate.tracking import get_available_trackers

    check_logger(cfg)
    available = {str(tracker) for tracker in get_available_trackers()}
    chosen = []
    for name in dict.fromkeys(cfg.trackers):
        if name in available:
            chosen.append(name)
        else:
            log.warning("logger.trackers: %s is not installed (pip install %s); not logging to it", name,
                        TRACKER_PACKAGES.get(name, name))
    return chosen


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"trainer": {"lr": 1e-3}}`` -> ``{"trainer.lr": 1e-3}``; lists and None as text (TensorBoard's
    hyper-parameters take scalars only)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` and mirrors them to the Accelerate trackers the ``accelerator``
    was built with (``logger.trackers``). Only rank 0 (``enabled``) writes.

    ``resume_step``: lines after it are dropped first (a resumed run logs those steps again; TensorBoard
    purges its events after it too); None for a fresh run, -1 to drop everything (``trainer.resume=auto``
    that found no checkpoint).
    """

    def __init__(self, run_dir: Path, enabled: bool, logger_cfg: LoggerConfig, run_name: str,
                 config: dict[str, Any], resume_step: int | None,
                 accelerator: Accelerator | None = None) -> None:
        check_logger(logger_cfg)
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.trackers = []
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if accelerator is not None and accelerator.log_with:
            wandb = logger_cfg.wandb
            init_kwargs = {
                "wandb": {"entity": wandb.entity, "name": wandb.name or run_name, "tags": list(wandb.tags),
                          "dir": str(run_dir), "resume": "allow", "id": _wandb_id(run_dir),
                          **({"mode": wandb.mode} if wandb.mode else {})},
                "tensorboard": {"purge_step": resume_step + 1} if resume_step is not None else {},
            }
            accelerator.init_trackers(wandb.project, init_kwargs=init_kwargs)
            self.trackers = list(accelerator.trackers)
            for tracker in self.trackers:  # wandb shows the nested config; the others take flat scalars
                tracker.store_init_configuration(config if tracker.name == "wandb" else flat_config(config))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint: they will be logged again."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        append_line(self.path, json.dumps({"step": step, **values}))
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.tracker.summary.update({k: v for k, v in summary.items()
                                                if isinstance(v, (int, float, str))})
            tracker.finish()
        self.trackers = []


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(id_file, run_id)
    return run_id


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


PROGRESS_SETTINGS = ("auto", True, False)  # trainer.progress
PROGRESS_LINES = 20  # trainer.progress_every=null: about this many plain lines a run


def check_progress(setting: Any, every: int | None) -> None:
    if setting not in PROGRESS_SETTINGS or isinstance(setting, int) and not isinstance(setting, bool):
        raise ConfigError(f"trainer.progress={setting!r} is not one of auto, true, false")
    if every is not None and every < 1:
        raise ConfigError(f"trainer.progress_every={every} must be >= 1 (or null)")


def progress_mode(setting: Any, stream: Any = None) -> str:
    """``trainer.progress`` as what is shown: ``bar`` (true; auto on a terminal), ``lines`` (auto when
    stderr is a file or a pipe: plain lines, no carriage returns) or ``off`` (false)."""
    if setting is False:
        return "off"
    if setting is True:
        return "bar"
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def progress_interval(total: int, log_every: int, every: int | None) -> int:
    """Steps between plain lines: ``every``, else about ``PROGRESS_LINES`` a run; a multiple of
    ``log_every`` (each line then shows the figures of the window just read)."""
    steps = every or max(1, math.ceil(total / PROGRESS_LINES))
    return max(log_every, math.ceil(steps / log_every) * log_every)


@contextlib.contextmanager
def hub_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars (loading weights) on or off for the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """What the console shows of training: a tqdm bar over optimiser steps (loss, aux loss, lr, tokens/s;
    tqdm gives the ETA), or, in ``lines`` mode (``progress_mode``), one plain line every ``every`` steps
    and at the last: loss, tokens/s, elapsed time and ETA."""

    def __init__(self, total: int, initial: int, mode: str | bool, is_main: bool, every: int = 1) -> None:
        if isinstance(mode, bool):  # the earlier signature: enabled or not
            mode = "bar" if mode else "off"
        self.is_main = is_main
        self.mode = mode if is_main else "off"
        self.total, self.step, self.every = total, initial, every
        self.first, self.started = initial, time.perf_counter()
        self.metrics: dict[str, Any] | None = None
        self.bar = tqdm(total=total, initial=initial, disable=self.mode != "bar", desc="train",
                        unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, Any] | None) -> None:
        """One step done; ``metrics`` when a logging window closed with it (the figures shown until the
        next)."""
        self.step += 1
        if metrics:
            self.metrics = metrics
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", aux=f"{metrics['aux_loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False,
            )
        self.bar.update(1)
        if self.mode == "lines" and (self.step % self.every == 0 or self.step == self.total):
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        done = self.step - self.first
        eta = elapsed / done * (self.total - self.step) if done else 0.0
        parts = [f"step {self.step}/{self.total} ({100 * self.step / max(1, self.total):.0f}%)"]
        if self.metrics:
            m = self.metrics
            parts += [f"loss {m['loss']:.4f}", f"aux {m['aux_loss']:.4f}", f"lr {m['lr']:.2e}",
                      f"{m['tokens_per_s']:.0f} tokens/s"]
        parts += [f"elapsed {_duration(elapsed)}", f"ETA {_duration(eta)}"]
        print("train: " + ", ".join(parts), file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        """A message above the bar, printed once (by rank 0)."""
        if self.is_main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """loss.png: LM loss (and per-task losses when present) and aux loss against step."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("lm_loss"), (int, float))]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_lm, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
    ax_lm.plot(steps, [r["lm_loss"] for r in rows], label="all tasks", color="black", linewidth=2)
    task_keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    for key in task_keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax_lm.plot(*zip(*points), label=key.split("/", 1)[1], alpha=0.7)
    ax_lm.set(title="LM loss (answer tokens)", xlabel="step", ylabel="cross-entropy")
    ax_lm.legend(fontsize=8)
    ax_aux.plot(steps, [r.get("aux_loss", 0.0) for r in rows], color="tab:red")
    ax_aux.set(title="router auxiliary loss", xlabel="step")
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out_path


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_summary(summary: dict[str, Any], before: EvalResult | None, after: EvalResult | None,
                   routing: dict | None, run_dir: Path) -> str:
    """The text printed when a run completes: throughput, parameters, accuracy before -> after and, for
    mixtures, the share of each task's tokens per expert."""
    best = summary["best_eval_average"]
    if best is not None:
        best_text = f"best eval average {best:.2f} at step {summary['best_step']}"
    elif before is not None:  # evaluated before training only
        best_text = f"eval average {before.average:.2f} before training (none after)"
    else:
        best_text = "no eval"
    lines = ["", f"== {summary['model']} + {summary['adapter']}: {summary['steps']} steps, "
                 f"{summary['tokens']:,} tokens in {summary['wall_time_s']:.0f} s "
                 f"({summary['tokens_per_s']:.0f} tokens/s while training), "
                 f"peak memory {summary['peak_memory_gb']:.1f} GB",
             f"   trainable parameters {summary['trainable_params']:,} "
             f"({summary['trainable_percent']:.2f}% of the base model); {best_text}", "",
             format_accuracy_table(before, after)
             or "no evaluation (trainer.eval_before=false, trainer.eval_after=false, trainer.eval_every=0)"]
    if routing:
        lines += ["", "share of each task's tokens routed to each expert (%, average over layers):",
                  format_expert_shares(routing)]
    files = [METRICS_FILE, SUMMARY_FILE, LOSS_PLOT, f"{ADAPTER_DIR}/"]
    if before is not None or after is not None:
        files.append(f"{EVAL_DIR}/step_<N>/{PREDICTIONS_FILE.format(scorer='<scorer>')}")
    if routing:
        files += [ROUTING_FILE, ROUTING_PLOT]
    lines += ["", f"outputs: {run_dir} ({', '.join(files)})"]
    return "\n".join(lines)
