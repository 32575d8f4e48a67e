"""Adapter layers (LoRA, MoLoRA, MALoRA, HydraLoRA), their injection into a model, and their files.

Adding an adapter kind (PEFT's ``tuners/<method>/`` folders are the model: config, layer, registration):

1. Give it a config class in ``malora_train/config.py``, deriving from ``AdapterConfig`` (one low-rank
   delta) or ``MixtureConfig`` (experts behind the top-K router): its ``kind``, its own keys, each with a
   comment (the ``--help`` description), their checks in ``validate`` (errors name the key), and
   ``effective_rank`` when the kind sizes its experts itself (MALoRA from λ); list it in ``ADAPTER_CONFIGS``.
   A key only another kind reads is then unknown to it.
2. Write ``adapters/<kind>.py`` with a layer class deriving from ``AdapterLinear`` or
   ``MixtureAdapterLinear``, built from that config (``__init__(base, cfg[, context])``). Set ``kind`` (the
   ``adapter.kind`` value) and ``tensor_kinds`` (its trainable tensors, for the parameter report and the
   saved file), create the tensors with ``param_factory`` and initialise them in ``reset_parameters``.
3. Say what it computes: ``reference_delta`` (or, for mixtures, ``rank_space``/``expert_forward`` and
   the fast-path hooks ``down_projection``/``coeff_projection``/``shared_down``), plus
   ``delta_weight`` if it can be merged into W0.
4. Decorate the class with ``@register_adapter`` and import the module below; add ``conf/adapter/<kind>.yaml``
   (its defaults list starts from ``/schema/adapter/<kind>``, the config class).
   Injection, the CLI, ``scripts/bench.py`` and the tests iterate over ``ADAPTER_CLASSES``, so the new kind
   is trained, saved, benchmarked and tested against the float64 reference without further edits.
"""

from malora_train.adapters import hydralora, lora, malora, molora  # noqa: F401  (registers the kinds)
from malora_train.adapters.adapted_lm import AdaptedCausalLM, AdaptedOutput
from malora_train.adapters.base import AdapterLinear, MixtureAdapterLinear, RoutingContext
from malora_train.adapters.inject import (
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    match_targets,
    parameter_report,
    remove_adapters,
)
from malora_train.adapters.io import (
    load_adapter,
    load_adapter_weights,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from malora_train.adapters.registry import ADAPTER_CLASSES, adapter_class, adapter_kinds, register_adapter

__all__ = [
    "ADAPTER_CLASSES",
    "AdaptedCausalLM",
    "AdaptedOutput",
    "AdapterLinear",
    "MixtureAdapterLinear",
    "RoutingContext",
    "adapter_class",
    "adapter_kinds",
    "adapter_layers",
    "adapter_state_dict",
    "inject_adapters",
    "load_adapter",
    "load_adapter_weights",
    "match_targets",
    "merge_lora",
    "parameter_report",
    "read_adapter_config",
    "register_adapter",
    "remove_adapters",
    "save_adapter",
]
