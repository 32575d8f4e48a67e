"""Evaluation: label-logit and generation scorers, per-task accuracy, routing diagnostics."""

from malora_train.eval.evaluate import (
    EvalResult,
    TaskScore,
    check_eval_config,
    evaluate,
    format_accuracy_table,
    reduce_scores,
)
from malora_train.eval.routing import format_expert_shares, routing_report, write_routing
from malora_train.eval.scorers import extract_label, score_generate, score_label_logits

__all__ = [
    "EvalResult",
    "TaskScore",
    "check_eval_config",
    "evaluate",
    "extract_label",
    "format_accuracy_table",
    "format_expert_shares",
    "reduce_scores",
    "routing_report",
    "score_generate",
    "score_label_logits",
    "write_routing",
]
