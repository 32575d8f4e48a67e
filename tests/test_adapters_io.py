"""Saving and loading adapters: bit-exact round trips onto a fresh base model, no pickle, clear errors
for damaged files, and PEFT compatibility (plus merging) for plain LoRA."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from malora_train.adapters import (
    AdaptedCausalLM,
    adapter_kinds,
    adapter_layers,
    adapter_state_dict,
    load_adapter,
    merge_lora,
    save_adapter,
)
from malora_train.config import AdapterConfig
from malora_train.errors import ConfigError

KINDS = adapter_kinds()
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _trained(make_tiny_model, kind: str, **overrides) -> AdaptedCausalLM:
    """An adapted tiny model whose adapter tensors are all random, as after some training."""
    model = AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind=kind, **overrides))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model.model):
            for name in layer.tensor_kinds:
                param = getattr(layer, name)
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if name == "router" else 0.05))
    return model.eval()


def _input_ids() -> torch.Tensor:
    return torch.randint(3, 260, (2, 11), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(model: AdaptedCausalLM | torch.nn.Module) -> torch.Tensor:
    hf_model = model.model if isinstance(model, AdaptedCausalLM) else model
    return hf_model(_input_ids()).logits


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_exact_on_a_fresh_base_model(kind: str, make_tiny_model,
                                                                  tmp_path) -> None:
    model = _trained(make_tiny_model, kind, target_modules="all-linear")
    save_adapter(model, tmp_path, base_model_name="tiny")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert CONFIG in written and WEIGHTS in written
    assert all(name.endswith((".json", ".safetensors")) and not name.startswith(".") for name in written), \
        written  # no pickle, no temporary files left behind
    for name in written:
        if name.endswith(".json"):
            json.loads((tmp_path / name).read_text())

    loaded = load_adapter(make_tiny_model(0), tmp_path).eval()
    saved, restored = adapter_state_dict(model.model), adapter_state_dict(loaded.model)
    assert saved.keys() == restored.keys() and len(saved) > 0
    for key, tensor in saved.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert loaded.targets == model.targets
    assert torch.equal(_logits(loaded), _logits(model))
    reference = load_adapter(make_tiny_model(0), tmp_path, impl="reference").eval()
    torch.testing.assert_close(_logits(reference), _logits(model), rtol=1e-5, atol=1e-5)


def _saved(make_tiny_model, tmp_path: Path, kind: str = "molora") -> Path:
    save_adapter(_trained(make_tiny_model, kind), tmp_path, base_model_name="tiny")
    return tmp_path


def _expect_error_naming(path: Path, make_tiny_model, adapter_dir: Path) -> None:
    """load_adapter fails with a one-line ConfigError naming ``path`` (a file, or the adapter folder)."""
    with pytest.raises(ConfigError) as err:
        load_adapter(make_tiny_model(0), adapter_dir)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _json_files(adapter_dir: Path) -> list[Path]:
    return sorted(adapter_dir.glob("*.json"))


def test_unreadable_config_names_the_file(make_tiny_model, tmp_path) -> None:
    adapter_dir = _saved(make_tiny_model, tmp_path)
    for path in _json_files(adapter_dir):
        path.write_text('{"malora_train": {"adapter": ')
    _expect_error_naming(adapter_dir, make_tiny_model, adapter_dir)


def test_foreign_config_names_the_file(make_tiny_model, tmp_path) -> None:
    """A plain PEFT LoRA folder (no malora-train metadata) is refused with a clear message."""
    adapter_dir = _saved(make_tiny_model, tmp_path)
    for path in _json_files(adapter_dir):
        path.unlink()
    (adapter_dir / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    _expect_error_naming(adapter_dir, make_tiny_model, adapter_dir)


def test_missing_config_names_the_file(make_tiny_model, tmp_path) -> None:
    adapter_dir = _saved(make_tiny_model, tmp_path)
    for path in _json_files(adapter_dir):
        path.unlink()
    _expect_error_naming(adapter_dir, make_tiny_model, adapter_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_weights_name_the_file(damage: str, make_tiny_model, tmp_path) -> None:
    adapter_dir = _saved(make_tiny_model, tmp_path)
    weights = adapter_dir / WEIGHTS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
    _expect_error_naming(weights, make_tiny_model, adapter_dir)


def test_weights_that_do_not_fit_the_config_name_the_file(make_tiny_model, tmp_path) -> None:
    adapter_dir = _saved(make_tiny_model, tmp_path / "rank8")
    other = tmp_path / "rank4"
    save_adapter(_trained(make_tiny_model, "molora", rank=4), other, base_model_name="tiny")
    (adapter_dir / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())  # same keys, other shapes
    _expect_error_naming(adapter_dir / WEIGHTS, make_tiny_model, adapter_dir)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_missing_or_extra_tensors_name_the_file(change: str, make_tiny_model, tmp_path) -> None:
    adapter_dir = _saved(make_tiny_model, tmp_path)
    weights = adapter_dir / WEIGHTS
    tensors = load_file(str(weights))
    if change == "drop":
        tensors.pop(sorted(tensors)[0])
    else:
        tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(weights))
    _expect_error_naming(weights, make_tiny_model, adapter_dir)


# -- PEFT and merging ---------------------------------------------------------------------------------

def _load_in_peft(make_tiny_model, adapter_dir: Path):
    """PEFT's own loader on a fresh copy of the base model; returns (model, warnings raised)."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(make_tiny_model(0), adapter_dir).eval()
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_loads_in_peft_and_merges_to_the_same_logits(use_rslora: bool, make_tiny_model,
                                                          tmp_path) -> None:
    ours = _trained(make_tiny_model, "lora", rank=4, alpha=6.0, use_rslora=use_rslora)
    expected = _logits(ours)
    assert (expected - _logits(make_tiny_model(0))).abs().max() > 1e-3  # the adapter changes the output
    save_adapter(ours, tmp_path, base_model_name="tiny")

    theirs, _ = _load_in_peft(make_tiny_model, tmp_path)
    torch.testing.assert_close(_logits(theirs), expected, rtol=1e-5, atol=1e-5)

    merged = merge_lora(ours)
    assert not list(adapter_layers(merged))
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_peft_reads_our_lora_config_without_warnings(make_tiny_model, tmp_path) -> None:
    """Extra keys in adapter_config.json make PEFT warn that the adapter is from a newer PEFT version."""
    save_adapter(_trained(make_tiny_model, "lora", rank=4), tmp_path, base_model_name="tiny")
    _, caught = _load_in_peft(make_tiny_model, tmp_path)
    # (PEFT itself trips a transformers deprecation warning; only complaints about our files count)
    complaints = [m for m in caught if any(w in m.lower() for w in ("unexpected", "missing", "malora_train"))]
    assert not complaints, complaints


