"""Fetch BIG-bench task files for ``data=mixture_bigbench`` without installing the ``bigbench`` package.

Runs ``pip download --no-deps bigbench==1.0.0`` (the PyPI sdist, ~358 MB) into a temporary folder and
extracts only the chosen tasks' ``task.json`` files (and those of their subtasks) into the cache folder:

    <cache-dir>/<task>/task.json
    <cache-dir>/<task>/<subtask>/task.json        (tasks split into subtasks)

Usage:
    python scripts/fetch_bigbench.py                              # the mixture_bigbench preset tasks
    python scripts/fetch_bigbench.py --tasks strategyqa winowhy   # any multiple-choice tasks
    python scripts/fetch_bigbench.py --sdist bigbench-1.0.0.tar.gz   # reuse a downloaded sdist

Then train with ``data=mixture_bigbench`` (``data.root`` defaults to the same cache folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

PACKAGE = "bigbench==1.0.0"
PRESET_TASKS = ["social_iqa", "strategyqa", "winowhy", "cause_and_effect", "goal_step_wikihow", "timedial"]
DEFAULT_CACHE = "~/.cache/malora-train/bigbench"
TASKS_FOLDER = ("bigbench", "benchmark_tasks")


def download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest`` and return the archive's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
               "-d", str(dest)]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download left no bigbench-*.tar.gz in {dest}")
    return archives[0]


def task_file_parts(member_name: str) -> tuple[str, ...] | None:
    """For ``.../bigbench/benchmark_tasks/<task>[/<subtask>]/task.json`` return (task[, subtask])."""
    parts = PurePosixPath(member_name).parts
    for start in range(len(parts) - 1):
        if parts[start:start + 2] == TASKS_FOLDER:
            rest = parts[start + 2:]
            if rest and rest[-1] == "task.json" and len(rest) in (2, 3):
                return rest[:-1]
            return None
    return None


def extract_tasks(sdist: Path, tasks: list[str], cache_dir: Path) -> dict[str, list[Path]]:
    """Copy the chosen tasks' task.json files out of the sdist; return the written files per task.

    Each task is written to a temporary folder first and renamed into place, so an interrupted run never
    leaves a task half-extracted; an existing task folder is replaced.
    """
    wanted = set(tasks)
    found: dict[str, list[tuple[tuple[str, ...], tarfile.TarInfo]]] = {task: [] for task in tasks}
    with tarfile.open(sdist, "r:gz") as archive:
        members = archive.getmembers()
        for member in members:
            parts = task_file_parts(member.name) if member.isfile() else None
            if parts and parts[0] in wanted:
                found[parts[0]].append((parts, member))
        missing = [task for task in tasks if not found[task]]
        if missing:
            raise SystemExit(f"no task.json for {', '.join(missing)} in {sdist.name} (check the task names)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[Path]] = {}
        for task, entries in found.items():
            staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=cache_dir))
            try:
                for parts, member in entries:
                    target = staging.joinpath(*parts[1:], "task.json")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    assert source is not None  # regular files always have content
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
                final = cache_dir / task
                if final.exists():
                    shutil.rmtree(final)
                os.rename(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            written[task] = sorted(final.joinpath(*parts[1:], "task.json") for parts, _ in entries)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=PRESET_TASKS, help="BIG-bench task names (folder names)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"where tasks go (default {DEFAULT_CACHE})")
    parser.add_argument("--sdist", type=Path, help="a downloaded bigbench-1.0.0.tar.gz (skips pip download)")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir).expanduser()
    with tempfile.TemporaryDirectory(prefix="bigbench-sdist-") as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        written = extract_tasks(sdist, list(dict.fromkeys(args.tasks)), cache_dir)
    for task, files in written.items():
        print(f"{task}: {len(files)} task.json file(s) in {cache_dir / task}")


if __name__ == "__main__":
    main()
