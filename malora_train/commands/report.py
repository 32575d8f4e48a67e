"""``malora-report <dir> [<dir> ...]``: gather the runs of one or more sweeps (Hydra multirun folders, or any
folders of runs) into one table, mean ± sample std over seeds, as report.md, report.csv and
accuracy_vs_params.png; report.md adds the paired comparison over seeds of every two configurations
(``study_stats``) and the routing of each mixture (``study_routing``).

A run is a folder holding ``summary.json`` (written when training finished), ``metrics.jsonl``,
``failure.json`` (a sweep job that raised: its error) or ``.hydra/overrides.yaml``; a run with a failure
record is listed as failed with its error, one without ``summary.json`` as incomplete. Runs are grouped
by their overrides minus ``seed=``. A run whose raw files (``metrics.jsonl``, ``routing.json``) were packed
away (``study_raw_files``) is reported from ``report_inputs.json``: what the report took from them, so the
report is the same.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from malora_train.commands.study_routing import configuration_routing, read_routing, routing_markdown
from malora_train.commands.study_stats import PairedComparison, paired_comparison
from malora_train.errors import DataError, MaloraError, exit_with_error
from malora_train.run_dir import (
    CONFIG_FILE,
    FAILURE_FILE,
    HYDRA_OVERRIDES,
    LOCATION_KEYS,
    METRICS_FILE,
    ROUTING_FILE,
    SUMMARY_FILE,
    atomic_write,
    read_json_object,
    read_jsonl,
    read_text,
    write_text_atomic,
)

OVERRIDES_FILE = HYDRA_OVERRIDES
REPORT_INPUTS_FILE = "report_inputs.json"  # a packed run: what the report took from its raw files
RAW_FILES = (METRICS_FILE, ROUTING_FILE)  # per step and per module: large, and read only through Run
RUN_MARKERS = (SUMMARY_FILE, METRICS_FILE, REPORT_INPUTS_FILE, FAILURE_FILE, str(OVERRIDES_FILE))
OUTPUTS = ("report.md", "report.csv", "accuracy_vs_params.png")
SEED_OVERRIDE = re.compile(r"^[+~]*seed=(.*)$")
JOB_FOLDER = re.compile(r"^\d+_(.+)$")  # Hydra's ``<job num>_<override_dirname>``
OVERRIDE_SEPARATOR = re.compile(r",(?=[\w.+~/-]+=)")  # a comma that starts ``key=``, not one inside a list
# overrides that do not change a result: Hydra's, the resume and display switches, where files live
UNCOMPARED_OVERRIDES = ("hydra.", "hydra/", "trainer.resume", "trainer.progress", "logger.", *LOCATION_KEYS)
MISSING = "–"


@dataclasses.dataclass
class Run:
    """What the report needs from one run folder; the numbers are None for a run that did not complete."""

    path: Path
    overrides: list[str]
    adapter: str
    status: str  # "failed" with a failure record, else summary.json's status, or "incomplete" without one
    last_step: int | None
    error: str | None = None  # a failed run's one-line error
    final_lm_loss: float | None = None
    trainable_params: int | None = None
    trainable_percent: float | None = None
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    average: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None  # training time per optimizer step (evaluation excluded)
    routing: dict[str, Any] | None = None  # a mixture's routing.json, reduced (study_routing.reduce_routing)
    where: str = ""  # the run's folder as the report names it (relative to the folder given)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def seed(self) -> str | None:
        found = [m.group(1) for m in map(SEED_OVERRIDE.match, self.overrides) if m]
        return found[-1] if found else None


@dataclasses.dataclass
class Stat:
    """Mean and sample standard deviation of one quantity over a configuration's seeds."""

    mean: float | None
    std: float | None  # None for fewer than two values

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        present = [float(v) for v in values if v is not None]
        if not present:
            return cls(None, None)
        return cls(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None)


