"""malora-train: multi-task fine-tuning with LoRA, MoLoRA, MALoRA and HydraLoRA adapters.

The public Python API, all of it listed here (see README, "Use from Python"); every other module of the
package is internal and may change. Names load on first use, so ``import malora_train`` stays light.

- ``get_adapted_model(base_model, AdapterConfig(...))`` -> ``AdaptedModel``; ``load_adapted_model(base, dir)``
- ``AdapterConfig``, ``RouterConfig``: the dataclasses the CLI's ``adapter.*`` keys fill;
  ``load_adapter_config("malora" | path.yaml, **overrides)`` reads a ``conf/adapter`` preset or a YAML file
- ``AdaptedModel``: forward -> ``AdaptedModelOutput`` (``loss = lm_loss + aux_loss``), ``save_adapter``,
  ``merge_and_unload``, ``print_trainable_parameters``, ``recording_routing`` / ``routing_stats``
- ``adapter_kinds()``: the registered kinds; ``MaloraError`` / ``ConfigError``: what bad input raises
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdaptedModelOutput",
    "AdapterConfig",
    "ConfigError",
    "MaloraError",
    "RouterConfig",
    "adapter_kinds",
    "get_adapted_model",
    "load_adapted_model",
    "load_adapter_config",
]

_HOME = {  # the module each public name lives in
    "AdaptedModel": "malora_train.api",
    "AdaptedModelOutput": "malora_train.api",
    "get_adapted_model": "malora_train.api",
    "load_adapted_model": "malora_train.api",
    "load_adapter_config": "malora_train.api",
    "AdapterConfig": "malora_train.config",
    "RouterConfig": "malora_train.config",
    "adapter_kinds": "malora_train.adapters",
    "MaloraError": "malora_train.errors",
    "ConfigError": "malora_train.errors",
}

if TYPE_CHECKING:
    from malora_train.adapters import adapter_kinds
    from malora_train.api import (
        AdaptedModel,
        AdaptedModelOutput,
        get_adapted_model,
        load_adapted_model,
        load_adapter_config,
    )
    from malora_train.config import AdapterConfig, RouterConfig
    from malora_train.errors import ConfigError, MaloraError


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'malora_train' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
