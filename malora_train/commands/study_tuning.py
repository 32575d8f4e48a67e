"""The study's tuned parts (issue 27), for ``scripts/study.py``: what each sweeps and how it is reported.

- ``lr_sweep``: each method's learning rate chosen on a validation split carved from the training data
  (``data.validation_fraction``, scored with ``data.eval_split=validation``), never on the test split:
  ``select_lrs`` takes the highest validation average, a tie going to the smaller lr, and records the whole
  curve and how flat it was (``lr_selection.json`` / ``lr_selection.md``);
- ``rank_experts``: MoLoRA and MALoRA over N experts x expert rank r at each method's tuned lr
  (MALoRA sized from the same MoLoRA budget r, N by lam: d = lam r N, r-bar = r + (1 - lam) r), reported
  as one table and one plot of accuracy against trainable parameters and against step time;
- ``router_specialisation``: the router's lr scale x balance-loss weight x init, one seed each, reported
  as I(task; expert) per decoder layer (``study_routing``).

The functions here only build overrides and read finished runs (``report.Run`` / ``report.Row``), so they
are tested on fabricated run folders without training.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from malora_train.commands.report import Row, Run
from malora_train.commands.study_routing import configuration_routing
from malora_train.errors import DataError

LRS = ("2e-4", "4e-4", "1e-3", "2e-3")  # the lr_sweep's default grid
VALIDATION_FRACTION = 0.1  # the lr_sweep's default data.validation_fraction
SELECTION_FILE = "lr_selection.json"
SELECTION_MARKDOWN = "lr_selection.md"
TIE = 1e-9  # validation averages closer than this are a tie (the smaller lr wins)
RANK_EXPERTS_METHODS = ("molora", "malora_intra")
NUM_EXPERTS = (4, 8, 16)
EXPERT_RANKS = (4, 8, 16)
RANK_EXPERTS_SEEDS = ("0", "1")
RANK_EXPERTS_FILES = ("rank_experts.md", "rank_experts.csv", "rank_experts.png")
ROUTER_METHODS = ("molora", "malora_intra")
ROUTER_GRID = {"adapter.router.lr_scale": ("1", "10"), "adapter.router.balance_coef": ("0.01", "0"),
               "adapter.router.init": ("normal", "kaiming")}
ROUTER_FILE = "router_specialisation.md"
MISSING = "–"


def override_value(overrides: list[str], key: str) -> str | None:
    """The value of the last ``key=...`` (``+`` / ``~`` prefixes ignored) in ``overrides``; None without."""
    found = [o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == key]
    return found[-1] if found else None


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.strip("[]").split(",") if item.strip()]


def same_lr(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except ValueError:
        return a == b


# -- lr_sweep ------------------------------------------------------------------------------------------------

def validation_overrides(methods: list[str], lrs: list[str], fraction: float, seed: str = "0") -> list[str]:
    """The validation stage: every method x lr on one seed, scoring the carved validation split."""
    return [f"+variant={','.join(methods)}", f"trainer.lr={','.join(lrs)}", f"seed={seed}",
            f"data.validation_fraction={fraction:g}", "data.eval_split=validation"]


def tuned_overrides(method: str, lr: str, seeds: list[str], fraction: float) -> list[str]:
    """One method's sweep at its chosen lr, scoring the test split, trained on the same examples (the
    validation split stays out of training, as in the validation stage)."""
    return [f"+variant={method}", f"trainer.lr={lr}", f"seed={','.join(seeds)}",
            f"data.validation_fraction={fraction:g}", "data.eval_split=test"]


def run_why(run: Run) -> str:
    return f"failed: {run.error}" if run.failed else run.status


def select_lrs(runs: list[Run], methods: list[str], lrs: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: its validation curve (lr -> average accuracy over its completed runs, None where none
    completed), the runs missing from it (lr -> why), the chosen lr (the highest average, the smaller lr on
    a tie; None while any lr of the grid is missing: a partial curve chooses nothing), the spread (best minus
    worst average) and the margin (best minus the next best): how flat the choice was."""
    chosen: dict[str, dict[str, Any]] = {}
    for method in methods:
        curve: dict[str, float | None] = {}
        missing: dict[str, str] = {}
        for lr in lrs:
            matching = [r for r in runs if override_value(r.overrides, "variant") == method
                        and same_lr(override_value(r.overrides, "trainer.lr") or "", lr)]
            averages = [r.average for r in matching if r.completed and r.average is not None]
            curve[lr] = statistics.fmean(averages) if averages else None
            if not averages:
                missing[lr] = "; ".join(run_why(r) for r in matching) if matching else "no run"
        present = sorted(((value, float(lr), lr) for lr, value in curve.items() if value is not None),
                         key=lambda item: (-item[0], item[1]))
        best = None
        if present and not missing:
            top = present[0][0]
            best = min((item for item in present if top - item[0] <= TIE), key=lambda item: item[1])[2]
        values = [item[0] for item in present]
        chosen[method] = {"lr": best, "curve": curve, "missing": missing,
                          "spread": max(values) - min(values) if values else None,
                          "margin": values[0] - values[1] if len(values) > 1 else None}
    return chosen


