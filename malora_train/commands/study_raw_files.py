"""A study part's raw run files packed away, so that its results fit in a repository.

Each run's per-step ``metrics.jsonl`` and per-module ``routing.json`` (``report.RAW_FILES``) are most of a
study's bytes, and the report uses little of them. ``pack_raw_files`` writes, for a part's folder:

- in each run folder, ``report_inputs.json``: what the report takes from those files (the last logged step,
  the final lm_loss, the routing reduced to its layer mean and decoder-layer means, kept to 9 significant
  digits), so that ``malora-report`` and ``scripts/study.py --report-only`` write the same report without
  them;
- ``raw_files.sha256``: one ``<sha256>  <path>`` line per raw file, paths relative to the part folder (the
  format of ``sha256sum``: ``sha256sum -c raw_files.sha256`` in the folder checks them too);
- ``raw_files.tar.xz``: the raw files under the same paths (``tar -xJf raw_files.tar.xz`` in the folder
  puts them back);

then removes the raw files. ``verify_raw_files`` checks each file of the manifest, in the folder (put back,
or trained again) or else in the archive, against its sha256.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from malora_train.commands.report import RAW_FILES, REPORT_INPUTS_FILE, find_run_dirs, read_run, report_inputs
from malora_train.errors import DataError
from malora_train.run_dir import atomic_write, read_text, write_text_atomic

MANIFEST_FILE = "raw_files.sha256"
ARCHIVE_FILE = "raw_files.tar.xz"


def sha256_of(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return sha256_of(stream)


def read_manifest(part_dir: Path) -> dict[str, str]:
    """Path (relative to ``part_dir``) -> sha256, from ``raw_files.sha256``."""
    path = part_dir / MANIFEST_FILE
    entries = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or not name:
            raise DataError(f"{path}:{number}: expected '<sha256>  <path>', got {line!r}")
        entries[name] = digest
    return entries


def write_archive(part_dir: Path, names: list[str]) -> None:
    """``raw_files.tar.xz`` of ``names`` (relative to ``part_dir``), in that order, without owner or time."""
    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:xz", preset=9) as archive:
            for name in names:
                info = archive.gettarinfo(part_dir / name, arcname=name)
                info.uid = info.gid = info.mtime = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with (part_dir / name).open("rb") as stream:
                    archive.addfile(info, stream)

    atomic_write(part_dir / ARCHIVE_FILE, write)


def archived_sha256(part_dir: Path) -> Iterator[tuple[str, str]]:
    """(path, sha256) of every file in the part's archive."""
    with tarfile.open(part_dir / ARCHIVE_FILE, "r:xz") as archive:
        for member in archive:
            stream = archive.extractfile(member)
            if stream is not None:
                yield member.name, sha256_of(stream)


def pack_raw_files(part_dir: Path) -> list[str]:
    """Pack the raw files of the runs below ``part_dir`` (see the module's docstring); the paths packed.
    Refused where a manifest exists (packed already: put the files back with tar first to pack again)."""
    if (part_dir / MANIFEST_FILE).exists():
        raise DataError(f"{part_dir / MANIFEST_FILE} exists: the part is packed already (tar -xJf "
                        f"{ARCHIVE_FILE} in {part_dir} puts its raw files back, then remove the manifest)")
    runs = find_run_dirs(part_dir)
    names = sorted((run / raw).relative_to(part_dir).as_posix() for run in runs for raw in RAW_FILES
                   if (run / raw).is_file())
    if not names:
        raise DataError(f"{part_dir}: no raw files ({', '.join(RAW_FILES)}) in its runs")
    for run in runs:
        inputs = report_inputs(read_run(run, part_dir))
        write_text_atomic(run / REPORT_INPUTS_FILE, json.dumps(inputs, separators=(",", ":")) + "\n")
    manifest = {name: file_sha256(part_dir / name) for name in names}
    write_archive(part_dir, names)
    if dict(archived_sha256(part_dir)) != manifest:
        raise DataError(f"{part_dir / ARCHIVE_FILE}: the archive does not hold the files read; none removed")
    write_text_atomic(part_dir / MANIFEST_FILE, "".join(f"{manifest[name]}  {name}\n" for name in names))
    for name in names:
        (part_dir / name).unlink()
    return names


def verify_raw_files(part_dir: Path) -> list[str]:
    """Each raw file of the part's manifest against its sha256: the file in the folder where it is there,
    else its copy in the archive. The problems, one line each (none: every file is there and matches)."""
    manifest = read_manifest(part_dir)
    archived = dict(archived_sha256(part_dir)) if (part_dir / ARCHIVE_FILE).is_file() else {}
    problems = []
    for name, expected in manifest.items():
        path = part_dir / name
        actual = file_sha256(path) if path.is_file() else archived.get(name)
        if actual is None:
            problems.append(f"{name}: missing (neither in {part_dir} nor in {ARCHIVE_FILE})")
        elif actual != expected:
            where = path if path.is_file() else f"{ARCHIVE_FILE}:{name}"
            problems.append(f"{name}: {where} has sha256 {actual}, the manifest {expected}")
    return problems
