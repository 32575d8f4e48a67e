"""Run one part of the paper's comparison as a resumable sweep, then report it (``make study PART=...``).

    python scripts/study.py commonsense                 # +experiment=paper_commonsense: 5 methods x 3 seeds
    python scripts/study.py ablations                   # paper_ablations, reported with commonsense's runs
    python scripts/study.py synthetic                   # paper_synthetic
    python scripts/study.py bigbench_probe [--min-gain 10]   # which BIG-bench tasks the model can learn
    python scripts/study.py bigbench                    # paper_bigbench on the tasks the probe selected
    python scripts/study.py synthetic model=tiny trainer.max_steps=2 '+variant=lora,molora' seed=0,1
    python scripts/study.py commonsense --jobs 3        # the seeds as 3 processes at once, then one report
    python scripts/study.py commonsense --pack          # the runs' raw files into one archive (a repository)
    python scripts/study.py lr_sweep --part bigbench    # each method's lr on a validation split, then 3 seeds
    python scripts/study.py rank_experts                # MoLoRA/MALoRA over N x r at their tuned lrs
    python scripts/study.py router_specialisation       # router lr scale x balance coef x init

Each part is ``malora-train -m +experiment=<preset>`` into ``<out>/<part>/`` (default ``studies/``), one
folder per job named by its overrides (not by its number, so adding a seed or a method does not rename the
others; ``experiment-paper_commonsense__variant-lora__seed-0``, the rule of
``malora_train/sweep/run_names.py``: no ``+``, ``=`` or ``,``; the overrides themselves are in the job's
``.hydra/overrides.yaml``), with ``trainer.resume=auto``: a rerun skips every run that completed, continues an
interrupted one from its last checkpoint and starts the others. Overrides after the part go on top of the
preset (``+variant=...`` and ``seed=...`` replace the preset's sweep). Then ``malora-report`` writes
report.md, report.csv and accuracy_vs_params.png into the part's folder, the script adds answer_priors.md
(what answering from each task's most frequent label or answer text scores on the evaluation examples: the bar
for "learned the task") and prints where they are. ``--no-report`` only trains; ``--report-only`` only
reports.

``--pack`` makes a finished part fit in a repository (``malora_train/commands/study_raw_files.py``): each
run's per-step ``metrics.jsonl`` and per-module ``routing.json`` go into ``<out>/<part>/raw_files.tar.xz``,
with their sha256 in ``raw_files.sha256``, and what the report takes from them stays in the run's
``report_inputs.json``: ``--report-only`` then writes the same report. A tuned part packs its whole folder
(``lr_sweep_<part>``: both stages) into one archive. ``--verify-raw`` checks the raw
files (put back with ``tar -xJf raw_files.tar.xz`` in the part folder, or else in the archive) against the
manifest.

``--jobs N`` splits the sweep by seed into N processes that run at once (each its own ``study.py`` with its
share of the seeds, output in ``<out>/<part>/jobs/<k>.log``), then reports once. A 135M model leaves most of a
large GPU idle: with CUDA MPS running (``nvidia-cuda-mps-control -d``) the processes' kernels share the GPU
(RESULTS.md gives the study's timings). The GPU pool launcher does the same within one sweep:
``hydra/launcher=gpu_pool hydra.launcher.jobs_per_gpu=5``.

The tuned parts (issue 27; ``malora_train/commands/study_tuning.py``) start from ``--part``'s preset
(default bigbench, on the probe's tasks). ``lr_sweep`` holds ``--validation-fraction`` (0.1) of each task's
training examples out as a validation split (``data.validation_fraction``, never trained on), trains every
method at every ``--lrs`` on seed 0 scoring that split (``<out>/lr_sweep_<part>/validation/``), writes each
method's choice, curve and spread to ``lr_selection.json`` / ``.md`` (the highest validation average, a tie
to the smaller lr; a method with a missing run gets no choice, the run named), then trains ``--seeds``
(0,1,2) at the chosen lr on the test split (``tuned/``) and writes ``report.md`` with the shared-lr report of
``<out>/<part>/`` beside it. ``rank_experts`` and ``router_specialisation`` read the choices (or ``--lr
METHOD=LR``) and write ``rank_experts.{md,csv,png}`` / ``router_specialisation.md`` beside malora-report's
files. ``+variant=a,b`` on the command line picks the methods. ``--jobs N`` runs the methods' sweeps as N
``malora-train`` processes at once (logs in ``<part folder>/jobs/``); with the GPU pool launcher each of them
runs ``jobs_per_gpu`` jobs at once, so ``--jobs 3`` and ``hydra.launcher.jobs_per_gpu=4`` put 12 runs on the
GPU (RESULTS.md, "Commonsense with the learning rate chosen per method", ran so).

The BIG-bench mixture is chosen by measuring (``bigbench_probe``): one LoRA run over 18 candidate tasks,
evaluated before and after training. A task is selected when its accuracy after training is at least
``--min-gain`` points (default 10) above its zero-shot accuracy: with 500 evaluation examples a task, an
accuracy near 50% has a standard error of 2.2 points, so 10 points is about four and a half of them.
``--over-prior`` counts the gain from the larger of the zero-shot accuracy and the most frequent answer's
share (``answer_priors.md``), so that a task trained only to its answer prior is not selected (RESULTS.md,
"BIG-bench", shows how often the plain gain is the prior). The selection goes to
``<out>/bigbench_probe/selection.json``; ``bigbench`` trains on it (``data.tasks=[...]`` on the command line
wins) and refuses fewer than 5 tasks. Rerunning the probe with another ``--min-gain`` or ``--over-prior``
selects again without training again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PRESETS = {"commonsense": "paper_commonsense", "ablations": "paper_ablations", "synthetic": "paper_synthetic",
           "bigbench_probe": "bigbench_probe", "bigbench": "paper_bigbench"}
REPORTED_WITH = {"ablations": ["commonsense"]}  # the ablations pair with commonsense's malora_intra runs
MIN_BIGBENCH_TASKS = 5
SELECTION_FILE = "selection.json"
PRIORS_FILE = "answer_priors.md"  # what answering from the prior alone scores on the part's evaluation data
TASKS_FILE = "tasks.json"  # bigbench: the task list its runs trained on (not in their folder names)


class StudyError(Exception):
    """A part that cannot run as asked: one line for the user."""


def sweep_command(part: str, out: Path, overrides: list[str]) -> list[str]:
    """The malora-train arguments of one part. BIG-bench's task list stays out of the folder names (eleven
    task names make a name longer than a file system allows); ``check_tasks`` keeps one list a folder."""
    return preset_sweep(PRESETS[part], out / part, overrides, tasks_unnamed=part == "bigbench")


def preset_sweep(preset: str, sweep_dir: Path, overrides: list[str], tasks_unnamed: bool) -> list[str]:
    """``malora-train -m +experiment=<preset>`` into ``sweep_dir``, one folder a job named by its overrides,
    resumable (``trainer.resume=auto``)."""
    from malora_train.run_dir import LOCATION_KEYS
    from malora_train.sweep.run_names import RUN_FOLDER_SUBDIR

    # not in the folder names: the resume switches, and where files live (a path in a name nests the folders,
    # and the same run on another machine must find its folder again)
    unnamed = (["trainer.resume", "trainer.progress", *LOCATION_KEYS]
               + (["data.tasks"] if tasks_unnamed else []))
    settings = [f"hydra.sweep.subdir='{RUN_FOLDER_SUBDIR}'",  # quoted: the resolver's comma is no sweep
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(unnamed)}]",
                "trainer.resume=auto"]
    return ["-m", f"+experiment={preset}", f"hydra.sweep.dir={sweep_dir}", *settings, *overrides]


def check_tasks(part_dir: Path, tasks: list[str]) -> None:
    """Record the task list of a bigbench folder, or refuse another one (its finished runs, named without
    the tasks, would be taken as this list's)."""
    path = part_dir / TASKS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text()).get("tasks")
        if recorded != tasks:
            raise StudyError(f"{path}: the runs in {part_dir} trained on "
                             f"data.tasks=[{','.join(recorded or [])}], not [{','.join(tasks)}]: "
                             "use another --out")
        return
    from malora_train.run_dir import write_json_atomic

    part_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"tasks": tasks})


