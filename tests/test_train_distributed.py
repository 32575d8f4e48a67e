"""Two processes on the CPU (gloo), launched the documented way (``accelerate launch --config_file
conf/accelerate/<config>.yaml --num_processes 2 -m malora_train.cli ...``): DDP, DeepSpeed ZeRO-2 and
ZeRO-3 follow the one-process loss curve for the same global batch, write one run directory once, and
ZeRO-3 saves the full adapter, which reloads outside DeepSpeed, and resumes exactly from its checkpoint.

Rank r takes the r-th block of each global micro-batch, so two processes with micro-batch 4 run exactly
the forwards of one process with micro-batch 4 and grad_accum 2: the router's balance loss (a statistic
of each forward's tokens) is on and must agree too. Tolerance: relative 1e-4 on every step's loss and
gradient norm. The loop divides summed token losses by the step's global answer-token count, so what is
left are float32 summation orders (~1e-7 relative), until top-k routing meets a near-tie: then that noise
flips one token's expert choice, a discrete change that moves the loss by up to ~1e-4 (a wrongly scaled
loss or gradient shows as a factor in the gradient norm). Dropout is off: each rank draws its own masks.
Routing itself (top-2 of 8 experts) stays on. The launched runs' steps are also checked against the
step recomputed from scratch (``scratch_model``): what one process gets wrong the same way is caught too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_specs import kind_config
from safetensors.torch import load_file
from scratch_model import AdapterSpec, assert_logged_step, recompute_steps

from malora_train.adapters import AdaptedCausalLM, adapter_kinds, load_adapter
from malora_train.config import RouterConfig
from malora_train.run_dir import write_manifest
from malora_train.train.checkpoint.folders import complete_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
COMMON = ["adapter=malora", "adapter.dropout=0", "adapter.router.balance_coef=0.01",
          "adapter.router.z_loss_coef=0.001", f"trainer.max_steps={STEPS}", "trainer.save_every=2",
          "trainer.keep_last=3", "trainer.warmup_ratio=0"]
TASKS = ["sentiment", "category", "case", "compare", "arithmetic"]
# COMMON's MALoRA: r = 8, N = 8, lam = 0.5 -> d = 32, r-bar = 12, alpha = 24
SPEC = AdapterSpec("malora", scaling=24 / 12, expert_rank=12, num_experts=8, top_k=2, balance_coef=0.01,
                   z_loss_coef=0.001)


def accelerate_launch() -> list[str]:
    script = Path(sys.executable).parent / "accelerate"
    if script.is_file():
        return [str(script), "launch"]
    return [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_training_overrides) -> Path:
    """The reference: one process, micro-batch 4 and grad_accum 2 (= 2 processes x 4, forward by forward)."""
    from accelerate.state import AcceleratorState, GradientState

    from malora_train.cli import compose
    from malora_train.train.loop import train

    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    cfg = compose([*tiny_training_overrides, *COMMON, "trainer.micro_batch_size=4", "trainer.grad_accum=2"])
    try:
        train(cfg, run_dir)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return run_dir


def launch(config: str, cwd: Path, overrides: list[str], succeed: bool = True,
           program: tuple[str, ...] = ("-m", "malora_train.cli")) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT),
           "MALORA_DIST_TIMEOUT_S": "90"}  # a rank waiting on another fails well within the test's timeout
    env.pop("MALORA_RUN_DIR", None)
    config_file = REPO_ROOT / "conf" / "accelerate" / f"{config}.yaml"
    command = [*accelerate_launch(), "--config_file", str(config_file), "--num_processes", "2",
               *program, *overrides]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert (result.returncode == 0) == succeed, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_two_processes_follow_the_one_process_loss_curve(config, tmp_path, one_process,
                                                          tiny_training_overrides, train_losses,
                                                          read_metrics):
    overrides = [*tiny_training_overrides, *COMMON, "trainer.micro_batch_size=4"]
    if config == "ddp":
        # no hydra.run.dir: each rank would stamp outputs/<date>/<time> on its own clock; they must agree
        cwd = tmp_path
        result = launch(config, cwd, overrides)
        [run_dir] = list((tmp_path / "outputs").glob("*/*"))
    else:
        # from a directory that is not the repository's: the launch config's relative DeepSpeed JSON path
        # is found among the configs
        cwd, run_dir = tmp_path, tmp_path / "run"
        result = launch(config, cwd, [*overrides, f"hydra.run.dir={run_dir}"])

    # one run directory, written once: each step logged once, one summary, rank 0's messages only
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
        expected = train_losses(one_process, key)
        got = train_losses(run_dir, key)
        assert list(got) == list(range(1, STEPS + 1))
        assert got == pytest.approx(expected, rel=1e-4), key
    assert [r["step"] for r in read_metrics(run_dir) if "eval/average" in r] == [STEPS]
    # each rank scored half the eval examples: one predictions file holds them all, in task and id order
    predictions = run_dir / "eval" / f"step_{STEPS}" / "predictions_label_logits.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [(r["task"], r["id"]) for r in rows] == [(task, i) for task in TASKS for i in range(8)]
    # the two ranks' forwards recomputed from scratch: step 1 from the base model (B = 0), step 3 from the
    # checkpoint of step 2 (LM, per-task and auxiliary losses, gradient norm)
    steps, task_names = recompute_steps(run_dir, overrides, SPEC, world_size=2, steps=(1, 3))
    logged = {row["step"]: row for row in read_metrics(run_dir) if "lm_loss" in row}
    for step, expected in steps.items():
        assert_logged_step(logged[step], expected, task_names, norm_rel=1e-4)
    assert result.stdout.count(f"== tiny + malora: {STEPS} steps") == 1
    assert (run_dir / "cli.log").read_text().count("run directory:") == 1
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS}"  # saved at the end: 5 is off the save_every grid
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2, 4, 5]

    # the saved adapter is the whole adapter, equal to the one-process run's
    expected = load_file(str(one_process / "adapter" / "adapter_model.safetensors"))
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    for key in expected:
        # atol: 1% of one AdamW step (lr 1e-3). Adam divides by the gradient's running RMS, so where a
        # gradient component is near zero, the reduction order's last-bit differences (ZeRO-3 reduce-scatters)
        # become a visible share of that component's update (seen: 3.8e-6 on one of 3,072 lora_B values after
        # 5 steps)
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-4, atol=1e-5)
    if config == "deepspeed_zero2":
        assert_crafted_checkpoint_is_refused(run_dir, tmp_path, overrides)
    if config == "deepspeed_zero3":
        assert_reloads_outside_deepspeed(run_dir, summary)
        # resuming from ZeRO-3's sharded optimizer state continues the run exactly
        resumed_dir = tmp_path / "resumed"
        launch(config, cwd, [*overrides, f"hydra.run.dir={resumed_dir}",
                             f"trainer.resume={run_dir / 'checkpoints' / 'step_2'}"])
        for key in ("loss", "grad_norm"):
            resumed = train_losses(resumed_dir, key)
            assert list(resumed) == list(range(3, STEPS + 1))
            assert resumed == {s: v for s, v in train_losses(run_dir, key).items() if s > 2}, key


@pytest.mark.distributed
def test_two_captured_processes_give_one_process_with_grad_accum_two(tmp_path, tiny_training_overrides,
                                                                    train_losses, run_training) -> None:
    """The captured step under two processes (no DDP wrapper: the gradient bucket summed by one all-reduce
    before the update, the aux loss a share of every process's forwards), its captures lifted onto the CPU:
    each step's losses, gradient norm and the trained adapter are those of one eager process with
    ``grad_accum=2`` on the same packed rows."""
    overrides = [*tiny_training_overrides, *COMMON, "trainer.micro_batch_size=4", "data.packing=true",
                 "trainer.save_every=0"]
    run_training(tmp_path / "one", *overrides, "trainer.grad_accum=2", "trainer.cuda_graphs=false")
    run_dir = tmp_path / "two"
    result = launch("ddp", tmp_path, [*overrides, "trainer.cuda_graphs=true", f"hydra.run.dir={run_dir}"],
                    program=(str(REPO_ROOT / "tests" / "launch_captured_on_cpu.py"),))
    assert "training step: captured" in result.stdout + result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
        got = train_losses(run_dir, key)
        assert list(got) == list(range(1, STEPS + 1))
        assert got == pytest.approx(train_losses(tmp_path / "one", key), rel=1e-4), key
    expected = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-4, atol=1e-5)


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def assert_crafted_checkpoint_is_refused(run_dir: Path, tmp_path: Path, overrides: list[str]) -> None:
    """A DeepSpeed checkpoint file replaced by one that runs code when unpickled (its manifest rewritten to
    match): resuming from it stops with one line naming the file, and the code never runs."""
    checkpoint = run_dir / "checkpoints" / "step_2"
    [model_states] = list(checkpoint.glob("deepspeed/state/mp_rank_00_model_states.pt"))
    state = torch.load(model_states, weights_only=False)  # our own file, from the run above
    marker = tmp_path / "code-ran"
    state["payload"] = RunsCode(marker)
    torch.save(state, model_states)
    write_manifest(checkpoint)
    result = launch("deepspeed_zero2", tmp_path, [*overrides, f"hydra.run.dir={tmp_path / 'crafted'}",
                                                  f"trainer.resume={checkpoint}"], succeed=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("malora-train: error:")]
    assert errors == [f"malora-train: error: {model_states}: refused to load it: it holds objects other than "
                      f"tensors and plain data, which could run code ({errors[0].rsplit('(', 1)[1]}"], errors
    assert not marker.exists()


def assert_reloads_outside_deepspeed(run_dir: Path, summary: dict) -> None:
    """The gathered ZeRO-3 adapter on a fresh tiny model, here, without DeepSpeed: the same eval."""
    from malora_train.cli import compose
    from malora_train.data import build_tasks
    from malora_train.eval import evaluate
    from malora_train.models import load_model_and_tokenizer

    cfg = compose(["model=tiny", "data.eval_per_task=8", "data.train_per_task=64", "data.max_length=256"])
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    model = load_adapter(base, run_dir / "adapter")
    result = evaluate(model, tokenizer, build_tasks(cfg.data, cfg.seed), cfg.eval, max_length=256)
    assert result.to_json()["accuracy"] == summary["eval_after"]


@pytest.mark.parametrize("kind", adapter_kinds())
def test_every_trainable_tensor_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(make_tiny_model,
                                                                                         kind):
    """DDP with find_unused_parameters=False hangs or fails when a parameter gets no gradient in a step;
    top-k routing must still give every expert (and the router) a gradient, even an unselected one."""
    cfg = kind_config(kind, num_experts=8, router=RouterConfig(top_k=1))
    model = AdaptedCausalLM.from_base(make_tiny_model(), cfg).train()
    ids = torch.randint(3, 200, (1, 3))  # 3 tokens, top-1 of 8 experts: most experts get no token
    model(ids, torch.ones_like(ids), ids, torch.zeros(1, dtype=torch.long)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_launch_configs_and_deepspeed_json_are_consistent():
    """The shipped launch configs point at the shipped DeepSpeed JSON and leave batch sizes to trainer.*."""
    import yaml

    for stage in (2, 3):
        launch_file = REPO_ROOT / "conf" / "accelerate" / f"deepspeed_zero{stage}.yaml"
        launch_cfg = yaml.safe_load(launch_file.read_text())
        ds_path = REPO_ROOT / launch_cfg["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(ds_path.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert {ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                "train_batch_size", "gradient_clipping")} == {"auto"}


@pytest.mark.parametrize("kind, stage, deepspeed, zero3", [("MULTI_GPU", None, False, False),
                                                          ("DEEPSPEED", 2, True, False),
                                                          ("DEEPSPEED", 3, True, True)])
def test_launch_info_holds_what_the_accelerator_says_of_this_process(kind, stage, deepspeed, zero3):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from malora_train.train.distributed import LaunchInfo

    accelerator = SimpleNamespace(process_index=1, num_processes=2, is_main_process=False,
                                  distributed_type=DistributedType[kind],
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    assert LaunchInfo.from_accelerator(accelerator) == LaunchInfo(process_index=1, world=2, is_main=False,
                                                                  deepspeed=deepspeed, zero3=zero3)
