"""The Python API under ``transformers.Trainer`` and Accelerate, on the tiny model and the CPU: every adapter
kind trains, the routers' auxiliary loss is optimised through ``outputs.loss``, gradient accumulation and
activation checkpointing give the same training, bf16 autocast trains, checkpoints hold the adapter and
resume exactly, routing is recorded during ``trainer.evaluate``, and two DDP processes launched with
``accelerate launch`` follow one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from api_trainer_run import DISTRIBUTED_STEPS, TASKS, collate, train_malora, two_task_rows
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import malora_train
from malora_train.adapters import MixtureAdapterLinear, adapter_kinds

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def rows(tiny_tokenizer) -> list[dict]:
    return two_task_rows(tiny_tokenizer)


def adapted(make_tiny_model, kind: str = "malora", seed: int = 0, **overrides) -> malora_train.AdaptedModel:
    torch.manual_seed(seed)
    config = malora_train.load_adapter_config(kind, **{"rank": 4, "dropout": 0.0, **overrides})
    return malora_train.get_adapted_model(make_tiny_model(), config)


def trainer(model, rows, out_dir, **args) -> Trainer:
    settings = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "use_cpu": True,
                "report_to": [], "save_strategy": "no", "logging_steps": 1, "seed": 0, "disable_tqdm": True,
                **args}
    return Trainer(model=model, args=TrainingArguments(str(out_dir), **settings), train_dataset=rows,
                   eval_dataset=rows[:12], data_collator=collate)


def logged(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history
            if key in entry and "train_runtime" not in entry]


def routers(model) -> list[torch.Tensor]:
    return [m.router for m in model.base_model.modules() if isinstance(m, MixtureAdapterLinear)]


def assert_same_adapter(a, b, rtol: float = 0.0, atol: float = 0.0) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", adapter_kinds())
def test_trainer_trains_every_adapter_kind(tmp_path, make_tiny_model, rows, kind):
    model = adapted(make_tiny_model, kind)
    run = trainer(model, rows, tmp_path, max_steps=12, learning_rate=1e-2)
    run.train()
    losses = logged(run, "loss")
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    model.save_adapter(tmp_path / "adapter")
    loaded = malora_train.load_adapted_model(make_tiny_model(), tmp_path / "adapter")
    assert_same_adapter(model, loaded)


def test_trainer_optimises_the_aux_loss_it_finds_in_outputs_loss(tmp_path, make_tiny_model, rows):
    # the up-projections start at zero, so in the first step only the auxiliary loss moves the routers
    moved = {}
    for coef in (0.0, 0.01):
        model = adapted(make_tiny_model, "malora", router={"balance_coef": coef})
        before = [r.detach().clone() for r in routers(model)]
        trainer(model, rows, tmp_path / str(coef), max_steps=1).train()
        moved[coef] = max((r.detach() - b).abs().max().item() for r, b in zip(routers(model), before))
    assert moved[0.0] == 0.0 and moved[0.01] > 1e-4, moved


def test_gradient_accumulation_matches_one_larger_batch(tmp_path, make_tiny_model, rows):
    # balance loss off: it is a per-forward statistic (two forwards of 2 rows differ from one of 4)
    whole = adapted(make_tiny_model, "malora", router={"balance_coef": 0.0})
    run_whole = trainer(whole, rows, tmp_path / "whole", per_device_train_batch_size=4)
    run_whole.train()
    accumulated = adapted(make_tiny_model, "malora", router={"balance_coef": 0.0})
    run_accumulated = trainer(accumulated, rows, tmp_path / "accum", per_device_train_batch_size=2,
                              gradient_accumulation_steps=2)
    run_accumulated.train()
    for key in ("loss", "grad_norm"):
        assert logged(run_accumulated, key) == pytest.approx(logged(run_whole, key), rel=1e-5), key
    assert_same_adapter(whole, accumulated, rtol=1e-4, atol=1e-6)
    assert any(value.abs().max() > 0 for key, value in whole.state_dict().items() if key.endswith("lora_B"))


def test_activation_checkpointing_gives_the_same_training(tmp_path, make_tiny_model, rows):
    # each model is made (seeded) right before its run: the dropout masks then start from the same state
    plain = adapted(make_tiny_model, "malora", dropout=0.05)
    run_plain = trainer(plain, rows, tmp_path / "plain")
    run_plain.train()
    checkpointed = adapted(make_tiny_model, "malora", dropout=0.05)
    run_checkpointed = trainer(checkpointed, rows, tmp_path / "ckpt", activation_checkpointing=True)
    run_checkpointed.train()
    assert checkpointed.base_model.is_activation_checkpointing
    for key in ("loss", "grad_norm"):
        assert logged(run_checkpointed, key) == pytest.approx(logged(run_plain, key), rel=1e-6), key
    assert_same_adapter(plain, checkpointed, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains_with_float32_adapters(tmp_path, make_tiny_model, rows):
    model = adapted(make_tiny_model, "malora")
    run = trainer(model, rows, tmp_path, bf16=True, max_steps=10, learning_rate=1e-2)
    run.train()
    assert run.accelerator.mixed_precision == "bf16"
    losses = logged(run, "loss")
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(value.dtype == torch.float32 for value in model.state_dict().values())


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, make_tiny_model, rows):
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    whole = adapted(make_tiny_model, "molora", dropout=0.05)
    trainer(whole, rows, tmp_path / "run", **settings).train()
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert set(saved) == set(whole.state_dict())  # the adapter, not the base model's weights

    resumed = adapted(make_tiny_model, "molora", dropout=0.05, seed=7)  # other initial adapter weights
    trainer(resumed, rows, tmp_path / "run", **settings).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert_same_adapter(whole, resumed)


def test_routing_is_recorded_per_task_during_trainer_evaluate(tmp_path, make_tiny_model, rows):
    model = adapted(make_tiny_model, "molora")
    run = trainer(model, rows, tmp_path)
    run.train()
    with model.recording_routing(TASKS):
        metrics = run.evaluate()
    assert metrics["eval_loss"] > 0
    stats = model.routing_stats()
    tokens = {task: sum(len(r["input_ids"]) for r in rows[:12] if r["task_ids"] == t)
              for t, task in enumerate(TASKS)}
    assert stats["tokens"] == tokens
    assert all(abs(sum(row) - 1) < 1e-9 for layer in stats["layers"].values() for row in layer)


def test_an_accelerate_loop_with_gradient_accumulation(make_tiny_model, rows):
    model = adapted(make_tiny_model, "malora")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = [r.detach().clone() for r in routers(model)]
    model.train()
    losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            out = model(**batch)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]) - 0.3, losses
    assert all((r.detach() - b).abs().max() > 0 for r, b in zip(routers(model), before))


@pytest.mark.distributed
def test_two_ddp_processes_follow_one_process(tmp_path, repo_root):
    # Trainer divides the summed token losses by the global answer-token count (num_items_in_batch), so two
    # processes of 2 rows are one process of 4 up to float32 summation order
    train_malora(tmp_path / "one", batch_size=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo_root)}
    script = Path(sys.executable).parent / "accelerate"
    launcher = ([str(script), "launch"] if script.is_file()
                else [sys.executable, "-m", "accelerate.commands.launch"])
    command = [*launcher, "--config_file", str(repo_root / "conf" / "accelerate" / "ddp.yaml"),
               "--num_processes", "2", str(Path(__file__).parent / "api_trainer_run.py"),
               str(tmp_path / "two"), "2"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    one, two = (json.loads((tmp_path / run / "losses.json").read_text()) for run in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    assert len(two["losses"]) == DISTRIBUTED_STEPS
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_the_adapter_trainer_saves_a_complete_loadable_adapter_folder(tmp_path, make_tiny_model, rows):
    model = adapted(make_tiny_model, "malora")
    settings = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "use_cpu": True,
                "report_to": [], "save_strategy": "steps", "save_steps": 2, "seed": 0, "disable_tqdm": True}
    run = malora_train.AdapterTrainer(model=model, args=TrainingArguments(str(tmp_path / "run"), **settings),
                                      train_dataset=rows, data_collator=collate)
    run.train()
    run.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= {
            p.name for p in folder.iterdir()}
        loaded = malora_train.load_adapted_model(make_tiny_model(), folder)
        assert_same_adapter(model, loaded)
    # a plain Trainer writes the tensors alone (what AdapterSaving adds to)
    trainer(adapted(make_tiny_model, "malora"), rows, tmp_path / "plain").save_model(str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "adapter_config.json").exists()
