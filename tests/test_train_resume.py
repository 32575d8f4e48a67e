"""Never lose work: an interrupted run (SIGINT, SIGTERM, kill -9 at any moment, even mid-save) resumes
from its last complete checkpoint and reproduces the uninterrupted run's per-step losses exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from malora_train.run_dir import read_json
from malora_train.train import checkpoint as ckpt
from malora_train.train.loop import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def signal_during_step(monkeypatch: pytest.MonkeyPatch, step: int, signum: int) -> None:
    """Make this process receive ``signum`` while it runs optimiser step ``step`` (1-based)."""
    original = Trainer.train_step

    def train_step(self: Trainer):
        metrics = original(self)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signum)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_resume_after_sigint_reproduces_the_uninterrupted_run(tmp_path, run_training, train_losses,
                                                              read_metrics, monkeypatch):
    # MALoRA with dropout 0.05 and top-2 routing: RNG, optimizer, scheduler and sampler state all matter
    common = ["adapter=malora", "adapter.dropout=0.05", "trainer.max_steps=20", "trainer.eval_every=5"]
    straight = run_training(tmp_path / "straight", *common)
    assert straight["status"] == "completed"

    signal_during_step(monkeypatch, 10, signal.SIGINT)
    first = run_training(tmp_path / "resumed", *common)
    assert first == {"status": "interrupted", "step": 10,
                     "checkpoint": str(tmp_path / "resumed" / "checkpoints" / "step_10")}
    assert set(train_losses(tmp_path / "resumed")) == set(range(1, 11))
    monkeypatch.undo()
    second = run_training(tmp_path / "resumed", *common, "trainer.resume=auto")
    assert second["status"] == "completed" and second["steps"] == 20

    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "router_entropy"):
        expected = train_losses(tmp_path / "straight", key)
        assert list(expected) == list(range(1, 21))
        assert train_losses(tmp_path / "resumed", key) == expected, key  # exact float equality
    straight_evals, resumed_evals = ([r for r in read_metrics(tmp_path / name) if "eval/average" in r]
                                     for name in ("straight", "resumed"))
    assert resumed_evals == straight_evals
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")
    assert second["tokens"] == straight["tokens"]
    assert (tmp_path / "resumed" / "config.resumed_step_10.yaml").is_file()


# -- real processes ------------------------------------------------------------------------------------
def cli_command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "malora_train.cli", *overrides, f"hydra.run.dir={run_dir}"]


def start_run(run_dir: Path, overrides: list[str], log_name: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(run_dir.parent / log_name, "w")
    return subprocess.Popen(cli_command(run_dir, overrides), cwd=run_dir.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 60.0, poll: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the moment the test waited for")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(poll)


def partial_folders(run_dir: Path) -> list[str]:
    root = ckpt.checkpoint_root(run_dir)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def latest_step(run_dir: Path) -> int:
    found = ckpt.complete_checkpoints(run_dir)
    return found[-1][0] if found else 0


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, tiny_training_overrides, run_training,
                                                           train_losses):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    common = ["adapter=malora", "trainer.max_steps=24", "trainer.save_every=2", "trainer.keep_last=2"]
    overrides = [*tiny_training_overrides, *common]

    # 1. kill -9 while checkpoint step_N (N >= 4) is being written: step_N-2 is the last complete one.
    # The poll sees the temporary folder ~14 ms before its rename; a busy machine may wake it too late,
    # so up to three tries (each resuming the last) until a kill lands inside a save.
    for attempt in range(3):
        resume = ["trainer.resume=auto"] if attempt else []
        proc = start_run(run_dir, [*overrides, *resume], f"first-{attempt}.log")
        wait_until(lambda: latest_step(run_dir) >= 2 and any(n.startswith(".tmp-")
                                                             for n in partial_folders(run_dir)), proc)
        proc.kill()
        proc.wait()
        if partial_folders(run_dir):
            break
    killed_at = latest_step(run_dir)
    assert partial_folders(run_dir) == [f".tmp-step_{killed_at + 2}"]  # the checkpoint being written
    for _, path in ckpt.complete_checkpoints(run_dir):
        assert (path / ckpt.STATE_FILE).is_file()
        assert (path / "adapter" / "adapter_model.safetensors").is_file()

    # 2. resume, then kill -9 in the middle of training, a little after a later checkpoint
    proc = start_run(run_dir, [*overrides, "trainer.resume=auto"], "second.log")
    wait_until(lambda: latest_step(run_dir) >= killed_at + 4, proc, poll=0.01)
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    second_log = (tmp_path / "second.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{killed_at}'} at step {killed_at}" in second_log

    # 3. resume to the end (in this process), and compare with a run that was never interrupted
    resumed_from = latest_step(run_dir)
    summary = run_training(run_dir, *common, "trainer.resume=auto")
    assert summary["status"] == "completed" and summary["steps"] == 24
    assert resumed_from >= killed_at + 4
    assert partial_folders(run_dir) == []
    run_training(tmp_path / "straight", *common)
    assert train_losses(run_dir) == train_losses(tmp_path / "straight")
    assert_same_adapter(run_dir, tmp_path / "straight")


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, tiny_training_overrides, run_training,
                                                          train_losses, signum):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    common = ["trainer.max_steps=30"]  # no periodic checkpoints: the one there comes from the signal
    proc = start_run(run_dir, [*tiny_training_overrides, *common], "run.log")
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 3, proc,
               poll=0.01)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 0
    output = (tmp_path / "run.log").read_text()
    [step] = [s for s, _ in ckpt.complete_checkpoints(run_dir)]
    assert 3 <= step < 30
    assert f"stopped by signal at step {step}; saved {run_dir / 'checkpoints' / f'step_{step}'}" in output
    assert "trainer.resume=auto" in output
    assert read_json(run_dir / "checkpoints" / f"step_{step}" / ckpt.STATE_FILE)["train"]["step"] == step
    assert list(train_losses(run_dir)) == list(range(1, step + 1))
    assert not (run_dir / "summary.json").exists()

    summary = run_training(run_dir, *common, "trainer.resume=auto")
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert list(train_losses(run_dir)) == list(range(1, 31))
