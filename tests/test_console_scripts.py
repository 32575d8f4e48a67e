"""The four console scripts run as the installed ones do (``sys.exit(<entry point>())``, the entry points
read from pyproject.toml) in processes of their own: each exits 0 on success with nothing on stderr that
looks like a returned value, and 2 with a one-line error on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[1]
RUN = ["model=tiny", "trainer.max_steps=1", "data.train_per_task=8", "data.eval_per_task=2",
       "trainer.eval_before=false", "trainer.eval_after=false", "trainer.progress=false"]


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _start(program: str, argv: list[str], cwd: Path) -> subprocess.Popen:
    module, function = _scripts()[program].split(":")
    code = f"import sys; from {module} import {function}; sys.argv[0] = {program!r}; sys.exit({function}())"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def test_every_console_script_exits_0_on_success_and_2_on_bad_input(tmp_path):
    failing = {program: _start(program, argv, tmp_path) for program, argv in (
        ("malora-train", [*RUN, "trainer.lr=fast"]), ("malora-eval", ["model=tiny", "eval.run_dir=nowhere"]),
        ("malora-inspect", ["model=tiny", "adapter.rnak=4"]), ("malora-report", [str(tmp_path / "nowhere")]))}
    run = tmp_path / "run"
    code, _, err = _finish(_start("malora-train", [*RUN, f"hydra.run.dir={run}"], tmp_path))
    assert code == 0, err
    succeeding = {program: _start(program, argv, tmp_path) for program, argv in (
        ("malora-eval", [str(run), "data.eval_per_task=2", f"eval.output_dir={tmp_path / 'eval'}"]),
        ("malora-inspect", ["model=tiny", "adapter=lora"]), ("malora-report", [str(run)]))}
    for program, process in succeeding.items():
        code, _, err = _finish(process)
        assert code == 0, f"{program}: {err}"
        assert "{'" not in err, f"{program} printed a returned value: {err}"
    for program, process in failing.items():
        code, _, err = _finish(process)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{program}: "), \
            f"{program}: {code} {err}"


HEAVY = ("torch", "transformers", "deepspeed", "wandb", "matplotlib")


def _loaded_after(code: str) -> list[str]:
    """The modules of ``HEAVY`` a fresh interpreter holds after running ``code``."""
    check = f"{code}\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_help_pages_import_no_torch_and_training_imports_only_what_it_uses():
    for function in ("train_main", "eval_main", "inspect_main", "report_main"):
        code = ("import contextlib, io, sys; from malora_train import cli; sys.argv = ['x', '--help']\n"
                f"with contextlib.redirect_stdout(io.StringIO()):\n    cli.{function}()")
        assert _loaded_after(code) == [], function
    # what a run imports before its first log line: no DeepSpeed (only a DeepSpeed launch), no wandb (only
    # logger.trackers=[wandb], through Accelerate), no plotting (after training)
    assert _loaded_after("import malora_train.cli, malora_train.train.loop") == ["torch", "transformers"]
