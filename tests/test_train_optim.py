"""AdamW groups (weight decay on matrices only), the learning-rate schedule, and the number of steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import SchedulerType

from malora_train.adapters import AdaptedCausalLM, adapter_kinds
from malora_train.config import AdapterConfig, RouterConfig, TrainerConfig
from malora_train.errors import ConfigError
from malora_train.train.optim import build_optimizer, build_scheduler, schedule_names, total_steps


def trainer_cfg(**overrides) -> TrainerConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), overrides))


def test_weight_decay_applies_to_matrices_not_to_norms_or_biases():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[2].requires_grad_(False)  # frozen: in no group
    optimizer = build_optimizer(model, trainer_cfg(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is model[0].weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


@pytest.mark.parametrize("kind", adapter_kinds())
def test_every_adapter_tensor_is_decayed(make_tiny_model, kind):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AdapterConfig), {"kind": kind}))
    model = AdaptedCausalLM.from_base(make_tiny_model(), cfg)
    optimizer = build_optimizer(model, trainer_cfg(weight_decay=0.01))
    [group] = optimizer.param_groups  # adapters hold matrices only (A, B, router, S_A, P)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable} and group["weight_decay"] == 0.01


def lrs(schedule: str, steps: int, warmup_ratio: float, **kwargs) -> list[float]:
    """The lr of each of ``steps`` optimiser steps (peak lr 1)."""
    param = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    cfg = trainer_cfg(lr_scheduler=schedule, warmup_ratio=warmup_ratio, lr_scheduler_kwargs=kwargs)
    scheduler = build_scheduler(optimizer, cfg, steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


# transformers' schedules warm up linearly from 0: the lr of step k (0-based) is k / warmup


def test_linear_schedule_warms_up_then_decays_towards_zero():
    # 10 steps, warm-up ceil(0.2 * 10) = 2 steps
    expected = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lrs("linear", 10, 0.2) == pytest.approx(expected)


def test_cosine_schedule_warms_up_then_follows_half_a_cosine():
    got = lrs("cosine", 10, 0.2)
    assert got[:2] == pytest.approx([0.0, 0.5])
    assert got[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_constant_schedules_with_and_without_warmup():
    assert lrs("constant", 4, 0.5) == [1.0, 1.0, 1.0, 1.0]  # transformers' constant has no warm-up
    assert lrs("constant_with_warmup", 4, 0.5) == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_every_transformers_schedule_is_available_with_its_own_arguments():
    assert set(schedule_names()) == ({kind.value for kind in SchedulerType}
                                     - {"reduce_lr_on_plateau", "greedy"})
    # two cosine cycles after a 2-step warm-up: the lr is back at the peak half-way through the 8 steps
    restarts = lrs("cosine_with_restarts", 10, 0.2, num_cycles=2)
    assert restarts[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * ((2 * k / 8) % 1)))
                                          for k in range(8)])
    # a quadratic decay from the peak to lr_end over the 8 steps after the warm-up
    assert lrs("polynomial", 10, 0.2, power=2.0, lr_end=0.0)[2:] == \
        pytest.approx([(1 - k / 8) ** 2 for k in range(8)])
    # warm-up, a stable plateau, then a linear decay over the last num_decay_steps (to min_lr_ratio)
    assert lrs("warmup_stable_decay", 10, 0.2, num_decay_steps=4, decay_type="linear") == pytest.approx(
        [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert lrs("cosine_with_min_lr", 10, 0.2, min_lr_rate=0.1)[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("name", ["linear", "cosine_with_restarts", "inverse_sqrt", "warmup_stable_decay"])
def test_schedule_state_round_trips_through_json_exactly(name):
    """A checkpoint keeps the scheduler's state as JSON: a resumed schedule gives the very same lrs."""
    kwargs = {"num_decay_steps": 3} if name == "warmup_stable_decay" else {}
    expected = lrs(name, 12, 0.25, **kwargs)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = trainer_cfg(lr_scheduler=name, warmup_ratio=0.25, lr_scheduler_kwargs=kwargs)
    first = build_scheduler(optimizer, cfg, 12)
    for _ in range(5):
        optimizer.step()
        first.step()
    saved = json.loads(json.dumps(first.state_dict()))
    saved_groups = optimizer.state_dict()["param_groups"]  # the optimizer's own checkpoint holds the lr
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = build_scheduler(optimizer, cfg, 12)
    optimizer.load_state_dict({"state": {}, "param_groups": saved_groups})
    resumed.load_state_dict(saved)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        resumed.step()
    assert seen == expected[5:]  # exact


