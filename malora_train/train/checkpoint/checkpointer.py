"""One checkpoint of the training run: what goes into ``checkpoints/step_<N>``, written and restored by
every rank together (rank 0 writes the shared files)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from malora_train.adapters import AdaptedCausalLM, load_adapter_weights, save_adapter
from malora_train.data import BatchStream
from malora_train.errors import ConfigError
from malora_train.run_dir import ADAPTER_DIR, read_json, replace_dir, write_json_atomic, write_manifest
from malora_train.train.checkpoint.deepspeed_engine import load_engine, save_engine
from malora_train.train.checkpoint.folders import prune, publish, step_dir, temporary_dir
from malora_train.train.checkpoint.state_files import (
    json_numbers,
    load_optimizer,
    load_rng,
    save_optimizer,
    save_rng,
)
from malora_train.train.distributed import LaunchInfo, barrier, gather_adapter_state

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class TrainState:
    """Everything about the run's progress that a checkpoint must carry besides tensors."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds inside optimiser steps
    wall_time: float = 0.0  # seconds of the whole run up to the last checkpoint or the end
    best_average: float | None = None
    best_step: int | None = None
    eval_before: dict[str, Any] | None = None
    eval_pending: bool = False  # a signal cut this step's evaluation short: resuming runs it first


@dataclasses.dataclass(frozen=True)
class CheckpointedParts:
    """The objects of a training run whose state a checkpoint holds."""

    model: AdaptedCausalLM
    engine: Any  # the model as ``accelerator.prepare`` wrapped it (under DeepSpeed: its engine)
    optimizer: Any  # Accelerate's wrapper; ``.optimizer`` is the torch optimizer
    scheduler: Any
    stream: BatchStream
    base_model_name: str  # recorded in the adapter's config


def apply_learning_rates(scheduler: Any, base_lrs: list[float], checkpoint: Path | None = None) -> None:
    """Put ``base_lrs`` (this run's ``trainer.lr``) in place of the base learning rates a restored schedule
    and optimizer brought back: the schedule keeps its position, every rate scaled by new base / old base
    (the schedules multiply the base rate by a factor of the step). A rate held as a tensor (a capturable
    optimizer's, read by captured graphs) is changed in place. ``checkpoint``: named in the note."""
    saved = list(scheduler.base_lrs)
    if saved == base_lrs:
        return
    groups = scheduler.optimizer.param_groups
    for index, (group, old, new) in enumerate(zip(groups, saved, base_lrs)):
        factor = new / old
        if torch.is_tensor(group["lr"]):
            group["lr"].mul_(factor)
        else:
            group["lr"] *= factor
        group["initial_lr"] = new
        scheduler.base_lrs[index] = new
        last = scheduler._last_lr[index]
        scheduler._last_lr[index] = last * factor
    if checkpoint is not None:
        log.info("trainer.lr: %s was trained with base learning rates %s; resuming with %s", checkpoint,
                 saved, base_lrs)


class Checkpointer:
    """Saves and restores the training run's state: adapter, optimizer (or DeepSpeed's engine),
    scheduler, data stream, RNGs and ``TrainState``. Every rank calls ``save`` and ``restore``;
    only rank 0 writes the shared files. ``seed``: the run's, to reseed RNG streams a checkpoint
    has none for."""

    def __init__(self, run_dir: Path, launch: LaunchInfo, parts: CheckpointedParts, *, seed: int) -> None:
        self.run_dir = run_dir
        self.launch = launch
        self.parts = parts
        self.seed = seed

    def save_final_adapter(self) -> Path:
        """``adapter/``, replaced whole (never half old, half new), with a manifest as a checkpoint's (loading
        it verifies its files)."""
        parts = self.parts
        state = gather_adapter_state(self.launch, parts.model)
        out = self.run_dir / ADAPTER_DIR
        if self.launch.is_main:
            tmp = self.run_dir / f".{ADAPTER_DIR}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(parts.model, tmp, parts.base_model_name, state_dict=state)
            write_manifest(tmp)
            replace_dir(tmp, out)
        barrier()
        return out

    def save(self, state: TrainState, keep_last: int) -> Path:
        """checkpoints/step_<N>: written into .tmp-step_<N> by every rank, renamed by rank 0 when complete;
        then all but the ``keep_last`` newest and the best are pruned."""
        launch, parts, step = self.launch, self.parts, state.step
        tmp = temporary_dir(self.run_dir, step)
        if launch.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        adapter_state = gather_adapter_state(launch, parts.model)
        if launch.deepspeed:
            save_engine(parts.engine, tmp)
        save_rng(tmp, launch.process_index)
        if launch.is_main:
            save_adapter(parts.model, tmp / ADAPTER_DIR, parts.base_model_name, state_dict=adapter_state)
            if not launch.deepspeed:
                save_optimizer(parts.optimizer.optimizer, tmp)
            write_json_atomic(tmp / STATE_FILE, {
                "train": dataclasses.asdict(state),
                "scheduler": json_numbers(parts.scheduler.state_dict()),
                "stream": parts.stream.state_dict(),
                "world_size": launch.world,
                "deepspeed": launch.deepspeed,
            })
        barrier()
        if launch.is_main:
            publish(tmp, self.run_dir, step)  # the manifest, then the rename
            prune(self.run_dir, keep_last, {state.best_step} if state.best_step is not None else set())
        barrier()
        return step_dir(self.run_dir, step)

    def restore(self, path: Path) -> TrainState:
        """Load a checkpoint into the model, optimizer, scheduler, stream and RNGs; returns its state."""
        launch, parts = self.launch, self.parts
        saved = read_json(path / STATE_FILE)
        if saved.get("deepspeed", False) != launch.deepspeed:
            made, now = ("with", "without") if saved.get("deepspeed") else ("without", "with")
            raise ConfigError(f"trainer.resume: {path} was written {made} DeepSpeed and this run is {now} "
                              "it; resume with the launcher config it was made with")
        state = TrainState(**saved["train"])
        configured = list(parts.scheduler.base_lrs)  # this run's trainer.lr (a group's multiple of it)
        if launch.deepspeed:
            load_engine(parts.engine, path)
        else:
            load_adapter_weights(parts.model, path / ADAPTER_DIR)
            load_optimizer(parts.optimizer.optimizer, path)
        parts.scheduler.load_state_dict(saved["scheduler"])
        apply_learning_rates(parts.scheduler, configured, path if launch.is_main else None)
        parts.stream.load_state_dict(saved["stream"])
        if saved["world_size"] != launch.world or not load_rng(path, launch.process_index):
            log.warning("resuming on %d processes from a %d-process checkpoint: RNG streams are reseeded",
                        launch.world, saved["world_size"])
            set_seed(self.seed + state.step, device_specific=True)
        if launch.is_main:
            log.info("resumed from %s at step %d", path, state.step)
        return state
