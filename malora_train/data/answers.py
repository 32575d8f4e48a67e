"""The kinds of answer a task can have (``answer_type``) and reading a gold answer of each kind.

``label``   a closed label set (answer1.., true/false): the default of every built-in source.
``number``  an open numeric answer (math word problems, e.g. "18", "1,200", "576.0"): no label set;
            scored by the LLM-Adapters math protocol (the last number in the generation, commas removed,
            compared as a float within ``eval.number_tolerance``).
``letter``  multiple choice answered by a capital letter (A-E, e.g. AQuA).
"""

from __future__ import annotations

import math

ANSWER_TYPES = ("label", "number", "letter")
DEFAULT_LETTERS = ["A", "B", "C", "D", "E"]


def parse_number(text: str) -> float | None:
    """``"1,200.5"`` -> 1200.5; None when the text (commas removed) is not a finite number."""
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def is_letter(label: str) -> bool:
    return len(label) == 1 and "A" <= label <= "Z"