@dataclasses.dataclass
class Row:
    """One configuration: its completed runs aggregated, its other runs counted."""

    overrides: list[str]  # what defines the configuration (the CSV's config column)
    distinct: list[str]  # those overrides not shared by every row (the markdown table's and the plot's label)
    adapter: str
    runs: list[Run]
    unfinished: list[Run]
    trainable_params: int | None
    trainable_percent: float | None
    accuracy: dict[str, Stat]
    average: Stat
    final_lm_loss: Stat
    tokens_per_s: Stat
    step_time_s: Stat = dataclasses.field(default_factory=lambda: Stat(None, None))

    @property
    def config(self) -> str:
        return ",".join(self.overrides) or "default"

    @property
    def label(self) -> str:
        return ",".join(self.distinct) or "default"

    def averages_by_seed(self) -> dict[str, float]:
        """Seed -> average accuracy after training (a seed run twice: the mean of its runs; a run without a
        ``seed=`` override counts as seed ``default``)."""
        values: dict[str, list[float]] = {}
        for run in self.runs:
            if run.average is not None:
                values.setdefault(run.seed or "default", []).append(run.average)
        return {seed: statistics.fmean(v) for seed, v in values.items()}


# -- reading runs ------------------------------------------------------------------------------------------

def find_run_dirs(root: Path) -> list[Path]:
    """Every folder below ``root`` (itself included) that holds a run marker, in path order."""
    markers = (SUMMARY_FILE, METRICS_FILE, REPORT_INPUTS_FILE, FAILURE_FILE)
    found = {path.parent for marker in markers for path in root.rglob(marker)}
    found |= {path.parent.parent for path in root.rglob(OVERRIDES_FILE.name) if path.parent.name == ".hydra"}
    return sorted(found)


def final_lm_loss(path: Path, records: list[dict[str, Any]]) -> float | None:
    """``lm_loss`` of the last training line (eval lines have none); non-finite values are logged as text."""
    for record in reversed(records):
        if "lm_loss" in record:
            try:
                return float(record["lm_loss"])
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}: lm_loss={record['lm_loss']!r} at step {record.get('step')} "
                                "is not a number") from err
    return None


def read_overrides(run_dir: Path, root: Path) -> list[str]:
    """``.hydra/overrides.yaml``, else the overrides in a ``<job num>_<override_dirname>`` folder name."""
    path = run_dir / OVERRIDES_FILE
    if path.is_file():
        try:
            overrides = yaml.safe_load(read_text(path)) or []
        except yaml.YAMLError as err:
            raise DataError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise DataError(f"{path}: expected a YAML list of override strings")
        return overrides
    match = JOB_FOLDER.match(run_dir.name)
    if match and "=" in match.group(1):
        return OVERRIDE_SEPARATOR.split(match.group(1))
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return [f"run={name}"]  # nothing to group by: the run stands alone under its folder name


def adapter_kind(run_dir: Path, overrides: list[str], summary: dict[str, Any] | None) -> str:
    """The adapter kind from summary.json, else the ``adapter=`` override, else the run's config.yaml."""
    if summary and summary.get("adapter"):
        return str(summary["adapter"])
    chosen = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("adapter=")]
    if chosen:
        return chosen[-1]
    try:
        kind = (yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}).get("adapter", {}).get("kind")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):  # the kind stays unknown
        kind = None
    return str(kind) if kind else "?"


def number(summary: dict[str, Any], key: str, path: Path) -> float | None:
    value = summary.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise DataError(f"{path}: {key}={value!r} is not a number")
    return value


def run_status(summary: dict[str, Any] | None, failure: dict[str, Any] | None) -> str:
    """A completed summary wins (a later attempt refused by the run-directory guard leaves its failure
    record beside it); otherwise a failure record; otherwise the summary's status, or incomplete."""
    if summary is None:
        status = "incomplete"
    elif "status" in summary:
        status = str(summary["status"])
    else:  # a summary written before it had a status holds the steps run; one without them ({}) is not whole
        status = "completed" if "steps" in summary else f"incomplete ({SUMMARY_FILE} has no status or steps)"
    return "failed" if failure is not None and status != "completed" else status


def read_report_inputs(run_dir: Path) -> dict[str, Any]:
    """``report_inputs.json`` of a run whose raw files were packed away (``report_inputs``); empty without."""
    path = run_dir / REPORT_INPUTS_FILE
    if not path.is_file():
        return {}
    inputs = read_json_object(path)
    routing = inputs.get("routing")
    reduced = isinstance(routing, dict) and isinstance(routing.get("decoder_layers"), list)
    if routing is not None and not reduced:
        raise DataError(f"{path}: 'routing' should be a reduced routing report (with 'decoder_layers')")
    number(inputs, "final_lm_loss", path)
    number(inputs, "last_step", path)
    return inputs


