"""Scaling over processes (GPUs): the real ``malora-train``, launched the documented way (``accelerate launch
--config_file conf/accelerate/<launch>.yaml --num_processes N -m malora_train.cli ...``) for each launch
config, adapter and process count, with packed rows of a fixed size per process; and the sweep pool.

    make bench-scaling          # = python scripts/bench_scaling.py: what the machine allows, see below

Without arguments it runs BENCHMARKS.md's scaling table on the GPUs it sees: LLaMA-2-7B shapes, MALoRA
and MoLoRA, packed 4 x 1024 tokens per process, DDP / ZeRO-2 / ZeRO-3 on 1, 2, 4, ... processes up to the
visible GPU count, 30 steps after 10 warm-up, loss agreement over 20 steps, and the sweep pool of one
SmolLM2-sized job per GPU. Without a GPU, the smoke version: the tiny model on 2 gloo processes (4 x 256
tokens, 6 steps after 2). Every default can be overridden; malora-train overrides for every run go after
``--``.

Every run trains ``--warmup + --steps`` steps of ``--rows`` packed rows of ``--length`` tokens per process,
logging every step, with ``adapter.dropout=0`` (each process draws its own dropout masks, so with dropout on
the losses could not agree; an override after ``--`` puts it back). Per row:

- tokens/s: all processes' real tokens over the time of the steps after the warm-up (``metrics.jsonl``);
- efficiency: tokens/s on N processes / (N x tokens/s of one process launched with ``single``, the plain
  one-GPU run of the same adapter);
- peak memory of rank 0 (``summary.json``: allocated GPU memory, or the process's RSS on the CPU);
- loss agreement over the first ``--agree-steps`` steps with one process that runs the same forwards: rank
  r of N takes the r-th block of rows of each global micro-batch (``malora_train.train.distributed.
  local_rows``), so the reference is one process with the same micro-batch and ``trainer.grad_accum=N``
  (same step count, so the same learning-rate schedule); packed rows too, since each rank's block of a
  global micro-batch is packed on its own, as the reference packs its micro-batches one after the other.
  ``--agree-steps 0`` skips the references.

DDP runs as the trainer always runs it: ``find_unused_parameters=False`` (every adapter tensor gets a
gradient in every forward), gradients all-reduced bucket by bucket during backward; ``--ddp-bucket-mb``
sets ``trainer.ddp_bucket_cap_mb`` of the DDP rows (DeepSpeed's buckets are in conf/deepspeed/*.json).

The sweep pool: ``--pool-jobs`` J training jobs (seeds 0..J-1) through ``hydra/launcher=gpu_pool``, one GPU
each, against one job through the same launcher on one GPU: the ratio of their throughputs (all jobs'
tokens over the sweep's wall time, against the one job's over its own), and the same ratio of the jobs'
tokens/s while training (process start-up and model loading left out).

Several jobs on one GPU (issue 27): ``--shared-runs`` runs of the pool model as one sweep through the same
launcher on GPU 0 alone, with ``hydra.launcher.jobs_per_gpu`` set to each of ``--shared-jobs`` (1, 4, 8 by
default on a GPU): all runs' tokens over the sweep's wall time, against the first count (one job at a
time). Start the CUDA MPS daemon first (``nvidia-cuda-mps-control -d``) for the jobs' kernels to run side by
side; the table says whether it ran.

Runs go to ``--out/<name>/`` with their log beside them. A run recorded as completed with the same command
is reused, so a table longer than one time limit is finished by running the same command again; an
interrupted run is run again. Prints a markdown table last and writes ``--out/scaling.json`` (the device
kind, the date, versions, every command) after every run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra_plugins.malora_gpu_pool.gpu_pool_launcher import mps_is_running  # noqa: E402
from malora_train.errors import MaloraError  # noqa: E402
from malora_train.run_dir import completed_summary, read_json_object, read_jsonl, write_json_atomic  # noqa: E402

PROGRAM = "bench_scaling.py"
CONF = REPO / "conf"
LAUNCHES = sorted(path.stem for path in (CONF / "accelerate").glob("*.yaml"))
ADAPTERS = sorted(path.stem for path in (CONF / "adapter").glob("*.yaml"))
REFERENCE_LAUNCH = "single"
SCALED_LAUNCHES = "ddp,deepspeed_zero2,deepspeed_zero3"


def defaults(gpus: int) -> dict[str, Any]:
    """Issue 14's table on ``gpus`` visible GPUs (process counts 1, 2, 4, ... up to them), or with none the
    smoke version on 2 CPU processes."""
    common = {"adapters": "malora,molora", "launch": SCALED_LAUNCHES, "rows": 4}
    if not gpus:
        return {**common, "model": "tiny", "nprocs": "2", "length": 256, "steps": 6, "warmup": 2,
                "agree_steps": 8, "pool_jobs": 2, "pool_model": "tiny", "shared_jobs": "1,2",
                "shared_runs": 2}
    counts = [2 ** k for k in range(gpus.bit_length()) if 2 ** k <= gpus]
    return {**common, "model": "llama2_7b", "nprocs": ",".join(map(str, counts)), "length": 1024, "steps": 30,
            "warmup": 10, "agree_steps": 20, "pool_jobs": gpus if gpus > 1 else 0,
            "pool_model": "smollm2_135m_shape", "shared_jobs": "1,4,8", "shared_runs": 8}


def fail(message: str) -> NoReturn:
    print(f"{PROGRAM}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        fail(message)


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        fail(f"{name}={text!r}: expected comma-separated whole numbers, e.g. 1,2,4,8")
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        fail(f"{name}={text!r}: each count must be >= 1 and appear once")
    return sorted(values)


def name_list(text: str, name: str, known: list[str]) -> list[str]:
    values = [part for part in text.split(",") if part]
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        fail(f"{name}={text!r}: unknown {', '.join(unknown) or 'empty list'} "
             f"(choose from {', '.join(known)})")
    return values


def parse_args(argv: list[str], gpus: int) -> argparse.Namespace:
    """The arguments, unset ones from ``defaults(gpus)``; every mistake ends the program in one line."""
    parser = Parser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="conf/model preset of the scaling runs")
    parser.add_argument("--adapters", help=f"comma-separated: {', '.join(ADAPTERS)}")
    parser.add_argument("--nprocs", help="process counts, e.g. 1,2,4,8 (0: no scaling rows)")
    parser.add_argument("--launch", help=f"launch configs (conf/accelerate): {', '.join(LAUNCHES)}; "
                        f"'{REFERENCE_LAUNCH}' (one process) always runs as the reference")
    parser.add_argument("--rows", type=int, help="packed rows per process and micro-batch")
    parser.add_argument("--length", type=int, help="tokens per packed row (data.max_length)")
    parser.add_argument("--steps", type=int, help="measured steps, after the warm-up")
    parser.add_argument("--warmup", type=int, help="steps left out of tokens/s")
    parser.add_argument("--agree-steps", type=int, help="first steps whose loss is compared with one process")
    parser.add_argument("--ddp-bucket-mb", type=float, help="trainer.ddp_bucket_cap_mb of the ddp runs")
    parser.add_argument("--pool-jobs", type=int, help="sweep-pool jobs at once, one GPU each (0: none)")
    parser.add_argument("--pool-model", help="conf/model preset of the pool jobs")
    parser.add_argument("--pool-steps", type=int, help="steps of each pool job (default: warm-up + steps)")
    parser.add_argument("--shared-jobs", help="jobs at once on GPU 0 (hydra.launcher.jobs_per_gpu), one "
                        "sweep each, e.g. 1,4,8 (0: none)")
    parser.add_argument("--shared-runs", type=int,
                        help="runs of the pool model in each --shared-jobs sweep")
    parser.add_argument("--device-kind", help="the machine's name in the report (default: what is detected)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scaling"))
    parser.add_argument("overrides", nargs="*", help="more malora-train overrides for every run (after --)")
    args = parser.parse_args(argv)
    for key, value in defaults(gpus).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.nprocs = [] if args.nprocs == "0" else int_list(args.nprocs, "--nprocs")
    args.launch = [v for v in name_list(args.launch, "--launch", LAUNCHES) if v != REFERENCE_LAUNCH]
    args.adapters = name_list(args.adapters, "--adapters", ADAPTERS)
    for key in ("rows", "length", "steps", "timeout"):
        if getattr(args, key) < 1:
            fail(f"--{key}={getattr(args, key)} must be >= 1")
    for key in ("warmup", "agree_steps", "pool_jobs"):
        if getattr(args, key) < 0:
            fail(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 0")
    if args.agree_steps > args.warmup + args.steps:
        fail(f"--agree-steps={args.agree_steps} exceeds the {args.warmup + args.steps} steps of a run")
    if args.pool_jobs == 1:
        fail("--pool-jobs=1: the pool compares several jobs at once with one job; use >= 2, or 0 for none")
    if args.ddp_bucket_mb is not None and not args.ddp_bucket_mb > 0:
        fail(f"--ddp-bucket-mb={args.ddp_bucket_mb} must be > 0")
    if args.pool_steps is not None and args.pool_steps < 1:
        fail(f"--pool-steps={args.pool_steps} must be >= 1")
    if gpus and max([*args.nprocs, args.pool_jobs]) > gpus:
        fail(f"--nprocs/--pool-jobs ask for {max([*args.nprocs, args.pool_jobs])} GPUs "
             f"but {gpus} are visible")
    args.shared_jobs = [] if args.shared_jobs == "0" else int_list(args.shared_jobs, "--shared-jobs")
    if args.shared_runs < 1:
        fail(f"--shared-runs={args.shared_runs} must be >= 1")
    args.out = args.out.resolve()
    args.pool_steps = args.pool_steps or args.warmup + args.steps
    return args


# -- the runs ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One command of the benchmark; ``folder`` is its run (or sweep) directory under ``--out``."""

    name: str
    command: list[str]
    folder: Path

    @property
    def record(self) -> Path:
        return self.folder.with_name(self.name + ".run.json")

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.name + ".log")


