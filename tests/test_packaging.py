"""``pip install`` of the wheel into another environment runs from any directory: the wheel carries the
configs (``malora_train/conf``), the commands find them, and the DeepSpeed launch configs' JSON path
resolves inside the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("malora_train", "hydra_plugins", "conf", "pyproject.toml", "setup.py", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, installed (without dependencies: this interpreter has
    them) into a folder of its own; returns that folder (its bin/ holds the console scripts)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        copy(REPO_ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                 if (REPO_ROOT / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"),
                    str(source)], check=True, capture_output=True, cwd=work)
    [wheel] = list((work / "dist").glob("malora_train-*.whl"))
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, cwd=work)
    return target


def run_installed(installed: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_installed_wheel_runs_from_any_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = run_installed(installed, elsewhere, sys.executable, "-c",
                          "import malora_train, malora_train.config as c; print(malora_train.__file__); "
                          "print(c.CONF_DIR)")
    module, conf = found.stdout.split()
    assert module == str(installed / "malora_train" / "__init__.py")
    assert conf == str(installed / "malora_train" / "conf")

    bin_dir = installed / "bin"
    help_page = run_installed(installed, elsewhere, str(bin_dir / "malora-train"), "--help")
    assert help_page.returncode == 0, help_page.stderr
    assert "config groups" in help_page.stdout and f"configs: {conf}" in help_page.stdout

    report = run_installed(installed, elsewhere, str(bin_dir / "malora-inspect"), "model=tiny",
                           "adapter=lora", "inspect.json=true")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["trainable"] > 0

    run = run_installed(installed, elsewhere, str(bin_dir / "malora-train"), "model=tiny",
                        "data.train_per_task=8", "data.eval_per_task=2", "trainer.max_steps=1",
                        "trainer.micro_batch_size=2", "trainer.eval_before=false", "trainer.progress=false")
    assert run.returncode == 0, run.stderr[-3000:]
    [run_dir] = list((elsewhere / "outputs").glob("*/*"))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1

    launchers = run_installed(installed, elsewhere, str(bin_dir / "malora-train"), "--cfg", "hydra",
                              "hydra/launcher=gpu_pool")  # the packaged launcher plugin is found too
    assert launchers.returncode == 0, launchers.stderr[-3000:]
    assert "gpu_pool" in launchers.stdout

    deepspeed_json = run_installed(
        installed, elsewhere, sys.executable, "-c",
        "import os; os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE'] = 'conf/deepspeed/zero2.json'; "
        "from malora_train.train.distributed import _find_deepspeed_config_file as f; f(); "
        "print(os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE'])")
    assert deepspeed_json.stdout.strip() == str(installed / "malora_train" / "conf" / "deepspeed"
                                                / "zero2.json")
