"""trainer.cuda_graphs on the CPU: the bookkeeping of ``graphs.StepGraphs`` (eager first, then one set of
input tensors per shape reused by every later call) and the graphed training step giving the eager
step's losses. The captures themselves run on a GPU only (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from malora_train.adapters.kernels.common import KernelState
from malora_train.train.graphs import StepGraphs, input_key


def _step_graphs(max_graphs: int = 8):
    weight = torch.nn.Parameter(torch.ones(3))
    seen_inputs: list[dict[str, torch.Tensor]] = []
    updates: list[int] = []

    def forward_backward(inputs):
        seen_inputs.append(inputs)
        (weight * inputs["x"].sum()).sum().backward()
        return inputs["x"].sum()

    def update():
        updates.append(1)
        with torch.no_grad():
            weight.sub_(0.1 * weight.grad)
            weight.grad.zero_()

    graphs = StepGraphs(forward_backward, update, [weight], torch.device("cpu"), KernelState(),
                        max_graphs=max_graphs)
    return graphs, weight, seen_inputs, updates


def test_first_sight_runs_eagerly_then_one_set_of_input_tensors_per_shape() -> None:
    graphs, weight, seen, _ = _step_graphs()
    assert weight.grad is not None and not weight.grad.any()  # allocated up front, zero
    small = [{"x": torch.full((2,), float(i))} for i in range(4)]
    outputs = [graphs.micro_step(inputs) for inputs in small]
    assert [float(o) for o in outputs] == [0.0, 2.0, 4.0, 6.0]  # each call computed on its own batch
    assert seen[0] is not seen[1]  # eager: a fresh copy
    assert seen[1] is seen[2] is seen[3]  # captured: the same input tensors, refilled
    big = graphs.micro_step({"x": torch.ones(5)})
    assert float(big) == 5.0 and seen[4] is not seen[1]  # a new shape starts eagerly again
    assert graphs.graph_count == 1
    assert input_key({"x": torch.ones(5)}) != input_key({"x": torch.ones(2)})
    assert input_key({"x": torch.ones(2)}) != input_key({"x": torch.ones(2, dtype=torch.long)})


def test_no_more_graphs_than_max_graphs() -> None:
    graphs, _, seen, _ = _step_graphs(max_graphs=1)
    for length in (2, 2, 3, 3, 3):
        graphs.micro_step({"x": torch.ones(length)})
    assert graphs.graph_count == 1
    assert seen[3] is not seen[4]  # the second shape stays eager


def test_the_update_runs_every_step() -> None:
    graphs, weight, _, updates = _step_graphs()
    for _ in range(3):
        graphs.micro_step({"x": torch.ones(2)})
        graphs.update()
    assert len(updates) == 3
    # d/dw of sum(w * 2) is 2 per element; three SGD steps of 0.1 x 2 from 1
    assert torch.allclose(weight.detach(), torch.full((3,), 1 - 3 * 0.2))


@pytest.mark.parametrize("kind", ["lora", "molora", "malora", "hydralora"])
def test_graphed_step_gives_the_eager_losses(kind, tmp_path, run_training, train_losses,
                                             captured_on_cpu) -> None:
    """The captured step's code path (inputs copied into fixed tensors, the normaliser as a tensor, the
    gradients zeroed in place in one bucket, AdamW with a tensor learning rate) trains as the eager step does;
    on the CPU nothing is captured, so the launch's "no GPU" obstacle is lifted for this test."""
    common = [f"adapter={kind}", "data.packing=true", "adapter.dropout=0", "trainer.max_steps=6",
              "trainer.grad_accum=2", "trainer.eval_after=false"]
    run_training(tmp_path / "graphed", *common, "trainer.cuda_graphs=true")
    run_training(tmp_path / "eager", *common, "trainer.cuda_graphs=false")
    graphed, eager = train_losses(tmp_path / "graphed"), train_losses(tmp_path / "eager")
    assert list(graphed) == list(range(1, 7))
    assert graphed == pytest.approx(eager, rel=1e-5)
    graphed_norm = train_losses(tmp_path / "graphed", "grad_norm")
    assert graphed_norm == pytest.approx(train_losses(tmp_path / "eager", "grad_norm"), rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["data.packing=false"],
     "data.packing=false (a captured step needs the fixed shapes of packed rows)"),
    (["trainer.skip_nonfinite=true"],
     "trainer.skip_nonfinite=true (it reads the loss on the host every step)"),
    (["trainer.compile=true", "trainer.compile_mode=reduce-overhead"],
     "trainer.compile_mode=reduce-overhead"),
    (["trainer.mixed_precision=fp16"], "trainer.mixed_precision=fp16 (its loss scaler"),
    (["adapter.impl=reference"], "adapter.impl=reference (its per-expert loop has data-dependent shapes)"),
    ([], "device cpu: CUDA graphs need a GPU"),
])
def test_cuda_graphs_true_refuses_what_it_cannot_capture(overrides, message, tmp_path, run_training) -> None:
    from malora_train.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        run_training(tmp_path / "run", "trainer.cuda_graphs=true", *overrides)
    assert str(err.value).startswith("trainer.cuda_graphs=true cannot capture this run: ")
    assert message in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_graphed_run_saves_and_resumes_checkpoints(tmp_path, run_training, train_losses,
                                                     captured_on_cpu) -> None:
    """The capturable optimiser's learning rate is a tensor: checkpoints store it as a number and a resume
    continues as the eager path's resume does (3 steps, then extended to 6 from the checkpoint)."""
    common = ["adapter=malora", "data.packing=true", "adapter.dropout=0", "trainer.eval_after=false",
              "trainer.save_every=3"]
    for mode in ("graphed", "eager"):
        graphs = [f"trainer.cuda_graphs={mode == 'graphed'}"]
        run_training(tmp_path / mode, *common, *graphs, "trainer.max_steps=3")
        run_training(tmp_path / mode, *common, *graphs, "trainer.max_steps=6", "trainer.resume=auto")
    graphed = train_losses(tmp_path / "graphed")
    assert list(graphed) == list(range(1, 7))
    assert graphed == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


