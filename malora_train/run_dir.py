"""The run directory, on the ground floor: the names of the files a run leaves, the guard that keeps one
run from overwriting another, the one way to write a file (atomically) and the readers.

Every module that writes into a run directory (training, checkpoints, adapters, routing, reports) does
it through ``atomic_write``: a reader, a crash or a kill sees the old file or the new one, whole, never
half of one. Files get the permissions of a normally created file (0666 minus the umask), not the 0600
of a temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from malora_train.errors import ConfigError, DataError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOSS_PLOT = "loss.png"
ROUTING_FILE = "routing.json"
ROUTING_PLOT = "routing_heatmap.png"
WANDB_ID_FILE = ".wandb_id"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
FAILURE_FILE = "failure.json"  # a sweep job that raised: the error (malora_train.sweep.jobs)

# what a run writes itself (Hydra's .hydra/ and log are left out: with several ranks, rank 0's Hydra may
# already have written them when another rank checks)
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR, CHECKPOINTS_DIR)


def guard_run_dir(run_dir: Path, resume: str | None) -> None:
    """A run never overwrites another: a directory that holds a run's outputs needs ``trainer.resume``."""
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not resume:
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run ({', '.join(existing)}); set "
                          "trainer.resume=auto to continue it or choose another hydra.run.dir")


# -- writing ---------------------------------------------------------------------------------------------

def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (same suffix, so writers that pick a format from
    it still do), flush it to disk, then rename it over ``path``; a failure leaves no temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


# -- reading ---------------------------------------------------------------------------------------------

def read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it ({err})") from err


def read_json(path: Path) -> Any:
    """A JSON file; a missing, unreadable or malformed one is a DataError naming the file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def read_json_object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``metrics.jsonl``); a last line without its newline (a killed
    writer) is ignored."""
    lines = read_text(path).split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: a partial append
                break
            raise DataError(f"{path}:{number}: not a JSON line ({err.msg})") from err
        if isinstance(record, dict):
            records.append(record)
    return records
