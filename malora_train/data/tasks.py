"""The task registry: which tasks a data config names, where each comes from, and start-up validation.

``build_tasks`` reads and checks everything before training starts, so a bad name, option, file or
record fails at once with a message naming the key, file, record and field.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from malora_train.config import DataConfig
from malora_train.data.bigbench import available_bigbench_tasks, load_bigbench_task
from malora_train.data.commonsense import COMMONSENSE_LABELS, load_llm_adapters_task
from malora_train.data.custom import check_custom_tasks, load_custom_task
from malora_train.data.hub import load_hub_task
from malora_train.data.mixture import check_mixture_options
from malora_train.data.rendering import RawTask, check_template, choose_template, prompt_renderer, render_task
from malora_train.data.splits import holdout_split, stable_subset
from malora_train.data.synthetic import (
    DEFAULT_EVAL_PER_TASK,
    DEFAULT_TRAIN_PER_TASK,
    SYNTHETIC_TASKS,
    generate_task,
)
from malora_train.data.types import TaskData
from malora_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "llm_adapters", "hub", "bigbench", "custom")
EVAL_SPLITS = ("test", "validation")  # data.eval_split


def known_tasks(cfg: DataConfig) -> list[str]:
    """Every task the configured source offers, in its default order."""
    if cfg.source == "synthetic":
        return list(SYNTHETIC_TASKS)
    if cfg.source in ("llm_adapters", "hub"):
        return list(COMMONSENSE_LABELS)
    if cfg.source == "custom":
        return [task.name for task in cfg.custom_tasks]
    return available_bigbench_tasks(cfg)


def selected_tasks(cfg: DataConfig) -> list[str]:
    names = list(cfg.tasks)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.tasks lists {', '.join(repeated)} more than once")
    if cfg.source == "bigbench" and names:
        return names  # any fetched task; a missing one fails when it is read, naming the fetch command
    known = known_tasks(cfg)
    for name in names:
        if name not in known:
            raise ConfigError(f"data.tasks: unknown task {name!r} for data.source={cfg.source}; "
                              f"known tasks: {', '.join(known) or 'none'}")
    if not (names or known):
        raise ConfigError(f"data.source={cfg.source} has no tasks (data.custom_tasks is empty)")
    return names or known


def check_options(cfg: DataConfig) -> None:
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source={cfg.source!r} is not one of {', '.join(SOURCES)}")
    check_template(cfg.prompt_template, cfg.prompt_template_fallback)
    if not 0 < cfg.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} must lie strictly between 0 and 1")
    if not 0 <= cfg.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction={cfg.validation_fraction} must be in [0, 1)")
    if cfg.eval_split not in EVAL_SPLITS:
        raise ConfigError(f"data.eval_split={cfg.eval_split!r} is not one of {', '.join(EVAL_SPLITS)}")
    if cfg.eval_split == "validation" and cfg.validation_fraction == 0:
        raise ConfigError("data.eval_split=validation needs a validation split: set data.validation_fraction "
                          "(e.g. 0.1)")
    for key in ("train_per_task", "eval_per_task"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value} must be >= 1 (or null for no cap)")
    if cfg.max_length < 8:
        raise ConfigError(f"data.max_length={cfg.max_length} must be at least 8 tokens")
    if cfg.custom_tasks and cfg.source != "custom":
        raise ConfigError(f"data.custom_tasks is set but data.source={cfg.source}; use data.source=custom")
    if cfg.source == "custom":
        check_custom_tasks(cfg)


def _loader(cfg: DataConfig, seed: int) -> Callable[[str], RawTask]:
    if cfg.source == "synthetic":
        train = cfg.train_per_task or DEFAULT_TRAIN_PER_TASK
        evaluation = cfg.eval_per_task or DEFAULT_EVAL_PER_TASK
        return lambda name: generate_task(name, train, evaluation, seed)
    if cfg.source == "llm_adapters":
        return lambda name: load_llm_adapters_task(name, cfg)
    if cfg.source == "hub":
        return lambda name: load_hub_task(name, cfg)
    if cfg.source == "bigbench":
        return lambda name: load_bigbench_task(name, cfg)
    custom = {task.name: task for task in cfg.custom_tasks}
    return lambda name: load_custom_task(custom[name], cfg)


def _capped(raw: RawTask, cfg: DataConfig) -> RawTask:
    """Apply data.train_per_task / data.eval_per_task to read tasks (synthetic ones are generated to size)."""
    if cfg.source == "synthetic":
        return raw

    def cap(pairs: list[tuple[str, ...]], limit: int | None, split: str) -> list[tuple[str, ...]]:
        return stable_subset(pairs, [pair[0] for pair in pairs], limit, salt=f"cap:{raw.name}:{split}")

    return dataclasses.replace(raw, train=cap(raw.train, cfg.train_per_task, "train"),
                               eval=cap(raw.eval, cfg.eval_per_task, "eval"))


def validation_split(raw: RawTask, fraction: float) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(train, validation): ``ceil(fraction x n)`` of the task's training examples held out, chosen by a hash
    of their instruction salted with the task's name (the same examples in every run, seed and machine; one
    instruction seen twice lands on one side)."""
    return holdout_split(raw.train, [pair[0] for pair in raw.train], fraction, salt=f"validation:{raw.name}")


