"""A trained LoRA adapter names its real base model (the hub id or the folder it was loaded from), so PEFT's
``AutoPeftModelForCausalLM.from_pretrained(<run>/adapter)`` finds the base by itself."""

from __future__ import annotations

import json

import pytest
import torch

from malora_train.config import ModelConfig
from malora_train.models import base_model_location


def test_base_model_location_is_a_hub_id_or_an_absolute_folder(tmp_path, monkeypatch):
    assert base_model_location(ModelConfig(source="pretrained",
                                           name_or_path="HuggingFaceTB/SmolLM2-135M")) == \
        "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_model_location(ModelConfig(source="pretrained", name_or_path="./models/mine")) == \
        str(tmp_path / "models" / "mine")
    assert base_model_location(ModelConfig(name="tiny", source="architecture")) == "tiny"  # random weights


def test_auto_peft_model_loads_a_trained_lora_adapter_with_its_base(tmp_path, make_tiny_model, tiny_tokenizer,
                                                                    run_training):
    peft = pytest.importorskip("peft")
    base_dir = tmp_path / "tiny-base"
    make_tiny_model(0).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    run_dir = tmp_path / "run"
    run_training(run_dir, "model.source=pretrained", f"model.name_or_path={base_dir}", "model.tokenizer=null",
                 "adapter=lora", "adapter.rank=4", "trainer.max_steps=2")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)

    model = peft.AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter").eval()
    ids = torch.randint(3, 260, (1, 9), generator=torch.Generator().manual_seed(0))
    from malora_train.adapters import load_adapter

    ours = load_adapter(make_tiny_model(0), run_dir / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_model_folder_over_a_preset_is_named_as_what_was_loaded(tmp_path, make_tiny_model, tiny_tokenizer,
                                                                  run_training, caplog):
    import logging

    import yaml

    base_dir = tmp_path / "merged"
    make_tiny_model(0).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="malora_train"):  # model=tiny: an architecture preset
        summary = run_training(run_dir, f"model.name_or_path={base_dir}", "model.tokenizer=null",
                               "trainer.max_steps=1", "trainer.eval_after=false")
    assert summary["model"] == str(base_dir)
    assert f"{base_dir} + malora: " in caplog.text and "tiny + malora" not in caplog.text
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert (saved["name"], saved["source"], saved["name_or_path"]) == (str(base_dir), "pretrained",
                                                                       str(base_dir))
    assert saved["architecture"] == {}


def test_a_relative_model_folder_is_saved_absolute_and_a_hub_id_as_written(tmp_path, monkeypatch):
    from malora_train.commands.composition import compose_config

    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    model = compose_config(["model=tiny", "model.name_or_path=models/mine"]).model
    assert (model.name, model.name_or_path) == (str(tmp_path / "models" / "mine"),) * 2
    model = compose_config(["model.name_or_path=HuggingFaceTB/SmolLM2-135M", "model.name=smol"]).model
    assert (model.name, model.source, model.name_or_path) == ("smol", "pretrained",
                                                              "HuggingFaceTB/SmolLM2-135M")
