"""``hydra/launcher=gpu_pool`` on the CPU, where the "GPUs" are worker slots: jobs run in parallel, one
slot each (``CUDA_VISIBLE_DEVICES``), the next job waits for a free slot, and a job that fails or whose
process dies fails alone; ``jobs_per_gpu`` puts several jobs on one GPU (never more), checked at launch,
and the launch log says whether CUDA MPS runs."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import yaml
from cli_runner import run_entry_point


def job_folders(sweep_dir: Path) -> dict[int, Path]:
    return {int(path.name.split("_", 1)[0]): path for path in sweep_dir.iterdir() if path.name[0].isdigit()}


def gpu_of(job: Path) -> str:
    return str(yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["env_set"]
               ["CUDA_VISIBLE_DEVICES"])


def started(job: Path) -> int:
    return (job / ".hydra" / "config.yaml").stat().st_mtime_ns  # written as the job starts


def ended(job: Path) -> int:
    outcome = job / "summary.json" if (job / "summary.json").exists() else job / "failure.json"
    return outcome.stat().st_mtime_ns


@pytest.mark.distributed
def test_jobs_run_in_parallel_one_gpu_each_and_wait_for_a_free_one(tmp_path: Path, train_cli,
                                                                    tiny_training_overrides) -> None:
    sweep_dir = tmp_path / "multirun"
    status = train_cli("-m", "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[0,1]", *tiny_training_overrides,
                       "trainer.max_steps=2", "data.eval_per_task=2", "adapter=lora", "adapter.rank=0,2,4",
                       f"hydra.sweep.dir={sweep_dir}")
    assert status == 2  # rank 0 failed, the others ran
    jobs = job_folders(sweep_dir)
    assert json.loads((jobs[0] / "failure.json").read_text())["error"] == "adapter.rank=0 must be >= 1"
    for num in (1, 2):
        assert json.loads((jobs[num] / "summary.json").read_text())["status"] == "completed"

    gpus = {num: gpu_of(job) for num, job in jobs.items()}
    start = {num: started(job) for num, job in jobs.items()}
    end = {num: ended(job) for num, job in jobs.items()}
    assert (gpus[0], gpus[1]) == ("0", "1")  # the first two jobs start at once, one GPU each
    assert start[1] < end[0]  # and run side by side
    assert start[2] >= min(end[0], end[1])  # the third waits for a free GPU ...
    assert gpus[2] in {gpus[num] for num in (0, 1) if end[num] <= start[2]}  # ... and takes the one freed


def die_when_x_is_one(cfg) -> None:
    """A task function for the test below: its process dies without a word for x=1."""
    if cfg.x == 1:
        os._exit(3)
    (Path(cfg.out) / f"done_{cfg.x}").touch()


def run_app(monkeypatch, config_dir: Path, argv: list[str]) -> int:
    import hydra

    app = hydra.main(config_path=str(config_dir), config_name="config", version_base=None)(die_when_x_is_one)
    return run_entry_point(monkeypatch, "app", app, argv)


def test_a_job_whose_process_dies_fails_alone(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 0\nout: ''\n")
    status = run_app(monkeypatch, tmp_path / "conf", ["-m", "hydra/launcher=gpu_pool",
                                                      "hydra.launcher.gpus=[7]", "x=1,2", f"out={tmp_path}",
                                                      f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert status == 1
    assert (tmp_path / "done_2").exists()  # the job after it ran, on the same (only) GPU
    assert f"job #0 (x=1 out={tmp_path}) ended without a result (exit code 3)" in capsys.readouterr().err


def test_without_a_visible_gpu_the_sweep_stops_with_one_line(monkeypatch, train_cli, capsys) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert train_cli("-m", "hydra/launcher=gpu_pool", "model=tiny", "seed=0,1") == 2  # a user error
    err = capsys.readouterr().err
    assert "hydra/launcher=gpu_pool: no GPU is visible; name them with hydra.launcher.gpus=[0,1,...]" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("visible", ["2,3", " 5 "])
def test_the_default_gpus_are_the_visible_ones(monkeypatch, visible: str) -> None:
    from hydra_plugins.malora_gpu_pool.gpu_pool_launcher import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == [gpu.strip() for gpu in visible.split(",")]


# -- several jobs on one GPU (hydra.launcher.jobs_per_gpu) ----------------------------------------------

def test_slots_put_at_most_jobs_per_gpu_on_a_gpu_and_fill_the_least_busy_first() -> None:
    from hydra_plugins.malora_gpu_pool.gpu_pool_launcher import GpuSlots

    slots = GpuSlots(["0", "1"], jobs_per_gpu=3)
    assert [slots.take() for _ in range(6)] == ["0", "1", "0", "1", "0", "1"]  # G x J = 6 slots
    assert not slots.free()
    slots.give_back("1")
    slots.give_back("0")
    slots.give_back("1")
    assert slots.take() == "1"  # GPU 1 ran one job, GPU 0 two
    running = ["0", "0", "1", "1"]
    rng = random.Random(0)
    for _ in range(500):  # jobs ending and starting in any order
        if running and (not slots.free() or rng.random() < 0.5):
            slots.give_back(running.pop(rng.randrange(len(running))))
        else:
            before = {gpu: running.count(gpu) for gpu in ("0", "1")}
            running.append(slots.take())
            assert before[running[-1]] == min(before.values())  # the least busy GPU
        counts = {gpu: running.count(gpu) for gpu in ("0", "1")}
        assert max(counts.values()) <= 3 and slots.running == counts


def test_the_launch_log_says_whether_cuda_mps_runs(monkeypatch, tmp_path: Path) -> None:
    from hydra_plugins.malora_gpu_pool.gpu_pool_launcher import sharing_line

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert sharing_line(1) is None  # one job a GPU: nothing to say
    assert sharing_line(4) == (f"4 jobs a GPU without CUDA MPS (no control pipe in {tmp_path}): they take "
                               "turns on it; start the daemon with nvidia-cuda-mps-control -d to run them "
                               "side by side")
    (tmp_path / "control").touch()  # the daemon's control pipe
    assert sharing_line(4) == f"4 jobs a GPU under CUDA MPS ({tmp_path}): their kernels run side by side"


@pytest.mark.parametrize(("settings", "message"), [
    (["hydra.launcher.gpus=[0,1]", "hydra.launcher.jobs_per_gpu=0"],
     "hydra.launcher.jobs_per_gpu must be an integer >= 1, got 0"),
    (["hydra.launcher.gpus=[0,1,0]"],
     "hydra.launcher.gpus names GPU 0 more than once: set hydra.launcher.jobs_per_gpu for several jobs on "
     "one GPU"),
    (["hydra.launcher.gpus=[0,1]", "hydra.launcher.jobs_per_gpu=two"],  # the schema's type check
     "hydra.launcher.jobs_per_gpu: Value 'two' of type 'str' could not be converted to Integer")])
def test_a_setting_that_cannot_work_stops_the_sweep_with_one_line(train_cli, capsys, settings: list[str],
                                                                 message: str) -> None:
    assert train_cli("-m", "hydra/launcher=gpu_pool", *settings, "model=tiny", "seed=0,1") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def meet_then_record_gpu(cfg) -> None:
    """A task function for the test below: jobs 0-3 wait until all four have started (they must run at
    once), then each job writes the GPU it sees and whether any of 0-3 had ended when it started."""
    out = Path(cfg.out)
    (out / f"started_{cfg.x}").touch()
    ended_before = any((out / f"ended_{x}").exists() for x in range(4))
    deadline = time.monotonic() + 120
    while cfg.x < 4 and not all((out / f"started_{x}").exists() for x in range(4)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {cfg.x}: the four jobs did not all start")
        time.sleep(0.05)
    (out / f"gpu_{cfg.x}").write_text(json.dumps([os.environ["CUDA_VISIBLE_DEVICES"], ended_before]))
    (out / f"ended_{cfg.x}").touch()


def test_jobs_per_gpu_runs_that_many_jobs_at_once_on_each_gpu(tmp_path: Path, monkeypatch, capsys) -> None:
    import hydra

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 0\nout: ''\n")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no_mps"))
    app = hydra.main(config_path=str(tmp_path / "conf"), config_name="config", version_base=None)(
        meet_then_record_gpu)
    status = run_entry_point(monkeypatch, "app", app, [
        "-m", "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[0,1]", "hydra.launcher.jobs_per_gpu=2",
        "x=0,1,2,3,4", f"out={tmp_path}", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert status == 0
    seen = {x: json.loads((tmp_path / f"gpu_{x}").read_text()) for x in range(5)}
    assert [seen[x][0] for x in range(4)] == ["0", "1", "0", "1"]  # 2 GPUs x 2 jobs, all four at once
    assert seen[4][0] in {"0", "1"} and seen[4][1]  # the fifth waited for a free slot
    logged = capsys.readouterr()
    assert "2 jobs a GPU without CUDA MPS (no control pipe in" in logged.out + logged.err