def run_sweep(arguments: list[str]) -> int:
    """``malora-train <arguments>`` in this process; its exit status (2 when a job failed)."""
    from malora_train.cli import train_main

    print("malora-train " + " ".join(arguments), flush=True)
    argv = sys.argv
    sys.argv = ["malora-train", *arguments]
    try:
        train_main()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv


def run_sweeps(sweeps: list[list[str]], jobs: int, logs: Path) -> int:
    """Each of ``sweeps`` (malora-train arguments) one after another in this process (``jobs`` 1), or as up
    to ``jobs`` ``malora-train`` processes at once (``run_processes``); the worst exit status."""
    if jobs == 1:
        return max((run_sweep(arguments) for arguments in sweeps), default=0)
    return run_processes([[sys.executable, "-m", "malora_train.cli", *arguments] for arguments in sweeps],
                         jobs, logs)


def run_processes(commands: list[list[str]], jobs: int, logs: Path) -> int:
    """``commands`` as processes, up to ``jobs`` at once, command k's output in ``logs/<k>.log``; the worst
    exit status, and the end of each failed one's log on stderr."""
    import subprocess
    import time

    logs.mkdir(parents=True, exist_ok=True)
    pending, running, statuses = list(enumerate(commands)), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            k, command = pending.pop(0)
            print(f"job {k}: {' '.join(command[1:])} > {logs / f'{k}.log'}", flush=True)
            with (logs / f"{k}.log").open("w") as handle:
                running[k] = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        finished = [k for k, process in running.items() if process.poll() is not None]
        for k in finished:  # a freed slot takes the next command at once
            statuses[k] = running.pop(k).returncode
        if not finished:
            time.sleep(0.2)
    for k, status in sorted(statuses.items()):
        if status:
            tail = (logs / f"{k}.log").read_text().strip().splitlines()[-3:]
            print(f"study.py: job {k} exited with status {status} ({logs / f'{k}.log'}):", *tail, sep="\n  ",
                  file=sys.stderr)
    return max(statuses.values(), default=0)


