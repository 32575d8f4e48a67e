"""`make bench-scaling` (scripts/bench_scaling.py) on the CPU: it launches the real malora-train through
`accelerate launch` (DDP over gloo, the tiny model) beside the one-process run and the one-process run of the
same forwards (grad_accum=2), and the sweep pool through hydra/launcher=gpu_pool, then prints and writes the
table: tokens/s after the warm-up, efficiency, peak memory, loss agreement, the pool's ratio. On GPUs the
same command produces BENCHMARKS.md's scaling table. The script runs in this process (its launches are
subprocesses), so the checks that launch nothing take no interpreter start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from script_modules import script_fixture

REPO = Path(__file__).resolve().parents[1]
WARMUP, STEPS, BUCKET_MB = 2, 4, 0.5
AGREE = WARMUP + STEPS  # every step: each rank packs its own block, as the reference packs its micro-batches
SMALL_DATA = ["data.train_per_task=64", "data.eval_per_task=2", "data.cache=false"]


bench = script_fixture("bench_scaling", "bench")


@pytest.fixture
def run_bench(bench, capsys, monkeypatch):
    """``run_bench(*argv)`` -> (exit status, stdout, stderr) of the script's ``main``."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launched processes share 2 cores

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            bench.main(list(argv))
            status = 0
        except SystemExit as stop:
            status = stop.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


def windows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "lm_loss" in r]


def trainer_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]


POOL_STEPS = 3


def scaling_argv(out: Path) -> list[str]:
    """The scaling table of two DDP processes, the sweep pool of two jobs and two runs on one slot one and two
    at a time, in one command: the tests below read its one run (each launch starts processes, the dearest
    part of these tests)."""
    return ["--nprocs", "2", "--launch", "ddp", "--adapters", "malora", "--rows", "4", "--length", "256",
            "--warmup", str(WARMUP), "--agree-steps", str(AGREE), "--pool-jobs", "2", "--pool-steps",
            str(POOL_STEPS), "--shared-jobs", "1,2", "--shared-runs", "2", "--ddp-bucket-mb", str(BUCKET_MB),
            "--device-kind", "cpu-test-box", "--out",
            str(out), "--", *SMALL_DATA]