def _split(raw: RawTask, cfg: DataConfig) -> RawTask:
    """``data.validation_fraction``: the validation examples leave the training split; with
    ``data.eval_split=validation`` they are what evaluation scores instead of the test split."""
    if cfg.validation_fraction == 0:
        return raw
    train, validation = validation_split(raw, cfg.validation_fraction)
    scored = validation if cfg.eval_split == "validation" else raw.eval
    return dataclasses.replace(raw, train=train, eval=scored)


def warn_overlap(raw: RawTask) -> None:
    """One warning for a task whose evaluation examples repeat training instructions: their score measures
    memory, not generalisation (an evaluation file that is the training file gives 100%)."""
    seen = {pair[0] for pair in raw.train}
    repeated = sum(pair[0] in seen for pair in raw.eval)
    if repeated:
        log.warning("task %s: %d of %d evaluation examples repeat a training example's instruction; their "
                    "accuracy measures memory, not generalisation (give the task a separate evaluation set)",
                    raw.name, repeated, len(raw.eval))


def read_tasks(cfg: DataConfig, seed: int) -> dict[str, RawTask]:
    """Ordered task name -> RawTask as read, capped and split (``data.validation_fraction``), before the
    prompt template (``build_tasks``'s data).

    Raises ConfigError for a bad option or unknown task name, DataError for a missing file, a malformed
    record (the message names file, record/line and field) or an empty task. Warns once per task whose
    evaluation examples repeat training ones (``warn_overlap``).
    """
    check_options(cfg)
    names = selected_tasks(cfg)
    check_mixture_options(names, cfg.sampling, cfg.temperature, cfg.task_weights, cfg.task_caps)
    load = _loader(cfg, seed)
    tasks = {}
    for name in names:
        raw = _split(_capped(load(name), cfg), cfg)
        for split, pairs in (("training", raw.train), ("evaluation", raw.eval)):
            if not pairs:
                raise DataError(f"task {name} (data.source={cfg.source}) has no {split} examples")
        warn_overlap(raw)
        tasks[name] = raw
    return tasks


def build_tasks(cfg: DataConfig, seed: int, tokenizer=None) -> dict[str, TaskData]:
    """Ordered task name -> TaskData (train and eval splits), everything validated at start-up.
    ``tokenizer`` (the model's) is needed by ``data.prompt_template=chat`` and picks the template of
    ``auto`` (``choose_template``); errors as ``read_tasks``.
    """
    prompt = prompt_renderer(choose_template(cfg.prompt_template, cfg.prompt_template_fallback, tokenizer),
                             tokenizer)
    return {name: render_task(raw, prompt) for name, raw in read_tasks(cfg, seed).items()}
