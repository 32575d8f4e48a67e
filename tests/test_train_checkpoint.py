"""Checkpoint files: only complete folders count, partial ones are cleaned, retention, exact state
round trips (optimizer, RNG), and metrics.jsonl after a killed write."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from malora_train.config import WandbConfig
from malora_train.errors import ConfigError
from malora_train.run_dir import write_json_atomic
from malora_train.train import checkpoint as ckpt
from malora_train.train.metrics import MetricsLogger


def make_checkpoint(run_dir, step: int, name: str | None = None, complete: bool = True):
    path = ckpt.checkpoint_root(run_dir) / (name or f"step_{step}")
    path.mkdir(parents=True)
    (path / "adapter.bin").write_text(str(step))
    if complete:
        write_json_atomic(path / ckpt.STATE_FILE, {"step": step})
    return path


def test_only_complete_step_folders_are_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 4, complete=False)  # no state file: never finished
    make_checkpoint(tmp_path, 6, name=".tmp-step_6")
    assert ckpt.complete_checkpoints(tmp_path) == [(2, tmp_path / "checkpoints" / "step_2"),
                                                   (10, tmp_path / "checkpoints" / "step_10")]
    assert ckpt.resolve_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step_10"
    assert ckpt.resolve_resume(tmp_path / "fresh", "auto") is None
    assert ckpt.resolve_resume(tmp_path, None) is None
    step_2 = tmp_path / "checkpoints" / "step_2"
    assert ckpt.resolve_resume(tmp_path, str(step_2)) == step_2
    with pytest.raises(ConfigError, match=r"trainer.resume=.*step_4: not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_4"))


def test_publish_renames_a_finished_folder_and_replaces_an_older_save_of_the_step(tmp_path):
    tmp = make_checkpoint(tmp_path, 3, name=".tmp-step_3")
    assert ckpt.publish(tmp, tmp_path, 3) == tmp_path / "checkpoints" / "step_3"
    again = make_checkpoint(tmp_path, 30, name=".tmp-step_3")
    ckpt.publish(again, tmp_path, 3)
    assert (tmp_path / "checkpoints" / "step_3" / "adapter.bin").read_text() == "30"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]


def test_remove_partial_deletes_half_written_folders_and_restores_a_moved_aside_one(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, name=".tmp-step_4", complete=False)
    make_checkpoint(tmp_path, 6, name=".old-step_6")  # killed between the two renames of a re-save
    make_checkpoint(tmp_path, 2, name=".old-step_2")  # its replacement arrived: stale
    ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_6"]


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 12, name=".tmp-step_12", complete=False)
    ckpt.prune(tmp_path, keep_last=2, keep_steps={4})
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [4, 8, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_4", "step_8"]


def test_optimizer_state_round_trips_exactly_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                                   {"params": params[1:], "weight_decay": 0.0}], lr=0.01)
    for _ in range(3):
        sum((p ** 2).sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad()
    ckpt.save_optimizer(optimizer, tmp_path)
    fresh = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                               {"params": params[1:], "weight_decay": 0.0}], lr=0.5)
    ckpt.load_optimizer(fresh, tmp_path)
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
    ckpt.save_rng(tmp_path, rank=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert ckpt.load_rng(tmp_path, rank=1)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    assert not ckpt.load_rng(tmp_path, rank=0)  # no files for that rank


def test_resumed_metrics_drop_later_lines_and_a_line_cut_by_a_kill(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    MetricsLogger(tmp_path, True, WandbConfig(), "name", {}, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    MetricsLogger(tmp_path, True, WandbConfig(), "name", {}, resume_step=-1)  # resume=auto, nothing saved
    assert (tmp_path / "metrics.jsonl").read_text() == ""
