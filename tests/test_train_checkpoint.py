"""Checkpoint files: only complete folders count, partial ones are cleaned, retention (pruning that a
kill cannot leave half done), the manifest that finds damaged files, resume's fallback to the newest
intact checkpoint, exact state round trips (optimizer, RNG), and metrics.jsonl after a killed write."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from malora_train.config import LoggerConfig, TrainerConfig
from malora_train.errors import ConfigError
from malora_train.run_dir import (
    MANIFEST_FILE,
    DamagedCheckpoint,
    verify_checkpoint,
    write_json_atomic,
    write_manifest,
)
from malora_train.train.checkpoint.checkpointer import STATE_FILE
from malora_train.train.checkpoint.folders import (
    checkpoint_root,
    complete_checkpoints,
    prune,
    publish,
    remove_partial,
)
from malora_train.train.checkpoint.resume import check_extendable, finished_run, resolve_resume
from malora_train.train.checkpoint.state_files import load_optimizer, load_rng, save_optimizer, save_rng
from malora_train.train.metrics import MetricsLogger


def make_checkpoint(run_dir, step: int, name: str | None = None, complete: bool = True):
    """A checkpoint folder with a tensor file and the state file; ``complete``: with its manifest."""
    path = checkpoint_root(run_dir) / (name or f"step_{step}")
    path.mkdir(parents=True)
    (path / "adapter.bin").write_text(str(step))
    save_file({"exp_avg": torch.arange(1.0, 65.0)}, str(path / "optimizer.safetensors"))
    write_json_atomic(path / STATE_FILE, {"step": step})
    if complete:
        write_manifest(path)
    return path


def test_only_complete_step_folders_are_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 4, complete=False)  # no manifest: never finished
    make_checkpoint(tmp_path, 6, name=".tmp-step_6")
    assert complete_checkpoints(tmp_path) == [(2, tmp_path / "checkpoints" / "step_2"),
                                                   (10, tmp_path / "checkpoints" / "step_10")]
    assert resolve_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step_10"
    assert resolve_resume(tmp_path / "fresh", "auto") is None
    assert resolve_resume(tmp_path, None) is None
    step_2 = tmp_path / "checkpoints" / "step_2"
    assert resolve_resume(tmp_path, str(step_2)) == step_2
    with pytest.raises(ConfigError, match=r"trainer.resume=.*step_4: not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_4"))


def test_publish_renames_a_finished_folder_and_replaces_an_older_save_of_the_step(tmp_path):
    tmp = make_checkpoint(tmp_path, 3, name=".tmp-step_3")
    assert publish(tmp, tmp_path, 3) == tmp_path / "checkpoints" / "step_3"
    again = make_checkpoint(tmp_path, 30, name=".tmp-step_3")
    publish(again, tmp_path, 3)
    assert (tmp_path / "checkpoints" / "step_3" / "adapter.bin").read_text() == "30"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]


def test_remove_partial_deletes_half_written_folders_and_restores_a_moved_aside_one(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, name=".tmp-step_4", complete=False)
    make_checkpoint(tmp_path, 6, name=".old-step_6")  # killed between the two renames of a re-save
    make_checkpoint(tmp_path, 2, name=".old-step_2")  # its replacement arrived: stale
    remove_partial(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_6"]


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 12, name=".tmp-step_12", complete=False)
    prune(tmp_path, keep_last=2, keep_steps={4})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 8, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_4", "step_8"]


def test_pruning_renames_before_deleting_so_a_kill_never_leaves_a_listed_partial_folder(tmp_path,
                                                                                       monkeypatch):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # the process dies after deleting one file of step_2
        if path.name.endswith("step_2") and path.exists():
            next(p for p in path.iterdir() if p.is_file()).unlink()
            raise KeyboardInterrupt("killed")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune(tmp_path, keep_last=2, keep_steps=set())
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 6]  # step_2 is gone from the list
    for _, path in complete_checkpoints(tmp_path):
        verify_checkpoint(path)
    monkeypatch.undo()
    remove_partial(tmp_path)  # the next start clears the half-deleted folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_6"]


# -- the manifest ----------------------------------------------------------------------------------------
def zero_bytes_inside_the_tensor(path):
    data = bytearray(path.read_bytes())
    data[-40:-20] = bytes(20)  # inside the float data: the file still parses, with other numbers
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda p: (p / "optimizer.safetensors").write_bytes((p / "optimizer.safetensors").read_bytes()[:100]),
     r"optimizer\.safetensors: 100 bytes, the manifest says \d+ \(truncated\?\)"),
    (lambda p: zero_bytes_inside_the_tensor(p / "optimizer.safetensors"),
     r"optimizer\.safetensors: content differs from the manifest \(corrupted\)"),
    (lambda p: (p / "adapter.bin").unlink(), r"adapter\.bin: missing"),
    (lambda p: (p / STATE_FILE).write_text('{"st'), r"trainer_state\.json: \d+ bytes, the manifest"),
    (lambda p: (p / MANIFEST_FILE).write_text("{"), r"manifest\.json: unreadable manifest"),
], ids=["truncated", "zeroed", "missing", "state-truncated", "manifest"])
def test_a_damaged_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, caplog, damage, problem):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    verify_checkpoint(newest)
    damage(newest)
    with pytest.raises(DamagedCheckpoint, match=problem):
        verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step_2"
    assert re.search(rf"skipping damaged checkpoint step_4 \(.*{problem}", caplog.text)
    assert "resuming from" in caplog.text and "step_2, the newest intact checkpoint" in caplog.text
    with pytest.raises(ConfigError, match=rf"^trainer.resume={newest}: damaged checkpoint: .*{problem}"):
        resolve_resume(tmp_path, str(newest))


def test_auto_resume_with_only_damaged_checkpoints_refuses_to_start_over(tmp_path):
    path = make_checkpoint(tmp_path, 2)
    (path / "adapter.bin").write_text("x" * 10)
    with pytest.raises(ConfigError, match=r"every checkpoint in .* is damaged \(newest: .*adapter\.bin"):
        resolve_resume(tmp_path, "auto")


def test_a_finished_run_is_left_alone_unless_more_is_asked(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"status": "completed", "steps": 8, "max_steps": 8,
                                                  "epochs": 1.0, "eval_after_average": 50.0})
    assert finished_run(tmp_path, TrainerConfig(max_steps=8, resume=None)) is None  # the guard's job
    assert finished_run(tmp_path, TrainerConfig(max_steps=8, resume="auto"))["steps"] == 8
    assert finished_run(tmp_path, TrainerConfig(max_steps=6, resume="auto")) is not None
    assert finished_run(tmp_path, TrainerConfig(max_steps=12, resume="auto")) is None
    write_json_atomic(tmp_path / "summary.json", {"status": "completed", "steps": 5, "max_steps": 0,
                                                  "epochs": 1.0})
    assert finished_run(tmp_path, TrainerConfig(max_steps=0, epochs=1.0, resume="auto")) is not None
    assert finished_run(tmp_path, TrainerConfig(max_steps=0, epochs=2.0, resume="auto")) is None
    with pytest.raises(ConfigError, match="holds a completed run without a checkpoint to continue from"):
        check_extendable(tmp_path, None)


def test_optimizer_state_round_trips_exactly_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                                   {"params": params[1:], "weight_decay": 0.0}], lr=0.01)
    for _ in range(3):
        sum((p ** 2).sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_optimizer(optimizer, tmp_path)
    fresh = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                               {"params": params[1:], "weight_decay": 0.0}], lr=0.5)
    load_optimizer(fresh, tmp_path)
    saved, loaded = optimizer.state_dict(), fresh.state_dict()
    assert loaded["param_groups"][0]["lr"] == 0.01
    for key in saved["state"]:
        for name, value in saved["state"][key].items():
            assert torch.equal(loaded["state"][key][name], value), name
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    save_rng(tmp_path, rank=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert load_rng(tmp_path, rank=1)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    assert not load_rng(tmp_path, rank=0)  # no files for that rank


def test_resumed_metrics_drop_later_lines_and_a_line_cut_by_a_kill(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    MetricsLogger(tmp_path, True, LoggerConfig(), "name", {}, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    MetricsLogger(tmp_path, True, LoggerConfig(), "name", {}, resume_step=-1)  # resume=auto, nothing saved
    assert (tmp_path / "metrics.jsonl").read_text() == ""
