"""The run directory, on the ground floor: the names of the files a run leaves, its unique default
name, the lock and the guard that keep one run from overwriting another, the one way to write a file
(atomically), the one way to replace or delete a folder (whole), and the readers.

Every module that writes into a run directory (training, checkpoints, adapters, routing, reports) does
it through ``atomic_write``: a reader, a crash or a kill sees the old file or the new one, whole, never
half of one. Files get the permissions of a normally created file (0666 minus the umask), not the 0600
of a temporary file. A file that cannot be written (read-only folder, disk full) is an ``OutputError``
naming it. Folders (the final adapter, checkpoints) are written aside and moved in by ``replace_dir``,
and removed by ``delete_dir``; a kill in either leaves a hidden folder behind, never a half one under
its own name.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from malora_train.errors import ConfigError, DataError, OutputError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOSS_PLOT = "loss.png"
ROUTING_FILE = "routing.json"
ROUTING_PLOT = "routing_heatmap.png"
WANDB_ID_FILE = ".wandb_id"
EVAL_DIR = "eval"  # eval/step_<N>/ for each evaluation of a run; malora-eval's results beside them
PREDICTIONS_FILE = "predictions_{scorer}.jsonl"
TRACKER_LOGS_DIR = "logs"  # the trackers that write files (tensorboard, aim, ...) write below it
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
FAILURE_FILE = "failure.json"  # a sweep job that raised: the error (malora_train.sweep.jobs)
LOCK_FILE = ".lock"  # held (flock) by the process that runs in the directory; names it (pid, host)
# written last: its presence marks a whole folder (a checkpoint, the final adapter)
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1  # the manifest's "format"; a later one is refused, not read as this one
OLD_PREFIX = ".old-"  # a folder ``replace_dir`` moved aside for its replacement
TRASH_PREFIX = ".trash-"  # a folder ``delete_dir`` is deleting

# what a run writes itself (Hydra's .hydra/ and log are left out: with several ranks, rank 0's Hydra may
# already have written them when another rank checks)
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR, CHECKPOINTS_DIR)
# overrides that say where a run's files live, not what it computes: the same run on another machine has other
# values (scripts/study.py leaves them out of run folder names, malora-report out of a configuration)
LOCATION_KEYS = ("data.root", "data.cache", "data.cache_dir", "model.cache_dir", "model.tokenizer")
# folders a run may fill before its first step: the evaluation before training's predictions, the trackers'
# files
UNSTARTED_FOLDERS = (EVAL_DIR, TRACKER_LOGS_DIR)


def guard_run_dir(run_dir: Path, resume: str | None) -> None:
    """A run never overwrites another: a directory that holds a run's outputs needs ``trainer.resume``."""
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not resume:
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run ({', '.join(existing)}); set "
                          "trainer.resume=auto to continue it or choose another hydra.run.dir")


