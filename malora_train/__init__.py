"""malora-train: multi-task fine-tuning with LoRA, MoLoRA, MALoRA and HydraLoRA adapters.

The public Python API, all of it listed here (see README, "Use from Python"); every other module of the
package is internal and may change. Names load on first use, so ``import malora_train`` stays light.

- ``get_adapted_model(base_model, AdapterConfig(...))`` -> ``AdaptedModel``; ``load_adapted_model(base, dir)``
- ``AdapterConfig``, ``RouterConfig``: the dataclasses the CLI's ``adapter.*`` keys fill;
  ``load_adapter_config("malora" | path.yaml, **overrides)`` reads a ``conf/adapter`` preset or a YAML file
- ``AdaptedModel``: forward -> ``AdaptedModelOutput`` (``loss = lm_loss + aux_loss``), ``save_adapter``,
  ``merge_and_unload``, ``print_trainable_parameters``, ``recording_routing`` / ``routing_stats``
- ``adapter_kinds()``: the registered kinds; ``MaloraError`` / ``ConfigError``: what bad input raises
- ``AdapterTrainer`` (``transformers.Trainer``) and the ``AdapterSaving`` mixin (for a subclass of it): its
  ``save_model()`` and checkpoints of an ``AdaptedModel`` hold a complete adapter folder
- ``MoLoRAPeftConfig``, ``MALoRAPeftConfig``, ``HydraLoRAPeftConfig``: the mixture kinds as PEFT methods
  (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``): importing this package
  registers them with PEFT as soon as ``peft`` is imported, without importing it itself
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdaptedModelOutput",
    "AdapterConfig",
    "AdapterSaving",
    "AdapterTrainer",
    "ConfigError",
    "HydraLoRAPeftConfig",
    "MALoRAPeftConfig",
    "MaloraError",
    "MoLoRAPeftConfig",
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
    "AdapterSaving": "malora_train.hf_trainer",
    "AdapterTrainer": "malora_train.hf_trainer",
    "AdapterConfig": "malora_train.config",
    "RouterConfig": "malora_train.config",
    "adapter_kinds": "malora_train.adapters",
    "MaloraError": "malora_train.errors",
    "ConfigError": "malora_train.errors",
    "MoLoRAPeftConfig": "malora_train.peft_method",
    "MALoRAPeftConfig": "malora_train.peft_method",
    "HydraLoRAPeftConfig": "malora_train.peft_method",
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
    from malora_train.hf_trainer import AdapterSaving, AdapterTrainer
    from malora_train.peft_method import HydraLoRAPeftConfig, MALoRAPeftConfig, MoLoRAPeftConfig


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'malora_train' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def _register_with_peft() -> None:
    try:
        importlib.import_module("malora_train.peft_method").register()
    except Exception as err:  # an incompatible PEFT must not break the user's own import of it
        warnings.warn(f"malora-train: the mixture kinds are not registered with PEFT ({err})", stacklevel=2)


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Registers the mixture kinds with PEFT once ``import peft`` has run (peft takes seconds to import, so
    ``import malora_train`` does not import it). A look-up alone (``importlib.util.find_spec("peft")``, as
    transformers does to see whether PEFT is installed) leaves the finder in place for the real import."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "peft":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_with_peft()

        spec.loader.exec_module = exec_then_register
        return spec

if "peft" in sys.modules:
    _register_with_peft()
elif not any(isinstance(finder, _RegisterAfterPeftImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeftImport())
