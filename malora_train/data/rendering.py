"""How a task's (instruction, label) pairs become the prompts and targets the model trains on.

Every source (synthetic, LLM-Adapters JSON, hub, BIG-bench, custom files) produces a ``RawTask`` of
(instruction, label) pairs; ``render_task`` wraps each instruction in the chosen prompt template and
writes the target ``answer_prefix + label + answer_suffix``, so every task looks the same to training and
scoring. A custom task may give each pair a target of its own instead (a rationale before the answer).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from malora_train.data.chat import chat_renderer
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError

ANSWER_PREFIX = "the correct answer is "

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# The plain template keeps alpaca's answer cue, so text after "### Response:" is the answer in both.
PLAIN_TEMPLATE = "{instruction}\n### Response:\n"
PROMPT_TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "plain": PLAIN_TEMPLATE}
CHAT = "chat"  # the tokenizer's own chat template (data/chat.py)
TEMPLATE_NAMES = (*PROMPT_TEMPLATES, CHAT)


class Pair(NamedTuple):
    """One example as a source reads it; sources may give plain ``(instruction, label)`` tuples."""

    instruction: str
    label: str
    target: str | None = None  # the whole target when it is more than prefix + label + suffix (a rationale)


@dataclass
class RawTask:
    """A task as its source reads it, before caps and the prompt template are applied."""

    name: str
    labels: list[str]
    train: list[tuple[str, ...]] = field(default_factory=list)  # Pair fields: (instruction, label[, target])
    eval: list[tuple[str, ...]] = field(default_factory=list)
    answer_prefix: str = ANSWER_PREFIX
    answer_suffix: str = ""
    answer_type: str = "label"  # label | number | letter (data/answers.py)
    # instruction -> the text of its correct answer, where a label names only a position (BIG-bench shuffles
    # each example's choices, so its labels are near uniform while the answers' texts need not be)
    answers: dict[str, str] = field(default_factory=dict)


AUTO = "auto"  # data.prompt_template: chat when the tokenizer has a chat template, else the fallback


def check_template(name: str, fallback: str = "alpaca") -> None:
    """``data.prompt_template`` (auto or a template name) and ``data.prompt_template_fallback``."""
    if name not in (AUTO, *TEMPLATE_NAMES):
        raise ConfigError(f"data.prompt_template={name!r} is not one of {', '.join((AUTO, *TEMPLATE_NAMES))}")
    if fallback not in PROMPT_TEMPLATES:
        raise ConfigError(f"data.prompt_template_fallback={fallback!r} is not one of "
                          f"{', '.join(PROMPT_TEMPLATES)}")


def choose_template(name: str, fallback: str, tokenizer=None) -> str:
    """The template ``data.prompt_template=name`` gives with this tokenizer: auto follows the model, ``chat``
    when the tokenizer has a chat template (an instruct model's), else ``fallback``."""
    check_template(name, fallback)
    if name != AUTO:
        return name
    return CHAT if tokenizer is not None and getattr(tokenizer, "chat_template", None) else fallback


def prompt_renderer(name: str, tokenizer=None) -> Callable[[str], str]:
    """instruction -> prompt for the template ``name`` (alpaca | plain | chat; chat needs the tokenizer)."""
    if name not in TEMPLATE_NAMES:
        raise ConfigError(f"data.prompt_template={name!r} is not one of {', '.join(TEMPLATE_NAMES)}")
    if name == CHAT:
        return chat_renderer(tokenizer)
    template = PROMPT_TEMPLATES[name]
    return lambda instruction: template.replace("{instruction}", instruction)


def render_prompt(template: str, instruction: str, tokenizer=None) -> str:
    """``template`` is a template name (alpaca | plain | chat)."""
    return prompt_renderer(template, tokenizer)(instruction)


def label_pattern(labels: Sequence[str]) -> str:
    """A regex whose first match in generated text is a label; longest labels first, whole words only
    ("" for no labels: a number task's answers are open)."""
    if not labels:
        return ""
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    return rf"(?<!\w)(?:{alternatives})(?!\w)"


def choices_instruction(question: str, options: Sequence[str], kind: str = "answer",
                        separator: str = " ", block_gap: str = "\n\n") -> str:
    """LLM-Adapters multiple choice: question, "Answer1: .. Answer2: ..", "Answer format: answer1/answer2".

    ``kind`` names the labels (answer -> answer1.., option -> option1..); the label of option i is
    ``f"{kind}{i + 1}"``.
    """
    listed = separator.join(f"{kind.capitalize()}{i + 1}: {option}" for i, option in enumerate(options))
    answer_format = "/".join(f"{kind}{i + 1}" for i in range(len(options)))
    return f"{question}{block_gap}{listed}{block_gap}Answer format: {answer_format}"


def numbered_labels(kind: str, count: int) -> list[str]:
    return [f"{kind}{i + 1}" for i in range(count)]


def render_task(raw: RawTask, prompt: Callable[[str], str]) -> TaskData:
    """``prompt``: a ``prompt_renderer``."""
    pairs = {split: [Pair(*pair) for pair in getattr(raw, split)] for split in ("train", "eval")}

    def examples(split: str) -> list[Example]:
        return [
            Example(task=raw.name, prompt=prompt(pair.instruction),
                    target=pair.target if pair.target is not None
                    else raw.answer_prefix + pair.label + raw.answer_suffix, label=pair.label)
            for pair in pairs[split]
        ]

    per_example = any(pair.target is not None for split in pairs.values() for pair in split)
    return TaskData(name=raw.name, labels=list(raw.labels), answer_prefix=raw.answer_prefix,
                    label_pattern=label_pattern(raw.labels) if raw.answer_type == "label" else "",
                    train=examples("train"), eval=examples("eval"), answer_type=raw.answer_type,
                    answer_suffix=raw.answer_suffix, per_example_targets=per_example)
