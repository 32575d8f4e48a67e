"""Adapter layers (LoRA, MoLoRA, MALoRA, HydraLoRA), their injection into a model, and their files.

Adding an adapter kind (PEFT's ``tuners/<method>/`` folders are the model: config, layer, registration):

1. Write ``adapters/<kind>.py`` with a layer class deriving from ``AdapterLinear`` (one low-rank delta)
   or ``MixtureAdapterLinear`` (experts behind the top-K router). Set ``kind`` (the ``adapter.kind``
   value) and ``tensor_kinds`` (its trainable tensors, for the parameter report and the saved file),
   create the tensors with ``param_factory`` and initialise them in ``reset_parameters``.
2. Own its configuration: list the ``adapter.*`` keys it adds in ``config_keys`` (any other key set away
   from its default is refused, naming it), override ``expert_rank_of`` when the kind sizes its experts
   itself (MALoRA from λ), extend ``layer_kwargs`` to validate and pass its own keys (errors name the
   key), and ``apply_freezing`` for its ablation switches.
3. Say what it computes: ``reference_delta`` (or, for mixtures, ``rank_space``/``expert_forward`` and
   the fast-path hooks ``down_projection``/``coeff_projection``/``shared_down``), plus
   ``delta_weight`` if it can be merged into W0.
4. Decorate the class with ``@register_adapter`` and import the module below; add ``conf/adapter/<kind>.yaml``.
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
    layer_kwargs,
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
    "layer_kwargs",
    "load_adapter",
    "load_adapter_weights",
    "match_targets",
    "merge_lora",
    "parameter_report",
    "read_adapter_config",
    "register_adapter",
    "save_adapter",
]