def accelerate_launch() -> list[str]:
    script = Path(sys.executable).parent / "accelerate"
    return ([str(script), "launch"] if script.is_file()
            else [sys.executable, "-m", "accelerate.commands.launch"])


def train_overrides(args: argparse.Namespace, model: str, adapter: str, steps: int) -> list[str]:
    return [f"model={model}", f"adapter={adapter}", "adapter.dropout=0",
            f"trainer.micro_batch_size={args.rows}", f"data.max_length={args.length}", "data.packing=true",
            f"trainer.max_steps={steps}",
            "trainer.log_every=1", "trainer.eval_before=false", "trainer.eval_after=false",
            "trainer.save_every=0", "trainer.progress=false", *args.overrides]


def launched(args: argparse.Namespace, name: str, launch: str, nprocs: int, overrides: list[str]) -> Run:
    folder = args.out / name
    command = [*accelerate_launch(), "--config_file", str(CONF / "accelerate" / f"{launch}.yaml"),
               "--num_processes", str(nprocs), "-m", "malora_train.cli", *overrides,
               f"hydra.run.dir={folder}"]
    return Run(name, command, folder)


def scaling_runs(args: argparse.Namespace,
                 adapter: str) -> tuple[Run, dict[int, Run], list[tuple[str, int, Run]]]:
    """The one-process run, the agreement references by process count, the (launch, N, run) rows."""
    base = train_overrides(args, args.model, adapter, args.warmup + args.steps)
    single = launched(args, f"{REFERENCE_LAUNCH}_{adapter}_n1", REFERENCE_LAUNCH, 1, base)
    references = {n: launched(args, f"reference_{adapter}_accum{n}", REFERENCE_LAUNCH, 1,
                              [*base, f"trainer.grad_accum={n}"])
                  for n in args.nprocs if n > 1 and args.agree_steps}
    bucket = [] if args.ddp_bucket_mb is None else [f"trainer.ddp_bucket_cap_mb={args.ddp_bucket_mb}"]
    rows = [(launch, n, launched(args, f"{launch}_{adapter}_n{n}", launch, n,
                                 [*base, *(bucket if launch == "ddp" else [])]))
            for launch in args.launch for n in args.nprocs]
    return single, references, rows