@pytest.fixture(scope="module")
def scaling_run(bench, tmp_path_factory):
    """(out folder, exit status, stdout, stderr) of ``scaling_argv`` with ``--steps STEPS``, run once."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("scaling") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the launched processes share 2 cores
        patch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(out.parent / "no_mps"))  # no MPS daemon, whatever runs
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                bench.main(["--steps", str(STEPS), *scaling_argv(out)])
                status = 0
            except SystemExit as stop:
                status = stop.code
    return out, status, stdout.getvalue(), stderr.getvalue()


@pytest.mark.distributed
def test_scaling_table_for_two_ddp_processes_against_one(scaling_run, run_bench):
    out, status, stdout, stderr = scaling_run
    argv = scaling_argv(out)
    assert status == 0, stderr[-4000:]
    report = json.loads((out / "scaling.json").read_text())
    assert report["device_kind"] == "cpu-test-box" and report["device"].startswith("CPU")
    assert report["date"][:4].isdigit() and report["versions"]["torch"] and report["pool"] is not None

    rows = {(r["launch"], r["nprocs"]): r for r in report["rows"]}
    assert list(rows) == [("single", 1), ("ddp", 2)]
    single, ddp = rows["single", 1], rows["ddp", 2]
    for (launch, nprocs), row in rows.items():
        assert "error" not in row, row
        run_dir = Path(row["run_dir"])
        assert row["world_size"] == nprocs and row["peak_memory_gb"] > 0
        trainer = trainer_config(run_dir)
        assert (trainer["micro_batch_size"], trainer["grad_accum"]) == (4, 1)  # rows per process
        # the bucket size goes to the DDP runs only
        assert trainer["ddp_bucket_cap_mb"] == (BUCKET_MB if launch == "ddp" else None)
        measured = [w for w in windows(run_dir) if w["step"] > WARMUP]  # tokens/s: after the warm-up only
        assert row["measured_steps"] == STEPS == len(measured)
        tokens = sum(w["tokens_per_s"] * w["step_time_s"] for w in measured)
        assert row["tokens_per_s"] == pytest.approx(tokens / sum(w["step_time_s"] for w in measured))
        assert row["efficiency"] == pytest.approx(row["tokens_per_s"] / (nprocs * single["tokens_per_s"]))
    assert single["efficiency"] == 1.0 and "agreement" not in single
    # loss agreement: against one process with grad_accum=2, the same forwards
    [reference] = report["references"]
    assert (reference["nprocs"], reference["status"]) == (2, "completed")
    assert trainer_config(Path(reference["run_dir"])) == {**trainer_config(Path(single["run_dir"])),
                                                          "grad_accum": 2}
    # tokens/s counts every process's tokens: a step of 2 processes holds the reference step's tokens
    tokens = [[w["tokens_per_s"] * w["step_time_s"] for w in windows(Path(r["run_dir"]))][:AGREE]
              for r in (ddp, reference)]
    assert tokens[0] == pytest.approx(tokens[1])
    agreement = ddp["agreement"]
    assert agreement["reference"] == reference["run_dir"] and agreement["compared_steps"] == AGREE
    # top-k near-ties; the one-process row (4 rows a step) is ~3e-3 off
    assert agreement["loss_max_rel_diff"] < 1e-4
    assert agreement["loss_max_abs_diff"] < 1e-3

    heading, table, *_ = stdout.strip().split("\n\n")  # the markdown tables: scaling, pool, one GPU
    assert (heading.startswith("cpu-test-box (CPU")
            and f"loss agreement over the first {AGREE} steps" in heading)
    assert table.splitlines()[-1] == (
        f"| ddp | malora | 2 | {ddp['tokens_per_s']:,.0f} | {ddp['efficiency']:.1%} | "
        f"{ddp['step_time_s']:.3f} | {ddp['peak_memory_gb']:.2f} | "
        f"{agreement['loss_max_abs_diff']:.1e} | {agreement['loss_max_rel_diff']:.1e} |")

    # the same command again reuses every completed run (a table too long for one call is finished this way)
    status, _, stderr = run_bench("--steps", str(STEPS), *argv)
    assert status == 0, stderr[-3000:]
    assert stderr.count(": reused (") == 7  # the three scaling runs, the pool's two, the one-GPU sweeps
    assert json.loads((out / "scaling.json").read_text())["rows"][1]["tokens_per_s"] == ddp["tokens_per_s"]
    # another command on the same folders is refused before anything runs
    status, _, stderr = run_bench("--steps", str(STEPS + 2), *argv)
    assert status == 2
    assert stderr.strip().splitlines() == [
        f"bench_scaling.py: error: {out / 'single_malora_n1'} holds a run of another command (recorded in "
        f"{out / 'single_malora_n1.run.json'}); use another --out or delete it"]


@pytest.mark.distributed
@pytest.mark.slow
def test_sweep_pool_of_two_jobs_against_one_job(scaling_run):
    out, status, stdout, stderr = scaling_run
    assert status == 0, stderr[-4000:]
    report = json.loads((out / "scaling.json").read_text())
    pool = report["pool"]
    runs = {name: json.loads((out / f"{name}.run.json").read_text())
            for name in ("pool_one_job", "pool_sweep")}
    one = json.loads((out / "pool_one_job" / "0" / "summary.json").read_text())
    jobs = [json.loads((out / "pool_sweep" / str(num) / "summary.json").read_text()) for num in (0, 1)]
    assert [s["steps"] for s in (one, *jobs)] == [POOL_STEPS] * 3
    folders = [out / "pool_one_job" / "0", out / "pool_sweep" / "0", out / "pool_sweep" / "1"]
    assert [yaml.safe_load((folder / "config.yaml").read_text())["seed"] for folder in folders] == [0, 0, 1]
    gpus = {str(yaml.safe_load((out / "pool_sweep" / str(num) / ".hydra" / "hydra.yaml").read_text())
                ["hydra"]["job"]["env_set"]["CUDA_VISIBLE_DEVICES"]) for num in (0, 1)}
    assert gpus == {"0", "1"}  # one worker slot ("GPU") each
    one_rate = one["tokens"] / runs["pool_one_job"]["wall_s"]
    assert pool["one_job_tokens_per_s_wall"] == pytest.approx(one_rate)
    assert pool["throughput_ratio"] == pytest.approx(
        sum(s["tokens"] for s in jobs) / runs["pool_sweep"]["wall_s"] / one_rate)
    assert pool["training_ratio"] == pytest.approx(sum(s["tokens_per_s"] for s in jobs) / one["tokens_per_s"])
    assert (f"| tiny | 2 | {pool['one_job_tokens_per_s_wall']:,.0f} | "
            f"{pool['pool_tokens_per_s_wall']:,.0f} | {pool['throughput_ratio']:.2f}x | "
            f"{pool['training_ratio']:.2f}x |") in stdout.splitlines()


@pytest.mark.distributed
@pytest.mark.slow
def test_several_jobs_on_one_gpu_one_then_two_at_once(scaling_run):
    """``--shared-jobs 1,2``: the same two runs as one sweep on one slot, one at a time and then two at once
    (``hydra.launcher.jobs_per_gpu``): every run completes on slot 0, the figure is all runs' tokens over the
    sweep's wall time, the ratio against one at a time."""
    out, status, stdout, stderr = scaling_run
    assert status == 0, stderr[-4000:]
    report = json.loads((out / "scaling.json").read_text())
    one, two = report["shared"]
    assert [(r["jobs_per_gpu"], r["runs"], r["mps"]) for r in (one, two)] == [(1, 2, False),
                                                                              (2, 2, False)]
    for row in (one, two):
        sweep = Path(row["sweep_dir"])
        summaries = [json.loads((sweep / str(num) / "summary.json").read_text()) for num in (0, 1)]
        assert [s["steps"] for s in summaries] == [POOL_STEPS] * 2
        gpus = {str(yaml.safe_load((sweep / str(num) / ".hydra" / "hydra.yaml").read_text())
                    ["hydra"]["job"]["env_set"]["CUDA_VISIBLE_DEVICES"]) for num in (0, 1)}
        assert gpus == {"0"}
        wall = json.loads(sweep.with_name(sweep.name + ".run.json").read_text())["wall_s"]
        assert row["tokens_per_s_wall"] == pytest.approx(sum(s["tokens"] for s in summaries) / wall)
        assert row["jobs_tokens_per_s_training"] == [s["tokens_per_s"] for s in summaries]
    assert one["x_first"] == 1.0 and two["x_first"] == pytest.approx(two["tokens_per_s_wall"]
                                                                     / one["tokens_per_s_wall"])
    assert stdout.strip().splitlines()[-1] == (
        f"| tiny | 2 | 2 | no | {two['wall_s']:.1f} | {two['tokens_per_s_wall']:,.0f} | "
        f"{two['x_first']:.2f}x |")