ROUTING_DIGITS = 9  # significant digits report_inputs.json keeps of routing means (reports print 1-3)


def rounded(value: Any, digits: int = ROUTING_DIGITS) -> Any:
    """``value`` with every float in it (nested in lists and dicts) to ``digits`` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    return value


def report_inputs(run: Run) -> dict[str, Any]:
    """What the report takes from the run's raw files, for ``report_inputs.json``: the routing means rounded
    (``ROUTING_DIGITS``), which halves a mixture run's file and changes no printed figure."""
    return {"last_step": run.last_step, "final_lm_loss": run.final_lm_loss, "routing": rounded(run.routing)}


def read_run(run_dir: Path, root: Path) -> Run:
    """The run's files; where a raw file (``RAW_FILES``) is absent, what ``report_inputs.json`` kept of it."""
    summary_path = run_dir / SUMMARY_FILE
    try:
        summary = read_json_object(summary_path) if summary_path.is_file() else None
        unreadable = None
    except DataError as err:  # a truncated or damaged summary: the run is listed, not aggregated
        summary, unreadable = None, " ".join(str(err).split())
    failure_path = run_dir / FAILURE_FILE
    failure = read_json_object(failure_path) if failure_path.is_file() else None
    metrics_path = run_dir / METRICS_FILE
    packed = read_report_inputs(run_dir)
    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    overrides = read_overrides(run_dir, root)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    last_step = (max(steps) if steps else None) if metrics_path.is_file() else packed.get("last_step")
    run = Run(path=run_dir, overrides=overrides, adapter=adapter_kind(run_dir, overrides, summary),
              status=run_status(summary, failure), last_step=last_step,
              where=run_dir.relative_to(root).as_posix() if run_dir != root else ".")
    if run.failed:
        run.error = str(failure.get("error") or failure.get("error_type") or "no error recorded")
    elif unreadable:
        run.status = f"unreadable summary ({unreadable})"
    if not run.completed:
        return run
    accuracy = summary.get("eval_after") or {}
    if not isinstance(accuracy, dict):
        raise DataError(f"{summary_path}: eval_after should map each task to its accuracy")
    run.accuracy = {task: number(accuracy, task, summary_path) for task in accuracy}
    run.average = number(summary, "eval_after_average", summary_path)
    run.tokens_per_s = number(summary, "tokens_per_s", summary_path)
    params = number(summary, "trainable_params", summary_path)
    run.trainable_params = int(params) if params is not None else None
    run.trainable_percent = number(summary, "trainable_percent", summary_path)
    run.final_lm_loss = (final_lm_loss(metrics_path, records) if metrics_path.is_file()
                         else packed.get("final_lm_loss"))
    train_time, steps_done = (number(summary, "train_time_s", summary_path),
                              number(summary, "steps", summary_path))
    run.step_time_s = train_time / steps_done if train_time is not None and steps_done else None
    run.routing = read_routing(run_dir) if (run_dir / ROUTING_FILE).is_file() else packed.get("routing")
    return run


# -- grouping ----------------------------------------------------------------------------------------------

def configuration(run: Run, group_by_seed: bool) -> tuple[str, list[str]]:
    """(grouping key, overrides shown): the run's overrides without seed (with it, and alone, under
    --no-group) and without those that do not change the result; their order is ignored."""
    shown = [o for o in run.overrides if not o.lstrip("+~").startswith(UNCOMPARED_OVERRIDES)
             and not (group_by_seed and SEED_OVERRIDE.match(o))]
    key = f"{run.adapter}|{sorted(shown)}" if group_by_seed else str(run.path)
    return key, shown


def first_value(label: str, what: str, values: list[Any]) -> Any:
    """The value shared by every seed (it depends on the configuration only); a warning if they differ."""
    present = [v for v in values if v is not None]
    if len(set(present)) > 1:
        print(f"malora-report: warning: {label}: {what} differs between seeds ({sorted(set(present))}); "
              "the first is reported", file=sys.stderr)
    return present[0] if present else None


