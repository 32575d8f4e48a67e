"""Per-task accuracy of an adapted model over a dict of tasks, on one process or sharded over ranks, with
one ``Prediction`` per scored example.

``eval.scorer=label_logits`` scores a task by generation instead when it cannot or should not compare
its labels' likelihoods: open numeric answers, targets with text of their own (a rationale), or more
labels than ``eval.max_labels`` (each label costs a forward per example); ``scorer_notes`` says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from malora_train.adapters import AdaptedCausalLM
from malora_train.config import EvalConfig
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError
from malora_train.eval.answers import AnswerReader
from malora_train.eval.encoding import check_task
from malora_train.eval.routing import start_recording, stop_recording, uncounted_bucket
from malora_train.eval.scorers import generate_texts, model_device, score_label_logits

SCORERS = ("label_logits", "generate")
SPLITS = ("train", "eval")
# batches per scorer call: evaluate hands examples over in chunks so that progress moves within a task
BATCHES_PER_CHUNK = 8


@dataclass(frozen=True)
class Prediction:
    """One scored example: what the model wrote (None under label_logits), the answer read from it and
    whether that is the gold label. ``id`` is the example's index in its task's split."""

    task: str
    id: int
    prompt: str
    generation: str | None
    extracted: str
    label: str
    correct: bool
    scorer: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskScore:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """In percent; 0 for a task without examples."""
        return 100.0 * self.correct / self.total if self.total else 0.0


@dataclass
class EvalResult:
    scores: dict[str, TaskScore]
    # this rank's, in its example order
    predictions: dict[str, list[Prediction]] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Macro average of the task accuracies in percent, over tasks with at least one example."""
        scored = [s.accuracy for s in self.scores.values() if s.total]
        return sum(scored) / len(scored) if scored else 0.0

    def to_json(self) -> dict:
        return {
            "accuracy": {task: s.accuracy for task, s in self.scores.items()},
            "average": self.average,
            "counts": {task: {"correct": s.correct, "total": s.total} for task, s in self.scores.items()},
        }

    @classmethod
    def from_json(cls, saved: dict | None) -> EvalResult | None:
        """Back from ``to_json`` (the trainer keeps it across resumes); None for nothing saved."""
        if not saved:
            return None
        return cls(scores={t: TaskScore(c["correct"], c["total"]) for t, c in saved["counts"].items()})


