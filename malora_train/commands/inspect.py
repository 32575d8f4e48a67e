"""``malora-inspect``: build a model with its adapter (on the meta device when possible) and report
where the trainable parameters are."""

from __future__ import annotations

import json
from typing import Any

from malora_train.adapters import AdaptedCausalLM, parameter_report
from malora_train.config import Config
from malora_train.models import load_model


def build_report(cfg: Config) -> dict[str, Any]:
    """Parameter report for ``cfg.model`` + ``cfg.adapter``; nothing is allocated (meta device)."""
    model = load_model(cfg.model, device="meta", seed=cfg.seed)
    adapted = AdaptedCausalLM.from_base(model, cfg.adapter)
    report = parameter_report(adapted)
    layer = adapted.model.get_submodule(adapted.targets[0])
    report.update(
        model=cfg.model.name,
        adapter=cfg.adapter.kind,
        expert_rank=layer.expert_rank,
        alpha=layer.alpha,
        shared_rank=getattr(layer, "shared_rank", None),
        num_experts=getattr(layer, "num_experts", None),
        top_k=getattr(layer, "top_k", None),
    )
    return report


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def format_report(report: dict[str, Any]) -> str:
    shape = f"r={report['expert_rank']}, alpha={report['alpha']:g}"
    if report["shared_rank"] is not None:
        shape += f", d={report['shared_rank']}"
    if report["num_experts"] is not None:
        shape += f", N={report['num_experts']}, K={report['top_k']}"
    lines = [
        f"model {report['model']} + {report['adapter']} ({shape}) "
        f"on {report['adapted_layers']} linear layers",
        f"  trainable {report['trainable']:>15,}  ({_millions(report['trainable'])}, "
        f"{report['percent']:.2f}% of the base model)",
        f"  base      {report['base']:>15,}  ({_millions(report['base'])})",
        f"  total     {report['total']:>15,}  ({_millions(report['total'])})",
        "  by module type:",
    ]
    lines += [f"    {name:<16}{count:>15,}" for name, count in report["by_module"].items()]
    lines.append("  by tensor kind:")
    lines += [f"    {name:<16}{count:>15,}" for name, count in report["by_tensor"].items()]
    return "\n".join(lines)


def inspect_command(cfg: Config) -> None:
    report = build_report(cfg)
    print(json.dumps(report) if cfg.inspect.json else format_report(report))
