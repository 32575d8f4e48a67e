"""The run directory's ground floor: atomic writes, their permissions and their errors, the readers'
errors, the guard, the lock (one run at a time, stale locks reported) and unique default names."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys

import pytest
from lock_holder import HOLD, hold_lock

from malora_train import run_dir as rd
from malora_train.errors import ConfigError, DataError, OutputError
from malora_train.run_dir import (
    LOCK_FILE,
    atomic_write,
    guard_run_dir,
    lock_run_dir,
    read_json,
    read_json_object,
    read_jsonl,
    run_dir_lock,
    unlock_run_dir,
    write_json_atomic,
    write_text_atomic,
)


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    write_text_atomic(tmp_path / "summary.json", "{}")
    write_text_atomic(tmp_path / "summary.json", '{"a": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert (tmp_path / "summary.json").read_text() == '{"a": 1}'


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_permissions_of_a_normal_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")  # what open() would have made
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o666 & ~umask


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "routing.json"
    write_json_atomic(target, {"old": True})

    def broken(path):
        path.write_text('{"new": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=rf"^{target}: cannot write it \(No space left on device\)$"):
        atomic_write(target, broken)
    assert read_json(target) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["routing.json"]


def test_a_read_only_folder_is_an_error_naming_the_file(read_only_dir):
    with pytest.raises(OutputError, match=rf"^{read_only_dir / 'summary.json'}: cannot write it"):
        write_text_atomic(read_only_dir / "summary.json", "{}")
    with pytest.raises(OutputError, match=rf"^{read_only_dir / 'run'}: cannot create the folder"):
        rd.ensure_dir(read_only_dir / "run")


def test_readers_name_the_file(tmp_path):
    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"summary\.json: not valid JSON"):
        read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object, found list"):
        read_json_object(bad)
    with pytest.raises(DataError, match="missing.json: cannot read it"):
        read_json(tmp_path / "missing.json")


def test_jsonl_ignores_a_last_line_cut_by_a_kill_but_not_a_broken_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_jsonl(path)


def test_guard_refuses_a_directory_holding_a_run_unless_resuming(tmp_path):
    guard_run_dir(tmp_path, None)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run \\(metrics.jsonl\\)"):
        guard_run_dir(tmp_path, None)
    guard_run_dir(tmp_path, "auto")


# -- the lock ----------------------------------------------------------------------------------------------
def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run, 30)
    try:
        with pytest.raises(ConfigError) as error:
            lock_run_dir(run)
        message = str(error.value)
        assert message.startswith(f"hydra.run.dir={run} is in use by another run (pid {holder.pid} on host "
                                  f"{socket.gethostname()}, since ")
        assert message.endswith("wait for it to end or choose another hydra.run.dir")
    finally:
        holder.kill()
        holder.wait()
    # its holder was killed: the kernel dropped the lock, the file says whose it was
    note = lock_run_dir(run)
    try:
        assert note.startswith(f"{run / LOCK_FILE}: the run that held this directory (pid {holder.pid} on "
                               f"host {socket.gethostname()}, since ")
        assert note.endswith(") ended without releasing it (killed?); taking it over")
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        unlock_run_dir(run)
    assert not (run / LOCK_FILE).exists()


def test_a_lock_released_normally_leaves_nothing_and_is_reentrant(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run, 0)
    holder.wait()  # exits normally: atexit released the lock and removed the file
    assert not (run / LOCK_FILE).exists()
    with run_dir_lock(run) as note:
        assert note is None  # nothing stale to report
        with run_dir_lock(run):  # the same process locks again (the CLI, then the trainer)
            pass
        assert (run / LOCK_FILE).exists()
        other = subprocess.run([sys.executable, "-c", HOLD, str(run), "0"], capture_output=True, text=True)
        assert other.returncode != 0 and "is in use by another run" in other.stderr  # another process cannot
    assert not (run / LOCK_FILE).exists()
    with run_dir_lock(run, enabled=False):  # ranks other than 0
        assert not (run / LOCK_FILE).exists()


def test_default_run_folders_are_unique_per_process():
    code = "from malora_train.run_dir import run_stamp; print(run_stamp())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    stamps = [proc.communicate()[0].strip() for proc in procs]
    assert stamps[0] != stamps[1]
    for stamp, proc in zip(stamps, procs):
        date, time_pid = stamp.split("/")
        assert time_pid.endswith(f"_{proc.pid}")
