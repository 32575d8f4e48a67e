"""``malora-eval``: per-task accuracy of a base model plus a saved adapter (or a whole run directory,
whose saved config the command line was put on top of, see ``composition.run_config``), with
``eval_<scorer>.json`` and ``predictions_<scorer>.jsonl`` written to ``eval.output_dir`` (by default the run
directory's ``eval/``), and ``eval.export=merged`` to write a LoRA-merged full model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from malora_train.adapters import load_adapter, merge_lora, read_adapter_config
from malora_train.config import Config
from malora_train.data import build_tasks
from malora_train.errors import ConfigError
from malora_train.eval import (
    evaluate,
    format_accuracy_table,
    predictions_file,
    scorer_notes,
    write_predictions,
)
from malora_train.models import load_model_and_tokenizer
from malora_train.run_dir import ADAPTER_DIR, EVAL_DIR, ensure_dir, run_dir_lock, write_json_atomic
from malora_train.train.preflight import check_config

log = logging.getLogger(__name__)


def adapter_location(cfg: Config) -> Path | None:
    if cfg.eval.adapter_path:
        return Path(cfg.eval.adapter_path)
    if cfg.eval.run_dir:
        return Path(cfg.eval.run_dir) / ADAPTER_DIR
    return None


def eval_command(cfg: Config) -> dict[str, Any]:
    """Evaluate (or export) an adapter. A run directory is locked meanwhile, as a training run locks it:
    evaluating a run that is still training, or starting one in it during the evaluation, is refused."""
    check_config(cfg)
    adapter_dir = adapter_location(cfg)
    if adapter_dir is None:
        raise ConfigError("malora-eval needs eval.run_dir=<run directory> or eval.adapter_path=<adapter folder>")
    read_adapter_config(adapter_dir)  # fail before the model loads (and before a missing run directory is made)
    run_dir = Path(cfg.eval.run_dir) if cfg.eval.run_dir else adapter_dir
    with run_dir_lock(run_dir, enabled=bool(cfg.eval.run_dir), setting="eval.run_dir") as note:
        if note:
            log.warning(note)
        return _evaluate_adapter(cfg, adapter_dir)


def _evaluate_adapter(cfg: Config, adapter_dir: Path) -> dict[str, Any]:
    base, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    model = load_adapter(base, adapter_dir)
    if cfg.eval.export:
        return export(cfg, model, tokenizer)
    tasks = build_tasks(cfg.data, cfg.seed, tokenizer)
    for note in scorer_notes(tasks, cfg.eval):
        log.warning(note)
    result = evaluate(model, tokenizer, tasks, cfg.eval, progress=True)
    report = {"adapter": str(adapter_dir), "scorer": cfg.eval.scorer, **result.to_json()}
    print(format_accuracy_table(None, result))
    print(json.dumps(report))
    out = results_dir(cfg)
    if out is None:
        log.warning("eval.output_dir is not set: the report and predictions are not saved")
        return report
    ensure_dir(out)
    write_json_atomic(out / f"eval_{cfg.eval.scorer}.json", report)
    predictions = [p for task in result.predictions.values() for p in task]
    path = write_predictions(predictions_file(out, cfg.eval.scorer), predictions, list(tasks))
    log.info("wrote %s and %s", out / f"eval_{cfg.eval.scorer}.json", path)
    return report


def results_dir(cfg: Config) -> Path | None:
    """eval.output_dir, else the evaluated run directory's eval/ folder (None with neither)."""
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    return Path(cfg.eval.run_dir) / EVAL_DIR if cfg.eval.run_dir else None


def export(cfg: Config, model, tokenizer) -> dict[str, Any]:
    if not cfg.eval.output_dir:
        raise ConfigError("eval.export=merged needs eval.output_dir=<new folder>")
    out = Path(cfg.eval.output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"eval.output_dir={out} is not empty: refusing to overwrite it")
    merged = merge_lora(model)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return {"exported": str(out)}
