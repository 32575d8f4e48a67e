"""The data presets (conf/data/*.yaml) fit the schema and build; start-up errors name the config key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from malora_train.config import DataConfig, register_configs
from malora_train.data import build_tasks, label_pattern
from malora_train.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def preset(name: str, **overrides) -> DataConfig:
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "data" / f"{name}.yaml"),
                           overrides)
    return OmegaConf.to_object(node)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")
                                        if p.stem != "commonsense_intra"))
def test_every_preset_fits_the_schema(name):
    cfg = preset(name)
    assert cfg.name == name and cfg.source in ("synthetic", "llm_adapters", "bigbench", "custom")


def test_default_synthetic_preset_builds():
    cfg = preset("synthetic")
    assert (cfg.prompt_template, cfg.prompt_template_fallback) == ("auto", "plain")
    assert (cfg.train_per_task, cfg.eval_per_task) == (2000, 48)
    tasks = build_tasks(cfg, seed=0)
    assert list(tasks) == ["sentiment", "category", "case", "compare", "arithmetic"]


def test_commonsense_presets_compose(monkeypatch):
    monkeypatch.delenv("MALORA_COMMONSENSE_ROOT", raising=False)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        intra = compose("config", overrides=["data=commonsense_intra"])
        full = compose("config", overrides=["data=mixture_commonsense"])
    assert list(intra.data.tasks) == ["piqa", "openbookqa", "boolq", "ARC-Challenge", "ARC-Easy"]
    assert intra.data.source == "llm_adapters" and intra.data.prompt_template == "alpaca"
    assert intra.data.root == "../shared/data/commonsense"
    assert len(full.data.tasks) == 8 and "hellaswag" in full.data.tasks
    monkeypatch.setenv("MALORA_COMMONSENSE_ROOT", "/data/cs")
    assert preset("mixture_commonsense").root == "/data/cs"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source": "s3"}, "data.source='s3' is not one of"),
        ({"prompt_template": "chatml"}, "data.prompt_template='chatml' is not one of auto, alpaca, plain"),
        ({"eval_fraction": 1.0}, "data.eval_fraction=1.0"),
        ({"train_per_task": 0}, "data.train_per_task=0"),
        ({"sampling": "round_robin"}, "data.sampling='round_robin'"),
        ({"sampling": "temperature", "temperature": 0.0}, "data.temperature=0.0"),
        ({"task_weights": {"arithmetic": 2.0, "sudoku": 1.0}},
         "data.task_weights names unknown task 'sudoku'"),
        ({"task_caps": {"sudoku": 10}}, "data.task_caps names unknown task 'sudoku'"),
        ({"tasks": ["compare", "compare"]}, "data.tasks lists compare more than once"),
        ({"max_length": 4}, "data.max_length=4"),
    ],
)
def test_start_up_errors_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        build_tasks(DataConfig(**{"source": "synthetic", "train_per_task": 8, "eval_per_task": 4, **options}),
                    seed=0)


def test_label_pattern_finds_whole_labels_first_match():
    import re

    pattern = label_pattern(["answer1", "answer10", "true"])
    assert re.search(pattern, "I think the correct answer is answer10, not answer1").group(0) == "answer10"
    assert re.search(pattern, "untrue, so answer1").group(0) == "answer1"
    assert re.search(pattern, "answer12") is None
