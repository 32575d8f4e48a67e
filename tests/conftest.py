"""Fixtures shared by the whole test suite (add new ones below; keep them generic)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from malora_train.config import ModelConfig

# the from-scratch reference model's checks (tests/scratch_model.py) report their values like test asserts
pytest.register_assert_rewrite("scratch_model")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests must never reach the network (a hub call without these hangs for ~50 s).
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)

# Tests use tiny tensors on a shared 2-core machine: a second intra-op thread only adds overhead, and when
# the cores are busy OpenMP's spinning threads make the suite several times slower.
torch.set_num_threads(1)


def model_config(preset: str) -> ModelConfig:
    """The ModelConfig of ``conf/model/<preset>.yaml`` merged into the schema."""
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(
        schema, OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{preset}.yaml")))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def model_preset_cfg() -> Callable[[str], ModelConfig]:
    """``model_preset_cfg("llama2_7b")`` -> the ModelConfig of conf/model/llama2_7b.yaml."""
    return model_config


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """conf/model/tiny.yaml: a random 2-layer LLaMA (hidden 64) with the builtin byte tokenizer."""
    return model_config("tiny")


@pytest.fixture
def make_tiny_model(tiny_model_cfg: ModelConfig) -> Callable:
    """``make_tiny_model(seed=0)`` -> a fresh tiny model (float32, eval mode); equal seeds, equal weights."""
    from malora_train.models import load_model

    def build(seed: int = 0):
        return load_model(tiny_model_cfg, seed=seed).eval()

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's builtin byte-level tokenizer (one token per byte, no files)."""
    from malora_train.models import load_tokenizer

    return load_tokenizer(model_config("tiny"))


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder nothing can be written into (chmod for a normal user; chattr +i for root, whom
    permissions do not stop); skips where neither works."""
    import shutil
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)],
                                                        capture_output=True).returncode:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
    else:
        folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
        except OSError:
            yield folder
        else:
            probe.unlink()
            pytest.skip("this file system lets the read-only folder be written")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The commonsense mixture (``<task>/{train,test}.json``): $MALORA_SHARED_DATA or ../shared/data."""
    root = Path(os.environ.get("MALORA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = root / "commonsense"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} "
                    "(set MALORA_SHARED_DATA to the folder holding commonsense/)")
    return path


# -- training runs on the tiny model (tests/test_train_*.py) ------------------------------------------------
# Small and fast: 5 synthetic tasks x 64 examples, byte-level prompts under 256 tokens, no progress bars.
TINY_TRAINING = ["model=tiny", "data.train_per_task=64", "data.eval_per_task=8", "data.max_length=256",
                 "trainer.micro_batch_size=4", "trainer.progress=false", "trainer.eval_before=false"]


def _read_metrics(run_dir: Path) -> list[dict]:
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    losses: dict[int, float] = {}
    for row in _read_metrics(run_dir):
        if "lm_loss" in row:
            assert row["step"] not in losses, f"step {row['step']} logged twice in {run_dir}"
            losses[row["step"]] = row[key]
    return losses


@pytest.fixture(scope="session")
def tiny_training_overrides() -> list[str]:
    """The overrides of a small, fast training run on the tiny model."""
    return list(TINY_TRAINING)


@pytest.fixture(scope="session")
def read_metrics() -> Callable[[Path], list[dict]]:
    """``read_metrics(run_dir)`` -> the records of run_dir/metrics.jsonl."""
    return _read_metrics


@pytest.fixture(scope="session")
def train_losses() -> Callable[..., dict[int, float]]:
    """``train_losses(run_dir, key="loss")`` -> {step: value} over the training lines of metrics.jsonl;
    a step logged twice fails the test."""
    return _train_losses


@pytest.fixture
def run_training() -> Callable[..., dict]:
    """``run_training(run_dir, *overrides)`` trains in this process (``TINY_TRAINING`` + overrides) and
    returns the summary; Accelerate's process-wide state is reset afterwards so runs do not leak."""
    from accelerate.state import AcceleratorState, GradientState

    from malora_train.cli import compose
    from malora_train.train.loop import train

    def run(run_dir: Path, *overrides: str) -> dict:
        cfg = compose([*TINY_TRAINING, *overrides])
        resolved_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))  # config.yaml, as the CLI writes it
        try:
            return train(cfg, Path(run_dir), resolved_yaml=resolved_yaml, overrides=list(overrides))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    return run


@pytest.fixture
def fresh_accelerate_state():
    """Resets Accelerate's process-wide state after the test (a ``transformers.Trainer`` or ``Accelerator``
    made in the test must not hand its mixed precision or accumulation settings to the next one)."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def train_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """``train_cli(*argv)`` runs ``malora-train <argv>`` (Hydra, ``-m`` sweeps included) in this process and
    returns its exit status; logging and Accelerate's process-wide state are put back afterwards."""
    from cli_runner import run_program

    return lambda *argv: run_program(monkeypatch, "malora-train", list(argv))


@pytest.fixture
def captured_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The captured step's code path on the CPU: the launch's "no GPU" obstacle lifted, so the trainer takes
    ``graphs.StepGraphs``, which runs its work again instead of replaying a capture."""
    from malora_train.train import step_path

    monkeypatch.setattr(step_path, "launch_obstacle", lambda *launch: None)
