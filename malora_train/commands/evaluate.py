"""``malora-eval``: per-task accuracy of a base model plus a saved adapter (or a whole run directory,
whose saved config the command line was put on top of, see ``composition.run_config``), with
``eval_<scorer>.json`` and ``predictions_<scorer>.jsonl`` written to ``eval.output_dir`` (by default the run
directory's ``eval/``), and ``eval.export=merged`` to write a LoRA-merged full model.
``eval.adapter_path=none`` evaluates the base model alone (the zero-shot baseline; a run directory's files
are then ``eval_base_*``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from malora_train.adapters import (
    AdaptedCausalLM,
    RoutingContext,
    adapter_class,
    load_adapter,
    merge_lora,
    read_adapter_config,
)
from malora_train.config import Config, LoRAConfig
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
from malora_train.run_dir import (
    ADAPTER_DIR,
    EVAL_DIR,
    check_writable,
    ensure_dir,
    run_dir_lock,
    write_json_atomic,
)
from malora_train.train.metrics import progress_mode
from malora_train.train.preflight import check_config

log = logging.getLogger(__name__)


NO_ADAPTER = "none"  # eval.adapter_path=none: the base model alone


def adapter_location(cfg: Config) -> Path | None:
    if cfg.eval.adapter_path == NO_ADAPTER:
        return None
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
    if cfg.eval.adapter_path == NO_ADAPTER:
        if cfg.eval.export:
            raise ConfigError("eval.export=merged needs an adapter to merge; eval.adapter_path=none has none")
        return _evaluate_adapter(cfg, None)
    if adapter_dir is None:
        raise ConfigError("malora-eval needs eval.run_dir=<run directory> or "
                          "eval.adapter_path=<adapter folder> (eval.adapter_path=none: the base model alone)")
    run_dir = Path(cfg.eval.run_dir) if cfg.eval.run_dir else adapter_dir
    # the lock first: a run still training (no adapter yet) is named, not reported as "no adapter config";
    # a missing run directory is not locked (that would make it): reading its adapter says it is missing
    with run_dir_lock(run_dir, enabled=bool(cfg.eval.run_dir) and run_dir.is_dir(),
                      setting="eval.run_dir") as note:
        if note:
            log.warning(note)
        # fail before the model loads
        adapter_cfg, _ = read_adapter_config(adapter_dir)
        if cfg.eval.export:
            _check_export(cfg, adapter_cfg.kind)
        return _evaluate_adapter(cfg, adapter_dir)


def _check_export(cfg: Config, kind: str) -> None:
    """What ``export`` needs, checked before the model loads."""
    if not adapter_class(kind).mergeable:
        raise ConfigError(f"eval.export=merged needs adapter.kind=lora; this adapter is {kind}, which routes "
                          "per token and cannot be merged into the base weights")
    if not cfg.eval.output_dir:
        raise ConfigError("eval.export=merged needs eval.output_dir=<new folder>")
    out = Path(cfg.eval.output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"eval.output_dir={out} is not empty: refusing to overwrite it")


def _evaluate_adapter(cfg: Config, adapter_dir: Path | None) -> dict[str, Any]:
    """Evaluate the adapter in ``adapter_dir`` (None: the base model alone)."""
    out = results_dir(cfg)
    if out is not None:  # found now, not after the whole evaluation
        check_writable(out, f"eval.output_dir={out}" if cfg.eval.output_dir
                       else f"eval.output_dir (default {out})")
    base, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    if adapter_dir is None:
        model = AdaptedCausalLM(base, LoRAConfig(), RoutingContext(), targets=[])  # no adapted layer
    else:
        model = load_adapter(base, adapter_dir)
    if cfg.eval.export:
        return export(cfg, model, tokenizer)
    tasks = build_tasks(cfg.data, cfg.seed, tokenizer)
    for note in scorer_notes(tasks, cfg.eval):
        log.warning(note)
    bar = progress_mode(cfg.trainer.progress) == "bar"  # no carriage returns in a file
    result = evaluate(model, tokenizer, tasks, cfg.eval, progress=bar)
    report = {"adapter": str(adapter_dir) if adapter_dir else NO_ADAPTER, "scorer": cfg.eval.scorer,
              **result.to_json()}
    print(format_accuracy_table(None, result))
    print(json.dumps(report))
    if out is None:
        log.warning("eval.output_dir is not set: the report and predictions are not saved")
        return report
    ensure_dir(out)
    name = cfg.eval.scorer if adapter_dir else f"base_{cfg.eval.scorer}"  # beside the adapter's own files
    write_json_atomic(out / f"eval_{name}.json", report)
    predictions = [p for task in result.predictions.values() for p in task]
    path = write_predictions(predictions_file(out, name), predictions, list(tasks))
    log.info("wrote %s and %s", out / f"eval_{name}.json", path)
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