def pool_sweep(args: argparse.Namespace, name: str, jobs: int, gpus: int | None = None,
               jobs_per_gpu: int = 1) -> Run:
    """``jobs`` jobs (seeds 0..jobs-1) through the gpu_pool launcher on GPUs 0..gpus-1 (default: one GPU a
    job; on the CPU: slots), ``jobs_per_gpu`` at once on each."""
    folder = args.out / name
    seeds = ",".join(str(i) for i in range(jobs))
    devices = ",".join(str(i) for i in range(jobs if gpus is None else gpus))
    command = [sys.executable, "-m", "malora_train.cli", "-m", "hydra/launcher=gpu_pool",
               f"hydra.launcher.gpus=[{devices}]", f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}",
               *train_overrides(args, args.pool_model, args.adapters[0], args.pool_steps), f"seed={seeds}",
               f"hydra.sweep.dir={folder}", "hydra.sweep.subdir=${hydra.job.num}"]
    return Run(name, command, folder)


def shared_sweeps(args: argparse.Namespace) -> dict[int, Run]:
    """The several-jobs-on-one-GPU sweeps by jobs at once: ``--shared-runs`` runs on GPU 0 each."""
    return {jobs: pool_sweep(args, f"shared_gpu_{jobs}_at_once", args.shared_runs, gpus=1,
                             jobs_per_gpu=jobs) for jobs in args.shared_jobs}


