"""Save and load adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` (no pickle).

Plain LoRA is written in PEFT's format (``peft.PeftModel.from_pretrained`` loads it), with our own
metadata beside it in ``malora_adapter.json`` so PEFT sees only keys it knows. Mixture adapters are PEFT
methods this package registers (``peft_method``): their ``adapter_config.json`` holds PEFT's keys
(``peft_type: MALORA``, ...), the kind's config keys flat, and our metadata under ``malora_train`` (which
names the package that reads the folder). They use the same layout with more tensors per layer: each
tensor a kind lists in its layer class's ``tensor_kinds`` is keyed
``base_model.model.<layer path>.<tensor>.weight`` (the class docstrings give the shapes). Expert t owns
rows [t*R, (t+1)*R) of a stacked down-projection and columns [t*R, (t+1)*R) of ``lora_B``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file
from torch import nn

from malora_train.adapters.adapted_lm import AdaptedCausalLM
from malora_train.adapters.inject import adapter_layers, adapter_state_dict
from malora_train.adapters.registry import adapter_class
from malora_train.config import ADAPTER_CONFIGS, AdapterConfig, escape_interpolations, saved_adapter_keys
from malora_train.errors import ConfigError
from malora_train.run_dir import MANIFEST_FILE, atomic_write, verify_checkpoint, write_text_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_METADATA = "malora_adapter.json"
FORMAT_VERSION = 2  # 1: a mixture's adapter_config.json held the kind's keys in malora_train.adapter
KEY_PREFIX = "base_model.model."
READ_WITH = ("malora-train (pip install malora-train): `import malora_train` registers this adapter's kind "
             "with PEFT, then PeftModel / AutoPeftModelForCausalLM.from_pretrained load it")
TASK_TYPE = "CAUSAL_LM"


def file_key(layer_path: str, tensor: str) -> str:
    return f"{KEY_PREFIX}{layer_path}.{tensor}.weight"


def _peft_targets(model: AdaptedCausalLM) -> Any:
    """What PEFT needs to wrap exactly our layers: the suffix list we were given, else an exact regex."""
    targets = model.adapter_cfg.target_modules
    if not isinstance(targets, str):
        return list(targets)
    return "^(" + "|".join(re.escape(n) for n in model.targets) + ")$"


def adapter_metadata(model: AdaptedCausalLM) -> dict[str, Any]:
    """What the files say beside the config keys: the sizes the layers were built with, the adapted layers,
    and which package reads the folder."""
    layer = next(layer for _, layer in adapter_layers(model.model))
    return {
        "format_version": FORMAT_VERSION,
        "read_with": READ_WITH,
        "kind": model.adapter_cfg.kind,
        "expert_rank": layer.expert_rank,
        "alpha": layer.alpha,
        "scaling": layer.scaling,
        "shared_rank": getattr(layer, "shared_rank", None),
        "layers": model.targets,
    }


def adapter_config_dict(model: AdaptedCausalLM, base_model_name: str) -> dict[str, Any]:
    cfg = model.adapter_cfg
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    layer = next(layer for _, layer in adapter_layers(model.model))
    meta = adapter_metadata(model)
    # the fields of peft_method's config class of the kind
    if not adapter_class(cfg.kind).peft_format:
        return {"peft_type": cfg.kind.upper(), "task_type": TASK_TYPE,
                "base_model_name_or_path": base_model_name, "revision": None, "inference_mode": True,
                "auto_mapping": None, **cfg_dict, "malora_train": meta}
    meta = {**meta, "format_version": 1, "adapter": cfg_dict}  # LoRA's file keeps the keys in its metadata
    del meta["read_with"]  # PEFT's own LoRA
    return {  # only fields PEFT's LoraConfig knows; the metadata goes to LORA_METADATA
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": layer.expert_rank, "lora_alpha": layer.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": _peft_targets(model), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "malora_train": meta,
    }


def save_adapter(model: AdaptedCausalLM, out_dir: str | Path, base_model_name: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter. ``state_dict`` (keys as in ``model.state_dict()``) lets a caller pass
    weights gathered from a sharded engine (ZeRO-3) instead of reading the local parameters."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, param in adapter_state_dict(model.model).items():
        layer_path, tensor = key.rsplit(".", 1)
        value = state_dict[f"model.{key}"] if state_dict is not None else param
        tensors[file_key(layer_path, tensor)] = value.detach().to("cpu").contiguous()
    config = adapter_config_dict(model, base_model_name)
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if config.get("peft_type") == "LORA":
        metadata = {"base_model_name_or_path": base_model_name, "malora_train": config.pop("malora_train")}
        write_text_atomic(out / LORA_METADATA, json.dumps(metadata, indent=2) + "\n")
    write_text_atomic(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """The saved adapter's config (its kind's class; an earlier version's file holds every kind's keys, see
    ``config.saved_adapter_keys``) and the file's whole content."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: no adapter config (expected {ADAPTER_CONFIG} beside {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text())
        if "malora_train" not in config and (Path(adapter_dir) / LORA_METADATA).is_file():
            path = Path(adapter_dir) / LORA_METADATA
            config = {**config, **json.loads(path.read_text())}
        meta = config["malora_train"]
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise ConfigError(f"{path}: format_version {version!r} is not one this malora-train reads (up to "
                              f"{FORMAT_VERSION}; a later version wrote it?)")
        # format 1 (and LoRA's metadata): the keys in malora_train.adapter; format 2: the kind's keys, flat
        keys = meta["adapter"] if "adapter" in meta else _flat_adapter_keys(config)
        # plain data: a "${...}" in the file stays text
        adapter_type, adapter = saved_adapter_keys(escape_interpolations(keys), str(path))
        adapter_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(adapter_type), adapter))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: not a malora-train adapter config ({err})") from err
    return adapter_cfg, config


