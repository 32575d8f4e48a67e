"""The ``checkpoints/`` folder of a run, where a listed checkpoint is always whole.

A checkpoint is written into a hidden temporary folder; ``publish`` then writes its ``manifest.json`` (size
and sha256 of every file) and renames the folder to ``step_<N>``. Old checkpoints are pruned with
``run_dir.delete_dir`` (renamed to a hidden trash name first, then deleted), so a kill during pruning never
leaves a listed folder with files missing; ``remove_partial`` clears what a kill left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from malora_train.run_dir import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    OLD_PREFIX,
    TRASH_PREFIX,
    delete_dir,
    replace_dir,
    write_manifest,
)

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-step_"  # a checkpoint being written


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def step_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is published."""
    return checkpoint_root(run_dir) / f"step_{step}"


def temporary_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before ``publish``."""
    return checkpoint_root(run_dir) / f"{TMP_PREFIX}{step}"


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


def unlisted_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step_<N>`` folder without a manifest (written before manifests existed, or
    not by malora-train), oldest first: never complete by ``complete_checkpoints``' measure, never ignored."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := STEP_DIR.match(path.name)) and path.is_dir()
             and not (path / MANIFEST_FILE).is_file()]
    return sorted(found)


def publish(tmp: Path, run_dir: Path, step: int) -> Path:
    """Turn a fully written temporary folder into ``step_<N>``: manifest last, then the rename."""
    write_manifest(tmp)
    final = step_dir(run_dir, step)
    replace_dir(tmp, final)
    return final


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
