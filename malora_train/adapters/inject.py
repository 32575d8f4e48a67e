"""Put adapters into a model: match target linear layers, freeze everything else, and report parameters."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from torch import nn

from malora_train.adapters.base import AdapterLinear, RoutingContext
from malora_train.adapters.registry import adapter_class
from malora_train.adapters.shared_input import group_shared_inputs
from malora_train.config import AdapterConfig
from malora_train.errors import ConfigError


def _describe_targets(target_modules: Any) -> str:
    return target_modules if isinstance(target_modules, str) else "[" + ",".join(target_modules) + "]"


def match_targets(model: nn.Module, target_modules: Any) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by PEFT's rules: a list of name suffixes, a regex
    (full match on the module name), or ``all-linear`` (every linear layer but the output head)."""
    linear_names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in linear_names if model.get_submodule(n) is not head]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ConfigError(f"adapter.target_modules={target_modules!r} "
                              f"is not a valid regex: {err}") from err
        names = [n for n in linear_names if pattern.fullmatch(n)]
    else:
        suffixes = [str(s) for s in target_modules]
        names = [n for n in linear_names if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        known = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ConfigError(
            f"adapter.target_modules={_describe_targets(target_modules)} matches no linear layer; "
            f"this model's linear layers end in: {', '.join(known)}"
        )
    return names


def inject_adapters(model: nn.Module, cfg: AdapterConfig, context: RoutingContext | None = None) -> list[str]:
    """Freeze ``model`` and replace each target linear layer by its adapted version (built from ``cfg``, the
    config of its kind), in place."""
    cls = adapter_class(cfg.kind)
    routing = {"context": context} if cls.routed else {}
    names = match_targets(model, cfg.target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = cls(getattr(parent, child), cfg, **routing)
        setattr(parent, child, layer)
        layers.append(layer)
    if cfg.shared_input:
        group_shared_inputs(zip(names, layers))
    assign_dropout_salts(layers)
    return names


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo ``inject_adapters`` in place: each adapted layer's frozen linear goes back where it was (the
    adapter tensors leave with the adapted layers). Returns ``model``."""
    for name, layer in list(adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model


def assign_dropout_salts(layers: list[AdapterLinear]) -> None:
    """A distinct salt per layer, in order, a shared-input group's members consecutive from its first (the
    group's kernel salts member g as its first member's salt + g)."""
    salted: set[int] = set()
    salt = 0
    for layer in layers:
        if id(layer) in salted:
            continue
        for member in layer.input_group.members if layer.input_group is not None else [layer]:
            member.dropout_salt = salt
            salted.add(id(member))
            salt += 1


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, Any]:
    """Adapter tensors only, keyed ``<layer path>.<tensor name>`` (frozen ablation tensors included)."""
    state = {}
    for name, layer in adapter_layers(model):
        for tensor_name in layer.tensor_kinds:
            state[f"{name}.{tensor_name}"] = getattr(layer, tensor_name)
    return state


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Trainable/total parameter counts, with ``percent`` = trainable / base-model parameters (the
    paper's convention), and breakdowns by adapted module type and by tensor kind."""
    adapter_ids = set()
    by_module: dict[str, int] = defaultdict(int)
    by_tensor: dict[str, int] = defaultdict(int)
    for name, layer in adapter_layers(model):
        module_type = name.rsplit(".", 1)[-1]
        for tensor_name, tensor_kind in layer.tensor_kinds.items():
            param = getattr(layer, tensor_name)
            adapter_ids.add(id(param))
            if param.requires_grad:
                by_module[module_type] += param.numel()
                by_tensor[tensor_kind] += param.numel()
    total = sum(p.numel() for p in model.parameters())
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable": trainable,
        "total": total,
        "base": base,
        "percent": 100.0 * trainable / base if base else 0.0,
        "by_module": dict(by_module),
        "by_tensor": dict(by_tensor),
        "adapted_layers": sum(1 for _ in adapter_layers(model)),
    }
