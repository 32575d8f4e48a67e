"""DeepSpeed's own checkpoint files (its optimizer shards and the trainable weights), saved by its engine
and loaded without unpickling: ``torch.load(weights_only=True)`` instead of DeepSpeed's
``weights_only=False``."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from malora_train.errors import ConfigError, DataError

DEEPSPEED_DIR = "deepspeed"  # the engine's folder inside a checkpoint
TAG = "state"  # the engine's name for its one checkpoint in that folder


def save_engine(engine: Any, folder: Path) -> None:
    """The engine's files under ``folder``; every rank calls it (each writes its shards)."""
    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=TAG, exclude_frozen_parameters=True)


def load_engine(engine: Any, folder: Path) -> None:
    """The weights and optimizer state ``save_engine`` wrote under ``folder`` back into the engine (the
    scheduler is the trainer's own); every rank calls it."""
    with weights_only_loads(engine):
        engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=TAG, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)


def _deepspeed_checkpoint_classes() -> list[type]:
    """The few DeepSpeed classes its ZeRO checkpoints hold besides tensors and plain data: rebuilt field by
    field by the weights-only unpickler, none of them runs code when loaded."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through ``torch.load(weights_only=True)``: a crafted
    ``*.pt`` file in a checkpoint is refused instead of running its code (DeepSpeed itself passes
    ``weights_only=False``)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()[0]
            raise DataError(f"{path}: refused to load it: it holds objects other than tensors and plain "
                            f"data, which could run code ({reason})") from None


@contextlib.contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """While DeepSpeed loads a checkpoint, its files are read without unpickling arbitrary objects."""
    if engine.load_universal_checkpoint():
        raise ConfigError("DeepSpeed universal checkpoints (checkpoint.load_universal in the DeepSpeed "
                          "config) load with pickle; resume from a checkpoint this trainer wrote instead")
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
