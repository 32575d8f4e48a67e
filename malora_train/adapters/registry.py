"""The adapter kinds by name (``adapter.kind``). Each kind's module registers its layer class with
``@register_adapter``; injection, the CLI, the benchmark and the tests look kinds up here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from malora_train.config import ADAPTER_CONFIGS
from malora_train.errors import ConfigError

if TYPE_CHECKING:
    from malora_train.adapters.base import AdapterLinear

ADAPTER_CLASSES: dict[str, type[AdapterLinear]] = {}


def register_adapter(cls: type[AdapterLinear]) -> type[AdapterLinear]:
    """Class decorator: make ``cls`` the layer of ``adapter.kind=<cls.kind>`` (whose config class
    ``malora_train.config.ADAPTER_CONFIGS`` lists)."""
    if not cls.kind or cls.kind in ADAPTER_CLASSES:
        raise ValueError(f"adapter kind {cls.kind!r} of {cls.__name__} is empty or registered twice")
    if cls.kind not in ADAPTER_CONFIGS:
        raise ValueError(f"adapter kind {cls.kind!r} of {cls.__name__} has no config class (ADAPTER_CONFIGS)")
    ADAPTER_CLASSES[cls.kind] = cls
    return cls


def adapter_class(kind: str) -> type[AdapterLinear]:
    if kind not in ADAPTER_CLASSES:
        raise ConfigError(f"adapter.kind={kind!r} is not one of {', '.join(ADAPTER_CLASSES)}")
    return ADAPTER_CLASSES[kind]


def adapter_kinds() -> list[str]:
    """Every registered kind, in registration order."""
    return list(ADAPTER_CLASSES)
