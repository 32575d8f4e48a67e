"""Checkpoints that survive ``kill -9`` and say when they are damaged.

Each checkpoint is written into a hidden temporary folder; rank 0 then writes ``manifest.json`` (size and
sha256 of every file) and renames the folder to ``checkpoints/step_<N>``, so a listed checkpoint is always
whole. Old checkpoints are pruned by renaming them to a hidden trash name first, then deleting, so a kill
during pruning never leaves a listed folder with files missing. Resuming verifies the manifest:
``trainer.resume=auto`` falls back to the newest intact checkpoint (with a warning naming what is wrong),
an explicit path that fails is an error naming the file.

A checkpoint holds the adapter (safetensors), the optimizer (safetensors + JSON, or DeepSpeed's own
files under ZeRO, loaded with ``torch.load(weights_only=True)``: nothing in a checkpoint can run code),
the scheduler, the data stream's sampler state, every rank's RNG states and the ``TrainState``.
``Checkpointer`` writes and restores one for the trainer; the functions below it manage the folders and
files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from malora_train.adapters import AdaptedCausalLM, load_adapter_weights, save_adapter
from malora_train.config import TrainerConfig
from malora_train.data import BatchStream
from malora_train.errors import ConfigError, DataError
from malora_train.run_dir import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    atomic_write,
    completed_summary,
    fsync_dir,
    read_json,
    read_json_object,
    write_json_atomic,
)
from malora_train.train.distributed import gather_adapter_state

log = logging.getLogger(__name__)

CHECKPOINTS = CHECKPOINTS_DIR
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # written last: its presence marks a whole checkpoint
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-step_"  # a checkpoint being written
OLD_PREFIX = ".old-"  # a folder being replaced by a newer save of itself
TRASH_PREFIX = ".trash-"  # a pruned checkpoint being deleted


class DamagedCheckpoint(DataError):
    """A checkpoint's files do not match its manifest (missing, truncated, corrupted)."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (published with its manifest), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, verified against its manifest. ``auto``: the newest intact checkpoint
    of this run (None on a fresh run; damaged newer ones are skipped with a warning); else the path given."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not (path / MANIFEST_FILE).is_file():
            raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (no {MANIFEST_FILE} in it)")
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as err:
            raise ConfigError(f"trainer.resume={resume}: damaged checkpoint: {err}") from err
        return path
    found = complete_checkpoints(run_dir)
    problems = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as err:
            problems.append(str(err))
            log.warning("trainer.resume=auto: skipping damaged checkpoint %s (%s)", path.name, err)
            continue
        if problems:
            log.warning("trainer.resume=auto: resuming from %s, the newest intact checkpoint", path)
        return path
    if problems:
        raise ConfigError(f"trainer.resume=auto: every checkpoint in {checkpoint_root(run_dir)} is damaged "
                          f"(newest: {problems[0]}); delete {checkpoint_root(run_dir)} to start over")
    return None


def finished_run(run_dir: Path, trainer: TrainerConfig) -> dict[str, Any] | None:
    """The summary of a completed run that ``trainer.resume`` asks nothing more of (the same or fewer
    steps or epochs), else None: such a run is left as it is."""
    summary = completed_summary(run_dir) if trainer.resume else None
    if summary is None:
        return None
    if trainer.max_steps > 0:
        return summary if trainer.max_steps <= summary.get("steps", 0) else None
    done_by_epochs = summary.get("max_steps") == 0 and trainer.epochs <= summary.get("epochs", 0)
    return summary if done_by_epochs else None


def finished_message(run_dir: Path, summary: dict[str, Any]) -> str:
    average = summary.get("eval_after_average")
    result = f", eval average {average:.2f}" if isinstance(average, (int, float)) else ""
    return (f"{run_dir} is complete ({summary.get('steps')} steps{result}); nothing to do (raise "
            "trainer.max_steps or trainer.epochs to train further)")


def check_extendable(run_dir: Path, resume_from: Path | None) -> None:
    """A completed run continues only from a checkpoint: starting it afresh would overwrite its results."""
    if resume_from is None and completed_summary(run_dir) is not None:
        raise ConfigError(f"hydra.run.dir={run_dir} holds a completed run without a checkpoint to continue "
                          "from (trainer.save_every was 0); start a new run in another hydra.run.dir")


# -- the manifest ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and sha256 of every file under ``folder``."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    write_json_atomic(folder / MANIFEST_FILE, {"format": 1, "files": files})


