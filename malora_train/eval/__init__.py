"""Evaluation: label-logit and generation scorers, answer extraction, per-task accuracy and predictions,
routing diagnostics."""

from malora_train.eval.answers import AnswerReader, extract_label, extract_letter, extract_number
from malora_train.eval.evaluate import (
    EvalResult,
    Prediction,
    TaskScore,
    check_eval_config,
    evaluate,
    format_accuracy_table,
    reduce_scores,
    scorer_notes,
    task_scorers,
)
from malora_train.eval.predictions import predictions_file, write_predictions
from malora_train.eval.routing import format_expert_shares, routing_report, write_routing
from malora_train.eval.scorers import generate_texts, score_label_logits

__all__ = [
    "AnswerReader",
    "EvalResult",
    "Prediction",
    "TaskScore",
    "check_eval_config",
    "evaluate",
    "extract_label",
    "extract_letter",
    "extract_number",
    "format_accuracy_table",
    "format_expert_shares",
    "generate_texts",
    "predictions_file",
    "reduce_scores",
    "routing_report",
    "score_label_logits",
    "scorer_notes",
    "task_scorers",
    "write_predictions",
    "write_routing",
]