# -- the BIG-bench probe ------------------------------------------------------------------------------------

def probe_gains(probe_dir: Path) -> list[tuple[str, float, float, float]]:
    """(task, zero-shot %, after training %, gain) for the probe's completed run, largest gain first."""
    from malora_train.run_dir import SUMMARY_FILE, completed_summary

    summaries = [s for path in sorted(probe_dir.rglob(SUMMARY_FILE)) if (s := completed_summary(path.parent))]
    if len(summaries) != 1:
        raise StudyError(f"{probe_dir}: expected one completed probe run, found {len(summaries)}")
    before, after = summaries[0].get("eval_before") or {}, summaries[0].get("eval_after") or {}
    if not before or not after:
        raise StudyError(f"{probe_dir}: the probe run has no evaluation before and after training "
                         "(trainer.eval_before and trainer.eval_after must stay true)")
    rows = [(task, before[task], after[task], after[task] - before[task]) for task in after if task in before]
    return sorted(rows, key=lambda row: -row[3])


def select_tasks(probe_dir: Path, min_gain: float, priors: dict[str, float] | None = None,
                 over_prior: bool = False) -> list[str]:
    """Print the probe's table, write and return the tasks whose gain is at least ``min_gain`` points: over
    the zero-shot accuracy, and with ``over_prior`` over the most frequent answer's share too (``priors``,
    task -> %), so that a task trained only to its answer prior is not taken for one the model learned.
    Without ``priors`` (the data is not here) those recorded with the last selection are kept."""
    from malora_train.run_dir import write_json_atomic

    recorded = probe_dir / SELECTION_FILE
    if not priors and recorded.is_file():  # the data is not here: keep the priors the last selection recorded
        priors = json.loads(recorded.read_text()).get("answer_priors")
    if over_prior and not priors:
        raise StudyError("--over-prior needs the tasks' answer priors, and the probe's data did not load "
                         "here: pass its data.root")
    priors = priors or {}
    rows = probe_gains(probe_dir)
    baseline = {task: max(before, priors.get(task, before)) if over_prior else before
                for task, before, _, _ in rows}
    selected = [task for task, _, after, _ in rows if after - baseline[task] >= min_gain]
    print("\n| task | zero-shot | most frequent answer | after training | gain | over the prior "
          "| selected |\n|---|---:|---:|---:|---:|---:|---|")
    for task, before, after, gain in rows:
        prior = f"{priors[task]:.1f} | " if task in priors else "– | "
        over = f"{after - priors[task]:+.1f} | " if task in priors else "– | "
        print(f"| {task} | {before:.1f} | {prior}{after:.1f} | {gain:+.1f} | "
              f"{over}{'yes' if task in selected else 'no'} |")
    write_json_atomic(probe_dir / SELECTION_FILE, {"min_gain": min_gain, "over_prior": over_prior,
                                                   "tasks": selected,
                                                   "gains": {task: gain for task, _, _, gain in rows},
                                                   "answer_priors": priors})
    counted = "over both their zero-shot accuracy and their answer prior" if over_prior else "over zero-shot"
    print(f"\n{len(selected)} task(s) gain at least {min_gain:g} points {counted}: "
          f"data.tasks=[{','.join(selected)}]\nwrote {probe_dir / SELECTION_FILE}")
    return selected