def check_reusable(run: Run) -> None:
    """Refuse an ``--out`` whose folder for this run was made by something else or another command."""
    if run.record.is_file():
        if read_json_object(run.record).get("command") != run.command:
            fail(f"{run.folder} holds a run of another command (recorded in {run.record}); use another --out "
                 "or delete it")
    elif run.folder.exists():
        fail(f"{run.folder} exists and was not made by {PROGRAM}; use another --out")


def execute(run: Run, timeout: int) -> dict[str, Any]:
    """Run (or reuse) one command: its record, with the wall time, or the reason it failed. The launched
    malora-train is the code beside this script (the repository first on the path)."""
    if run.record.is_file():
        record = read_json_object(run.record)
        if record.get("status") == "completed":
            print(f"{run.name}: reused ({run.record})", file=sys.stderr, flush=True)
            return record
        shutil.rmtree(run.folder, ignore_errors=True)  # an interrupted run of this command: again
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"command": run.command, "status": "started"}
    write_json_atomic(run.record, record)
    print(f"{run.name}: {' '.join(run.command)}", file=sys.stderr, flush=True)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    with run.log.open("w") as log:  # its own process group: a time-out stops every rank it started
        process = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    record["wall_s"] = time.perf_counter() - started
    record["finished"] = now()
    if status == 0:
        record["status"] = "completed"
    else:
        record["status"] = "failed"
        record["error"] = (f"timed out after {timeout} s" if status is None
                           else f"exit {status}: {last_error(run.log)}")
        print(f"{run.name}: {record['error']} (log: {run.log})", file=sys.stderr, flush=True)
    write_json_atomic(run.record, record)
    return record


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


# -- reading the runs --------------------------------------------------------------------------------------
def training_windows(run_dir: Path) -> list[dict[str, Any]]:
    return sorted((r for r in read_jsonl(run_dir / "metrics.jsonl") if "lm_loss" in r),
                  key=lambda r: r["step"])


def measured_throughput(run_dir: Path, warmup: int) -> dict[str, float]:
    """Tokens/s over the steps after ``warmup`` (one logged window a step), and the mean step time."""
    measured = [w for w in training_windows(run_dir) if w["step"] > warmup]
    if not measured:
        raise MaloraError(f"{run_dir / 'metrics.jsonl'}: no step logged after the {warmup} warm-up steps")
    seconds = sum(w["step_time_s"] for w in measured)
    tokens = sum(w["tokens_per_s"] * w["step_time_s"] for w in measured)
    return {"tokens_per_s": tokens / seconds, "step_time_s": seconds / len(measured),
            "measured_steps": len(measured)}


def loss_agreement(run_dir: Path, reference_dir: Path, steps: int) -> dict[str, Any]:
    """Max abs and relative difference of the logged loss over the first ``steps`` steps."""
    ours = {w["step"]: w["loss"] for w in training_windows(run_dir) if w["step"] <= steps}
    theirs = {w["step"]: w["loss"] for w in training_windows(reference_dir) if w["step"] <= steps}
    if not ours or set(ours) != set(theirs):
        raise MaloraError(f"{run_dir}: logged steps {sorted(ours)} differ from the reference's "
                          f"{sorted(theirs)}")
    diffs = {s: abs(ours[s] - theirs[s]) for s in ours}
    rel = [d / abs(theirs[s]) if theirs[s] else math.inf for s, d in diffs.items()]
    return {"reference": str(reference_dir), "compared_steps": len(ours),
            "loss_max_abs_diff": max(diffs.values()), "loss_max_rel_diff": max(rel)}