@pytest.mark.parametrize("kind", ["molora", "malora", "hydralora"])
def test_mixtures_cannot_be_merged(kind: str, make_tiny_model) -> None:
    with pytest.raises(ConfigError, match=kind):
        merge_lora(_trained(make_tiny_model, kind))


@pytest.mark.parametrize("kind", ["molora", "hydralora"])
def test_an_adapter_saved_with_the_flat_config_of_every_kinds_keys_loads(kind: str, make_tiny_model,
                                                                        tmp_path) -> None:
    """Earlier versions saved the adapter section with every kind's keys: those the kind does not read, at
    their defaults, are dropped (a mixture kind's file lives in adapter_config.json)."""
    model = _trained(make_tiny_model, kind, rank=4)
    save_adapter(model, tmp_path, base_model_name="tiny")
    saved = json.loads((tmp_path / CONFIG).read_text())
    keys = {key: saved[key] for key in dataclasses.asdict(model.adapter_cfg)}
    config = {"adapter_type": kind, "base_model_name_or_path": "tiny",  # format 1: the keys in the metadata
              "malora_train": {**saved["malora_train"], "format_version": 1, "adapter": keys}}
    config["malora_train"]["adapter"].update(lam=0.5, shared_rank=None, expert_rank=None, beta=1.0,
                                             freeze_shared=False, freeze_coeff=False)
    (tmp_path / CONFIG).write_text(json.dumps(config))
    loaded = load_adapter(make_tiny_model(0), tmp_path).eval()
    assert loaded.adapter_cfg == model.adapter_cfg
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    config["malora_train"]["adapter"]["beta"] = 1.25
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"adapter\.beta=1\.25 is set, but adapter={kind} does not read"):
        load_adapter(make_tiny_model(0), tmp_path)
