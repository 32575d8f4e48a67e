"""Accelerate's trackers: ``logger.trackers=[tensorboard]`` mirrors metrics.jsonl into TensorBoard event files
(purged after the checkpoint on resume), a tracker that is not installed is skipped with a warning, and
bad logger settings fail at start."""

from __future__ import annotations

import logging

import pytest

from malora_train.config import LoggerConfig, WandbConfig
from malora_train.errors import ConfigError
from malora_train.train.metrics import check_logger, flat_config, installed_trackers


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of ``tag`` TensorBoard would show for the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [folder] = (run_dir / "logs").iterdir()  # logs/<logger.wandb.project>/
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_gets_every_metric_and_resume_purges_the_redone_steps(tmp_path, run_training,
                                                                          read_metrics):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    common = ["adapter=lora", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=2",
              "logger.trackers=[tensorboard]"]
    run_training(run_dir, *common)
    rows = read_metrics(run_dir)
    expected = [(r["step"], r["lm_loss"]) for r in rows if "lm_loss" in r]
    assert [step for step, _ in expected] == [1, 2, 3, 4]
    assert scalars(run_dir, "lm_loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert [s for s, _ in scalars(run_dir, "eval/average")] == [2, 4]
    assert [s for s, _ in scalars(run_dir, "loss/sentiment")] == [
        s for s, _ in expected if any("loss/sentiment" in r and r["step"] == s for r in rows)]

    # resume from step 2: steps 3 and 4 are logged again, and TensorBoard shows each step once
    run_training(run_dir, *common, f"trainer.resume={run_dir / 'checkpoints' / 'step_2'}")
    redone = [(r["step"], r["lm_loss"]) for r in read_metrics(run_dir) if "lm_loss" in r]
    assert [s for s, _ in scalars(run_dir, "lm_loss")] == [1, 2, 3, 4]
    assert scalars(run_dir, "lm_loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in redone]


def test_a_tracker_that_is_not_installed_is_skipped_with_a_warning(monkeypatch, caplog):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["wandb"])
    with caplog.at_level(logging.WARNING, logger="malora_train.train.metrics"):
        chosen = installed_trackers(LoggerConfig(trackers=["tensorboard", "wandb", "comet_ml"]))
    assert chosen == ["wandb"]
    assert [r.getMessage() for r in caplog.records] == [
        "logger.trackers: tensorboard is not installed (pip install tensorboard); not logging to it",
        "logger.trackers: comet_ml is not installed (pip install comet-ml); not logging to it",
    ]


def test_bad_logger_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"logger.trackers: 'tensorbored' is not an Accelerate tracker; "
                                          r"choose from .*tensorboard"):
        check_logger(LoggerConfig(trackers=["tensorbored"]))
    with pytest.raises(ConfigError, match=r"logger.wandb.mode='loud' is not one of "
                                          r"online, offline, disabled"):
        check_logger(LoggerConfig(trackers=["wandb"], wandb=WandbConfig(mode="loud")))
    with pytest.raises(ConfigError, match=r"logger.wandb.mode=offline logs nothing unless logger.trackers "
                                          r"names wandb"):
        check_logger(LoggerConfig(wandb=WandbConfig(mode="offline")))
    check_logger(LoggerConfig(trackers=["wandb"], wandb=WandbConfig(mode="offline")))


def test_flat_config_gives_trackers_scalars():
    nested = {"seed": 0, "trainer": {"lr": 1e-3, "resume": None, "kwargs": {}},
              "adapter": {"target_modules": ["q_proj", "v_proj"], "router": {"dense": False}}}
    assert flat_config(nested) == {"seed": 0, "trainer.lr": 1e-3, "trainer.resume": "None",
                                   "adapter.target_modules": "['q_proj', 'v_proj']",
                                   "adapter.router.dense": False}
