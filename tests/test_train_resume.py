"""Never lose work: an interrupted run (SIGINT, SIGTERM, a second signal during the save, kill -9 at any
moment, even mid-save or mid-prune) resumes from its last complete checkpoint, with its own saved config,
and reproduces the uninterrupted run's per-step losses exactly."""

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

from malora_train.adapters import load_adapter
from malora_train.run_dir import read_json, verify_checkpoint
from malora_train.train.checkpoint import folders
from malora_train.train.checkpoint.checkpointer import STATE_FILE
from malora_train.train.checkpoint.folders import TMP_PREFIX, checkpoint_root, complete_checkpoints
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
    root = checkpoint_root(run_dir)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def latest_step(run_dir: Path) -> int:
    found = complete_checkpoints(run_dir)
    return found[-1][0] if found else 0


# The CLI in a process that kills itself (SIGKILL, as kill -9) while it prunes its N-th old checkpoint: right
# after renaming it to its trash name ("renamed"), or after deleting one of its files ("deleting").
KILLED_WHILE_PRUNING = """
import os, signal, shutil, sys
from pathlib import Path
from malora_train.run_dir import TRASH_PREFIX
from malora_train.train.checkpoint.folders import checkpoint_root
moment, nth = sys.argv[1], int(sys.argv[2])
run_dir = Path(next(a for a in sys.argv if a.startswith("hydra.run.dir=")).split("=", 1)[1])
left_by_the_last_kill = set(checkpoint_root(run_dir).glob(TRASH_PREFIX + "*"))
seen, real_rmtree = [], shutil.rmtree
def rmtree(path, *args, **kwargs):
    trash = Path(path).name.startswith(TRASH_PREFIX) and Path(path) not in left_by_the_last_kill
    if trash and Path(path).exists():
        seen.append(path)
        if len(seen) == nth:
            if moment == "deleting":
                next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree
sys.argv = ["malora-train", *sys.argv[3:]]
from malora_train.cli import train_main
train_main()
"""


