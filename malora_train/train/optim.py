"""The optimiser over the adapter tensors (``trainer.optimizer``: AdamW by default, or any ``torch.optim``
class) and the learning-rate schedule (any of ``transformers.get_scheduler``'s)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import SchedulerType, get_scheduler

from malora_train.config import TrainerConfig
from malora_train.errors import ConfigError


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class ``trainer.optimizer`` names (any case: ``adamw``, ``SGD``)."""
    classes = {cls.__name__.lower(): cls for cls in vars(torch.optim).values()
               if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
               and cls not in (torch.optim.Optimizer, torch.optim.LBFGS)}  # LBFGS steps with a closure
    if name.lower() not in classes:
        raise ConfigError(f"trainer.optimizer={name!r} is not a torch.optim optimizer; choose one of "
                          f"{', '.join(sorted(c.__name__ for c in classes.values()))}")
    return classes[name.lower()]


def _optimizer_arguments(cls: type[torch.optim.Optimizer], trainer: TrainerConfig) -> dict:
    """``trainer.betas``/``eps`` where ``cls`` takes them, then ``trainer.optimizer_kwargs`` (refused, naming
    the key, where ``cls`` does not take one)."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in (("betas", tuple(trainer.betas)), ("eps", trainer.eps))
              if key in accepted}
    for key, value in trainer.optimizer_kwargs.items():
        if key not in accepted or key in ("params", "lr"):
            raise ConfigError(f"trainer.optimizer_kwargs.{key}: {cls.__name__} takes no argument {key!r} "
                              "here")
        kwargs[key] = value
    return kwargs


def build_optimizer(model: nn.Module, trainer: TrainerConfig, fused: bool = False,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """``trainer.optimizer`` (AdamW by default) with weight decay on matrices (adapter and router weights),
    none on vectors (norms, biases). ``fused``: one kernel for every tensor, where the optimiser has one.
    ``capturable`` (CUDA graphs): the learning rate is a device tensor the schedule fills in place, and
    the step runs without reading anything on the host."""
    if trainer.lr <= 0:
        raise ConfigError(f"trainer.lr={trainer.lr} must be > 0")
    scaled = router_weights(model)  # id -> lr scale (adapter.router.lr_scale), only where it is not 1
    decay, no_decay, routers = [], [], {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in scaled:
            routers.setdefault(scaled[id(param)], []).append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay and not routers:
        raise ConfigError("the model has no trainable parameters: check adapter.target_modules")
    groups = [{"params": decay, "weight_decay": trainer.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # the routers at lr x scale: the schedule multiplies each group's own lr, so the ratio holds at every step
    groups += [{"params": params, "weight_decay": trainer.weight_decay, "lr": trainer.lr * scale}
               for scale, params in routers.items()]
    # fused: one kernel updates every tensor (the for-each default launches kernels per tensor; BENCHMARKS.md)
    device = next(iter(decay or no_decay or next(iter(routers.values())))).device
    cls = optimizer_class(trainer.optimizer)
    kwargs = _optimizer_arguments(cls, trainer)
    accepted = inspect.signature(cls.__init__).parameters
    if capturable and "capturable" not in accepted:
        raise ConfigError(f"trainer.optimizer={trainer.optimizer} cannot step inside a captured CUDA graph; "
                          "set trainer.cuda_graphs=false")
    if "fused" in accepted:
        kwargs.setdefault("fused", fused or None)
    if "capturable" in accepted:
        kwargs.setdefault("capturable", capturable and device.type == "cuda")
    lr = torch.tensor(trainer.lr, device=device) if capturable else trainer.lr
    if capturable:
        for group in groups[1:]:
            if "lr" in group:
                group["lr"] = torch.tensor(group["lr"], device=device)
    try:
        return cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"trainer.optimizer={trainer.optimizer} with {kwargs}: {err}") from err


def router_weights(model: nn.Module) -> dict[int, float]:
    """id of each router weight whose layer has ``adapter.router.lr_scale`` other than 1 -> that scale.
    With scale 1 the routers stay in the decayed group, so a run's param groups (and its checkpoints) are
    what they were before the setting existed."""
    found = {}
    for module in model.modules():
        scale = getattr(module, "router_lr_scale", None)
        router = getattr(module, "router", None)
        if scale is not None and scale != 1 and isinstance(router, nn.Parameter):
            found[id(router)] = float(scale)
    return found


def check_optimizer(trainer: TrainerConfig) -> None:
    """``trainer.optimizer`` and its arguments, tried on a throwaway tensor before anything is loaded."""
    build_optimizer(nn.Linear(2, 2, bias=False), trainer)


# schedules that step on a validation metric (``scheduler.step(metric)``): the loop steps once per update
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def schedule_names() -> list[str]:
    """The ``transformers.get_scheduler`` names this loop can drive."""
    return [kind.value for kind in SchedulerType if kind.value not in METRIC_SCHEDULES]


def build_scheduler(optimizer: torch.optim.Optimizer, trainer: TrainerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler(trainer.lr_scheduler)`` with ``ceil(warmup_ratio x steps)`` warm-up steps
    and ``trainer.lr_scheduler_kwargs`` (e.g. ``num_cycles``, ``power``, ``min_lr_rate``,
    ``num_decay_steps``)."""
    name = trainer.lr_scheduler
    if name not in schedule_names():
        why = " (it steps on a validation metric)" if name in METRIC_SCHEDULES else ""
        raise ConfigError(f"trainer.lr_scheduler={name!r} is not supported{why}; choose one of "
                          f"{', '.join(schedule_names())}")
    if not 0 <= trainer.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={trainer.warmup_ratio} must be in [0, 1)")
    kwargs = dict(trainer.lr_scheduler_kwargs)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(trainer.warmup_ratio * total_steps),
                             num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"trainer.lr_scheduler={name} with trainer.lr_scheduler_kwargs={kwargs}: "
                          f"{err}") from err


def check_schedule(trainer: TrainerConfig) -> None:
    """``trainer.lr_scheduler``, ``trainer.lr_scheduler_kwargs`` and ``trainer.warmup_ratio`` as
    ``build_scheduler`` takes them, tried on a throwaway optimiser before anything is loaded: an unknown
    name, a missing or misspelt argument fails in a second instead of after the model has loaded."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    build_scheduler(optimizer, trainer, max(trainer.max_steps, 10))


def total_steps(trainer: TrainerConfig, batches_for_epochs: Callable[[float], int]) -> int:
    """``trainer.max_steps`` when set, else the optimiser steps that draw ``trainer.epochs`` passes over the
    training examples (``batches_for_epochs(epochs)`` micro-batches, ``grad_accum`` a step)."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    if trainer.epochs <= 0:
        raise ConfigError("set trainer.max_steps > 0 or trainer.epochs > 0")
    return max(1, math.ceil(batches_for_epochs(trainer.epochs) / trainer.grad_accum))