def read_row(run: Run, record: dict[str, Any], warmup: int) -> dict[str, Any]:
    row: dict[str, Any] = {"run_dir": str(run.folder), "log": str(run.log), "command": run.command,
                           "wall_s": record.get("wall_s"), "finished": record.get("finished")}
    if record["status"] != "completed":
        return {**row, "error": record.get("error", record["status"])}
    summary = completed_summary(run.folder)
    if summary is None:
        return {**row, "error": f"no completed summary.json in {run.folder}"}
    row.update({"world_size": summary["world_size"], "mixed_precision": summary["mixed_precision"],
                "peak_memory_gb": summary["peak_memory_gb"], "trainable_params": summary["trainable_params"]})
    try:
        row.update(measured_throughput(run.folder, warmup))
    except MaloraError as err:
        row["error"] = str(err)
    return row


def sweep_summaries(sweep: Run, record: dict[str, Any], runs: int) -> list[dict[str, Any]]:
    """The completed ``summary.json`` of each of a sweep's ``runs`` jobs, in job order; a MaloraError saying
    what is missing."""
    if record["status"] != "completed":
        raise MaloraError(record.get("error") or "did not complete")
    summaries = [completed_summary(sweep.folder / str(num)) for num in range(runs)]
    if None in summaries:
        raise MaloraError(f"a job left no completed summary.json under {sweep.folder}")
    return summaries


def pool_result(one: Run, one_record: dict[str, Any], pool: Run, pool_record: dict[str, Any],
                jobs: int) -> dict[str, Any]:
    """Throughput of ``jobs`` jobs at once against one job: tokens over the sweep's wall time, and the sum of
    the jobs' own tokens/s while training."""
    result: dict[str, Any] = {"jobs": jobs, "one_job_dir": str(one.folder), "sweep_dir": str(pool.folder)}
    try:
        (alone,) = sweep_summaries(one, one_record, 1)
        summaries = sweep_summaries(pool, pool_record, jobs)
    except MaloraError as err:
        return {**result, "error": str(err)}
    one_rate = alone["tokens"] / one_record["wall_s"]
    pool_rate = sum(s["tokens"] for s in summaries) / pool_record["wall_s"]
    return {**result, "one_job_wall_s": one_record["wall_s"], "sweep_wall_s": pool_record["wall_s"],
            "one_job_tokens_per_s_wall": one_rate, "pool_tokens_per_s_wall": pool_rate,
            "throughput_ratio": pool_rate / one_rate,
            "one_job_tokens_per_s_training": alone["tokens_per_s"],
            "jobs_tokens_per_s_training": [s["tokens_per_s"] for s in summaries],
            "training_ratio": sum(s["tokens_per_s"] for s in summaries) / alone["tokens_per_s"]}


def shared_result(sweep: Run, record: dict[str, Any], jobs_per_gpu: int, runs: int,
                  mps: bool) -> dict[str, Any]:
    """All runs' tokens over the sweep's wall time, and each run's tokens/s while training."""
    result: dict[str, Any] = {"jobs_per_gpu": jobs_per_gpu, "runs": runs, "mps": mps,
                              "sweep_dir": str(sweep.folder)}
    try:
        summaries = sweep_summaries(sweep, record, runs)
    except MaloraError as err:
        return {**result, "error": str(err)}
    return {**result, "wall_s": record["wall_s"],
            "tokens_per_s_wall": sum(s["tokens"] for s in summaries) / record["wall_s"],
            "jobs_tokens_per_s_training": [s["tokens_per_s"] for s in summaries]}


# -- the report --------------------------------------------------------------------------------------------
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_description(gpus: int) -> str:
    if gpus:
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(gpus)]
        return f"{gpus} x {statistics.mode(names)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True)
    found["malora_train_commit"] = commit.stdout.strip() or None
    return found


def cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    machine = report["device_kind"] if report["device_kind"] == report["device"] else \
        f"{report['device_kind']} ({report['device']})"
    lines = [f"{machine}, {report['date']}: {args['model']}, packed {args['rows']} x {args['length']} tokens "
             f"per process, {args['steps']} steps after {args['warmup']} warm-up; loss agreement over the "
             f"first {args['agree_steps']} steps", "",
             "| launch | adapter | processes | tokens/s | efficiency | step s | peak GB (rank 0) | "
             "loss max abs diff | loss max rel diff |", "|---|---|---|---|---|---|---|---|---|"]
    if not report["rows"]:
        lines = [f"{machine}, {report['date']}: no scaling rows (--nprocs 0)"]
    for row in report["rows"]:
        head = f"| {row['launch']} | {row['adapter']} | {row['nprocs']} |"
        if "error" in row:
            lines.append(f"{head} failed: {row['error']} | | | | | |")
            continue
        agreement = row.get("agreement") or {}
        reference = row["launch"] == REFERENCE_LAUNCH
        lines.append(f"{head} {row['tokens_per_s']:,.0f} | {cell(row.get('efficiency'), '{:.1%}')} | "
                     f"{row['step_time_s']:.3f} | {row['peak_memory_gb']:.2f} | "
                     f"{'reference' if reference else cell(agreement.get('loss_max_abs_diff'), '{:.1e}')} | "
                     f"{'reference' if reference else cell(agreement.get('loss_max_rel_diff'), '{:.1e}')} |")
    pool = report.get("pool")
    if pool:
        lines += ["", "| sweep pool | jobs at once | tokens/s, one job | tokens/s, all jobs | ratio | "
                  "ratio while training |", "|---|---|---|---|---|---|"]
        if "error" in pool:
            lines.append(f"| {args['pool_model']} | {pool['jobs']} | failed: {pool['error']} | | | |")
        else:
            lines.append(f"| {args['pool_model']} | {pool['jobs']} | "
                         f"{pool['one_job_tokens_per_s_wall']:,.0f} | "
                         f"{pool['pool_tokens_per_s_wall']:,.0f} | {pool['throughput_ratio']:.2f}x | "
                         f"{pool['training_ratio']:.2f}x |")
    shared = report.get("shared") or []
    if shared:
        lines += ["", "| one GPU | jobs at once | runs | under CUDA MPS | wall s | tokens/s, all jobs | "
                  f"x {shared[0]['jobs_per_gpu']} at once |", "|---|---|---|---|---|---|---|"]
    for row in shared:
        head = (f"| {args['pool_model']} | {row['jobs_per_gpu']} | {row['runs']} | "
                f"{'yes' if row['mps'] else 'no'} |")
        if "error" in row:
            lines.append(f"{head} failed: {row['error']} | | |")
            continue
        lines.append(f"{head} {row['wall_s']:.1f} | {row['tokens_per_s_wall']:,.0f} | "
                     f"{cell(row.get('x_first'), '{:.2f}x')} |")
    return "\n".join(lines)


def attach_comparisons(report: dict[str, Any], agree_steps: int) -> None:
    """Efficiency against the adapter's one-process row; loss agreement against the one-process run of the
    same forwards (the one-process row itself for N = 1, else the completed ``grad_accum=N`` reference)."""
    rows = report["rows"]
    single = {r["adapter"]: r for r in rows if r["launch"] == REFERENCE_LAUNCH and "error" not in r}
    references = {(r["adapter"], r["nprocs"]): Path(r["run_dir"]) for r in report["references"]
                  if r["status"] == "completed"}
    references.update({(adapter, 1): Path(r["run_dir"]) for adapter, r in single.items()})
    for row in rows:
        if "error" in row:
            continue
        base = single.get(row["adapter"])
        row["efficiency"] = row["tokens_per_s"] / (row["nprocs"] * base["tokens_per_s"]) if base else None
        reference = references.get((row["adapter"], row["nprocs"]))
        if row["launch"] != REFERENCE_LAUNCH and agree_steps and reference is not None:
            try:
                row["agreement"] = loss_agreement(Path(row["run_dir"]), reference, agree_steps)
            except MaloraError as err:
                row["agreement"] = {"error": str(err)}


