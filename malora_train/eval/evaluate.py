"""Per-task accuracy of an adapted model over a dict of tasks, on one process or sharded over ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from malora_train.adapters import AdaptedCausalLM
from malora_train.config import EvalConfig
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError
from malora_train.eval.encoding import check_task
from malora_train.eval.routing import start_recording, stop_recording, uncounted_bucket
from malora_train.eval.scorers import model_device, score_generate, score_label_logits

SCORERS = ("label_logits", "generate")
SPLITS = ("train", "eval")
# batches per scorer call: evaluate hands examples over in chunks so that progress moves within a task
BATCHES_PER_CHUNK = 8


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
    predictions: dict[str, list[str]] = field(default_factory=dict)  # this rank's, in its example order

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
    for key in ("batch_size", "num_beams", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"eval.{key}={getattr(cfg, key)} must be >= 1")


def shard(examples: list[Example], rank: int, world_size: int) -> tuple[list[Example], list[bool]]:
    """This rank's examples ``[rank::world_size]``, padded with copies of the first example to the
    longest shard's length so that every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively); the second list says which entries count."""
    local = examples[rank::world_size]
    longest = -(-len(examples) // world_size)
    padding = longest - len(local)
    return local + examples[:1] * padding, [True] * len(local) + [False] * padding


def evaluate(model: AdaptedCausalLM, tokenizer, tasks: dict[str, TaskData], cfg: EvalConfig, *,
             split: str = "eval", max_examples: int | None = None, rank: int = 0, world_size: int = 1,
             record_routing: bool = False, progress: bool = False, max_length: int | None = None,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    """Score the first ``max_examples`` of each task's ``split`` with ``cfg.scorer``.

    With ``world_size`` > 1 each rank scores examples ``[rank::world_size]``; every rank must call
    this (same arguments but ``rank``). The counts are this rank's unless ``all_reduce`` is given: a
    function summing a tensor (on the model's device) across ranks, e.g.
    ``lambda t: accelerator.reduce(t, "sum")``; then every rank returns the global counts.
    ``record_routing`` resets the model's routing counts and fills them with this evaluation's
    tokens, task by task in the order of ``tasks`` (read them with ``routing_report``).
    ``max_length`` (pass data.max_length) truncates long prompts from the left as training does;
    None scores whole prompts. Pass the unwrapped model (``accelerator.unwrap_model``).
    """
    check_eval_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    selected = {name: getattr(task, split)[:max_examples] for name, task in tasks.items()}
    for name, task in tasks.items():
        check_task(task, selected[name], split)

    was_training = model.training
    model.eval()
    if record_routing:
        start_recording(model, len(tasks))
    scores: dict[str, TaskScore] = {}
    predictions: dict[str, list[str]] = {}
    total = sum(-(-len(ex) // world_size) for ex in selected.values())
    bar = tqdm(total=total, desc="eval", unit="ex", disable=not progress or rank != 0, leave=False)
    try:
        for index, (name, task) in enumerate(tasks.items()):
            if not selected[name]:
                continue
            local, counted = shard(selected[name], rank, world_size)
            buckets = [index if c else uncounted_bucket(model) for c in counted] if record_routing else None
            preds = []
            chunk = cfg.batch_size * BATCHES_PER_CHUNK
            for start in range(0, len(local), chunk):
                part = slice(start, start + chunk)
                part_buckets = None if buckets is None else buckets[part]
                preds += _score(model, tokenizer, task, local[part], cfg, part_buckets, max_length)
                bar.update(len(local[part]))
            kept = [(p, ex) for p, ex, c in zip(preds, local, counted) if c]
            predictions[name] = [p for p, _ in kept]
            scores[name] = TaskScore(sum(p == ex.label for p, ex in kept), len(kept))
    finally:
        bar.close()
        model.train(was_training)
        if record_routing:
            stop_recording(model)
    result = EvalResult(scores, predictions)
    return reduce_scores(result, all_reduce, model_device(model)) if all_reduce is not None else result


def _score(model, tokenizer, task: TaskData, examples: list[Example], cfg: EvalConfig,
           buckets: list[int] | None, max_length: int | None) -> list[str]:
    if cfg.scorer == "generate":
        return score_generate(model, tokenizer, task, examples, cfg.batch_size, num_beams=cfg.num_beams,
                              max_new_tokens=cfg.max_new_tokens, task_index=buckets, max_length=max_length)
    return score_label_logits(model, tokenizer, task, examples, cfg.batch_size, task_index=buckets,
                              max_length=max_length)


def reduce_scores(result: EvalResult, all_reduce: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device | str = "cpu") -> EvalResult:
    """Sum the correct/total counts across ranks (predictions stay local)."""
    names = list(result.scores)
    local = torch.tensor([[result.scores[n].correct, result.scores[n].total] for n in names],
                         dtype=torch.long, device=device).reshape(len(names), 2)
    summed = all_reduce(local).cpu().tolist()
    scores = {n: TaskScore(int(c), int(t)) for n, (c, t) in zip(names, summed)}
    return EvalResult(scores, result.predictions)


def format_accuracy_table(before: EvalResult | None, after: EvalResult) -> str:
    """Per-task accuracy (%) before -> after with the change, and the macro average; plain text."""
    names = list(after.scores)
    width = max(len("average"), len("task"), *(len(n) for n in names))
    if before is None:
        lines = [f"{'task':<{width}} {'n':>6} {'accuracy':>9}"]
        lines += [f"{n:<{width}} {after.scores[n].total:>6} {after.scores[n].accuracy:>9.2f}" for n in names]
        lines.append(f"{'average':<{width}} {'':>6} {after.average:>9.2f}")
        return "\n".join(lines)

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
