"""Fetch BIG-bench task files for ``data=mixture_bigbench`` without installing the ``bigbench`` package.

Runs ``pip download --no-deps bigbench==1.0.0`` (the PyPI sdist, ~358 MB) into a temporary folder and
copies only the chosen tasks' ``task.json`` files (and those of their subtasks) into the cache folder:

    <cache-dir>/<task>/task.json
    <cache-dir>/<task>/<subtask>/task.json        (tasks split into subtasks)

Usage:
    python scripts/fetch_bigbench.py                              # the mixture_bigbench preset tasks
    python scripts/fetch_bigbench.py --tasks strategyqa winowhy   # any multiple-choice tasks
    python scripts/fetch_bigbench.py --sdist bigbench-1.0.0.tar.gz   # reuse a downloaded sdist
    python scripts/fetch_bigbench.py --tasks-of conf/experiment/bigbench_probe.yaml  # a config's data.tasks

Then train with ``data=mixture_bigbench`` (``data.root`` defaults to the same cache folder).

Recent pip (at least since 24) unpacks the sdist, reads its metadata and then refuses to save it ("cannot
declare direct URL dependencies": it names a bleurt zip inside itself). ``--no-clean`` keeps the unpacked
tree, so the task files are read from it when no archive was saved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

PACKAGE = "bigbench==1.0.0"
PRESET_TASKS = ["social_iqa", "strategyqa", "winowhy", "cause_and_effect", "goal_step_wikihow", "timedial"]
DEFAULT_CACHE = "~/.cache/malora-train/bigbench"
TASKS_FOLDER = ("bigbench", "benchmark_tasks")


def download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest``: the archive's path, or, when pip refuses to save it after
    unpacking it (recent pip), the unpacked source tree that ``--no-clean`` left in ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
               PACKAGE, "-d", str(dest)]
    print("running:", " ".join(command), flush=True)
    result = subprocess.run(command, env={**os.environ, "TMPDIR": str(dest)})
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if archives:
        return archives[0]
    trees = sorted(dest.glob("pip-*/bigbench*/bigbench/benchmark_tasks"))
    if not trees:
        raise SystemExit(f"pip download (exit status {result.returncode}) left neither bigbench-*.tar.gz "
                         f"nor an unpacked bigbench source tree in {dest}")
    print("using the source tree pip unpacked (it did not save the archive)", flush=True)
    return trees[0].parent.parent


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


Opener = Callable[[], BinaryIO]  # opens one task.json for reading


def archive_task_files(archive: tarfile.TarFile) -> list[tuple[tuple[str, ...], Opener]]:
    """(task[, subtask]) and a function opening its task.json, for every task file in the sdist."""
    found = []
    for member in archive.getmembers():
        parts = task_file_parts(member.name) if member.isfile() else None
        if parts:
            found.append((parts, lambda member=member: archive.extractfile(member)))
    return found


def tree_task_files(tree: Path) -> list[tuple[tuple[str, ...], Opener]]:
    """The same for an unpacked source tree (the folder holding ``bigbench/benchmark_tasks``)."""
    found = []
    for path in sorted(tree.rglob("task.json")):
        parts = task_file_parts(path.relative_to(tree).as_posix())
        if parts:
            found.append((parts, lambda path=path: open(path, "rb")))
    return found


def extract_tasks(source: Path, tasks: list[str], cache_dir: Path) -> dict[str, list[Path]]:
    """Copy the chosen tasks' task.json files out of the sdist (an archive or an unpacked tree); return the
    written files per task.

    Each task is written to a temporary folder first and renamed into place, so an interrupted run never
    leaves a task half-extracted; an existing task folder is replaced.
    """
    if source.is_dir():
        return copy_tasks(tree_task_files(source), tasks, cache_dir, source.name)
    with tarfile.open(source, "r:gz") as archive:
        return copy_tasks(archive_task_files(archive), tasks, cache_dir, source.name)


def copy_tasks(files: list[tuple[tuple[str, ...], Opener]], tasks: list[str], cache_dir: Path,
               source_name: str) -> dict[str, list[Path]]:
    found: dict[str, list[tuple[tuple[str, ...], Opener]]] = {task: [] for task in tasks}
    for parts, opener in files:
        if parts[0] in found:
            found[parts[0]].append((parts, opener))
    missing = [task for task in tasks if not found[task]]
    if missing:
        raise SystemExit(f"no task.json for {', '.join(missing)} in {source_name} (check the task names)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for task, entries in found.items():
        staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=cache_dir))
        try:
            for parts, opener in entries:
                target = staging.joinpath(*parts[1:], "task.json")
                target.parent.mkdir(parents=True, exist_ok=True)
                with opener() as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
            final = cache_dir / task
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written[task] = sorted(final.joinpath(*parts[1:], "task.json") for parts, _ in entries)
    return written


def tasks_of(config_file: Path) -> list[str]:
    """The ``data.tasks`` list of an experiment preset, or the ``tasks`` list of a data preset."""
    import yaml

    content = yaml.safe_load(config_file.read_text()) or {}
    tasks = (content.get("data") or {}).get("tasks") if isinstance(content.get("data"), dict) else None
    tasks = tasks if tasks is not None else content.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(task, str) for task in tasks):
        raise SystemExit(f"{config_file}: no data.tasks (or tasks) list of task names")
    return tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"BIG-bench task names (folder names; default {' '.join(PRESET_TASKS)})")
    parser.add_argument("--tasks-of", type=Path, metavar="YAML",
                        help="take the tasks from a config file's data.tasks (an experiment) "
                             "or tasks (a data preset)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help=f"where tasks go (default {DEFAULT_CACHE})")
    parser.add_argument("--sdist", type=Path,
                        help="a downloaded bigbench-1.0.0.tar.gz, or its unpacked folder "
                             "(skips pip download)")
    args = parser.parse_args(argv)
    tasks = (args.tasks or []) + (tasks_of(args.tasks_of) if args.tasks_of else [])
    cache_dir = Path(args.cache_dir).expanduser()
    with tempfile.TemporaryDirectory(prefix="bigbench-sdist-") as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        written = extract_tasks(sdist, list(dict.fromkeys(tasks or PRESET_TASKS)), cache_dir)
    for task, files in written.items():
        print(f"{task}: {len(files)} task.json file(s) in {cache_dir / task}")


if __name__ == "__main__":
    main()
