"""The four console scripts run as the installed ones do (``sys.exit(<entry point>())``, the entry points
read from pyproject.toml) in processes of their own: each exits 0 on success with nothing on stderr that
looks like a returned value, and 2 with a one-line error on bad input."""

from __future__ import annotations

import json
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


def test_a_users_project_through_the_console_scripts(tmp_path, make_tiny_model, tiny_tokenizer):
    """Issue 25's command line, each item as the installed scripts run it, in processes of their own: a flag
    after an override (--config-dir), a custom task from a CSV file named by a relative path (saved absolute,
    so malora-eval of the run works from another folder), a numeric answer scored with generate (the note
    printed once), plain progress lines in a log file (no carriage returns), the prompt template named, the
    base model evaluated alone, a model folder named as what was loaded, a merged export of a mixture refused
    before loading, an unknown optimizer refused up front."""
    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (home / "mydata").mkdir(parents=True)
    (home / "conf" / "data").mkdir(parents=True)
    elsewhere.mkdir()
    lines = [f"{a} plus {b},{a + b}" for a in range(8) for b in range(8)]
    (home / "mydata" / "addsub.csv").write_text("q,answer\n" + "\n".join(lines) + "\n")
    (home / "conf" / "data" / "addsub.yaml").write_text(
        "defaults:\n  - custom_example\n  - _self_\nname: addsub\ncustom_tasks:\n"
        "  - {name: addsub, path: mydata/addsub.csv, prompt_template: '{q} =', answer_field: answer,\n"
        "     answer_type: number}\n")
    run = tmp_path / "run"
    settings = ["trainer.max_steps=2", "trainer.eval_before=false", "eval.max_examples=2",
                "eval.max_new_tokens=2", "trainer.progress_every=1", f"hydra.run.dir={run}"]
    code, out, err = _finish(_start("malora-train", ["model=tiny", "--config-dir", "conf", "data=addsub",
                                                     *settings], home))
    assert code == 0, err
    log = out + err
    assert "\r" not in log and "step 2/2" in log  # trainer.progress=auto into a pipe: plain lines
    assert log.count("is scored with generate") == 1
    assert "prompt template: alpaca (data.prompt_template=auto: the tokenizer has no chat template)" in log
    saved = (run / "config.yaml").read_text()
    assert f"path: {home / 'mydata' / 'addsub.csv'}" in saved and "mydata/addsub.csv" in saved  # as written

    merged = tmp_path / "merged_model"  # a user's own model folder, over the tiny preset
    make_tiny_model(0).save_pretrained(merged)
    tiny_tokenizer.save_pretrained(merged)
    finished = {name: _start(program, argv, cwd) for name, cwd, program, argv in (
        ("eval of the run", elsewhere, "malora-eval", [str(run), f"eval.output_dir={tmp_path / 'eval'}"]),
        ("base model alone", home, "malora-eval", ["model=tiny", "--config-dir", "conf", "data=addsub",
                                                   "eval.adapter_path=none", "eval.max_examples=2",
                                                   "eval.max_new_tokens=2",
                                                   f"eval.output_dir={tmp_path / 'base'}"]),
        ("own model", elsewhere, "malora-train", [*RUN, f"model.name_or_path={merged}",
                                                  "model.tokenizer=null",
                                                  f"hydra.run.dir={tmp_path / 'own'}"]),
        ("unknown optimizer", elsewhere, "malora-train", [*RUN, "trainer.optimizer=NoSuchOptimizer"]))}
    results = {name: _finish(process) for name, process in finished.items()}
    # after the run's evaluation: each malora-eval of a run holds its lock
    results["merged mixture"] = _finish(_start("malora-eval", [str(run), "eval.export=merged",
                                                               f"eval.output_dir={tmp_path / 'merged'}"],
                                               elsewhere))
    for name in ("eval of the run", "base model alone"):
        code, out, err = results[name]
        assert code == 0, f"{name}: {err}"
        assert "addsub" in out + err, name
    assert any(p.name.startswith("eval_base") for p in (tmp_path / "base").iterdir())
    code, out, err = results["own model"]
    assert code == 0 and f"{merged} + malora: " in out + err and "tiny + malora" not in out + err, err
    assert json.loads((tmp_path / "own" / "summary.json").read_text())["model"] == str(merged)
    for name, expected in (("merged mixture", "eval.export=merged"),
                           ("unknown optimizer", "trainer.optimizer")):
        code, _, err = results[name]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], f"{name}: {code} {err}"
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