def selected_tasks(out: Path) -> list[str]:
    path = out / "bigbench_probe" / SELECTION_FILE
    if not path.is_file():
        raise StudyError(f"{path} not found: run the probe first (make study PART=bigbench_probe), or pass "
                         "data.tasks=[...]")
    tasks = json.loads(path.read_text()).get("tasks") or []
    if len(tasks) < MIN_BIGBENCH_TASKS:
        raise StudyError(f"{path}: the probe selected {len(tasks)} task(s) ({', '.join(tasks) or 'none'}), "
                         f"fewer than {MIN_BIGBENCH_TASKS}: rerun the probe with a lower --min-gain")
    return tasks


# -- parallel jobs -------------------------------------------------------------------------------------------

def sweep_seeds(part: str, overrides: list[str]) -> list[str]:
    """The seeds the part sweeps: a ``seed=`` override's, else its preset's
    (``hydra.sweeper.params.seed``)."""
    for override in overrides:
        if override.startswith("seed="):
            return override.split("=", 1)[1].split(",")
    seeds = sweep_params(part).get("seed")
    return str(seeds).split(",") if seeds is not None else ["0"]


def sweep_params(part: str):
    """The part's preset's ``hydra.sweeper.params`` (what its ``malora-train -m`` sweeps)."""
    from hydra import compose, initialize_config_dir

    from malora_train.config import CONF_DIR, register_configs

    register_configs()  # the schemas conf/config.yaml and conf/adapter/*.yaml start from
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={PRESETS[part]}"], return_hydra_config=True)
    return cfg.hydra.sweeper.params


def job_overrides(seeds: list[str], jobs: int, overrides: list[str]) -> list[list[str]]:
    """Each job's overrides: ``overrides`` with its share of ``seeds`` (round robin; at most one job a
    seed)."""
    rest = [o for o in overrides if not o.startswith("seed=")]
    shares = [seeds[k::jobs] for k in range(min(jobs, len(seeds)))]
    return [[*rest, f"seed={','.join(share)}"] for share in shares]


def run_jobs(part: str, out: Path, overrides: list[str], jobs: int) -> int:
    """Run the part as ``jobs`` ``study.py`` processes at once (split by seed); the worst exit status."""
    shares = job_overrides(sweep_seeds(part, overrides), jobs, overrides)
    commands = [[sys.executable, __file__, part, "--out", str(out), "--no-report", *share]
                for share in shares]
    return run_processes(commands, len(commands), out / part / "jobs")


# -- the tuned parts (issue 27): lr per method, rank x experts, router specialisation ----------------------

TUNED_PARTS = ("lr_sweep", "rank_experts", "router_specialisation")
TUNED_BASES = ("bigbench", "commonsense", "synthetic")  # --part: the preset a tuned part starts from


def tuned_dir(part: str, out: Path, base: str) -> Path:
    """``<out>/lr_sweep_<base>``; ``<out>/rank_experts`` and ``<out>/router_specialisation`` on BIG-bench
    (the issue's), ``..._<base>`` on another mixture."""
    return out / (f"{part}_{base}" if part == "lr_sweep" or base != "bigbench" else part)


