"""Checkpoints that survive ``kill -9``: each is written into a hidden temporary folder and renamed to
``checkpoints/step_<N>`` only once every file is on disk, so a listed checkpoint is always complete.

A checkpoint holds the adapter (safetensors), the optimizer (safetensors + JSON, or DeepSpeed's own
files under ZeRO), the scheduler, the data stream's sampler state, every rank's RNG states and the step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from malora_train.errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


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
    return checkpoint_root(run_dir) / f".tmp-step_{step}"


def publish(tmp: Path, run_dir: Path, step: int) -> Path:
    """Atomically turn a fully written temporary folder into ``step_<N>``."""
    final = checkpoint_root(run_dir) / f"step_{step}"
    if final.exists():  # a re-run of the same step after a resume: the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(checkpoint_root(run_dir), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def prune(run_dir: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the ``keep_last`` newest checkpoints and those in ``keep_steps`` (the best)."""
    found = complete_checkpoints(run_dir)
    newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step not in newest and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
    for stale in checkpoint_root(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


# -- files ---------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_json(path: Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


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
    _fsync_file(folder / "optimizer.safetensors")
    write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


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
    write_json(folder / f"rng_rank{rank}.json", {
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
