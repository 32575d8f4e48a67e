"""The plain objects that flow from the data stage to training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One rendered instruction -> answer pair.

    ``prompt`` is the full text the model sees before its answer (template applied);
    ``target`` is what it must produce: ``answer_prefix + label + answer_suffix`` of its task, or, for a
    task with ``per_example_targets``, text of its own around the label (a rationale before it).
    """

    task: str
    prompt: str
    target: str
    label: str


@dataclass
class TaskData:
    """A task's examples and what scoring needs to know about its answers."""

    name: str
    labels: list[str]  # the closed label set, e.g. ["answer1", "answer2"]; empty for answer_type number
    answer_prefix: str  # e.g. "the correct answer is "; a target is answer_prefix + label + answer_suffix
    label_pattern: str  # regex whose first match in generated text is the predicted label (answer_type label)
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)
    answer_type: str = "label"  # label | number | letter (data/answers.py)
    answer_suffix: str = ""
    per_example_targets: bool = False  # targets hold text of their own (a rationale): generation scores them

    @property
    def closed_targets(self) -> bool:
        """Every target is one of the labels' fixed texts, so the labels' likelihoods can be compared."""
        return self.answer_type != "number" and not self.per_example_targets