def split_methods(overrides: list[str], default: list[str]) -> tuple[list[str], list[str]]:
    """(methods, the other overrides): a ``+variant=a,b`` override names the methods, else ``default``;
    ``seed=`` is left out (each stage sets its own seeds: --seeds)."""
    from malora_train.commands.study_tuning import split_list

    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("variant=")]
    rest = [o for o in overrides if not o.lstrip("+~").startswith(("variant=", "seed="))]
    return (split_list(given[-1]) if given else list(default)), rest


def preset_variants(base: str) -> list[str]:
    """The methods the base preset sweeps (``hydra.sweeper.params.+variant``)."""
    return str(sweep_params(base).get("+variant")).split(",")


def with_tasks(base: str, part_dir: Path, out: Path, overrides: list[str]) -> list[str]:
    """BIG-bench: the probe's selection (or the command line's data.tasks), one list a folder."""
    if base != "bigbench":
        return overrides
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("data.tasks=")]
    tasks = given[-1].strip("[]").split(",") if given else selected_tasks(out)
    check_tasks(part_dir, tasks)
    return overrides if given else [*overrides, f"data.tasks=[{','.join(tasks)}]"]


def report_runs(folder: Path):
    """(rows, markdown) of ``malora-report folder`` (written into it); (None, '') while it holds no run."""
    from malora_train.commands.report import build_report, find_run_dirs

    if not folder.is_dir() or not find_run_dirs(folder):
        return None, ""
    return build_report(folder, folder)


def lr_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    """Validation stage (every method x lr, seed 0, the validation split), the selection, then each method's
    seeds at its chosen lr on the test split; one report beside the shared-lr one."""
    from malora_train.commands import study_tuning as tuning
    from malora_train.run_dir import write_json_atomic, write_text_atomic

    base, part_dir = args.base, tuned_dir("lr_sweep", args.out, args.base)
    methods, rest = split_methods(overrides, preset_variants(base))
    lrs, seeds = tuning.split_list(args.lrs), tuning.split_list(args.seeds)
    fraction = args.validation_fraction
    rest = with_tasks(base, part_dir, args.out, rest)
    trains, status = not args.report_only, 0
    if trains:  # one sweep, or with --jobs one a method (the same run folders either way)
        groups = [methods] if args.jobs == 1 else [[method] for method in methods]
        sweeps = [preset_sweep(PRESETS[base], part_dir / "validation",
                               rest + tuning.validation_overrides(group, lrs, fraction), base == "bigbench")
                  for group in groups]
        status = run_sweeps(sweeps, args.jobs, part_dir / "jobs" / "validation")
    rows, _ = report_runs(part_dir / "validation")
    runs = [run for row in rows or [] for run in (*row.runs, *row.unfinished)]
    record = tuning.selection_record(tuning.select_lrs(runs, methods, lrs), base=base, lrs=lrs,
                                     fraction=fraction, seeds=["0"])
    part_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(part_dir / tuning.SELECTION_FILE, record)
    selection = tuning.selection_markdown(record)
    write_text_atomic(part_dir / tuning.SELECTION_MARKDOWN, selection)
    print("\n" + selection + f"wrote {part_dir / tuning.SELECTION_FILE}", flush=True)
    unchosen = [m for m, entry in record["methods"].items() if not entry["lr"]]
    if unchosen:
        print(f"study.py: no lr chosen for {', '.join(unchosen)} (runs missing from the curve, listed "
              "above): their tuned runs wait", file=sys.stderr)
        status = status or 2
    if trains:
        sweeps = [preset_sweep(PRESETS[base], part_dir / "tuned",
                               rest + tuning.tuned_overrides(method, entry["lr"], seeds, fraction),
                               base == "bigbench")
                  for method, entry in record["methods"].items() if entry["lr"]]
        status = max(status, run_sweeps(sweeps, args.jobs, part_dir / "jobs" / "tuned"))
    _, tuned_markdown = report_runs(part_dir / "tuned")
    shared = args.out / base / "report.md"
    shared_text = (shared.read_text() if shared.is_file() else
                   f"Not found here ({shared}): make study PART={base} writes it.\n")
    report_md = (f"# {base}: learning rate chosen per method on the validation split\n\n{selection}\n"
                 f"## Tuned lr, seed(s) {','.join(seeds)}, the test split (`{part_dir / 'tuned'}`)\n\n"
                 f"{tuned_markdown or 'No tuned run yet.' + chr(10)}\n"
                 f"## Shared lr (the preset's, every method alike: `{shared}`)\n\n{shared_text}")
    write_text_atomic(part_dir / "report.md", report_md)
    print(f"wrote {part_dir / 'report.md'}", flush=True)
    return status