def test_a_tensor_learning_rate_stays_a_tensor_through_a_checkpoint(tmp_path) -> None:
    from malora_train.train.checkpoint.state_files import load_optimizer, save_optimizer

    def optimizer():
        param = torch.nn.Parameter(torch.ones(3))
        return param, torch.optim.AdamW([param], lr=torch.tensor(0.5))

    param, saved = optimizer()
    param.grad = torch.ones(3)
    saved.step()
    saved.param_groups[0]["lr"].fill_(0.25)
    save_optimizer(saved, tmp_path)
    _, loaded = optimizer()
    load_optimizer(loaded, tmp_path)
    lr = loaded.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and float(lr) == 0.25
    assert torch.equal(loaded.state[loaded.param_groups[0]["params"][0]]["exp_avg"],
                       saved.state[param]["exp_avg"])


def _config(*overrides: str):
    from malora_train.cli import compose

    return compose(["model=tiny", *overrides])


@pytest.mark.parametrize("overrides, device, deepspeed, reason", [
    (["data.packing=false"], "cuda", False, "data.packing=false"),
    (["trainer.skip_nonfinite=true"], "cuda", False, "trainer.skip_nonfinite=true"),
    (["trainer.mixed_precision=fp16"], "cuda", False, "trainer.mixed_precision=fp16"),
    (["trainer.compile=true", "trainer.compile_mode=max-autotune"], "cuda", False,
     "trainer.compile_mode=max-autotune"),
    (["adapter.impl=reference"], "cuda", False, "adapter.impl=reference"),
    ([], "cpu", False, "device cpu"),
    ([], "cuda", True, "DeepSpeed"),
    (["trainer.cuda_graphs=false"], "cuda", False, "trainer.cuda_graphs=false"),
])
def test_auto_runs_eager_and_names_the_one_reason(overrides, device, deepspeed, reason) -> None:
    from malora_train.train.step_path import choose_step_path

    path = choose_step_path(_config(*overrides), device, deepspeed)
    assert not path.captured and path.reason.startswith(reason)
    assert path.describe() == f"eager ({path.reason})"


@pytest.mark.parametrize("overrides", [[], ["trainer.gradient_checkpointing=true"], ["trainer.compile=true"],
                                       ["trainer.cuda_graphs=true"]])
def test_auto_captures_wherever_nothing_stands_in_the_way(overrides, monkeypatch) -> None:
    """Several processes and gradient checkpointing do not stand in the way (the launch is not an input)."""
    import importlib.util

    from malora_train.train.step_path import choose_step_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # Triton "installed"
    path = choose_step_path(_config("data.packing=true", *overrides), "cuda", False)
    assert path.captured and path.reason is None


def test_cuda_graphs_true_refuses_deepspeed_and_a_missing_triton(monkeypatch) -> None:
    import importlib.util

    from malora_train.errors import ConfigError
    from malora_train.train.step_path import choose_step_path

    cfg = _config("data.packing=true", "trainer.cuda_graphs=true")
    with pytest.raises(ConfigError, match="cannot capture this run: DeepSpeed"):
        choose_step_path(cfg, "cuda", True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="cannot capture this run: no Triton"):
        choose_step_path(cfg, "cuda", False)
    assert choose_step_path(_config("data.packing=true", "adapter.dropout=0"), "cuda", False).captured


def test_cuda_graphs_takes_auto_true_or_false_only(tmp_path, run_training) -> None:
    from malora_train.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.cuda_graphs='sometimes' is not one of auto, true, false"):
        run_training(tmp_path / "run", "trainer.cuda_graphs=sometimes")


def test_the_first_log_line_names_the_step_path(tmp_path, tiny_training_overrides, caplog,
                                                fresh_accelerate_state) -> None:
    import logging

    import malora_train.train.loop as loop
    from malora_train.cli import compose

    cfg = compose([*tiny_training_overrides, "trainer.max_steps=1"])
    with caplog.at_level(logging.INFO, logger="malora_train.train.loop"):
        loop.Trainer(cfg, tmp_path / "run", "", [])._announce()
    assert caplog.records[0].getMessage() == "training step: eager (device cpu: CUDA graphs need a GPU)"
