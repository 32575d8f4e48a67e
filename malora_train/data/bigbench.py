"""Multiple-choice BIG-bench tasks read from ``<data.root>/<task>/task.json`` (``scripts/fetch_bigbench.py``).

A task's file holds ``examples`` with ``input`` and ``target_scores`` (choice -> score, the best is correct);
a task split into subtasks has one more ``task.json`` per subtask folder, and all of them are used (a choice
set repeated across subtasks is kept once). The choices are shuffled per example with a hash of its text
(BIG-bench often lists the correct one first), rendered in the LLM-Adapters style, and the examples are
split into train/eval deterministically with ``data.eval_fraction``.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

from malora_train.config import DataConfig
from malora_train.data.records import read_json
from malora_train.data.rendering import RawTask, choices_instruction, numbered_labels
from malora_train.data.splits import holdout_split
from malora_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)
QUESTION = "Please choose the correct answer to the question: "


def bigbench_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError("data.root must name the BIG-bench cache folder for data.source=bigbench "
                          "(scripts/fetch_bigbench.py writes ~/.cache/malora-train/bigbench)")
    return Path(cfg.root).expanduser()


def available_bigbench_tasks(cfg: DataConfig) -> list[str]:
    root = bigbench_root(cfg)
    tasks = sorted(p.parent.name for p in root.glob("*/task.json")) if root.is_dir() else []
    if not tasks:
        raise DataError(f"no <task>/task.json under data.root={root}: run scripts/fetch_bigbench.py "
                        f"--cache-dir {root} first, or list tasks in data.tasks")
    return tasks


def _task_sections(name: str, root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file, parsed task.json) for the task itself or, if it has no examples, each of its subtasks."""
    task_file = root / name / "task.json"
    if not task_file.is_file():
        raise DataError(f"{task_file} not found: run python scripts/fetch_bigbench.py --tasks {name} "
                        f"--cache-dir {root}")
    content = read_json(task_file)
    if isinstance(content, dict) and content.get("examples"):
        sections = [(task_file, content)]
    else:
        sections = [(path, read_json(path)) for path in sorted(root.glob(f"{name}/*/task.json"))]
        if not sections:
            raise DataError(f"{task_file} has no examples and {root / name} has no subtask folders")
    for path, section in sections:
        if not isinstance(section, dict) or not isinstance(section.get("examples"), list):
            raise DataError(f"{path}: expected an object with an 'examples' list")
    return sections


def _choices(example: Any, where: str) -> list[tuple[str, float]]:
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected an object, got {type(example).__name__}")
    scores = example.get("target_scores")
    if not isinstance(scores, dict):
        raise DataError(f"{where}: field 'target_scores' is missing or not an object (is the task multiple "
                        "choice?)")
    choices = []
    for text, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{where}: field 'target_scores' gives {text!r} the score {score!r}, "
                            "not a number")
        choices.append((text.strip(), float(score)))
    if len(choices) < 2:
        raise DataError(f"{where}: field 'target_scores' needs at least two choices")
    return choices


def load_bigbench_task(name: str, cfg: DataConfig) -> RawTask:
    root = bigbench_root(cfg)
    pairs: list[tuple[str, str]] = []
    keys: list[str] = []
    answers: dict[str, str] = {}
    seen: set[str] = set()
    skipped_ties = max_choices = 0
    for path, content in _task_sections(name, root):
        prefix = content.get("task_prefix") or ""
        if not isinstance(prefix, str):
            raise DataError(f"{path}: field 'task_prefix' must be text")
        for number, example in enumerate(content["examples"], start=1):
            where = f"{path} example {number}"
            choices = _choices(example, where)
            text = example.get("input", "")
            if not isinstance(text, str):
                raise DataError(f"{where}: field 'input' must be text")
            key = "\0".join([text.strip(), *sorted(choice for choice, _ in choices)])
            if key in seen:  # the same item in another subtask's wording
                continue
            seen.add(key)
            question = " ".join(part.strip() for part in (prefix, text) if part.strip())
            if not question:
                raise DataError(f"{where}: field 'input' is empty and the task has no 'task_prefix'")
            best = max(score for _, score in choices)
            if sum(score == best for _, score in choices) > 1:
                skipped_ties += 1
                continue
            random.Random(f"bigbench:{name}:{key}").shuffle(choices)
            correct = next(i for i, (_, score) in enumerate(choices) if score == best)
            instruction = choices_instruction(QUESTION + question, [choice for choice, _ in choices])
            pairs.append((instruction, f"answer{correct + 1}"))
            answers[instruction] = choices[correct][0]
            keys.append(key)
            max_choices = max(max_choices, len(choices))
    if skipped_ties:
        log.warning("bigbench task %s: skipped %d examples with several best-scored choices",
                    name, skipped_ties)
    if not pairs:
        raise DataError(f"BIG-bench task {name} under {root} has no usable examples")
    train, evaluation = holdout_split(pairs, keys, cfg.eval_fraction, salt=f"holdout:{name}")
    return RawTask(name=name, labels=numbered_labels("answer", max_choices), train=train, eval=evaluation,
                   answers=answers)
