"""A signal at any moment of a run (issue 26.1): during the set-up, the evaluation before training, an
``eval_every`` evaluation or the one after training, the run keeps what it trained as a checkpoint, prints
the command that continues it, releases its lock and returns (exit status 0 on the command line); resuming
never trains a step again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from malora_train.run_dir import LOCK_FILE
from malora_train.train import loop
from malora_train.train.checkpoint.folders import complete_checkpoints


def signal_in_evaluation(monkeypatch: pytest.MonkeyPatch, which: int,
                         signum: int = signal.SIGTERM) -> list[int]:
    """This process receives ``signum`` inside its ``which``-th evaluation (1-based); returns the list of the
    steps the evaluations started at."""
    real, started = loop.Trainer.evaluate, []

    def evaluate(self, *args, **kwargs):
        started.append(self.state.step)
        if len(started) == which:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate)
    return started


def train_steps(read_metrics, run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir) if "lm_loss" in row]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_in_the_final_evaluation_keeps_the_training_and_the_resume_only_evaluates(
        tmp_path, run_training, read_metrics, monkeypatch, capsys, signum):
    run_dir = tmp_path / "run"
    started = signal_in_evaluation(monkeypatch, 1, signum)
    summary = run_training(run_dir, "trainer.max_steps=4")  # save_every=0: no checkpoint but this one
    assert summary == {"status": "interrupted", "step": 4,
                       "checkpoint": str(run_dir / "checkpoints" / "step_4")}
    assert started == [4]
    assert (run_dir / "adapter" / "manifest.json").is_file()  # saved before the evaluation began
    assert [step for step, _ in complete_checkpoints(run_dir)] == [4]
    out = capsys.readouterr().out
    assert f"stopped by signal at step 4; saved {run_dir / 'checkpoints' / 'step_4'}; continue with " in out
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / "summary.json").exists()

    monkeypatch.undo()
    resumed = run_training(run_dir, "trainer.max_steps=4", "trainer.resume=auto")
    assert resumed["status"] == "completed" and resumed["steps"] == 4
    assert train_steps(read_metrics, run_dir) == [1, 2, 3, 4]  # nothing trained twice
    assert any("eval/average" in row for row in read_metrics(run_dir))


def test_a_signal_in_an_eval_every_evaluation_saves_that_step(tmp_path, run_training, read_metrics,
                                                              monkeypatch):
    run_dir = tmp_path / "run"
    started = signal_in_evaluation(monkeypatch, 1)
    summary = run_training(run_dir, "trainer.max_steps=6", "trainer.eval_every=2")
    assert started == [2]
    assert summary == {"status": "interrupted", "step": 2,
                       "checkpoint": str(run_dir / "checkpoints" / "step_2")}
    assert not any("eval/average" in row for row in read_metrics(run_dir))  # cut short, not finished first
    assert not (run_dir / LOCK_FILE).exists()
    monkeypatch.undo()
    assert run_training(run_dir, "trainer.max_steps=6", "trainer.eval_every=2",
                        "trainer.resume=auto")["status"] == "completed"
    assert train_steps(read_metrics, run_dir) == [1, 2, 3, 4, 5, 6]
    # the evaluation cut short is run when the run resumes, before its next step
    assert [row["step"] for row in read_metrics(run_dir) if "eval/average" in row] == [2, 4, 6]


def test_a_signal_before_the_first_step_leaves_the_directory_reusable(tmp_path, run_training, monkeypatch,
                                                                      capsys):
    run_dir = tmp_path / "run"
    signal_in_evaluation(monkeypatch, 1, signal.SIGINT)
    summary = run_training(run_dir, "trainer.max_steps=2", "trainer.eval_before=true")
    assert summary == {"status": "interrupted", "step": 0, "checkpoint": None}
    assert "stopped by signal before its first step" in capsys.readouterr().out
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / "config.yaml").exists()
    monkeypatch.undo()

    real = loop.load_model_and_tokenizer

    def load(*args, **kwargs):  # a signal while the model loads (the set-up)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "load_model_and_tokenizer", load)
    assert run_training(run_dir, "trainer.max_steps=2") == {"status": "interrupted", "step": 0,
                                                            "checkpoint": None}
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / "config.yaml").exists()
    monkeypatch.undo()
    assert run_training(run_dir, "trainer.max_steps=2")["status"] == "completed"  # no resume needed


def test_ctrl_c_in_an_evaluation_of_the_command_line_is_one_line_and_exit_0(tmp_path,
                                                                          tiny_training_overrides):
    """A real process: SIGINT during the evaluation before training (the first step would follow)."""
    run_dir = tmp_path / "run"
    hook = tmp_path / "hook.py"  # sends the process SIGINT when its first evaluation starts
    hook.write_text(
        "import os, signal, runpy, sys\n"
        "from malora_train.train import loop\n"
        "real = loop.Trainer.evaluate\n"
        "def evaluate(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(self, *a, **k)\n"
        "loop.Trainer.evaluate = evaluate\n"
        "sys.argv = ['malora-train', *sys.argv[1:]]\n"
        "from malora_train.cli import train_main\n"
        "train_main()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(hook), *tiny_training_overrides, "trainer.eval_before=true",
                           "trainer.max_steps=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    [line] = [line for line in output.splitlines() if "stopped by signal" in line]
    assert "continue with trainer.resume=auto" in line
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_in_malora_eval_is_one_line_and_releases_the_lock(tmp_path, run_training, monkeypatch,
                                                                   capsys, signum):
    from cli_runner import run_program

    from malora_train.commands import evaluate as eval_module

    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.max_steps=1", "trainer.eval_after=false")
    real = eval_module.evaluate

    def evaluate(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_module, "evaluate", evaluate)
    handler = signal.getsignal(signal.SIGTERM)
    # Ctrl-C reaches a command in the foreground, whose SIGINT is Python's own handler; a shell starts a
    # background job (the test run itself, say) with SIGINT ignored, which the command keeps
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)
    capsys.readouterr()
    try:
        status = run_program(monkeypatch, "malora-eval", [str(run_dir)])
    finally:
        signal.signal(signal.SIGINT, interactive)
    err = capsys.readouterr().err
    assert status == 130, err
    assert "Traceback" not in err and [line for line in err.splitlines() if "malora-eval" in line] == [
        "malora-eval: stopped by signal (Ctrl-C or SIGTERM); nothing written"]
    assert not (run_dir / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
