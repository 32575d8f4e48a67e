"""Routing of a sweep, for ``malora-report``: does the router specialise by task?

From each run's ``routing.json`` (written after the final evaluation: per adapted module, the share of each
task's token-slot assignments that each expert got), reduced to what the report uses (``reduce_routing``:
the layer mean and one mean per decoder layer, which a packed run keeps in ``report_inputs.json``), per
configuration, averaged over its seeds:

- the task x expert share, averaged over every adapted module (rows sum to 100%);
- per decoder layer (the modules of ``layers.<i>.`` averaged), each task's routing entropy in bits
  (log2 N: all experts alike; 0: one expert, or K experts each getting 1/K under top-K: log2 K) and the
  mutual information I(task; expert) in bits = H(mean of the task rows, weighted by their tokens) minus the
  weighted mean of the rows' entropies: 0 when every task is routed alike, up to the smaller of log2(number
  of tasks) and log2 N when the tasks use disjoint experts.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from malora_train.errors import DataError
from malora_train.run_dir import ROUTING_FILE, read_json_object

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def entropy_bits(shares: list[float]) -> float:
    total = sum(shares)
    return -sum(p / total * math.log2(p / total) for p in shares if p > 0) if total > 0 else 0.0


def mutual_information_bits(rows: list[list[float]], weights: list[float]) -> float:
    """I(task; expert) for task rows (each a distribution over experts) weighted by the tasks' tokens."""
    total = sum(weights)
    if total <= 0:
        return 0.0
    w = [x / total for x in weights]
    marginal = [sum(wt * row[e] for wt, row in zip(w, rows)) for e in range(len(rows[0]))]
    return entropy_bits(marginal) - sum(wt * entropy_bits(row) for wt, row in zip(w, rows))


def mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(m[i][j] for m in matrices) / len(matrices) for j in range(len(matrices[0][0]))]
            for i in range(len(matrices[0]))]


def read_routing(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``routing.json`` reduced (``reduce_routing``); None without one."""
    path = run_dir / ROUTING_FILE
    if not path.is_file():
        return None
    report = read_json_object(path)
    if not isinstance(report.get("tasks"), list) or not isinstance(report.get("layers"), dict):
        raise DataError(f"{path}: expected 'tasks' (a list) and 'layers' (module -> task x expert shares)")
    return reduce_routing(report)


def reduce_routing(report: dict[str, Any]) -> dict[str, Any]:
    """What the report uses of one run's routing report: its tasks, expert count, top-k, tokens per task, the
    task x expert share averaged over modules, and per decoder layer that of the layer's modules
    (``decoder_layers``: ``{"layer": i, "share": [[...]]}``, in layer order). JSON as it is, so that a run
    reports the same from this reduction as from its routing.json."""
    return {"tasks": report["tasks"], "num_experts": report.get("num_experts"), "top_k": report.get("top_k"),
            "tokens": report.get("tokens"), "average": report["average"],
            "decoder_layers": [{"layer": index, "share": share}
                               for index, share in by_decoder_layer(report["layers"]).items()]}


def by_decoder_layer(layers: dict[str, list[list[float]]]) -> dict[int, list[list[float]]]:
    """The modules of each decoder layer (``...layers.<i>.self_attn.q_proj``) averaged; modules without a
    layer index are left out."""
    grouped: dict[int, list[list[list[float]]]] = defaultdict(list)
    for name, shares in layers.items():
        match = LAYER_INDEX.search(name)
        if match:
            grouped[int(match.group(1))].append(shares)
    return {index: mean_matrix(grouped[index]) for index in sorted(grouped)}


def configuration_routing(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The seeds' reduced routing reports (``reduce_routing``) of one configuration averaged: tasks, the
    task x expert share (layer mean), and per decoder layer each task's entropy and the mutual information;
    None without a report or when the seeds' tasks or expert counts differ."""
    if not reports:
        return None
    tasks = reports[0]["tasks"]
    if any(r["tasks"] != tasks or r.get("num_experts") != reports[0].get("num_experts") for r in reports):
        return None
    per_seed = [{entry["layer"]: entry["share"] for entry in r["decoder_layers"]} for r in reports]
    layers = sorted(set.intersection(*(set(p) for p in per_seed)))
    tokens = [sum(float((r.get("tokens") or {}).get(t, 0)) for r in reports) for t in tasks]
    if not any(tokens):
        tokens = [1.0] * len(tasks)
    rows = []
    for index in layers:
        shares = mean_matrix([p[index] for p in per_seed])
        rows.append({"layer": index, "entropy": [entropy_bits(row) for row in shares],
                     "mutual_information": mutual_information_bits(shares, tokens)})
    return {"tasks": tasks, "num_experts": len(reports[0]["average"][0]), "top_k": reports[0].get("top_k"),
            "seeds": len(reports), "share": mean_matrix([r["average"] for r in reports]), "layers": rows}


def routing_markdown(label: str, routing: dict[str, Any]) -> str:
    tasks, experts = routing["tasks"], routing["num_experts"]
    lines = [f"#### `{label}` ({routing['seeds']} seed(s), top-{routing['top_k']} of {experts})", "",
             "| task | " + " | ".join(f"E{e}" for e in range(experts)) + " |",
             "|---|" + "---:|" * experts]
    lines += [f"| {task} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |"
              for task, row in zip(tasks, routing["share"])]
    lines += ["", "Share of each task's assignments per expert (%), mean over adapted modules and seeds. "
              "Per decoder layer: each task's routing entropy and I(task; expert), in bits "
              f"(max {math.log2(experts):.2f} and {math.log2(min(max(len(tasks), 1), experts)):.2f}):", "",
              "| layer | " + " | ".join(f"H({t})" for t in tasks) + " | I(task; expert) |",
              "|---:|" + "---:|" * (len(tasks) + 1)]
    lines += [f"| {row['layer']} | " + " | ".join(f"{h:.2f}" for h in row["entropy"])
              + f" | {row['mutual_information']:.3f} |" for row in routing["layers"]]
    return "\n".join(lines)
