"""Adapter layers (LoRA, MoLoRA, MALoRA, HydraLoRA), their injection into a model, and their files."""

from malora_train.adapters.base import AdapterLinear, MixtureAdapterLinear, RoutingContext
from malora_train.adapters.inject import (
    ADAPTER_CLASSES,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    match_targets,
    parameter_report,
)
from malora_train.adapters.io import (
    load_adapter,
    load_adapter_weights,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from malora_train.adapters.model import IGNORE_INDEX, AdaptedCausalLM, AdaptedOutput

__all__ = [
    "ADAPTER_CLASSES",
    "IGNORE_INDEX",
    "AdaptedCausalLM",
    "AdaptedOutput",
    "AdapterLinear",
    "MixtureAdapterLinear",
    "RoutingContext",
    "adapter_layers",
    "adapter_state_dict",
    "inject_adapters",
    "load_adapter",
    "load_adapter_weights",
    "match_targets",
    "merge_lora",
    "parameter_report",
    "read_adapter_config",
    "save_adapter",
]
