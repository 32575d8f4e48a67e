"""The run directory's ground floor: atomic writes, their permissions, the readers' errors, the guard."""

from __future__ import annotations

import os
import stat

import pytest

from malora_train.errors import ConfigError, DataError
from malora_train.run_dir import (
    atomic_write,
    guard_run_dir,
    read_json,
    read_json_object,
    read_jsonl,
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
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert read_json(target) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["routing.json"]


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
