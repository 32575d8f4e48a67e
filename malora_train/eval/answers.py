"""Reading the answer out of a generated text, by the task's ``answer_type``, and judging it.

``label``   the first match of the task's label pattern (LLM-Adapters' commonsense protocol);
``number``  the last number, commas removed (LLM-Adapters' math protocol: a rationale comes first),
            correct when within ``tolerance`` of the gold number;
``letter``  the last standalone capital letter among the task's labels (A-E), so that "A" in
            "Answer" or in a rationale's "A train leaves ..." before "the answer is C" is not taken.
"""

from __future__ import annotations

import re

from malora_train.data.answers import parse_number
from malora_train.data.types import TaskData
from malora_train.errors import DataError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def compile_label_pattern(task: TaskData) -> re.Pattern:
    try:
        return re.compile(task.label_pattern)
    except re.error as err:
        raise DataError(f"task {task.name}: label_pattern {task.label_pattern!r} is not a valid regex: "
                        f"{err}") from err


def extract_label(pattern: re.Pattern, text: str) -> str:
    """The first match of ``pattern`` in ``text`` (its first group if it has groups); "" if none."""
    match = pattern.search(text)
    if match is None:
        return ""
    return (match.group(1) if pattern.groups else match.group(0)) or ""


def extract_number(text: str) -> str:
    """The last number in ``text`` once commas are removed ("1,200.5" -> "1200.5"); "" if none."""
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else ""


def extract_letter(letters: list[str], text: str) -> str:
    """The last of ``letters`` that stands alone in ``text`` (not inside a word); "" if none."""
    alternatives = "|".join(re.escape(letter) for letter in letters)
    found = re.findall(rf"(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])", text)
    return found[-1] if found else ""


class AnswerReader:
    """Extracts and judges one task's answers (compiles its label pattern once)."""

    def __init__(self, task: TaskData, tolerance: float) -> None:
        self.task = task
        self.tolerance = tolerance
        self.pattern = compile_label_pattern(task) if task.answer_type == "label" else None

    def extract(self, text: str) -> str:
        if self.task.answer_type == "number":
            return extract_number(text)
        if self.task.answer_type == "letter":
            return extract_letter(self.task.labels, text)
        return extract_label(self.pattern, text)

    def is_correct(self, extracted: str, label: str) -> bool:
        if self.task.answer_type != "number":
            return extracted == label
        value, gold = parse_number(extracted), parse_number(label)
        return value is not None and gold is not None and abs(value - gold) <= self.tolerance