def write_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The report so far: written after every run, so a run cut short by a time limit keeps the others."""
    attach_comparisons(report, args.agree_steps)
    shared = report["shared"]
    first = shared[0].get("tokens_per_s_wall") if shared else None
    for row in shared:
        if first and "error" not in row:
            row["x_first"] = row["tokens_per_s_wall"] / first
    report["date"] = now()
    write_json_atomic(args.out / "scaling.json", report)


def check_overrides(args: argparse.Namespace) -> None:
    """Compose and check every run's config before launching anything: a typo fails in seconds, in one
    line."""
    from malora_train.cli import compose_config, to_config
    from malora_train.train.preflight import check_config

    models = [(args.model, adapter) for adapter in args.adapters]
    pooled = args.pool_jobs or args.shared_jobs
    for model, adapter in dict.fromkeys([*models, (args.pool_model, args.adapters[0])] if pooled else models):
        try:
            check_config(to_config(compose_config(train_overrides(args, model, adapter, args.steps))))
        except MaloraError as err:
            fail(str(err))


def failures(report: dict[str, Any]) -> list[str]:
    """What did not produce its number: failed rows, references, comparisons and the pool."""
    found = [f"{r['launch']} {r['adapter']} x{r['nprocs']}: {r['error']}" for r in report["rows"]
             if "error" in r]
    found += [f"{r['launch']} {r['adapter']} x{r['nprocs']} agreement: {r['agreement']['error']}"
              for r in report["rows"] if "error" in r.get("agreement", {})]
    found += [f"reference {r['adapter']} accum {r['nprocs']}: {r['error']}" for r in report["references"]
              if "error" in r]
    if report["pool"] and "error" in report["pool"]:
        found.append(f"pool: {report['pool']['error']}")
    found += [f"{r['jobs_per_gpu']} jobs at once on one GPU: {r['error']}" for r in report["shared"]
              if "error" in r]
    return found


def main(argv: list[str] | None = None) -> None:
    import torch

    gpus = torch.cuda.device_count()
    args = parse_args(sys.argv[1:] if argv is None else argv, gpus)
    plan = {adapter: scaling_runs(args, adapter) for adapter in args.adapters} if args.nprocs else {}
    pool = (pool_sweep(args, "pool_one_job", 1), pool_sweep(args, "pool_sweep", args.pool_jobs)) \
        if args.pool_jobs else ()
    for single, references, rows in plan.values():
        for run in (single, *(run for *_, run in rows), *references.values()):
            check_reusable(run)
    shared = shared_sweeps(args)
    for run in (*pool, *shared.values()):
        check_reusable(run)
    check_overrides(args)

    device = device_description(gpus)
    report: dict[str, Any] = {"device_kind": args.device_kind or device, "device": device, "date": now(),
                              "versions": versions(),
                              "args": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()},
                              "rows": [], "references": [], "pool": None, "shared": []}
    for adapter, (single, references, rows) in plan.items():
        for launch, nprocs, run in [(REFERENCE_LAUNCH, 1, single), *rows]:
            record = execute(run, args.timeout)
            report["rows"].append({"launch": launch, "adapter": adapter, "nprocs": nprocs,
                                   **read_row(run, record, args.warmup)})
            write_report(args, report)
        for nprocs, run in references.items():
            record = execute(run, args.timeout)
            report["references"].append({"launch": REFERENCE_LAUNCH, "adapter": adapter, "nprocs": nprocs,
                                         "grad_accum": nprocs, "status": record["status"],
                                         "run_dir": str(run.folder), "command": run.command,
                                         **({"error": record["error"]} if "error" in record else {})})
            write_report(args, report)
    if pool:
        one, sweep = pool
        report["pool"] = pool_result(one, execute(one, args.timeout), sweep, execute(sweep, args.timeout),
                                     args.pool_jobs)
        write_report(args, report)
    for jobs_per_gpu, sweep in shared.items():
        mps = mps_is_running()
        report["shared"].append(shared_result(sweep, execute(sweep, args.timeout), jobs_per_gpu,
                                              args.shared_runs, mps))
        write_report(args, report)
    print(markdown(report))
    print(f"{PROGRAM}: raw numbers and commands in {args.out / 'scaling.json'}", file=sys.stderr)
    problems = failures(report)
    if problems:
        print(f"{PROGRAM}: {len(problems)} failed: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