def selection_record(selection: dict[str, dict[str, Any]], *, base: str, lrs: list[str], fraction: float,
                     seeds: list[str]) -> dict[str, Any]:
    """What ``lr_selection.json`` holds: the choice per method with its curve, and how it was made."""
    return {"part": base, "scored": "validation", "validation_fraction": fraction, "seeds": seeds,
            "lrs": lrs, "tie_rule": "highest validation average; a tie goes to the smaller lr",
            "methods": selection}


def selection_markdown(record: dict[str, Any]) -> str:
    lrs = record["lrs"]
    lines = [f"Learning rate per method on `{record['part']}`: the average accuracy on the validation split "
             f"(data.validation_fraction={record['validation_fraction']:g} of each task's training examples, "
             f"never trained on), seed(s) {','.join(record['seeds'])}. The chosen lr has the highest "
             "validation average (a tie goes to the smaller lr); spread = best − worst, margin = best − next "
             "best (points): a small margin means a flat choice.", "",
             "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen lr | spread | margin |",
             "|---|" + "---:|" * (len(lrs) + 3)]
    notes = []
    for method, entry in record["methods"].items():
        cells = []
        for lr in lrs:
            value = entry["curve"].get(lr)
            text = MISSING if value is None else f"{value:.2f}"
            cells.append(f"**{text}**" if lr == entry["lr"] else text)
        spread = MISSING if entry["spread"] is None else f"{entry['spread']:.2f}"
        margin = MISSING if entry["margin"] is None else f"{entry['margin']:.2f}"
        lines.append(f"| {method} | " + " | ".join(cells)
                     + f" | {entry['lr'] or 'none'} | {spread} | {margin} |")
        notes += [f"- {method}, lr {lr}: {why}" for lr, why in entry["missing"].items()]
    if notes:
        lines += ["", "Missing from the curves (a method with a missing lr gets no choice; rerun the same "
                  "command to retry):", *notes]
    return "\n".join(lines) + "\n"


def read_selection(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        raise DataError(f"{path} not found: run the lr sweep first (make study PART=lr_sweep "
                        "ARGS='--part bigbench'), or give each method's lr with --lr METHOD=LR")
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("methods"), dict):
        raise DataError(f"{path}: expected an object with 'methods'")
    return record


def chosen_lrs(methods: list[str], given: dict[str, str], record: dict[str, Any] | None,
               source: str) -> dict[str, str]:
    """method -> lr: ``given`` (--lr) first, else the selection record's choice; a method with neither is
    refused, naming it."""
    lrs = {}
    for method in methods:
        lr = given.get(method) or ((record or {}).get("methods", {}).get(method) or {}).get("lr")
        if not lr:
            raise DataError(f"no tuned lr for {method}: {source} has no choice for it; give one with "
                            f"--lr {method}=LR")
        lrs[method] = str(lr)
    return lrs


# -- rank_experts --------------------------------------------------------------------------------------------