def tuned_lrs(args: argparse.Namespace, methods: list[str]) -> tuple[dict[str, str], float]:
    """Each method's tuned lr (--lr, else the lr_sweep part's selection) and the validation fraction its runs
    held out (the selection's, else --validation-fraction)."""
    from malora_train.commands import study_tuning as tuning

    given = dict(item.split("=", 1) for item in args.lr)
    path = tuned_dir("lr_sweep", args.out, args.base) / tuning.SELECTION_FILE
    record = None if all(m in given for m in methods) else tuning.read_selection(path)
    fraction = float(record["validation_fraction"]) if record else args.validation_fraction
    return tuning.chosen_lrs(methods, given, record, str(path)), fraction


def rank_experts(args: argparse.Namespace, overrides: list[str]) -> int:
    """MoLoRA and MALoRA over N x r at their tuned lrs, then malora-report and the rank x experts table and
    plot."""
    from malora_train.commands import study_tuning as tuning

    part_dir = tuned_dir("rank_experts", args.out, args.base)
    methods, rest = split_methods(overrides, list(tuning.RANK_EXPERTS_METHODS))
    seeds = tuning.split_list(args.seeds or ",".join(tuning.RANK_EXPERTS_SEEDS))
    status = 0
    if not args.report_only:
        lrs, fraction = tuned_lrs(args, methods)
        rest = with_tasks(args.base, part_dir, args.out, rest)
        experts = tuple(int(n) for n in tuning.split_list(args.experts))
        ranks = tuple(int(r) for r in tuning.split_list(args.ranks))
        sweeps = [preset_sweep(PRESETS[args.base], part_dir,
                               rest + tuning.rank_experts_overrides(method, lrs[method], seeds, fraction,
                                                                    experts, ranks),
                               args.base == "bigbench") for method in methods]
        status = run_sweeps(sweeps, args.jobs, part_dir / "jobs")
    rows, _ = report_runs(part_dir)
    if rows is None:
        raise StudyError(f"{part_dir}: no runs to report")
    markdown = tuning.write_rank_experts(rows, part_dir)
    print("\n" + markdown + "wrote " + ", ".join(str(part_dir / f) for f in tuning.RANK_EXPERTS_FILES),
          flush=True)
    return status


def router_specialisation(args: argparse.Namespace, overrides: list[str]) -> int:
    """The router grid (lr scale x balance coef x init), one seed a configuration, then I(task; expert) per
    decoder layer."""
    from malora_train.commands import study_tuning as tuning
    from malora_train.run_dir import write_text_atomic

    part_dir = tuned_dir("router_specialisation", args.out, args.base)
    methods, rest = split_methods(overrides, list(tuning.ROUTER_METHODS))
    status = 0
    if not args.report_only:
        lrs, fraction = tuned_lrs(args, methods)
        rest = with_tasks(args.base, part_dir, args.out, rest)
        seed = tuning.split_list(args.seeds or "0")[0]
        sweeps = [preset_sweep(PRESETS[args.base], part_dir,
                               rest + tuning.router_overrides(method, lrs[method], seed, fraction),
                               args.base == "bigbench") for method in methods]
        status = run_sweeps(sweeps, args.jobs, part_dir / "jobs")
    rows, _ = report_runs(part_dir)
    if rows is None:
        raise StudyError(f"{part_dir}: no runs to report")
    markdown = tuning.router_markdown(rows)
    write_text_atomic(part_dir / tuning.ROUTER_FILE, markdown)
    print("\n" + markdown + f"wrote {part_dir / tuning.ROUTER_FILE}", flush=True)
    return status


TUNED_RUNNERS = {"lr_sweep": lr_sweep, "rank_experts": rank_experts,
                 "router_specialisation": router_specialisation}


# -- the command ---------------------------------------------------------------------------------------------

