"""DDP settings that decide how well several GPUs scale, checked in the real loop with two CPU processes
(gloo): no unused-parameter search (every trainable tensor gets a gradient in every micro-batch, on every
rank), ``trainer.ddp_bucket_cap_mb`` reaches DDP, gradients are all-reduced once per optimiser step (not per
micro-batch) and the all-reduce of the first full bucket starts while backward is still running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from malora_train.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS, GRAD_ACCUM, BUCKET_MB = 3, 2, 0.1


def split(events: list[list], marker: str) -> list[list[list]]:
    """The events after each ``marker`` event, up to the next one."""
    parts: list[list[list]] = []
    for event in events:
        if event[0] == marker:
            parts.append([])
        elif parts:
            parts[-1].append(event)
    return parts


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["malora", "molora"])
def test_ddp_reduces_every_adapter_gradient_once_a_step_overlapping_backward(tmp_path,
                                                                             tiny_training_overrides,
                                                                             kind):
    # top-1 of 8 experts over 2 short rows: most experts see no token in a micro-batch
    overrides = [*tiny_training_overrides, f"adapter={kind}", "adapter.router.top_k=1",
                 "trainer.micro_batch_size=1", f"trainer.grad_accum={GRAD_ACCUM}",
                 f"trainer.ddp_bucket_cap_mb={BUCKET_MB}", f"trainer.max_steps={STEPS}"]
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--config_file",
               str(REPO_ROOT / "conf" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
               str(REPO_ROOT / "tests" / "ddp_probe_run.py"), str(tmp_path), str(STEPS), *overrides]
    # a rank waiting on another fails in 120 s, naming itself, well within the test's timeout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "MALORA_DIST_TIMEOUT_S": "120"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["engine"] == "DistributedDataParallel"
        assert report["find_unused_parameters"] is False
        assert report["bucket_bytes_cap"] == int(BUCKET_MB * 1024 * 1024)
        trainable = set(report["trainable"])
        steps = split(report["events"], "step")
        assert len(steps) == STEPS
        for number, step in enumerate(steps):
            micro_batches = split(step, "forward")
            assert len(micro_batches) == GRAD_ACCUM
            for micro in micro_batches:  # no unused parameter: each one's gradient arrives in each backward
                assert {e[1] for e in micro if e[0] == "grad"} == trainable
            for micro in micro_batches[:-1]:  # accumulation without communication
                assert [e for e in micro if e[0] == "allreduce"] == []
            last = micro_batches[-1]
            reduces = [i for i, e in enumerate(last) if e[0] == "allreduce"]
            assert sum(last[i][1] for i in reduces) == len(trainable)  # every gradient, once
            if number == 0:  # DDP's first step has one bucket; it then rebuilds them in backward's order
                continue
            assert len(reduces) > 1  # buckets of at most BUCKET_MB
            last_grad = max(i for i, e in enumerate(last) if e[0] == "grad")
            assert reduces[0] < last_grad  # the first bucket is sent before backward has finished


def test_ddp_bucket_size_is_checked_before_anything_loads():
    from malora_train.cli import compose
    from malora_train.train.preflight import check_config

    with pytest.raises(ConfigError, match=r"^trainer.ddp_bucket_cap_mb=0.0 must be > 0 \(or null\)$"):
        check_config(compose(["model=tiny", "trainer.ddp_bucket_cap_mb=0"]))


def test_ddp_bucket_size_is_refused_under_deepspeed_which_has_its_own():
    from malora_train.cli import compose
    from malora_train.train.distributed import check_launch, ddp_settings

    trainer = compose(["model=tiny", "trainer.ddp_bucket_cap_mb=50"]).trainer
    with pytest.raises(ConfigError, match=r"^trainer.ddp_bucket_cap_mb applies to DDP; .*reduce_bucket_size"):
        check_launch(trainer, SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    check_launch(trainer, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    assert ddp_settings(trainer).to_kwargs() == {"bucket_cap_mb": 50}
    assert ddp_settings(compose(["model=tiny"]).trainer).to_kwargs() == {}  # torch's default, 25 MB


@pytest.mark.parametrize("config", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_every_multi_process_launch_takes_a_free_port(config):
    """A fixed port (Accelerate's default 29500) lets two launches on one machine (two tests, two sessions)
    meet in one rendezvous and wait on each other for ever: port 0 is a free port for each launch."""
    import yaml

    assert yaml.safe_load((REPO_ROOT / "conf" / "accelerate" / f"{config}.yaml").read_text())[
        "main_process_port"] == 0


def test_a_failed_collective_is_one_line_naming_the_rank(monkeypatch, capsys, tmp_path):
    """A rank whose collective timed out (another rank stopped, or skipped it) says so in one line naming
    itself, instead of a traceback or silence."""
    import torch.distributed as dist
    from cli_runner import run_program

    from malora_train.train import loop

    def train(*args, **kwargs):
        raise dist.DistBackendError("[gloo] Timed out waiting 120000ms for recv operation to complete")

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MALORA_RUN_DIR", str(tmp_path / "run"))  # as agreed with rank 0
    status = run_program(monkeypatch, "malora-train", ["model=tiny", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("malora-train: error: rank 1 of 2: waiting for the other processes failed ([gloo] "
                           "Timed out waiting 120000ms")