def test_defaults_are_issue_14s_table_on_the_gpus_seen_and_a_cpu_smoke_run_without(bench):
    eight = bench.parse_args([], 8)
    assert (eight.model, eight.nprocs, eight.adapters, eight.launch) == (
        "llama2_7b", [1, 2, 4, 8], ["malora", "molora"], ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
    assert (eight.rows, eight.length, eight.steps, eight.warmup, eight.agree_steps) == (4, 1024, 30, 10, 20)
    assert (eight.pool_jobs, eight.pool_model, eight.pool_steps) == (8, "smollm2_135m_shape", 40)
    assert (eight.shared_jobs, eight.shared_runs) == ([1, 4, 8], 8)  # several jobs on GPU 0
    assert (bench.parse_args([], 6).nprocs, bench.parse_args([], 6).pool_jobs) == ([1, 2, 4], 6)
    assert (bench.parse_args([], 1).nprocs, bench.parse_args([], 1).pool_jobs) == ([1], 0)
    cpu = bench.parse_args([], 0)
    assert (cpu.model, cpu.nprocs, cpu.pool_jobs, cpu.length) == ("tiny", [2], 2, 256)
    assert (cpu.shared_jobs, cpu.shared_runs) == ([1, 2], 2)
    assert bench.parse_args(["--shared-jobs", "0"], 1).shared_jobs == []
    assert bench.parse_args(["--nprocs", "0"], 1).nprocs == []  # the one-GPU part alone
    assert cpu.launch == eight.launch and cpu.adapters == eight.adapters
    assert bench.parse_args(["--nprocs", "1,3", "--pool-jobs", "0"], 0).nprocs == [1, 3]  # CPU: any count


def test_plan_bucket_size_for_ddp_only_and_one_reference_per_process_count(bench, tmp_path):
    args = bench.parse_args(["--nprocs", "1,2,4", "--ddp-bucket-mb", "50", "--out", str(tmp_path)], 0)
    single, references, rows = bench.scaling_runs(args, "molora")
    assert sorted(references) == [2, 4]
    assert "trainer.grad_accum=4" in references[4].command and "--num_processes" in references[4].command
    assert {(launch, n) for launch, n, _ in rows} == {(launch, n) for launch in args.launch
                                                      for n in (1, 2, 4)}
    for launch, nprocs, run in rows:
        assert run.command[run.command.index("--num_processes") + 1] == str(nprocs)
        assert run.command[run.command.index("--config_file") + 1].endswith(f"conf/accelerate/{launch}.yaml")
        assert ("trainer.ddp_bucket_cap_mb=50.0" in run.command) == (launch == "ddp")
        assert "adapter=molora" in run.command and "adapter.dropout=0" in run.command
    assert "trainer.ddp_bucket_cap_mb=50.0" not in single.command
    assert not bench.scaling_runs(bench.parse_args(["--agree-steps", "0", "--out", str(tmp_path)], 0),
                                  "malora")[1]


@pytest.mark.parametrize(("argv", "message"), [
    (["--nprocs", "0,2"], "--nprocs='0,2': each count must be >= 1 and appear once"),
    (["--nprocs", "two"], "--nprocs='two': expected comma-separated whole numbers, e.g. 1,2,4,8"),
    (["--launch", "ddp,fsdp"], "--launch='ddp,fsdp': unknown fsdp (choose from ddp, deepspeed_zero2, "
                               "deepspeed_zero3, single)"),
    (["--agree-steps", "9"], "--agree-steps=9 exceeds the 8 steps of a run"),
    (["--pool-jobs", "1"], "--pool-jobs=1: the pool compares several jobs at once with one job; use >= 2, "
                           "or 0 for none"),
    (["--ddp-bucket-mb", "0"], "--ddp-bucket-mb=0.0 must be > 0"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--", "adapter.rnk=3"], "adapter.rnk"),
])
def test_bad_arguments_fail_in_one_line(tmp_path, run_bench, argv, message):
    status, _, stderr = run_bench("--out", str(tmp_path / "out"), *argv)
    assert status == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("bench_scaling.py: error: ") and message in line
    assert not (tmp_path / "out").exists()


def test_more_gpus_than_visible_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--nprocs", "1,2,4"], 2)
    assert capsys.readouterr().err == ("bench_scaling.py: error: --nprocs/--pool-jobs ask for 4 GPUs "
                                       "but 2 are visible\n")


def test_a_folder_it_did_not_make_is_left_alone(tmp_path, run_bench):
    foreign = tmp_path / "out" / "single_malora_n1"
    foreign.mkdir(parents=True)
    status, _, stderr = run_bench("--out", str(tmp_path / "out"))
    assert status == 2
    assert stderr.strip().splitlines() == [
        f"bench_scaling.py: error: {foreign} exists and was not made by bench_scaling.py; use another --out"]
    assert list((tmp_path / "out").iterdir()) == [foreign]