def report(part: str, out: Path) -> Path:
    from malora_train.commands.report import OUTPUTS, build_report

    folders = [out / other for other in REPORTED_WITH.get(part, []) if (out / other).is_dir()] + [out / part]
    _, markdown = build_report(folders, out / part)
    print(markdown, end="")
    print("reported " + ", ".join(str(f) for f in folders) + "; wrote "
          + ", ".join(str(out / part / name) for name in OUTPUTS), flush=True)
    return out / part


def write_priors(part: str, out: Path, overrides: list[str]) -> dict[str, float]:
    """The part's evaluation data's prior scores (``malora_train/data/priors.py``), beside its report: the bar
    a method's accuracy must clear to show it learned a task. Returns task -> the most frequent answer's
    share (%); skipped (empty), with the reason, when the data does not load here (a report made away from
    the data)."""
    from malora_train.commands.composition import compose_config, to_config
    from malora_train.config import register_configs
    from malora_train.data.priors import answer_priors, priors_markdown
    from malora_train.errors import MaloraError
    from malora_train.run_dir import write_text_atomic

    register_configs()
    data = [o for o in overrides if o.lstrip("+~").startswith("data.")]
    try:
        cfg = to_config(compose_config([f"+experiment={PRESETS[part]}", *data]))
        priors = answer_priors(cfg.data, cfg.seed)
        markdown = priors_markdown(priors)
    except MaloraError as err:
        print(f"answer priors: not written ({err})", flush=True)
        return {}
    header = (f"Answering from the prior alone, on the evaluation examples of `+experiment={PRESETS[part]}` "
              f"(seed {cfg.seed}'s data{', ' + ' '.join(data) if data else ''}):\n\n")
    write_text_atomic(out / part / PRIORS_FILE, header + markdown)
    print("\n" + header + markdown + f"wrote {out / part / PRIORS_FILE}", flush=True)
    return {prior.task: prior.answer_share for prior in priors}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted([*PRESETS, *TUNED_PARTS]), help="which part of the study")
    parser.add_argument("overrides", nargs="*", help="malora-train overrides on top of the preset")
    parser.add_argument("--out", type=Path, default=Path("studies"),
                        help="where the parts go (default studies/)")
    parser.add_argument("--over-prior", action="store_true",
                        help="bigbench_probe: count the gain from the larger of the zero-shot accuracy and "
                             "the most frequent answer's share (a task trained only to its answer prior is "
                             "not selected)")
    parser.add_argument("--min-gain", type=float, default=10.0,
                        help="bigbench_probe: points a task must gain from training to be selected "
                             "(default 10)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes at once, the seeds split between them; the tuned parts: the methods' "
                             "sweeps as processes at once (default 1; see the top of this file)")
    parser.add_argument("--no-report", action="store_true",
                        help="run the jobs only (what each of --jobs does)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the part's finished runs "
                             "(after jobs run with --no-report)")
    parser.add_argument("--pack", action="store_true",
                        help="train nothing: move the runs' raw files (metrics.jsonl, routing.json) into "
                             "raw_files.tar.xz with a sha256 manifest, keeping what the report reads")
    parser.add_argument("--verify-raw", action="store_true",
                        help="train nothing: check the part's raw files (in its folder, else in its archive) "
                             "against raw_files.sha256")
    tuned = parser.add_argument_group("lr_sweep, rank_experts, router_specialisation (issue 27)")
    tuned.add_argument("--part", dest="base", choices=TUNED_BASES, default="bigbench",
                       help="the preset the part starts from (default bigbench)")
    tuned.add_argument("--lrs", default="2e-4,4e-4,1e-3,2e-3",
                       help="lr_sweep: the learning rates each method is tried at "
                            "(default 2e-4,4e-4,1e-3,2e-3)")
    tuned.add_argument("--validation-fraction", type=float, default=0.1,
                       help="share of each task's training examples held out as the validation split "
                            "(data.validation_fraction; default 0.1; the others read lr_sweep's)")
    tuned.add_argument("--seeds", default=None,
                       help="the seeds of the test-split runs (lr_sweep 0,1,2; rank_experts 0,1; "
                            "router_specialisation 0)")
    tuned.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                       help="rank_experts, router_specialisation: a method's lr (default: lr_sweep's choice)")
    tuned.add_argument("--experts", default="4,8,16", help="rank_experts: the N swept (default 4,8,16)")
    tuned.add_argument("--ranks", default="4,8,16", help="rank_experts: the expert ranks r (default 4,8,16)")
    args = parser.parse_intermixed_args(argv)
    if args.part == "lr_sweep" and args.seeds is None:
        args.seeds = "0,1,2"
    if any("=" not in item for item in args.lr):
        parser.error(f"--lr takes METHOD=LR, got {' '.join(args.lr)}")
    if args.part in TUNED_PARTS and args.no_report:
        parser.error(f"{args.part} reports as it goes: --no-report is for the other parts")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    actions = [f"--{name.replace('_', '-')}" for name in ("no_report", "report_only", "pack", "verify_raw")
               if getattr(args, name)]
    if len(actions) > 1:
        parser.error(f"{' and '.join(actions)} exclude each other")
    return args


