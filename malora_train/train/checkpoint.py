"""Checkpoints that survive ``kill -9``: each is written into a hidden temporary folder and renamed to
``checkpoints/step_<N>`` only once every file is on disk, so a listed checkpoint is always complete.

A checkpoint holds the adapter (safetensors), the optimizer (safetensors + JSON, or DeepSpeed's own
files under ZeRO), the scheduler, the data stream's sampler state, every rank's RNG states and the
``TrainState``. ``Checkpointer`` writes and restores one for the trainer; the functions below it
manage the folders and files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from malora_train.adapters import AdaptedCausalLM, load_adapter_weights, save_adapter
from malora_train.data import BatchStream
from malora_train.errors import ConfigError
from malora_train.run_dir import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    fsync_dir,
    read_json,
    write_json_atomic,
)
from malora_train.train.distributed import gather_adapter_state

log = logging.getLogger(__name__)

CHECKPOINTS = CHECKPOINTS_DIR
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-step_"  # a checkpoint being written
OLD_PREFIX = ".old-"  # a folder being replaced by a newer save of itself


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``auto``: the latest complete checkpoint of this run (None on a fresh run); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (no {STATE_FILE} in it)")
    return path


def temporary_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"{TMP_PREFIX}{step}"


def publish(tmp: Path, run_dir: Path, step: int) -> Path:
    """Turn a fully written temporary folder into ``step_<N>``."""
    final = checkpoint_root(run_dir) / f"step_{step}"
    replace_dir(tmp, final)
    return final


def replace_dir(src: Path, dst: Path) -> None:
    """Move the fully written folder ``src`` to ``dst`` by renames, after an fsync of every file in it.
    A ``dst`` already there (the final adapter, or a step re-run after resuming from an older
    checkpoint) is moved aside first and deleted last, so a complete ``dst`` exists at every moment
    but between two renames."""
    fsync_tree(src)
    if dst.exists():
        old = dst.with_name(f"{OLD_PREFIX}{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
    fsync_dir(dst.parent)


def remove_partial(run_dir: Path) -> None:
    """Clean up after a save that was killed: delete half-written folders, and put back a complete
    checkpoint that was moved aside and whose replacement never arrived."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for old in root.glob(f"{OLD_PREFIX}step_*"):
        original = root / old.name[len(OLD_PREFIX):]
        if not original.exists() and (old / STATE_FILE).is_file():
            os.rename(old, original)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def prune(run_dir: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the ``keep_last`` newest checkpoints and those in ``keep_steps`` (the best)."""
    found = complete_checkpoints(run_dir)
    newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step not in newest and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
    remove_partial(run_dir)


# -- files ---------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (a rename is durable only after this)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (hyper-parameters): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    write_json_atomic(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    meta = read_json(folder / "optimizer.json")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    write_json_atomic(folder / f"rng_rank{rank}.json", {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
    })


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False when the checkpoint has none for this rank."""
    path = folder / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    meta = read_json(folder / f"rng_rank{rank}.json")
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


# -- the trainer's checkpoints ----------------------------------------------------------------------------

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
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        save_rng(tmp, self.process_index)
        if self.is_main:
            save_adapter(self.model, tmp / ADAPTER_DIR, self.base_model_name, state_dict=adapter_state)
            if not self.deepspeed:
                save_optimizer(self.optimizer.optimizer, tmp)
            write_json_atomic(tmp / STATE_FILE, {  # written last: its presence marks a whole checkpoint
                "train": dataclasses.asdict(state),
                "scheduler": self.scheduler.state_dict(),
                "stream": self.stream.state_dict(),
                "world_size": self.world,
                "deepspeed": self.deepspeed,
            })
        self.accelerator.wait_for_everyone()
        final = checkpoint_root(self.run_dir) / f"step_{step}"
        if self.is_main:
            publish(tmp, self.run_dir, step)
            prune(self.run_dir, keep_last, {state.best_step} if state.best_step is not None else set())
        self.accelerator.wait_for_everyone()
        return final

    def restore(self, path: Path) -> TrainState:
        """Load a checkpoint into the model, optimizer, scheduler, stream and RNGs; returns its state."""
        saved = read_json(path / STATE_FILE)
        if saved.get("deepspeed", False) != self.deepspeed:
            made, now = ("with", "without") if saved.get("deepspeed") else ("without", "with")
            raise ConfigError(f"trainer.resume: {path} was written {made} DeepSpeed and this run is {now} "
                              "it; resume with the launcher config it was made with")
        state = TrainState(**saved["train"])
        if self.deepspeed:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
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

    def last_good_hint(self) -> str:
        """Where a failed run can be resumed from, for error messages."""
        found = complete_checkpoints(self.run_dir)
        return f"last good checkpoint: {found[-1][1]}" if found else "no checkpoint was saved yet"
