"""The CUDA path of the training loop (skipped without a GPU): packed rows through flex attention give
the unpacked losses and gradients, a training step never waits for the device, and the compiled decoder
(CUDA graphs included) trains as eager does. The Triton kernels have their own tests in test_fused.py."""

from __future__ import annotations

import pytest
import torch

from malora_train.adapters import AdaptedCausalLM
from malora_train.attention import SDPA_FLEX
from malora_train.config import AdapterConfig, DataConfig
from malora_train.data import BatchStream, Collator, build_tasks
from malora_train.data.packing import pack_rows
from malora_train.labels import loss_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_packed_rows_through_flex_attention_match_padded_rows(make_tiny_model, tiny_tokenizer) -> None:
    """float32: per-example answer-token losses and every adapter gradient, packed (BlockMask, the compiled
    flex kernel) against one padded example a row (SDPA)."""
    tasks = build_tasks(DataConfig(source="synthetic", train_per_task=40, eval_per_task=2,
                                   prompt_template="plain"), seed=0)
    stream = BatchStream(tasks, tiny_tokenizer, DataConfig(max_length=256, cache=False), batch_size=12,
                         seed=0)
    draws = [stream.mixture.draw() for _ in range(12)]
    examples = [stream.splits[t].example(i) for t, i in draws]
    torch.manual_seed(0)
    model = AdaptedCausalLM.from_base(make_tiny_model().cuda(),
                                      AdapterConfig(kind="malora", rank=4, num_experts=4,
                                                    dropout=0.0)).cuda().train()
    assert model.model.config._attn_implementation == SDPA_FLEX
    for param in model.parameters():  # B = 0 at init would hide the adapters from the check
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)

    def run(batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        batch = {**batch, **loss_targets(batch["labels"], batch["task_ids"])}
        batch = {k: v.cuda() for k, v in batch.items() if k != "labels"}
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.lm_loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.token_loss.cpu(), grads

    padded_losses, padded_grads = run(Collator(tiny_tokenizer.pad_token_id)(examples))
    rows = [[stream.splits[t].packed(i) for t, i in draws[:6]],
            [stream.splits[t].packed(i) for t, i in draws[6:]]]
    packed = pack_rows(rows, 1024, tiny_tokenizer.pad_token_id)
    packed_losses, packed_grads = run(packed)
    # answer positions come in the same order: examples in order, within each its tokens
    torch.testing.assert_close(packed_losses, padded_losses, rtol=1e-4, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def assert_steps_never_synchronise(overrides: list[str], tmp_path, warmup: int):
    """After ``warmup`` steps, three training steps run under CUDA's sync debug mode set to error: any
    synchronising call inside ``train_step`` raises."""
    from accelerate.state import AcceleratorState, GradientState

    from malora_train.cli import compose
    from malora_train.train.loop import Trainer

    cfg = compose([*overrides, "data.packing=true", "trainer.max_steps=8", "trainer.log_every=8"])
    trainer = Trainer(cfg, tmp_path / "run", "", [])
    try:
        trainer.engine.train()
        for _ in range(warmup):
            trainer.train_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return trainer
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_training_step_never_waits_for_the_device(tmp_path, tiny_training_overrides) -> None:
    assert_steps_never_synchronise(tiny_training_overrides, tmp_path, warmup=2)  # allocator, kernel builds


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager_over_20_steps(mode, tmp_path, run_training, train_losses) -> None:
    """bf16 autocast, dropout off: compiled and eager losses agree within bf16 noise over 20 steps."""
    import torch._dynamo

    common = ["data.packing=true", "adapter.dropout=0", "trainer.max_steps=20", "data.eval_per_task=2",
              "trainer.log_every=1"]
    torch._dynamo.reset()
    run_training(tmp_path / "compiled", *common, "trainer.compile=true", f"trainer.compile_mode={mode}")
    run_training(tmp_path / "eager", *common)
    compiled, eager = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    assert list(compiled) == list(range(1, 21))
    assert compiled == pytest.approx(eager, rel=2e-3)  # seen on an H100: 2.6e-4 at most
    assert compiled[20] < compiled[1]  # it trains


COMPILED_KERNELS = ["trainer.compile=true", "trainer.compile_adapters=kernels"]
COMPILED_TRACED = ["trainer.compile=true", "trainer.compile_adapters=traced"]


@pytest.mark.parametrize("kind, extra", [("lora", []), ("molora", []), ("malora", []),
                                         ("malora", COMPILED_TRACED), ("malora", COMPILED_KERNELS),
                                         ("molora", COMPILED_KERNELS)])
def test_graphed_training_matches_eager_over_20_steps(kind, extra, tmp_path, run_training,
                                                      train_losses) -> None:
    """trainer.cuda_graphs (forward + backward and the AdamW update replayed as CUDA graphs), bf16
    autocast, dropout off: the losses of eager steps within bf16 noise over 20 steps, with two
    micro-batches a step."""
    import torch._dynamo

    common = [f"adapter={kind}", "data.packing=true", "adapter.dropout=0", "trainer.max_steps=20",
              "trainer.grad_accum=2", "data.eval_per_task=2", "trainer.log_every=1"]
    torch._dynamo.reset()
    run_training(tmp_path / "graphed", *common, "trainer.cuda_graphs=true", *extra)
    run_training(tmp_path / "eager", *common, "trainer.cuda_graphs=false")
    graphed, eager = train_losses(tmp_path / "graphed"), train_losses(tmp_path / "eager")
    assert list(graphed) == list(range(1, 21))
    assert graphed == pytest.approx(eager, rel=1e-3)  # seen on an H100: 1.3e-4 at most (with compile)
    assert graphed[20] < graphed[1]  # it trains


def test_a_bare_run_on_a_gpu_takes_the_captured_step(tmp_path, run_training, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="malora_train.train.loop"):
        run_training(tmp_path / "run", "adapter=malora", "trainer.max_steps=3", "data.eval_per_task=2")
    assert "training step: captured (each step replayed as CUDA graphs)" in caplog.text


@pytest.mark.parametrize("setting", ["true", "selective"])
def test_checkpointed_capture_draws_the_forward_masks_again_over_20_steps(setting, tmp_path, run_training,
                                                                         train_losses) -> None:
    """Gradient checkpointing (whole layers, or all but the kept MLP input projections) under the captured
    step, dropout on: the recompute reads the device seed the forward read (no RNG state to save or restore),
    so the losses are those of the captured step without checkpointing, and within bf16 noise of the eager
    step (whose masks are drawn otherwise). Each micro-batch gets a new seed: the masks change from step to
    step."""
    from malora_train.train import graphs

    seeds: list[int] = []
    original = graphs.StepGraphs._copy_in

    def record(self, inputs, host_inputs, seed):
        seeds.append(seed)
        return original(self, inputs, host_inputs, seed)

    common = ["adapter=malora", "data.packing=true", "adapter.dropout=0.1", "trainer.max_steps=20",
              "trainer.grad_accum=2", "data.eval_per_task=2", "trainer.log_every=1",
              "trainer.eval_after=false"]
    graphs.StepGraphs._copy_in = record
    try:
        run_training(tmp_path / "checkpointed", *common, f"trainer.gradient_checkpointing={setting}")
    finally:
        graphs.StepGraphs._copy_in = original
    run_training(tmp_path / "captured", *common)
    run_training(tmp_path / "eager", *common, "trainer.cuda_graphs=false")
    checkpointed = train_losses(tmp_path / "checkpointed")
    assert list(checkpointed) == list(range(1, 21))
    assert checkpointed == pytest.approx(train_losses(tmp_path / "captured"), rel=1e-5)  # seen: 2e-7
    # eager steps draw their dropout masks from other seeds than the captured ones: the losses differ by
    # dropout's noise, not by rounding (the captured runs above agree to rounding)
    assert checkpointed == pytest.approx(train_losses(tmp_path / "eager"), rel=2e-2)
    assert len(seeds) >= 36 and len(set(seeds)) == len(seeds)  # replays after the first step: a new seed each


@pytest.mark.parametrize("dropout, rel", [(0.0, 1e-5), (0.1, 2e-3)])  # seen on an H100: 1.2e-7, 2.4e-4
def test_two_processes_sharing_the_gpu_capture_as_one_process_with_grad_accum_two(dropout, rel, tmp_path,
                                                                                run_training,
                                                                                train_losses) -> None:
    """``torchrun`` with two processes on one GPU (gloo between them): the captured step without DDP, its
    gradient bucket summed by one all-reduce, gives one process's losses with ``grad_accum=2`` over 20 steps:
    to bf16 rounding with dropout off, within dropout's noise with it on (each rank draws its own masks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY_TRAINING

    common = ["adapter=malora", "data.packing=true", f"adapter.dropout={dropout}", "trainer.max_steps=20",
              "trainer.log_every=1", "trainer.eval_after=false"]
    run_training(tmp_path / "one", *common, "trainer.grad_accum=2")
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("MALORA_RUN_DIR", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "malora_train.cli", *TINY_TRAINING, *common,
                             f"hydra.run.dir={tmp_path / 'two'}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training step: captured" in result.stdout + result.stderr
    two = train_losses(tmp_path / "two")
    assert list(two) == list(range(1, 21))
    assert two == pytest.approx(train_losses(tmp_path / "one"), rel=rel)
    assert two[20] < two[1]  # it trains


def test_shared_input_groups_train_as_the_layers_one_by_one(tmp_path, run_training, train_losses) -> None:
    """adapter.shared_input (q/k/v and gate/up projected by one kernel launch) under CUDA graphs with dropout
    on: the group salts its members as the lone layers are salted, so the masks are the same and the losses
    equal those of the layers computed one by one within bf16 noise."""
    common = ["adapter=malora", "data.packing=true", "adapter.dropout=0.1", "trainer.max_steps=20",
              "trainer.cuda_graphs=true", "data.eval_per_task=2", "trainer.log_every=1"]
    run_training(tmp_path / "grouped", *common)
    run_training(tmp_path / "alone", *common, "adapter.shared_input=false")
    grouped, alone = train_losses(tmp_path / "grouped"), train_losses(tmp_path / "alone")
    assert list(grouped) == list(range(1, 21))
    assert grouped == pytest.approx(alone, rel=2e-3)  # seen on an H100: 2.1e-4


def test_graphed_step_waits_for_nothing(tiny_training_overrides, tmp_path) -> None:
    """After its graphs are captured, a graphed step (dropout on) never synchronises with the device."""
    trainer = assert_steps_never_synchronise([*tiny_training_overrides, "adapter=malora",
                                              "trainer.cuda_graphs=true"],
                                             tmp_path, warmup=3)  # eager, capture, replay
    assert trainer.graphs.graph_count >= 2


def test_a_replayed_projection_draws_its_dropout_mask_from_the_device_seed() -> None:
    """projection.project inside a CUDA graph: each replay reads the seed tensor, so a new seed gives a new
    mask, the same seed the same mask, and both equal the eager call with that seed; layers (salts)
    differ."""
    from malora_train.adapters.kernels import projection
    from malora_train.adapters.kernels.common import KernelState

    torch.manual_seed(0)
    x = torch.randn(256, 192, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(16, 192, device="cuda", dtype=torch.bfloat16)
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    state = KernelState()

    def project(salt: int = 0) -> torch.Tensor:
        with state.device_seed(seed):
            return projection.project(x, down, None, 0.5, True, salt, state=state)

    seed.fill_(11)
    eager_11, eager_11_salted = project(), project(salt=1)
    seed.fill_(12)
    eager_12 = project()
    project()  # warm-up on the capture's terms
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = project()
    seed.fill_(11)
    graph.replay()
    first = replayed.clone()
    seed.fill_(12)
    graph.replay()
    second = replayed.clone()
    assert torch.equal(first, eager_11) and torch.equal(second, eager_12)
    assert not torch.equal(first, second) and not torch.equal(eager_11, eager_11_salted)