def aggregate(overrides: list[str], runs: list[Run]) -> Row:
    label = ",".join(overrides) or "default"
    done = [r for r in runs if r.completed]
    tasks = list(dict.fromkeys(t for r in done for t in r.accuracy))
    return Row(
        overrides=overrides,
        distinct=overrides,
        adapter=runs[0].adapter,
        runs=done,
        unfinished=[r for r in runs if not r.completed],
        trainable_params=first_value(label, "trainable_params", [r.trainable_params for r in done]),
        trainable_percent=first_value(label, "trainable_percent", [r.trainable_percent for r in done]),
        accuracy={t: Stat.of([r.accuracy.get(t) for r in done]) for t in tasks},
        average=Stat.of([r.average for r in done]),
        final_lm_loss=Stat.of([r.final_lm_loss for r in done]),
        tokens_per_s=Stat.of([r.tokens_per_s for r in done]),
        step_time_s=Stat.of([r.step_time_s for r in done]),
    )


def group_runs(runs: list[Run], group_by_seed: bool = True) -> list[Row]:
    """One row per configuration, sorted by adapter kind, then trainable parameters, then label."""
    groups: dict[str, tuple[list[str], list[Run]]] = {}
    for run in runs:
        key, shown = configuration(run, group_by_seed)
        groups.setdefault(key, (shown, []))[1].append(run)
    rows = [aggregate(shown, members) for shown, members in groups.values()]
    shared = common_overrides(rows)
    for row in rows:
        row.distinct = [o for o in row.overrides if o not in shared]
        counts = Counter(r.seed for r in row.runs)
        repeated = [seed for seed, n in counts.items() if seed is not None and n > 1]
        if repeated:
            print(f"malora-report: warning: {row.config}: several runs with seed={','.join(repeated)} "
                  "(from different sweeps?) are averaged together", file=sys.stderr)
    return sorted(rows, key=lambda r: (r.adapter, r.trainable_params is None, r.trainable_params or 0,
                                       r.config))


def common_overrides(rows: list[Row]) -> list[str]:
    """Overrides every configuration shares (``model=...``, ``trainer.max_steps=...``); none for one row."""
    if len(rows) < 2:
        return []
    return [o for o in rows[0].overrides if all(o in row.overrides for row in rows[1:])]


# -- output --------------------------------------------------------------------------------------------

def task_names(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(t for row in rows for t in row.accuracy))


def format_stat(stat: Stat | None, digits: int) -> str:
    if stat is None or stat.mean is None:
        return MISSING
    std = MISSING if stat.std is None else f"{stat.std:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {std}"


def format_params(row: Row) -> str:
    if row.trainable_params is None:
        return MISSING
    text = f"{row.trainable_params:,}"
    return f"{text} ({row.trainable_percent:.2f}%)" if row.trainable_percent is not None else text


def unfinished_counts(row: Row) -> dict[str, int]:
    """{"failed": n, "incomplete": m} over the row's runs that did not complete (interrupted ones are
    incomplete)."""
    failed = sum(run.failed for run in row.unfinished)
    return {"failed": failed, "incomplete": len(row.unfinished) - failed}


def format_seeds(row: Row) -> str:
    counts = [f"+{n} {what}" for what, n in unfinished_counts(row).items() if n]
    return f"{len(row.runs)} ({', '.join(counts)})" if counts else str(len(row.runs))


