"""What answering from a prior alone scores on each task's evaluation split.

A model that learns which answer is common, and nothing of the task, scores the most frequent answer's
share. That is the bar a method must clear before its accuracy says it learned the task. The label and the
answer text differ where a label names a position: BIG-bench shuffles each example's choices, so its labels
(answer1, answer2, ...) come out near uniform while its correct texts need not (social_support answers
"neutral" four times in five). Elsewhere (commonsense's true/false, answer1..5 in the file's order) the
label is the answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from malora_train.config import DataConfig
from malora_train.data.tasks import read_tasks


@dataclass(frozen=True)
class TaskPrior:
    task: str
    examples: int  # evaluation examples, after data.eval_per_task
    label: str  # the most frequent gold label, and its share of the examples (%)
    label_share: float
    answer: str  # the most frequent gold answer text, and its share (%)
    answer_share: float


def most_frequent(values: list[str]) -> tuple[str, float]:
    """The most frequent value (the first seen among ties) and its share in %."""
    value, count = Counter(values).most_common(1)[0]
    return value, 100.0 * count / len(values)


def answer_priors(cfg: DataConfig, seed: int = 0) -> list[TaskPrior]:
    """Each task's prior scores on the evaluation examples a run with ``cfg`` evaluates on."""
    priors = []
    for name, raw in read_tasks(cfg, seed).items():
        labels = [pair[1] for pair in raw.eval]
        answers = [raw.answers.get(pair[0], pair[1]) for pair in raw.eval]
        label, label_share = most_frequent(labels)
        answer, answer_share = most_frequent(answers)
        priors.append(TaskPrior(name, len(raw.eval), label, label_share, answer, answer_share))
    return priors


def priors_markdown(priors: list[TaskPrior]) -> str:
    lines = ["| task | evaluation examples | most frequent label | share (%) "
             "| most frequent answer | share (%) |",
             "|---|---:|---|---:|---|---:|"]
    lines += [f"| {p.task} | {p.examples} | {_cell(p.label)} | {p.label_share:.2f} | {_cell(p.answer)} | "
              f"{p.answer_share:.2f} |" for p in priors]
    return "\n".join(lines) + "\n"


def _cell(text: str, width: int = 60) -> str:
    """``text`` as one markdown table cell: one line, pipes escaped, at most ``width`` characters."""
    line = " ".join(text.split())
    line = line if len(line) <= width else line[: width - 1] + "…"
    return line.replace("|", "\\|")