def rank_experts_overrides(method: str, lr: str, seeds: list[str], fraction: float,
                           num_experts: tuple[int, ...] = NUM_EXPERTS,
                           ranks: tuple[int, ...] = EXPERT_RANKS) -> list[str]:
    """One method's grid: N x r at its tuned lr (MALoRA: r is the MoLoRA budget its sizing rule starts
    from, so each MALoRA point matches the MoLoRA point of the same N and r)."""
    return [f"+variant={method}", f"trainer.lr={lr}",
            f"adapter.num_experts={','.join(map(str, num_experts))}",
            f"adapter.rank={','.join(map(str, ranks))}", f"seed={','.join(seeds)}",
            f"data.validation_fraction={fraction:g}", "data.eval_split=test"]


@dataclasses.dataclass
class GridPoint:
    method: str
    num_experts: int | None
    rank: int | None
    sizes: str  # MALoRA's (d, r-bar); empty for the others
    row: Row


def grid_points(rows: list[Row]) -> list[GridPoint]:
    """The rank x experts rows with their method, N and r (from their overrides), by method, N, r."""
    from malora_train.config import MALoRAConfig

    points = []
    for row in rows:
        method = override_value(row.overrides, "variant") or row.adapter
        n = override_value(row.overrides, "adapter.num_experts")
        r = override_value(row.overrides, "adapter.rank")
        n, r = (int(n) if n else None), (int(r) if r else None)
        sizes = ""
        if row.adapter == "malora" and n and r:
            lam = float(override_value(row.overrides, "adapter.lam") or MALoRAConfig.lam)
            d, r_bar = MALoRAConfig(rank=r, num_experts=n, lam=lam).sizes()
            sizes = f"d={d}, r̄={r_bar}"
        points.append(GridPoint(method, n, r, sizes, row))
    return sorted(points, key=lambda p: (p.method, p.num_experts or 0, p.rank or 0))


def stat_text(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f} ± {MISSING if std is None else f'{std:.{digits}f}'}"


def rank_experts_markdown(points: list[GridPoint]) -> str:
    lines = ["| method | N | r | MALoRA sizes | trainable params | seeds | average accuracy | step time (s) "
             "| tokens/s |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        row = p.row
        params = MISSING if row.trainable_params is None else f"{row.trainable_params:,}"
        seeds = f"{len(row.runs)}" + (f" (+{len(row.unfinished)} not completed)" if row.unfinished else "")
        lines.append(f"| {p.method} | {p.num_experts or MISSING} | {p.rank or MISSING} "
                     f"| {p.sizes or MISSING} "
                     f"| {params} | {seeds} | {stat_text(row.average.mean, row.average.std, 2)} "
                     f"| {stat_text(row.step_time_s.mean, row.step_time_s.std, 3)} "
                     f"| {stat_text(row.tokens_per_s.mean, row.tokens_per_s.std, 0)} |")
    lines += ["", "Average accuracy after training (%, the test split), training time per optimizer step and "
              "tokens/s: mean ± sample std over seeds. MALoRA at r is sized from the MoLoRA budget (r, N) by "
              "its rule d = lam r N, r̄ = r + (1 − lam) r."]
    return "\n".join(lines) + "\n"


def rank_experts_csv(points: list[GridPoint]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "adapter", "num_experts", "rank", "malora_sizes", "trainable_params", "seeds",
                     "acc_average_mean", "acc_average_std", "step_time_s_mean", "step_time_s_std",
                     "tokens_per_s_mean", "tokens_per_s_std"])
    for p in points:
        row = p.row
        cells = [p.method, row.adapter, p.num_experts, p.rank, p.sizes, row.trainable_params, len(row.runs),
                 row.average.mean, row.average.std, row.step_time_s.mean, row.step_time_s.std,
                 row.tokens_per_s.mean, row.tokens_per_s.std]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return out.getvalue()