def markdown_table(rows: list[Row]) -> str:
    tasks = task_names(rows)
    header = ["config", "adapter", "trainable params", "seeds", *tasks, "average", "final lm_loss",
              "tokens/s", "step time (s)"]
    align = ["---"] * 4 + ["---:"] * (len(tasks) + 4)  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        cells = [f"`{row.label}`".replace("|", "\\|"), row.adapter, format_params(row), format_seeds(row),
                 *(format_stat(row.accuracy.get(t), 2) for t in tasks), format_stat(row.average, 2),
                 format_stat(row.final_lm_loss, 4), format_stat(row.tokens_per_s, 0),
                 format_stat(row.step_time_s, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unfinished_list(rows: list[Row]) -> str:
    runs = [run for row in rows for run in row.unfinished]
    if not runs:
        return ""
    lines = [f"Runs not aggregated ({len(runs)}, failed or without a completed summary.json):"]
    for run in runs:
        step = f"last logged step {run.last_step}" if run.last_step is not None else "nothing logged"
        where = run.where
        overrides = ",".join(run.overrides) or "default"
        status = f"failed: {run.error}" if run.failed else run.status
        lines.append(f"- `{where}` (`{overrides}`): {status}, {step}")
    return "\n".join(lines)


def markdown_report(rows: list[Row]) -> str:
    """The table, a line on what it shows, the runs left out of it, the paired comparisons and the routing."""
    parts = [markdown_table(rows),
             "Accuracy after training (%), final training lm_loss, tokens/s and training time per step: "
             f"mean ± sample std over seeds ({MISSING} for a single seed)."]
    shared = common_overrides(rows)
    if shared:
        parts.append(f"Overrides shared by every configuration: `{','.join(shared)}`.")
    unfinished = unfinished_list(rows)
    if unfinished:
        parts.append(unfinished)
    comparisons = paired_comparisons(rows)
    if comparisons:
        parts.append(comparison_markdown(comparisons))
    routing = [routing_markdown(row.label, r) for row in rows
               if (r := configuration_routing([run.routing for run in row.runs if run.routing]))]
    if routing:
        parts.append("### Routing\n\n" + "\n\n".join(routing))
    return "\n\n".join(parts) + "\n"


def paired_comparisons(rows: list[Row]) -> list[PairedComparison]:
    """Every two configurations with at least two seeds in common, the better average first."""
    found = []
    for i, first in enumerate(rows):
        for second in rows[i + 1:]:
            a, b = first.averages_by_seed(), second.averages_by_seed()
            if len(set(a) & set(b)) < 2:
                continue
            comparison = paired_comparison(first.label, second.label, a, b)
            if comparison.mean < 0:
                comparison = paired_comparison(second.label, first.label, b, a)
            found.append(comparison)
    return found


def comparison_markdown(comparisons: list[PairedComparison]) -> str:
    lines = ["### Paired comparison over seeds", "",
             "| A | B | seeds | A − B per seed | mean ± std | t | p | A better on | verdict |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for c in comparisons:
        per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(c.seeds, c.differences))
        t = MISSING if c.t is None else f"{c.t:.2f}"
        p = MISSING if c.p_value is None else f"{c.p_value:.3f}"
        std = MISSING if c.std is None else f"{c.std:.2f}"
        lines.append(f"| `{c.first}` | `{c.second}` | {len(c.seeds)} | {per_seed} | {c.mean:+.2f} ± {std} "
                     f"| {t} | {p} | {c.wins}/{len(c.seeds)} | {c.verdict} |")
    lines += ["", "Differences of the average accuracy after training (points), seed by seed (the same seed: "
              "the same data order and evaluation). Student's paired t test, two-sided, 5% level: "
              "\"larger than seed noise\" when |t| exceeds the t quantile for n − 1 degrees of freedom "
              "(12.71 for 2 seeds, 4.30 for 3); otherwise the seeds do not show a difference."]
    return "\n".join(lines)


def csv_header(tasks: list[str]) -> list[str]:
    metrics = [f"acc_{t}" for t in tasks] + ["acc_average", "final_lm_loss", "tokens_per_s", "step_time_s"]
    stats = [f"{m}_{part}" for m in metrics for part in ("mean", "std")]
    return ["config", "adapter", "seeds", "incomplete", "failed", "trainable_params", "trainable_percent",
            *stats]


def csv_text(rows: list[Row]) -> str:
    """One line per configuration, plain numbers; an empty cell is a missing value (std of one seed)."""
    tasks = task_names(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_header(tasks))
    for row in rows:
        stats = [row.accuracy.get(t) or Stat(None, None) for t in tasks]
        stats += [row.average, row.final_lm_loss, row.tokens_per_s, row.step_time_s]
        unfinished = unfinished_counts(row)
        cells = [row.config, row.adapter, len(row.runs), unfinished["incomplete"], unfinished["failed"],
                 row.trainable_params, row.trainable_percent, *(v for s in stats for v in (s.mean, s.std))]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return out.getvalue()


def point_label(row: Row) -> str:
    """The label without the ``adapter=<kind>`` choice, which the marker and colour already show."""
    rest = [o for o in row.distinct if not o.lstrip("+~").startswith("adapter=")]
    return ",".join(rest) or row.adapter


def accuracy_figure(rows: list[Row]):
    """Average accuracy after training against trainable parameters (log x), one marker per adapter kind,
    each point labelled with its overrides (labels moved apart where they would overlap)."""
    from matplotlib.figure import Figure

    markers = "os^DvPX*"
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    plotted = [r for r in rows if r.average.mean is not None and r.trainable_params]
    kinds = list(dict.fromkeys(r.adapter for r in plotted))
    labels = []
    for index, kind in enumerate(kinds):
        points = sorted((r for r in plotted if r.adapter == kind), key=lambda r: r.trainable_params)
        ax.errorbar([r.trainable_params for r in points], [r.average.mean for r in points],
                    yerr=[r.average.std or 0.0 for r in points], fmt=markers[index % len(markers)],
                    color=f"C{index}", capsize=3, markersize=7, label=kind)
        labels += [ax.annotate(point_label(r), (r.trainable_params, r.average.mean),
                               textcoords="offset points", xytext=(5, 4), fontsize=7, color=f"C{index}")
                   for r in points]
    if plotted:
        ax.set_xscale("log")
        ax.legend(title="adapter")
    else:
        ax.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="trainable parameters", ylabel="average accuracy after training (%)",
           title="accuracy against trainable parameters (error bars: std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    spread_labels(fig, labels)
    return fig


def spread_labels(fig, labels: list, tries: int = 40) -> None:
    """Shift each point label up or down (alternating, one line height further each try) until it
    overlaps no label placed before it. Offsets are in points, so the layout holds at any dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    placed = []
    for label in labels:
        x, y = label.xyann
        step = label.get_window_extent(renderer).height * 72 / fig.dpi + 1
        for attempt in range(tries):
            shift = (attempt + 1) // 2 * step * (1 if attempt % 2 else -1)
            label.xyann = (x, y + shift)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))


def plot_accuracy(rows: list[Row], path: Path) -> None:
    fig = accuracy_figure(rows)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


# -- command -----------------------------------------------------------------------------------------------

def build_report(roots: Path | list[Path], out_dir: Path,
                 group_by_seed: bool = True) -> tuple[list[Row], str]:
    """Read every run below each of ``roots``, write the three outputs into ``out_dir``; returns (rows,
    markdown). Runs of several sweeps with the same overrides are one configuration (their seeds pooled)."""
    runs = []
    for root in [roots] if isinstance(roots, Path) else roots:
        if not root.is_dir():
            raise DataError(f"{root}: not a directory")
        run_dirs = find_run_dirs(root)
        if not run_dirs:
            raise DataError(f"{root}: no runs found (no {', '.join(RUN_MARKERS)} below it)")
        runs += [read_run(d, root) for d in run_dirs]
    rows = group_runs(runs, group_by_seed)
    markdown = markdown_report(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.md", markdown)
    write_text_atomic(out_dir / "report.csv", csv_text(rows))
    plot_accuracy(rows, out_dir / "accuracy_vs_params.png")
    return rows, markdown


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="malora-report",
        description="Gather the runs below each DIR (e.g. a multirun/<date>/<time> folder) into report.md, "
                    "report.csv and accuracy_vs_params.png, mean ± std over seeds, with a paired comparison "
                    "over seeds of every two configurations and the routing of each mixture.")
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="folder holding runs (searched recursively); several are reported together")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: the first DIR)")
    grouping = parser.add_mutually_exclusive_group()
    grouping.add_argument("--group-by-seed", dest="group", action="store_true", default=True,
                          help="one row per configuration, aggregated over seeds (default)")
    grouping.add_argument("--no-group", dest="group", action="store_false", help="one row per run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = args.out if args.out is not None else args.dirs[0]
    try:
        _, markdown = build_report(args.dirs, out_dir, args.group)
    except (MaloraError, OSError) as err:
        exit_with_error(err, program="malora-report")
    print(markdown, end="")
    print(f"wrote {', '.join(str(out_dir / name) for name in OUTPUTS)}", file=sys.stderr)