def verify_checkpoint(folder: Path) -> None:
    """Every file the manifest lists is there with its size and sha256; else DamagedCheckpoint naming
    the first file at fault (a missing, truncated, corrupted or zeroed file)."""
    try:
        manifest = read_json_object(folder / MANIFEST_FILE)
        files = manifest["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (DataError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DamagedCheckpoint(f"{folder / MANIFEST_FILE}: unreadable manifest ({err})") from None
    for name, size, sha256 in entries:
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path}: missing")
        actual = path.stat().st_size
        if actual != size:
            raise DamagedCheckpoint(f"{path}: {actual} bytes, the manifest says {size} (truncated?)")
        if _sha256(path) != sha256:
            raise DamagedCheckpoint(f"{path}: content differs from the manifest (corrupted)")


# -- folders ---------------------------------------------------------------------------------------------
def temporary_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"{TMP_PREFIX}{step}"


def publish(tmp: Path, run_dir: Path, step: int) -> Path:
    """Turn a fully written temporary folder into ``step_<N>``: manifest last, then the rename."""
    write_manifest(tmp)
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


def delete_dir(path: Path) -> None:
    """Delete a folder so that no kill leaves it half deleted under its own name: rename, then remove."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_partial(run_dir: Path) -> None:
    """Clean up after a save or a prune that was killed: delete half-written and half-deleted folders, and
    put back a complete checkpoint that was moved aside and whose replacement never arrived."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for old in root.glob(f"{OLD_PREFIX}step_*"):
        original = root / old.name[len(OLD_PREFIX):]
        if not original.exists() and (old / MANIFEST_FILE).is_file():
            os.rename(old, original)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{TRASH_PREFIX}*")]:
        shutil.rmtree(stale, ignore_errors=True)


def prune(run_dir: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the ``keep_last`` newest checkpoints and those in ``keep_steps`` (the best)."""
    found = complete_checkpoints(run_dir)
    newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step not in newest and step not in keep_steps:
            delete_dir(path)
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
    atomic_write(folder / "optimizer.safetensors", lambda path: save_file(tensors, str(path)))
    write_json_atomic(folder / "optimizer.json", {"param_groups": json_numbers(state["param_groups"]),
                                                  "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The saved state into ``optimizer``; hyper-parameters it holds as tensors (a capturable optimiser's
    learning rate) stay tensors, on their device."""
    meta = read_json(folder / "optimizer.json")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    held = [{k: v for k, v in group.items() if torch.is_tensor(v)} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, tensor_values in zip(optimizer.param_groups, held):
        for key, old in tensor_values.items():
            if not torch.is_tensor(group[key]):
                group[key] = torch.tensor(group[key], dtype=old.dtype, device=old.device)


def json_numbers(value: Any) -> Any:
    """``value`` with its one-element tensors as numbers (JSON has no tensors)."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_numbers(v) for v in value]
    return value


def save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    atomic_write(folder / f"rng_rank{rank}.safetensors", lambda path: save_file(tensors, str(path)))
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


# -- DeepSpeed's files, without unpickling ---------------------------------------------------------------
def _deepspeed_checkpoint_classes() -> list[type]:
    """The few DeepSpeed classes its ZeRO checkpoints hold besides tensors and plain data: rebuilt field by
    field by the weights-only unpickler, none of them runs code when loaded."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through ``torch.load(weights_only=True)``: a crafted
    ``*.pt`` file in a checkpoint is refused instead of running its code (DeepSpeed itself passes
    ``weights_only=False``)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()[0]
            raise DataError(f"{path}: refused to load it: it holds objects other than tensors and plain "
                            f"data, which could run code ({reason})") from None


@contextlib.contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """While DeepSpeed loads a checkpoint, its files are read without unpickling arbitrary objects."""
    if engine.load_universal_checkpoint():
        raise ConfigError("DeepSpeed universal checkpoints (checkpoint.load_universal in the DeepSpeed "
                          "config) load with pickle; resume from a checkpoint this trainer wrote instead")
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


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
            write_json_atomic(tmp / STATE_FILE, {
                "train": dataclasses.asdict(state),
                "scheduler": json_numbers(self.scheduler.state_dict()),
                "stream": self.stream.state_dict(),
                "world_size": self.world,
                "deepspeed": self.deepspeed,
            })
        self.accelerator.wait_for_everyone()
        final = checkpoint_root(self.run_dir) / f"step_{step}"
        if self.is_main:
            publish(tmp, self.run_dir, step)  # the manifest, then the rename
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
            with weights_only_loads(self.engine):
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
