"""The mixture kinds (MoLoRA, MALoRA, HydraLoRA) as PEFT methods, registered with PEFT's
``register_peft_method`` when ``peft`` is imported after (or before) ``import malora_train``.

Then ``get_peft_model(model, MALoRAPeftConfig(rank=4, ...))``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM.from_pretrained`` and ``save_pretrained`` work for every mixture kind. PEFT only
frames the adapter: the layers, their injection, the routers' auxiliary loss (``AdaptedModel``'s forward)
and the file layout are this package's own, so a folder written by PEFT is one ``load_adapted_model`` reads
and the other way round. A PEFT config holds the keys of its kind's config class (``malora_train.config``),
flat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from malora_train.adapters.inject import adapter_layers, adapter_state_dict, remove_adapters
from malora_train.adapters.io import KEY_PREFIX, adapter_metadata, file_key
from malora_train.config import ADAPTER_CONFIGS, AdapterConfig, MixtureConfig
from malora_train.errors import ConfigError

TASK_TYPE = "CAUSAL_LM"


def peft_type_name(kind: str) -> str:
    """The ``peft_type`` of adapter ``kind`` (``malora`` -> ``MALORA``)."""
    return kind.upper()


class MixturePeftConfig(PeftConfig):
    """The PEFT config of a mixture kind: PEFT's fields plus the keys of the kind's config class (made per
    kind below, e.g. ``MALoRAPeftConfig(rank=4, num_experts=4, router={"top_k": 1})``), checked when it is
    made. ``malora_train`` is the metadata the adapter's files carry (filled when the adapter is injected)."""

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(peft_type_name(self.kind))
        if self.task_type is None:
            self.task_type = TASK_TYPE
        adapter = self.adapter_config()  # a wrong key or value fails here, naming it
        if isinstance(adapter, MixtureConfig):
            self.router = dataclasses.asdict(adapter.router)  # every router key, as the files hold them

    def adapter_config(self) -> AdapterConfig:
        """This config's adapter as its kind's config class (what ``malora_train`` injects)."""
        keys = {f.name: getattr(self, f.name) for f in dataclasses.fields(ADAPTER_CONFIGS[self.kind])}
        if keys["kind"] != self.kind:
            raise ConfigError(f"adapter.kind={keys['kind']} is not the kind of {type(self).__name__}")
        if isinstance(keys.get("router"), dict):
            keys["router"] = dict(keys["router"])
        try:
            schema = OmegaConf.structured(ADAPTER_CONFIGS[self.kind])
            return OmegaConf.to_object(OmegaConf.merge(schema, keys))
        except OmegaConfBaseException as err:
            raise ConfigError(f"adapter.{err.full_key}: {str(err.msg).splitlines()[0]}") from None


def _peft_config_class(kind: str) -> type[MixturePeftConfig]:
    """A dataclass of PeftConfig's fields and those of ``kind``'s config class (a nested config, the router,
    as the plain dict the JSON file holds)."""
    fields = []
    for f in dataclasses.fields(ADAPTER_CONFIGS[kind]):
        if f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        elif dataclasses.is_dataclass(value := f.default_factory()):
            default = field(default_factory=lambda value=value: dataclasses.asdict(value))
        else:
            default = field(default_factory=f.default_factory)
        fields.append((f.name, Any, default))
    fields.append(("malora_train", dict, field(default_factory=dict)))
    name = ADAPTER_CONFIGS[kind].__name__.replace("Config", "PeftConfig")
    cls = dataclasses.make_dataclass(name, fields, bases=(MixturePeftConfig,), namespace={"kind": kind})
    cls.__module__ = __name__
    cls.__doc__ = (f"The PEFT config of adapter kind {kind}: PEFT's fields and the keys of "
                   f"{ADAPTER_CONFIGS[kind].__name__}.")
    return cls


class MixtureTuner(BaseTuner):
    """PEFT's tuner for a mixture kind: it injects the package's layers through ``AdaptedModel`` (whose
    forward adds the routers' auxiliary loss to ``outputs.loss``) and keeps the package's file keys
    (``base_model.model.<layer path>.<tensor>.weight``). One adapter per model."""

    kind: ClassVar[str] = ""
    prefix: str = ""
    tuner_layer_cls = nn.Module
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False,
                       state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from malora_train.api import AdaptedModel

        if "_adapted" in self.__dict__ or any(True for _ in adapter_layers(model)):
            raise ConfigError(f"{self.kind} through PEFT holds one adapter per model; {adapter_name!r} would "
                              "be a second (load it into a fresh base model)")
        config = self.peft_config[adapter_name]
        adapted = AdaptedModel(model, config.adapter_config())
        object.__setattr__(self, "_adapted", adapted)  # kept out of the module tree: its modules are model's
        config.malora_train = adapter_metadata(adapted.adapted_lm)
        self.targeted_module_names = list(adapted.adapted_lm.targets)
        if config.inference_mode:
            for param in adapter_state_dict(model).values():
                param.requires_grad_(False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the layers are injected by inject_adapter")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._adapted(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._adapted.generate(*args, **kwargs)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        pass  # AdaptedModel froze the base model

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        pass  # the adapter tensors are float32 already

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            raise NotImplementedError(f"{self.kind} adapters cannot be switched off in place; "
                                      "use the base model")

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            raise ConfigError(f"{self.kind} routes each token to its own experts and cannot be merged into "
                              "the base weights; unload() gives the base model back")
        return remove_adapters(self.model)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """The adapter tensors of ``state_dict`` (the PeftModel's: ``base_model.model.<path>.<tensor>``),
        keyed as the package's files key them."""
        keys = adapter_state_dict(model.get_base_model())
        return {file_key(*key.rsplit(".", 1)): state_dict[KEY_PREFIX + key] for key in keys
                if KEY_PREFIX + key in state_dict}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's keys as the PeftModel's; every tensor must be there, and nothing else."""
        expected = {file_key(*key.rsplit(".", 1)): KEY_PREFIX + key
                    for key in adapter_state_dict(model.get_base_model())}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ConfigError(f"{cls.kind} adapter: tensors do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        return {expected[key]: value for key, value in state_dict.items()}


PEFT_CONFIGS: dict[str, type[MixturePeftConfig]] = {}
PEFT_TUNERS: dict[str, type[MixtureTuner]] = {}
for _kind in ADAPTER_CONFIGS:
    if _kind != "lora":  # plain LoRA is PEFT's own LoraConfig
        PEFT_CONFIGS[_kind] = _peft_config_class(_kind)
        PEFT_TUNERS[_kind] = type(f"{ADAPTER_CONFIGS[_kind].__name__[:-6]}Tuner", (MixtureTuner,),
                                  {"kind": _kind, "prefix": f"{_kind}_", "__module__": __name__})
MoLoRAPeftConfig = PEFT_CONFIGS["molora"]
MALoRAPeftConfig = PEFT_CONFIGS["malora"]
HydraLoRAPeftConfig = PEFT_CONFIGS["hydralora"]


def _add_peft_type(name: str) -> None:
    """Add member ``name`` to PEFT's ``PeftType`` enum (``register_peft_method`` takes only the names it
    lists; this is what a method inside PEFT adds to the enum's source)."""
    if name in PeftType._value2member_map_:
        return
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)


def register() -> None:
    """Register every mixture kind with PEFT (once)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for kind, config_cls in PEFT_CONFIGS.items():
        name = peft_type_name(kind)
        _add_peft_type(name)
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType(name)) is config_cls:
            continue
        register_peft_method(name=kind, config_cls=config_cls, model_cls=PEFT_TUNERS[kind])
