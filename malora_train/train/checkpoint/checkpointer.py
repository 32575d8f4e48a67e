"""One checkpoint of the training run: what goes into ``checkpoints/step_<N>``, written and restored by
every rank together (rank 0 writes the shared files)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from malora_train.adapters import AdaptedCausalLM, load_adapter_weights, save_adapter
from malora_train.data import BatchStream
from malora_train.errors import ConfigError
from malora_train.run_dir import ADAPTER_DIR, read_json, replace_dir, write_json_atomic
from malora_train.train.checkpoint.deepspeed_engine import load_engine, save_engine
from malora_train.train.checkpoint.folders import prune, publish, step_dir, temporary_dir
from malora_train.train.checkpoint.state_files import (
    json_numbers,
    load_optimizer,
    load_rng,
    save_optimizer,
    save_rng,
)
from malora_train.train.distributed import gather_adapter_state

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


class Checkpointer:
    """Saves and restores the training run's state: adapter, optimizer (or DeepSpeed's engine),
    scheduler, data stream, RNGs and ``TrainState``. Every rank calls ``save`` and ``restore``;
    only rank 0 writes the shared files."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, model: AdaptedCausalLM, engine: Any,
                 optimizer: Any, scheduler: Any, stream: BatchStream, base_model_name: str, seed: int,
                 deepspeed: bool) -> None:
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.model = model
        self.engine = engine
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream = stream
        self.base_model_name = base_model_name
        self.seed = seed
        self.is_main = accelerator.is_main_process
        self.process_index, self.world = accelerator.process_index, accelerator.num_processes
        self.deepspeed = deepspeed

    def save_final_adapter(self) -> Path:
        """``adapter/``, replaced whole (never half old, half new)."""
        state = gather_adapter_state(self.accelerator, self.model)
        out = self.run_dir / ADAPTER_DIR
        if self.is_main:
            tmp = self.run_dir / f".{ADAPTER_DIR}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(self.model, tmp, self.base_model_name, state_dict=state)
            replace_dir(tmp, out)
        self.accelerator.wait_for_everyone()
        return out

    def save(self, state: TrainState, keep_last: int) -> Path:
        """checkpoints/step_<N>: written into .tmp-step_<N> by every rank, renamed by rank 0 when complete;
        then all but the ``keep_last`` newest and the best are pruned."""
        step = state.step
        tmp = temporary_dir(self.run_dir, step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        adapter_state = gather_adapter_state(self.accelerator, self.model)
        if self.deepspeed:
            save_engine(self.engine, tmp)
        save_rng(tmp, self.process_index)
        if self.is_main:
            save_adapter(self.model, tmp / ADAPTER_DIR, self.base_model_name, state_dict=adapter_state)
            if not self.deepspeed:
                save_optimizer(self.optimizer.optimizer, tmp)
            write_json_atomic(tmp / STATE_FILE, {
                "train": dataclasses.asdict(state),
                "scheduler": json_numbers(self.scheduler.state_dict()),
                "stream": self.stream.state_dict(),
                "world_size": self.world,
                "deepspeed": self.deepspeed,
            })
        self.accelerator.wait_for_everyone()
        if self.is_main:
            publish(tmp, self.run_dir, step)  # the manifest, then the rename
            prune(self.run_dir, keep_last, {state.best_step} if state.best_step is not None else set())
        self.accelerator.wait_for_everyone()
        return step_dir(self.run_dir, step)

    def restore(self, path: Path) -> TrainState:
        """Load a checkpoint into the model, optimizer, scheduler, stream and RNGs; returns its state."""
        saved = read_json(path / STATE_FILE)
        if saved.get("deepspeed", False) != self.deepspeed:
            made, now = ("with", "without") if saved.get("deepspeed") else ("without", "with")
            raise ConfigError(f"trainer.resume: {path} was written {made} DeepSpeed and this run is {now} "
                              "it; resume with the launcher config it was made with")
        state = TrainState(**saved["train"])
        if self.deepspeed:
            load_engine(self.engine, path)
        else:
            load_adapter_weights(self.model, path / ADAPTER_DIR)
            load_optimizer(self.optimizer.optimizer, path)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.stream.load_state_dict(saved["stream"])
        if saved["world_size"] != self.world or not load_rng(path, self.process_index):
            log.warning("resuming on %d processes from a %d-process checkpoint: RNG streams are reseeded",
                        self.world, saved["world_size"])
            set_seed(self.seed + state.step, device_specific=True)
        if self.is_main:
            log.info("resumed from %s at step %d", path, state.step)
        return state