def rank_experts_figure(points: list[GridPoint]):
    """Two panels: average accuracy against trainable parameters (log x) and against step time; one colour a
    method, one marker an N, a line through each (method, N)'s ranks, each point labelled r."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2, sharey=True)
    markers = dict(zip(sorted({p.num_experts or 0 for p in points}), "os^DvP"))
    methods = list(dict.fromkeys(p.method for p in points))
    for ax, x_of, xlabel in ((axes[0], lambda r: r.trainable_params, "trainable parameters"),
                             (axes[1], lambda r: r.step_time_s.mean, "training time per step (s)")):
        drawn = False
        for colour, method in enumerate(methods):
            for n, marker in markers.items():
                line = [p for p in points if p.method == method and (p.num_experts or 0) == n
                        and p.row.average.mean is not None and x_of(p.row)]
                line.sort(key=lambda p: x_of(p.row))
                if not line:
                    continue
                drawn = True
                ax.errorbar([x_of(p.row) for p in line], [p.row.average.mean for p in line],
                            yerr=[p.row.average.std or 0.0 for p in line], fmt=f"{marker}-",
                            color=f"C{colour}", capsize=3, markersize=6, label=f"{method}, N={n}")
                for p in line:
                    ax.annotate(f"r={p.rank}", (x_of(p.row), p.row.average.mean), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=f"C{colour}")
        if drawn:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel=xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("average accuracy after training (%)")
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[0].legend(fontsize=7)
    fig.suptitle("rank x experts: accuracy against trainable parameters and step time (error bars: std over "
                 "seeds)")
    fig.tight_layout()
    return fig


def write_rank_experts(rows: list[Row], out_dir: Path) -> str:
    """rank_experts.md, .csv and .png into ``out_dir``; returns the markdown."""
    from malora_train.run_dir import atomic_write, write_text_atomic

    points = grid_points(rows)
    markdown = rank_experts_markdown(points)
    write_text_atomic(out_dir / RANK_EXPERTS_FILES[0], markdown)
    write_text_atomic(out_dir / RANK_EXPERTS_FILES[1], rank_experts_csv(points))
    fig = rank_experts_figure(points)
    atomic_write(out_dir / RANK_EXPERTS_FILES[2], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return markdown


# -- router_specialisation -----------------------------------------------------------------------------------

def router_overrides(method: str, lr: str, seed: str = "0",
                     fraction: float = VALIDATION_FRACTION) -> list[str]:
    """One method's router grid (lr scale x balance-loss weight x init), one seed, at its lr."""
    return [f"+variant={method}", f"trainer.lr={lr}", *(f"{key}={','.join(values)}"
                                                         for key, values in ROUTER_GRID.items()),
            f"seed={seed}", f"data.validation_fraction={fraction:g}", "data.eval_split=test"]


def router_markdown(rows: list[Row]) -> str:
    """Per configuration: its router settings, accuracy, and I(task; expert) over decoder layers (mean, max
    and where), from the routing the report computes (``study_routing.configuration_routing``)."""
    lines = ["| method | lr scale | balance coef | init | average accuracy | mean I(task; expert) "
             "| max I (layer) | bound | I per layer |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: [override_value(r.overrides, k) or "" for k in
                                           ("variant", *ROUTER_GRID)]):
        routing = configuration_routing([run.routing for run in row.runs if run.routing])
        values = [layer["mutual_information"] for layer in (routing or {}).get("layers", [])]
        if values:
            top = max(range(len(values)), key=values.__getitem__)
            bound = math.log2(min(max(len(routing["tasks"]), 1), routing["num_experts"]))
            where = routing["layers"][top]["layer"]
            summary = (f"{statistics.fmean(values):.3f} | {values[top]:.3f} ({where}) | {bound:.2f} | "
                       + " ".join(f"{v:.3f}" for v in values))
        else:
            summary = f"{MISSING} | {MISSING} | {MISSING} | no routing"
        settings = [override_value(row.overrides, key) or "default" for key in ROUTER_GRID]
        lines.append(f"| {override_value(row.overrides, 'variant') or row.adapter} | " + " | ".join(settings)
                     + f" | {stat_text(row.average.mean, row.average.std, 2)} | {summary} |")
    lines += ["", "I(task; expert) in bits per decoder layer (study_routing: 0 when every task is routed "
              "alike; the bound is log2 of the smaller of the task count and N), one seed each."]
    return "\n".join(lines) + "\n"
