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
    _fsync_dir(dst.parent)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (a rename is durable only after this)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