def test_schedule_and_optimizer_settings_are_checked():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError,
                       match="trainer.lr_scheduler='step' is not supported; choose one of linear"):
        build_scheduler(optimizer, trainer_cfg(lr_scheduler="step"), 10)
    with pytest.raises(ConfigError,
                       match="'reduce_lr_on_plateau' is not supported .it steps on a validation"):
        build_scheduler(optimizer, trainer_cfg(lr_scheduler="reduce_lr_on_plateau"), 10)
    with pytest.raises(ConfigError, match=r"trainer.lr_scheduler=cosine_with_min_lr with "
                                          r"trainer.lr_scheduler_kwargs=\{\}: .*min_lr"):
        build_scheduler(optimizer, trainer_cfg(lr_scheduler="cosine_with_min_lr"), 10)
    with pytest.raises(ConfigError,
                       match=r"trainer.lr_scheduler_kwargs=\{'cycles': 2\}: .*unexpected keyword"):
        build_scheduler(optimizer, trainer_cfg(lr_scheduler="cosine", lr_scheduler_kwargs={"cycles": 2}), 10)
    with pytest.raises(ConfigError, match="trainer.warmup_ratio"):
        build_scheduler(optimizer, trainer_cfg(warmup_ratio=1.0), 10)
    with pytest.raises(ConfigError, match="trainer.lr=0"):
        build_optimizer(nn.Linear(2, 2), trainer_cfg(lr=0.0))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), trainer_cfg())


def batches_of(examples: int, rows: int):
    """``batches_for_epochs`` of a padded stream: one example a row."""
    return lambda epochs: math.ceil(epochs * examples / rows)


def test_max_steps_wins_over_epochs():
    assert total_steps(trainer_cfg(max_steps=7, epochs=3), batches_of(100, 10)) == 7
    # 2 epochs of 100 examples in batches of 8: ceil(200 / 8)
    assert total_steps(trainer_cfg(max_steps=0, epochs=2), batches_of(100, 8)) == 25
    assert total_steps(trainer_cfg(max_steps=0, epochs=0.01), batches_of(100, 8)) == 1
    # 2 micro-batches a step: ceil(25 / 2)
    assert total_steps(trainer_cfg(max_steps=0, epochs=2, grad_accum=2), batches_of(100, 8)) == 13
    with pytest.raises(ConfigError, match="trainer.max_steps > 0 or trainer.epochs > 0"):
        total_steps(trainer_cfg(max_steps=0, epochs=0), batches_of(100, 8))


def test_the_optimizer_is_chosen_by_name_with_its_arguments_and_checked_up_front():
    from malora_train.train.optim import check_optimizer

    model = nn.Linear(4, 4)
    adamw = build_optimizer(model, trainer_cfg(betas=[0.8, 0.95], eps=1e-6))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6
    sgd = build_optimizer(model, trainer_cfg(optimizer="SGD", optimizer_kwargs={"momentum": 0.9}))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]
    assert type(build_optimizer(model, trainer_cfg(optimizer="radam"))) is torch.optim.RAdam
    with pytest.raises(ConfigError, match=r"^trainer\.optimizer='adamm' is not a torch\.optim optimizer"):
        check_optimizer(trainer_cfg(optimizer="adamm"))
    with pytest.raises(ConfigError, match=r"^trainer\.optimizer_kwargs\.momentum: AdamW takes no argument"):
        check_optimizer(trainer_cfg(optimizer_kwargs={"momentum": 0.9}))
    with pytest.raises(ConfigError, match=r"^trainer\.optimizer=adamw with .*betas"):
        check_optimizer(trainer_cfg(betas=[1.5, 0.9]))


def mixture_model(make_tiny_model, kind: str = "molora", **router):
    cfg = AdapterConfig(kind=kind, num_experts=4, router=RouterConfig(**router))
    return AdaptedCausalLM.from_base(make_tiny_model(), cfg)


@pytest.mark.parametrize("capturable", [False, True])
def test_router_lr_scale_gives_the_routers_a_group_at_lr_times_scale_through_the_schedule(make_tiny_model,
                                                                                          capturable):
    model = mixture_model(make_tiny_model, "malora", lr_scale=10.0)
    routers = [p for name, p in model.named_parameters() if name.endswith(".router")]
    assert routers
    cfg = trainer_cfg(lr=1e-3, weight_decay=0.01, warmup_ratio=0.25, lr_scheduler="linear")
    optimizer = build_optimizer(model, cfg, capturable=capturable)
    decay, router_group = optimizer.param_groups
    assert {id(p) for p in router_group["params"]} == {id(p) for p in routers}
    assert not {id(p) for p in routers} & {id(p) for p in decay["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(router_group["params"]) == len(trainable)
    assert router_group["weight_decay"] == decay["weight_decay"] == 0.01
    scheduler = build_scheduler(optimizer, cfg, 8)
    for _ in range(8):  # warm-up, then linear decay: the router's lr stays 10 x the others' at every step
        optimizer.step()
        scheduler.step()
        base, router = (float(g["lr"]) for g in optimizer.param_groups)
        assert router == pytest.approx(10 * base, rel=1e-6, abs=1e-12)
    assert float(optimizer.param_groups[1]["initial_lr"]) == pytest.approx(1e-2)


def test_router_lr_scale_one_keeps_the_groups_as_they_were(make_tiny_model):
    model = mixture_model(make_tiny_model, "molora")
    [group] = build_optimizer(model, trainer_cfg()).param_groups  # a checkpoint's groups stay the same
    assert len(group["params"]) == len([p for p in model.parameters() if p.requires_grad])
