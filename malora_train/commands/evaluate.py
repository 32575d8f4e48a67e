"""``malora-eval``: per-task accuracy of a base model plus a saved adapter (or a whole run directory),
and ``eval.export=merged`` to write a LoRA-merged full model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from malora_train.adapters import load_adapter, merge_lora, read_adapter_config
from malora_train.config import Config
from malora_train.data import build_tasks
from malora_train.errors import ConfigError
from malora_train.eval import evaluate, format_accuracy_table
from malora_train.models import load_model_and_tokenizer
from malora_train.run_dir import ADAPTER_DIR, CONFIG_FILE, write_json_atomic

log = logging.getLogger(__name__)
RUN_GROUPS = ("model", "data")


def explicit_groups(argv: list[str]) -> set[str]:
    """Top-level config groups named on the command line (``data=...`` or ``data.tasks=...``)."""
    return {arg.lstrip("+~").split("=", 1)[0].split(".", 1)[0] for arg in argv}


def config_for_run(cfg: Config, run_dir: Path, argv: list[str]) -> Config:
    """A run's own model and data settings, unless the command line names those groups."""
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"eval.run_dir={run_dir}: no {CONFIG_FILE} (is it a malora-train run directory?)")
    run_cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))
    merged = OmegaConf.structured(cfg)
    for group in RUN_GROUPS:
        if group not in explicit_groups(argv):
            merged[group] = run_cfg[group]
    return OmegaConf.to_object(merged)


def adapter_location(cfg: Config) -> Path | None:
    if cfg.eval.adapter_path:
        return Path(cfg.eval.adapter_path)
    if cfg.eval.run_dir:
        return Path(cfg.eval.run_dir) / ADAPTER_DIR
    return None


def eval_command(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    if cfg.eval.run_dir:
        cfg = config_for_run(cfg, Path(cfg.eval.run_dir), argv or [])
    adapter_dir = adapter_location(cfg)
    if adapter_dir is None:
        raise ConfigError("malora-eval needs eval.run_dir=<run directory> or eval.adapter_path=<adapter folder>")
    read_adapter_config(adapter_dir)  # fail before the model loads
    base, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    model = load_adapter(base, adapter_dir)
    if cfg.eval.export:
        return export(cfg, model, tokenizer)
    tasks = build_tasks(cfg.data, cfg.seed)
    result = evaluate(model, tokenizer, tasks, cfg.eval, progress=True)
    report = {"adapter": str(adapter_dir), "scorer": cfg.eval.scorer, **result.to_json()}
    print(format_accuracy_table(None, result))
    print(json.dumps(report))
    if cfg.eval.output_dir:
        out = Path(cfg.eval.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / f"eval_{cfg.eval.scorer}.json", report)
    return report


def export(cfg: Config, model, tokenizer) -> dict[str, Any]:
    if cfg.eval.export != "merged":
        raise ConfigError(f"eval.export={cfg.eval.export!r} is not supported (use merged)")
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