def check_eval_config(cfg: EvalConfig) -> None:
    if cfg.scorer not in SCORERS:
        raise ConfigError(f"eval.scorer={cfg.scorer!r} is not one of {', '.join(SCORERS)}")
    for key in ("batch_size", "num_beams", "max_new_tokens", "max_labels"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"eval.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise ConfigError(f"eval.max_examples={cfg.max_examples} must be >= 1 (or null for every example)")
    if not cfg.number_tolerance >= 0:
        raise ConfigError(f"eval.number_tolerance={cfg.number_tolerance} must be >= 0")


def generation_reason(task: TaskData, cfg: EvalConfig) -> str | None:
    """Why label_logits leaves ``task`` to generation; None when it scores it."""
    if task.answer_type == "number":
        return "its answers are open numbers"
    if task.per_example_targets:
        return "its targets hold text of their own (a rationale)"
    if len(task.labels) > cfg.max_labels:
        return (f"it has {len(task.labels)} labels, more than eval.max_labels={cfg.max_labels} "
                "(label_logits would score every one of them for every example)")
    return None


def task_scorers(tasks: dict[str, TaskData], cfg: EvalConfig) -> dict[str, str]:
    """The scorer each task gets under ``cfg``."""
    if cfg.scorer == "generate":
        return {name: "generate" for name in tasks}
    return {name: "generate" if generation_reason(task, cfg) else "label_logits"
            for name, task in tasks.items()}


def scorer_notes(tasks: dict[str, TaskData], cfg: EvalConfig) -> list[str]:
    """One line per task that ``eval.scorer=label_logits`` scores by generation, saying why (to log once)."""
    if cfg.scorer != "label_logits":
        return []
    reasons = {name: generation_reason(task, cfg) for name, task in tasks.items()}
    return [f"eval.scorer=label_logits: task {name} is scored with generate: {reason}"
            for name, reason in reasons.items() if reason]


def shard(items: list, rank: int, world_size: int) -> tuple[list, list[bool]]:
    """This rank's items ``[rank::world_size]``, padded with copies of the first item to the longest
    shard's length so that every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively); the second list says which entries count."""
    local = items[rank::world_size]
    longest = -(-len(items) // world_size)
    padding = longest - len(local)
    return local + items[:1] * padding, [True] * len(local) + [False] * padding


def evaluate(model: AdaptedCausalLM, tokenizer, tasks: dict[str, TaskData], cfg: EvalConfig, *,
             split: str = "eval", rank: int = 0, world_size: int = 1, record_routing: bool = False,
             progress: bool = False, max_length: int | None = None,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    """Score the first ``cfg.max_examples`` (all when None) of each task's ``split`` with the task's
    scorer (``task_scorers``).

    With ``world_size`` > 1 each rank scores examples ``[rank::world_size]``; every rank must call
    this (same arguments but ``rank``). The counts are this rank's unless ``all_reduce`` is given: a
    function summing a tensor (on the model's device) across ranks, e.g.
    ``lambda t: accelerator.reduce(t, "sum")``; then every rank returns the global counts (the
    predictions stay this rank's). ``record_routing`` resets the model's routing counts and fills them
    with this evaluation's tokens, task by task in the order of ``tasks`` (read them with
    ``routing_report``). ``max_length`` (pass data.max_length) truncates long prompts from the left as
    training does; None scores whole prompts. Pass the unwrapped model (``accelerator.unwrap_model``).
    """
    check_eval_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    selected = {name: getattr(task, split)[:cfg.max_examples] for name, task in tasks.items()}
    for name, task in tasks.items():
        check_task(task, selected[name], split)
    scorers = task_scorers(tasks, cfg)

    was_training = model.training
    model.eval()
    if record_routing:
        start_recording(model, len(tasks))
    scores: dict[str, TaskScore] = {}
    predictions: dict[str, list[Prediction]] = {}
    total = sum(-(-len(ex) // world_size) for ex in selected.values())
    bar = tqdm(total=total, desc="eval", unit="ex", disable=not progress or rank != 0, leave=False)
    try:
        for index, (name, task) in enumerate(tasks.items()):
            if not selected[name]:
                continue
            reader = AnswerReader(task, cfg.number_tolerance)
            local, counted = shard(list(enumerate(selected[name])), rank, world_size)
            buckets = [index if c else uncounted_bucket(model) for c in counted] if record_routing else None
            outputs = []
            chunk = cfg.batch_size * BATCHES_PER_CHUNK
            for start in range(0, len(local), chunk):
                part = slice(start, start + chunk)
                part_buckets = None if buckets is None else buckets[part]
                examples = [example for _, example in local[part]]
                outputs += _score(model, tokenizer, task, examples, cfg, scorers[name], part_buckets,
                                  max_length)
                bar.update(len(examples))
            predictions[name] = [_prediction(reader, scorers[name], i, example, output)
                                 for (i, example), output, c in zip(local, outputs, counted) if c]
            scores[name] = TaskScore(sum(p.correct for p in predictions[name]), len(predictions[name]))
    finally:
        bar.close()
        model.train(was_training)
        if record_routing:
            stop_recording(model)
    result = EvalResult(scores, predictions)
    return reduce_scores(result, all_reduce, model_device(model)) if all_reduce is not None else result


def _score(model, tokenizer, task: TaskData, examples: list[Example], cfg: EvalConfig, scorer: str,
           buckets: list[int] | None, max_length: int | None) -> list[str]:
    """Generated texts (generate) or predicted labels (label_logits)."""
    if scorer == "generate":
        return generate_texts(model, tokenizer, task, examples, cfg.batch_size, num_beams=cfg.num_beams,
                              max_new_tokens=cfg.max_new_tokens, task_index=buckets, max_length=max_length)
    return score_label_logits(model, tokenizer, task, examples, cfg.batch_size, task_index=buckets,
                              max_length=max_length)


def _prediction(reader: AnswerReader, scorer: str, index: int, example: Example, output: str) -> Prediction:
    generation = output if scorer == "generate" else None
    extracted = reader.extract(output) if scorer == "generate" else output
    return Prediction(task=example.task, id=index, prompt=example.prompt, generation=generation,
                      extracted=extracted, label=example.label,
                      correct=reader.is_correct(extracted, example.label), scorer=scorer)


def reduce_scores(result: EvalResult, all_reduce: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device | str = "cpu") -> EvalResult:
    """Sum the correct/total counts across ranks (predictions stay local)."""
    names = list(result.scores)
    local = torch.tensor([[result.scores[n].correct, result.scores[n].total] for n in names],
                         dtype=torch.long, device=device).reshape(len(names), 2)
    summed = all_reduce(local).cpu().tolist()
    scores = {n: TaskScore(int(c), int(t)) for n, (c, t) in zip(names, summed)}
    return EvalResult(scores, result.predictions)


def format_accuracy_table(before: EvalResult | None, after: EvalResult | None) -> str:
    """Per-task accuracy (%) before -> after with the change, and the macro average; plain text. With
    only one of the two, its column alone (headed "accuracy" or "before"); "" with neither."""
    if after is None or before is None:
        only = after if after is not None else before
        return _single_table(only, "accuracy" if after is not None else "before") if only is not None else ""
    names = list(after.scores)
    width = max(len("average"), len("task"), *(len(n) for n in names))

    def row(name: str, n: str, old: float | None, new: float) -> str:
        old_text = f"{old:8.2f}" if old is not None else f"{'-':>8}"
        delta = f"{new - old:+8.2f}" if old is not None else f"{'-':>8}"
        return f"{name:<{width}} {n:>6} {old_text} {new:8.2f} {delta}"

    lines = [f"{'task':<{width}} {'n':>6} {'before':>8} {'after':>8} {'delta':>8}"]
    for name in names:
        old = before.scores[name].accuracy if name in before.scores and before.scores[name].total else None
        lines.append(row(name, str(after.scores[name].total), old, after.scores[name].accuracy))
    lines.append(row("average", "", before.average if before.scores else None, after.average))
    return "\n".join(lines)


def _single_table(result: EvalResult, header: str) -> str:
    names = list(result.scores)
    width = max(len("average"), len("task"), *(len(n) for n in names))
    lines = [f"{'task':<{width}} {'n':>6} {header:>9}"]
    lines += [f"{n:<{width}} {result.scores[n].total:>6} {result.scores[n].accuracy:>9.2f}" for n in names]
    lines.append(f"{'average':<{width}} {'':>6} {result.average:>9.2f}")
    return "\n".join(lines)