def _flat_adapter_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter keys of a format-2 mixture config: those of its kind's config class."""
    kind = config["kind"]
    if kind not in ADAPTER_CONFIGS:
        raise ValueError(f"adapter.kind={kind!r} is not one of {', '.join(ADAPTER_CONFIGS)}")
    return {f.name: config[f.name] for f in dataclasses.fields(ADAPTER_CONFIGS[kind]) if f.name in config}


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, impl: str | None = None) -> AdaptedCausalLM:
    """Inject the saved adapter into a fresh ``base_model`` and load its tensors (strictly)."""
    adapter_cfg, _ = read_adapter_config(adapter_dir)
    if impl is not None:
        adapter_cfg = dataclasses.replace(adapter_cfg, impl=impl)
    model = AdaptedCausalLM.from_base(base_model, adapter_cfg)
    load_adapter_weights(model, adapter_dir)
    return model


def verify_adapter_files(adapter_dir: str | Path) -> None:
    """A run's final ``adapter/`` carries a ``manifest.json`` (size and sha256 of each file, as a checkpoint
    does): its files are checked against it, so a truncated, corrupted or zeroed file is an error naming it,
    never evaluated silently. A folder without one (a checkpoint's, checked as a whole; an adapter from
    elsewhere) is taken as it is."""
    if (Path(adapter_dir) / MANIFEST_FILE).is_file():
        verify_checkpoint(Path(adapter_dir))


@torch.no_grad()
def load_adapter_weights(model: AdaptedCausalLM, adapter_dir: str | Path) -> None:
    """Copy saved tensors into ``model``'s adapter parameters; every key and shape must match."""
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ConfigError(f"{weights_path}: adapter weights not found")
    verify_adapter_files(adapter_dir)
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"{weights_path}: cannot read adapter weights ({err})") from err
    expected = adapter_state_dict(model.model)
    expected_keys = {file_key(*k.rsplit(".", 1)): k for k in expected}
    missing = sorted(set(expected_keys) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_keys))
    if missing or unexpected:
        raise ConfigError(f"{weights_path}: tensors do not match the model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for saved_key, key in expected_keys.items():
        param = expected[key]
        value = tensors[saved_key]
        if value.shape != param.shape:
            raise ConfigError(f"{weights_path}: {saved_key} has shape {tuple(value.shape)}, "
                              f"the model expects {tuple(param.shape)}")
        param.copy_(value)


@torch.no_grad()
def merge_lora(model: AdaptedCausalLM) -> nn.Module:
    """Fold ``(alpha/r) B A`` into each base weight and return the plain model (adapters removed)."""
    if not adapter_class(model.adapter_cfg.kind).mergeable:
        raise ConfigError(f"export=merged needs adapter.kind=lora; {model.adapter_cfg.kind} routes per "
                          "token and cannot be merged into the base weights")
    base_model = model.model
    for name, layer in list(adapter_layers(base_model)):
        base = layer.base
        base.weight += layer.delta_weight().to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(base_model.get_submodule(parent_name) if parent_name else base_model, child, base)
    return base_model
