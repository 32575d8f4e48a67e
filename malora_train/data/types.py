"""The plain objects that flow from the data stage to training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One rendered instruction -> answer pair.

    ``prompt`` is the full text the model sees before its answer (template applied);
    ``target`` is what it must produce, always ``answer_prefix + label`` of its task.
    """

    task: str
    prompt: str
    target: str
    label: str


@dataclass
class TaskData:
    """A task's examples and what scoring needs to know about its answers."""

    name: str
    labels: list[str]  # the closed label set, e.g. ["answer1", "answer2", "answer3", "answer4"]
    answer_prefix: str  # e.g. "the correct answer is "; every target is answer_prefix + label
    label_pattern: str  # regex whose first match in generated text is the predicted label
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)
