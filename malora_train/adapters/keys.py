"""Which ``adapter.*`` keys a config sets: the keys whose value differs from the schema default.

Every composed config carries every ``adapter.*`` key (the schema is the union of all kinds' settings),
so "set" cannot mean "present"; it means "not at the ``AdapterConfig`` default". A kind refuses the set
keys it does not read (``AdapterLinear.config_keys``): they would be silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from malora_train.config import AdapterConfig
from malora_train.errors import ConfigError


def _changed(value: Any, default: Any, prefix: str) -> dict[str, Any]:
    if dataclasses.is_dataclass(default):
        found: dict[str, Any] = {}
        for field in dataclasses.fields(default):
            found.update(_changed(getattr(value, field.name), getattr(default, field.name),
                                  f"{prefix}{field.name}."))
        return found
    return {} if value == default else {prefix.rstrip("."): value}


def changed_keys(cfg: AdapterConfig) -> dict[str, Any]:
    """``{dotted key: value}`` of every key of ``cfg`` that differs from its default (``router.top_k``...)."""
    return _changed(cfg, AdapterConfig(), "")


def owns(owned: tuple[str, ...], key: str) -> bool:
    """Whether ``key`` is one of ``owned`` or lies below one of them (``router`` owns ``router.top_k``)."""
    return any(key == name or key.startswith(name + ".") for name in owned)


def keep_owned(cfg: AdapterConfig, owned: tuple[str, ...]) -> AdapterConfig:
    """``cfg`` with every top-level key outside ``owned`` back at its default: one spec shared by several
    kinds (a test over every kind) narrowed to what one kind reads."""
    default = AdapterConfig()
    return dataclasses.replace(cfg, **{field.name: getattr(default, field.name) for field in dataclasses.fields(cfg)
                                       if field.name not in owned})


def reject_foreign_keys(cfg: AdapterConfig, owned: tuple[str, ...]) -> None:
    """A ConfigError naming every set key of ``cfg`` that the kind (reading only ``owned``) ignores."""
    foreign = {key: value for key, value in changed_keys(cfg).items() if not owns(owned, key)}
    if not foreign:
        return
    listed = ", ".join(f"adapter.{key}={value}" for key, value in foreign.items())
    verb = "does" if len(foreign) == 1 else "do"
    reads = ", ".join(f"{name}.*" if dataclasses.is_dataclass(getattr(cfg, name)) else name for name in owned)
    raise ConfigError(f"{listed} {verb} not apply to adapter.kind={cfg.kind} (its keys: {reads}); remove "
                      f"{'it' if len(foreign) == 1 else 'them'} or choose another adapter")


def reject_unused(cfg: AdapterConfig, keys: tuple[str, ...], reason: str) -> None:
    """A ConfigError if one of ``keys`` is set although ``reason`` makes it unused."""
    changed = changed_keys(cfg)
    unused = [f"adapter.{key}={changed[key]}" for key in keys if key in changed]
    if unused:
        verb = "has" if len(unused) == 1 else "have"
        pronoun = "it" if len(unused) == 1 else "them"
        raise ConfigError(f"{', '.join(unused)} {verb} no effect {reason}; remove {pronoun}")