def pack_or_verify(part_dir: Path, pack: bool) -> int:
    """``--pack`` or ``--verify-raw`` of a part's folder; the exit status."""
    from malora_train.commands.study_raw_files import (
        ARCHIVE_FILE,
        MANIFEST_FILE,
        pack_raw_files,
        verify_raw_files,
    )
    from malora_train.errors import DataError

    try:
        if pack:
            packed = pack_raw_files(part_dir)
            print(f"packed {len(packed)} raw files into {part_dir / ARCHIVE_FILE}; their sha256 are in "
                  f"{part_dir / MANIFEST_FILE}")
            return 0
        problems = verify_raw_files(part_dir)
    except DataError as err:
        raise StudyError(str(err)) from err
    for problem in problems:
        print(f"study.py: {problem}", file=sys.stderr)
    verdict = "some raw files differ or are missing" if problems else "every raw file matches"
    print(f"{part_dir / MANIFEST_FILE}: {verdict}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    try:
        if args.part in TUNED_PARTS and (args.pack or args.verify_raw):
            part_dir = tuned_dir(args.part, args.out, args.base)
            if not part_dir.is_dir():
                raise StudyError(f"{part_dir} not found: nothing to {'pack' if args.pack else 'verify'}")
            return pack_or_verify(part_dir, args.pack)
        if args.part in TUNED_PARTS:
            from malora_train.errors import MaloraError

            try:
                status = TUNED_RUNNERS[args.part](args, overrides)
            except MaloraError as err:
                raise StudyError(str(err)) from err
            if status:
                print(f"study.py: some runs failed or wait (exit status {status}); rerun the same command to "
                      "retry them: completed runs are skipped.", file=sys.stderr)
            return status
        trains = not (args.report_only or args.pack or args.verify_raw)
        if not trains and not (args.out / args.part).is_dir():
            what = "pack" if args.pack else "verify" if args.verify_raw else "report"
            raise StudyError(f"{args.out / args.part} not found: nothing to {what}")
        if args.pack or args.verify_raw:
            return pack_or_verify(args.out / args.part, args.pack)
        if args.part == "bigbench":
            given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("data.tasks=")]
            tasks = given[-1].strip("[]").split(",") if given else selected_tasks(args.out)
            if not given:
                overrides.append(f"data.tasks=[{','.join(tasks)}]")
            check_tasks(args.out / args.part, tasks)
        if args.report_only:
            status = 0
        elif args.jobs > 1:
            status = run_jobs(args.part, args.out, overrides, args.jobs)
        else:
            status = run_sweep(sweep_command(args.part, args.out, overrides))
        if not (args.out / args.part).is_dir():
            # the sweep stopped before its first job (a bad override): its error is printed
            return status or 2
        if args.no_report:
            return status
        report(args.part, args.out)
        priors = write_priors(args.part, args.out, overrides)
        if args.part == "bigbench_probe":
            select_tasks(args.out / args.part, args.min_gain, priors, args.over_prior)
    except StudyError as err:
        print(f"study.py: error: {err}", file=sys.stderr)
        return 2
    if status:
        print(f"study.py: some runs failed (exit status {status}); they are listed in the report. "
              "Rerun the same command to retry them: completed runs are skipped.", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
