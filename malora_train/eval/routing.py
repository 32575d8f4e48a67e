"""Which experts each task's tokens go to: recording during evaluation, the report, its files and a
text table.

Recording convention: ``start_recording(model, T)`` makes the per-layer count tables T + 1 rows
tall; rows 0..T-1 are the tasks (in the order of the tasks dict) and the last row collects tokens
that must not count (padding examples of a short rank, the extra candidate rows of the sequence
scorer). ``routing_report`` keeps only the task rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from malora_train.adapters import AdaptedCausalLM
from malora_train.run_dir import ROUTING_FILE, ROUTING_PLOT, atomic_write, write_text_atomic

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def start_recording(model: AdaptedCausalLM, num_tasks: int) -> None:
    model.reset_routing_counts()
    model.num_tasks = num_tasks + 1
    model.record_routing = True


def stop_recording(model: AdaptedCausalLM) -> None:
    """Stop counting; the counts stay for ``routing_report``."""
    model.record_routing = False
    model.context.token_task = None


def uncounted_bucket(model: AdaptedCausalLM) -> int:
    return model.num_tasks - 1


def routing_report(model: AdaptedCausalLM, task_names: list[str],
                   all_reduce: AllReduce | None = None) -> dict | None:
    """Per mixture layer, the share of each task's (token, slot) assignments that each expert got
    (rows sum to 1; a task with no counted token has a row of zeros), their average over layers, the
    tokens counted per task, and each layer's expert load balance: ``cv`` (std / mean of the experts'
    load shares, 0 = perfectly even) and ``max_over_mean`` (1 = even, N = one expert takes all).

    None when the model has no mixture layer or nothing was recorded. With several ranks, pass
    ``all_reduce`` (sums a tensor on the model's device across ranks) so every rank reports the total.
    """
    counts = model.routing_counts()
    if not counts:
        return None
    names = list(counts)
    num_tasks = len(task_names)
    if any(counts[n].shape[0] < num_tasks for n in names):
        raise ValueError(f"routing counts cover fewer than the {num_tasks} tasks {task_names}")
    table = torch.stack([counts[n][:num_tasks] for n in names]).double()  # (layers, tasks, experts)
    if all_reduce is not None:
        device = next(model.parameters()).device
        table = all_reduce(table.to(device)).cpu()
    shares = table / table.sum(dim=-1, keepdim=True).clamp_min(1.0)
    top_k = dict(model.mixture_layers())[names[0]].top_k
    dense = top_k == table.shape[-1]  # dense routing counts gate mass: one unit per token, not K slots
    load = table.sum(dim=1)  # (layers, experts)
    load_share = load / load.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean = load_share.mean(dim=-1)
    cv = load_share.std(dim=-1, unbiased=False) / mean.clamp_min(1e-12)
    max_over_mean = load_share.max(dim=-1).values / mean.clamp_min(1e-12)
    balance = {
        name: {"cv": cv[i].item(), "max_over_mean": max_over_mean[i].item(), "load": load_share[i].tolist()}
        for i, name in enumerate(names)
    }
    return {
        "tasks": list(task_names),
        "num_experts": table.shape[-1],
        "top_k": top_k,
        "dense": dense,
        "tokens": {task: round(table[0, t].sum().item() / (1 if dense else top_k))
                   for t, task in enumerate(task_names)},
        "layers": {name: shares[i].tolist() for i, name in enumerate(names)},
        "average": shares.mean(dim=0).tolist(),
        "balance": balance,
        "balance_mean": {"cv": cv.mean().item(), "max_over_mean": max_over_mean.mean().item()},
    }


def write_routing(report: dict | None, out_dir: Path) -> list[Path]:
    """routing.json and routing_heatmap.png (tasks x experts, layer average) in ``out_dir``;
    nothing for a model without routing. Returns the paths written."""
    if not report:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / ROUTING_FILE
    png_path = out_dir / ROUTING_PLOT
    write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write(png_path, lambda p: _heatmap(report).savefig(p, dpi=120))
    return [json_path, png_path]


def _heatmap(report: dict):
    # Figure without pyplot: no global backend switch, nothing left open in the caller's process
    from matplotlib.figure import Figure

    tasks, percent = report["tasks"], 100 * torch.tensor(report["average"])
    num_experts = report["num_experts"]
    fig = Figure(figsize=(max(4.0, 0.7 * num_experts + 2.5), max(2.5, 0.45 * len(tasks) + 1.5)),
                 layout="constrained")
    ax = fig.add_subplot()
    top = max(percent.max().item(), 1e-6)
    image = ax.imshow(percent.numpy(), cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    ax.set_xticks(range(num_experts), [f"E{e}" for e in range(num_experts)])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("expert")
    what = "router probability mass" if report.get("dense") else "token-slot assignments"
    routing = "dense" if report.get("dense") else f"top-{report['top_k']}"
    ax.set_title(f"Share of each task's {what} per expert\n({routing}, mean over "
                 f"{len(report['layers'])} mixture layers)", fontsize=10)
    for t in range(len(tasks)):
        for e in range(num_experts):
            value = percent[t, e].item()
            ax.text(e, t, f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if value > top / 2 else "white")
    fig.colorbar(image, ax=ax, label="% of the task's assignments")
    return fig


def format_expert_shares(report: dict | None) -> str:
    """Rows = tasks, columns = experts, cells = % of the task's assignments (mean over layers)."""
    if not report:
        return ""
    tasks = report["tasks"]
    width = max(len("task"), *(len(t) for t in tasks))
    experts = [f"E{e}" for e in range(report["num_experts"])]
    lines = [f"{'task':<{width}} " + " ".join(f"{e:>5}" for e in experts)]
    for task, row in zip(tasks, report["average"]):
        lines.append(f"{task:<{width}} " + " ".join(f"{100 * v:5.1f}" for v in row))
    routing = "dense: router probability mass" if report.get("dense") else f"top-{report['top_k']}"
    lines.append(f"(% of each task's tokens per expert, {routing}, mean over "
                 f"{len(report['layers'])} layers; load cv {report['balance_mean']['cv']:.2f})")
    return "\n".join(lines)
