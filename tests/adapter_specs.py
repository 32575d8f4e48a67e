"""Adapter configs for tests that run one spec over several kinds."""

from __future__ import annotations

import dataclasses
from typing import Any

from malora_train.config import ADAPTER_CONFIGS, AdapterConfig


def kind_config(kind: str, **spec: Any) -> AdapterConfig:
    """The config of ``kind`` from a spec shared by several kinds: the keys the kind does not read are left
    out (LoRA has no experts or router, only MALoRA has ``shared_rank``)."""
    cls = ADAPTER_CONFIGS[kind]
    own = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in spec.items() if key in own})