def kill_while_pruning(run_dir: Path, overrides: list[str], moment: str, nth: int, log_name: str) -> str:
    """Run until the process kills itself inside pruning; its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_PRUNING, moment, str(nth), *overrides,
                             f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-3000:]
    (run_dir.parent / log_name).write_text(result.stdout + result.stderr)
    return result.stdout + result.stderr


def assert_every_listed_checkpoint_loads(run_dir: Path, make_tiny_model) -> None:
    """Whatever moment a kill hit, every folder complete_checkpoints lists is whole and loads."""
    listed = complete_checkpoints(run_dir)
    assert listed
    for step, path in listed:
        verify_checkpoint(path)
        load_adapter(make_tiny_model(), path / "adapter")  # strict: every tensor with its shape
        assert load_file(str(path / "optimizer.safetensors"))
        assert read_json(path / STATE_FILE)["train"]["step"] == step
        read_json(path / "optimizer.json")
        read_json(path / "rng_rank0.json")


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, tiny_training_overrides, run_training,
                                                           train_losses, make_tiny_model):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    common = ["adapter=malora", "trainer.max_steps=24", "trainer.save_every=2", "trainer.keep_last=2"]
    overrides = [*tiny_training_overrides, *common]

    # 0. kill -9 inside pruning: saves at 2, 4, 6; saving 6 prunes 2. Killed half-way through deleting it,
    # then (resumed) right after renaming the next one (step_4, pruned when 8 is saved)
    kill_while_pruning(run_dir, overrides, "deleting", 1, "prune-0.log")
    assert partial_folders(run_dir) == [".trash-step_2"]
    assert [s for s, _ in complete_checkpoints(run_dir)] == [4, 6]
    assert_every_listed_checkpoint_loads(run_dir, make_tiny_model)
    output = kill_while_pruning(run_dir, [*overrides, "trainer.resume=auto"], "renamed", 1, "prune-1.log")
    assert f"{run_dir / '.lock'}: the run that held this directory (pid " in output  # the killed run's
    assert "ended without releasing it (killed?); taking it over" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_6'} at step 6" in output
    assert partial_folders(run_dir) == [".trash-step_4"]  # the half-deleted step_2 was cleared at start
    assert [s for s, _ in complete_checkpoints(run_dir)] == [6, 8]
    assert_every_listed_checkpoint_loads(run_dir, make_tiny_model)

    # 1. kill -9 while checkpoint step_N is being written: step_N-2 is the last complete one. The poll sees
    # the temporary folder ~14 ms before its rename; a busy machine may wake it too late, so up to three
    # tries (each resuming the last) until a kill lands inside a save.
    def writing() -> list[str]:
        return [name for name in partial_folders(run_dir) if name.startswith(TMP_PREFIX)]

    for attempt in range(3):
        proc = start_run(run_dir, [*overrides, "trainer.resume=auto"], f"first-{attempt}.log")
        wait_until(lambda: bool(writing()), proc)
        proc.kill()
        proc.wait()
        if writing():
            break
    killed_at = latest_step(run_dir)
    assert writing() == [f"{TMP_PREFIX}{killed_at + 2}"]  # the checkpoint being written
    assert_every_listed_checkpoint_loads(run_dir, make_tiny_model)

    # 2. resume, then kill -9 in the middle of training, a little after a later checkpoint
    proc = start_run(run_dir, [*overrides, "trainer.resume=auto"], "second.log")
    wait_until(lambda: latest_step(run_dir) >= killed_at + 4, proc, poll=0.01)
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert_every_listed_checkpoint_loads(run_dir, make_tiny_model)
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


def test_sigterm_twice_saves_at_the_next_step_and_the_hint_resumes_with_the_runs_config(
        tmp_path, tiny_training_overrides, train_losses, make_tiny_model):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps = 120  # enough that a loaded machine cannot finish the run before the signals arrive
    # no periodic checkpoints: the one there comes from the signal; a non-default adapter and length, which
    # the printed hint must bring back without retyping them
    overrides = [*tiny_training_overrides, "adapter=lora", "adapter.rank=4", f"trainer.max_steps={steps}"]
    proc = start_run(run_dir, overrides, "run.log")
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 3, proc,
               poll=0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # a second signal 50 ms later (an impatient user, a scheduler's repeat) must not
    proc.send_signal(signal.SIGTERM)  # break the save
    assert proc.wait(timeout=60) == 0
    output = (tmp_path / "run.log").read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    [step] = [s for s, _ in complete_checkpoints(run_dir)]
    assert 3 <= step < steps
    assert_every_listed_checkpoint_loads(run_dir, make_tiny_model)
    hint = (f"stopped by signal at step {step}; saved {run_dir / 'checkpoints' / f'step_{step}'}; "
            "continue with ")
    assert hint in output
    resume_args = output.split(hint)[1].split()[:2]
    assert resume_args == ["trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    assert read_json(run_dir / "checkpoints" / f"step_{step}" / STATE_FILE)["train"]["step"] == step
    assert list(train_losses(run_dir)) == list(range(1, step + 1))
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run(cli_command(run_dir, resume_args[:1]), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = read_json(run_dir / "summary.json")
    assert (summary["status"], summary["steps"], summary["model"], summary["adapter"]) == (
        "completed", steps, "tiny", "lora")
    assert list(train_losses(run_dir)) == list(range(1, steps + 1))
    assert (run_dir / f"config.resumed_step_{step}.yaml").is_file()


def test_a_second_signal_during_the_save_does_not_interrupt_it(tmp_path, run_training, monkeypatch,
                                                              make_tiny_model):
    signal_during_step(monkeypatch, 3, signal.SIGTERM)
    real_write_manifest = folders.write_manifest

    def signal_again(folder):  # the checkpoint's files are written, its manifest and rename are next
        os.kill(os.getpid(), signal.SIGINT)
        real_write_manifest(folder)

    monkeypatch.setattr(folders, "write_manifest", signal_again)
    summary = run_training(tmp_path / "run", "trainer.max_steps=10")
    assert summary == {"status": "interrupted", "step": 3,
                       "checkpoint": str(tmp_path / "run" / "checkpoints" / "step_3")}
    assert_every_listed_checkpoint_loads(tmp_path / "run", make_tiny_model)


def test_a_stopped_single_run_ignores_further_signals_and_a_library_caller_gets_its_handlers_back():
    """The command line's single run (``hold``) ends with its process: a repeated signal after the stop's
    save, while it ends (the interpreter's shutdown included), must not kill it (exit status 0, not -15): the
    signals are ignored from there on. Elsewhere the previous handlers come back."""
    from malora_train.train.loop import StopRequest

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for hold, stop in ((False, True), (True, False), (True, True)):
            with StopRequest(hold=hold) as request:
                if stop:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.01)
                assert request.requested is stop
            after = {sig: signal.getsignal(sig) for sig in before}
            assert after == ({sig: signal.SIG_IGN for sig in before} if hold and stop else before)
            for sig, handler in before.items():
                signal.signal(sig, handler)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