def remove_unstarted_outputs(run_dir: Path, folders: Iterable[str] = ()) -> None:
    """Delete what a fresh run wrote before its first step (its config, an eval line) after it failed, so
    the directory can be used again. Only for a run that found the directory free (the guard passed).
    ``folders``: those of ``UNSTARTED_FOLDERS`` the run created (absent when it started), deleted whole."""
    for name in (CONFIG_FILE, METRICS_FILE, WANDB_ID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    for name in folders:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def completed_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json of a run that completed, or None (no summary, an unreadable one, or not completed)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = read_json_object(path)
    except DataError:
        return None
    return summary if summary.get("status") == "completed" else None


@functools.cache
def run_stamp() -> str:
    """``<date>/<time>_<pid>``: the default run folder's name, unique to this process (two runs started in
    the same second get two folders). Fixed for the process's lifetime."""
    return f"{time.strftime('%Y-%m-%d/%H-%M-%S')}_{os.getpid()}"


# -- the lock --------------------------------------------------------------------------------------------
# One run at a time in a directory: ``flock`` on LOCK_FILE, held for the whole run. The kernel drops it when
# the process ends, even by kill -9; the file keeps the holder's pid and host, so a run that finds it left
# behind says whose lock it takes over, and one that finds it held says who holds it.
_held: dict[Path, list[int]] = {}  # resolved run directory -> [file descriptor, times locked]


def _holder() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _read_lock(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _open_locked(path: Path, run_dir: Path, setting: str) -> int:
    """A descriptor of ``path`` holding its exclusive lock; ConfigError naming the holder (and ``setting``,
    the key that named the directory) if it is taken."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _default_file_mode())
        except OSError as err:
            raise OutputError(f"{path}: cannot create the run directory's lock ({err.strerror})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_lock(fd))
            os.close(fd)
            raise ConfigError(f"{setting}={run_dir} is in use by another run ({holder}); wait for it to "
                              f"end or choose another {setting}") from None
        except OSError as err:
            os.close(fd)
            raise OutputError(f"{path}: cannot lock it ({err.strerror})") from err
        try:  # its last holder may have deleted it between our open and our lock: then take the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_run_dir(run_dir: Path, setting: str = "hydra.run.dir") -> str | None:
    """Take the run directory's lock (creating the directory), or fail with a ConfigError naming the
    run that holds it (and ``setting``, the key that named the directory). Re-entrant within a process.
    Returns a warning when the lock file was left by a run that ended without releasing it (killed),
    None otherwise."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return None
    ensure_dir(key)
    path = key / LOCK_FILE
    fd = _open_locked(path, Path(run_dir), setting)
    previous = _read_lock(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder().encode(), 0)
    _held[key] = [fd, 1]
    if previous.strip():
        return (f"{path}: the run that held this directory ({_describe_holder(previous)}) ended without "
                "releasing it (killed?); taking it over")
    return None


def unlock_run_dir(run_dir: Path) -> None:
    """Release one ``lock_run_dir``; the last release deletes the lock file, then drops the lock."""
    key = Path(run_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    with contextlib.suppress(OSError):
        os.unlink(key / LOCK_FILE)
    os.close(entry[0])


@atexit.register
def unlock_all_run_dirs() -> None:
    """Release every lock this process holds (a process that exits early, e.g. on a user error)."""
    for key in list(_held):
        _held[key][1] = 1
        unlock_run_dir(key)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, enabled: bool = True, setting: str = "hydra.run.dir") -> Iterator[str | None]:
    """``lock_run_dir`` for a block (``enabled=False``: a no-op, for ranks other than 0)."""
    if not enabled:
        yield None
        return
    note = lock_run_dir(run_dir, setting)
    try:
        yield note
    finally:
        unlock_run_dir(run_dir)


# -- writing ---------------------------------------------------------------------------------------------

def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def ensure_dir(path: Path) -> Path:
    """``mkdir -p``; a folder that cannot be made (read-only parent, disk full) is an OutputError."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{path}: cannot create the folder ({err.strerror or err})") from err
    return Path(path)


def check_writable(folder: Path, setting: str) -> None:
    """Fail now, in one OutputError line naming ``setting`` (the key and its folder, e.g.
    ``eval.output_dir=/x``), when files cannot be written into ``folder``, rather than after the work whose
    results go there. A missing folder is made to try, and removed again: the check leaves nothing behind."""
    folder = Path(folder)
    made = []
    parent = folder
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise OutputError(f"{setting}: cannot write files there ({err.strerror or err})") from None
    finally:
        for path in made:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (a rename is durable only after this)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (same suffix, so writers that pick a format from
    it still do), flush it to disk, then rename it over ``path``; a failure leaves no temporary file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write it ({err.strerror or err})") from err
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_file_mode())
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk with its own error type
        raise OutputError(f"{path}: cannot write it ({getattr(err, 'strerror', None) or err})") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line (``metrics.jsonl``); a failed write is an OutputError naming the file."""
    try:
        with open(path, "a") as handle:
            handle.write(line + "\n")
    except OSError as err:
        raise OutputError(f"{path}: cannot append to it ({err.strerror or err})") from err


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


class DamagedCheckpoint(DataError):
    """A checkpoint's files do not match its manifest (missing, truncated, corrupted)."""


class NewerFormat(DataError):
    """A manifest written by a later version of malora-train, in a format this one cannot check."""


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
    write_json_atomic(folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": files})


def verify_checkpoint(folder: Path) -> None:
    """Every file the manifest lists is there with its size and sha256; else DamagedCheckpoint naming
    the first file at fault (a missing, truncated, corrupted or zeroed file)."""
    try:
        manifest = read_json_object(folder / MANIFEST_FILE)
        version = manifest.get("format")
        if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_FORMAT:
            raise NewerFormat(f"{folder / MANIFEST_FILE}: format {version}, written by a later malora-train "
                              f"(this one reads format {MANIFEST_FORMAT}); use that version")
        if version != MANIFEST_FORMAT:
            raise ValueError(f"format {version!r}, expected {MANIFEST_FORMAT}")
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
