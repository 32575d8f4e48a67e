"""Adapters that read the same input (q/k/v, gate/up) project it as one group (adapters/shared_input.py):
the groups form by name, one projection serves every member, and the model's loss and gradients equal
those of the layers computed one by one (float64); with dropout each member keeps a mask of its own."""

from __future__ import annotations

import pytest
import torch
from adapter_specs import kind_config
from torch.utils._python_dispatch import TorchDispatchMode

from malora_train.adapters import AdaptedCausalLM, adapter_kinds
from malora_train.adapters.inject import adapter_layers
from malora_train.adapters.kernels import common, projection
from malora_train.adapters.kernels.common import KernelState

KINDS = adapter_kinds()


def adapted(make_tiny_model, kind: str, shared_input: bool, dropout: float = 0.0) -> AdaptedCausalLM:
    torch.manual_seed(0)
    cfg = kind_config(kind, rank=4, num_experts=4, dropout=dropout, shared_input=shared_input)
    model = AdaptedCausalLM.from_base(make_tiny_model(), cfg).double().train()
    torch.manual_seed(1)
    for param in model.parameters():  # B = 0 at init would hide the adapters from the check
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    return model


def loss_and_grads(model: AdaptedCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    out = model(input_ids=ids, labels=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    return [out.loss, *torch.autograd.grad(out.loss, params)]


def test_groups_are_the_siblings_reading_one_input_with_consecutive_salts(make_tiny_model) -> None:
    model = adapted(make_tiny_model, "malora", shared_input=True)
    layers = dict(adapter_layers(model))
    groups = {id(layer.input_group): layer.input_group for layer in layers.values() if layer.input_group}
    names = {tuple(name.rsplit(".", 1)[-1] for name, layer in layers.items() if layer.input_group is group)
             for group in groups.values()}
    assert names == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert len(groups) == 2 * model.model.config.num_hidden_layers
    for name, layer in layers.items():
        if name.endswith(("o_proj", "down_proj")):
            assert layer.input_group is None
    for group in groups.values():
        salts = [member.dropout_salt for member in group.members]
        assert salts == list(range(salts[0], salts[0] + len(salts)))
    all_salts = [layer.dropout_salt for layer in layers.values()]
    assert sorted(all_salts) == list(range(len(all_salts)))
    ungrouped = adapted(make_tiny_model, "malora", shared_input=False)
    assert all(layer.input_group is None for _, layer in adapter_layers(ungrouped))
    assert [layer.dropout_salt for _, layer in adapter_layers(ungrouped)] == all_salts


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_projection_gives_the_loss_and_gradients_of_the_layers_one_by_one(kind: str, make_tiny_model,
                                                                                  monkeypatch) -> None:
    ids = torch.randint(3, 200, (2, 17))
    ungrouped = loss_and_grads(adapted(make_tiny_model, kind, shared_input=False), ids)
    calls = []
    project_group = projection.project_group
    monkeypatch.setattr(projection, "project_group", lambda x, downs, *a, **k: calls.append(len(downs))
                        or project_group(x, downs, *a, **k))
    model = adapted(make_tiny_model, kind, shared_input=True)
    grouped = loss_and_grads(model, ids)
    layers = model.model.config.num_hidden_layers
    # per decoder layer: one projection for q/k/v, one for gate/up, one for down (o is not a default target)
    assert sorted(calls) == sorted([3, 2, 1] * layers)
    for a, b in zip(grouped, ungrouped, strict=True):  # GEMMs of other widths sum in another order
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * b.abs().max().item())


def test_each_member_keeps_its_own_dropout_mask(monkeypatch) -> None:
    """With dropout the group's member g draws its mask from the group's seed as ``member_seed(seed, g)``:
    its z and gradients equal one layer's projection with that seed, and the members' masks differ."""
    torch.manual_seed(0)
    x = torch.randn(30, 24, dtype=torch.float64, requires_grad=True)
    downs = [torch.randn(5, 24, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    routers = [torch.randn(4, 24, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    weights = [(torch.randn(30, 5, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64))
               for _ in range(3)]
    monkeypatch.setattr(common, "draw_seed", lambda: 77)
    grouped = projection.project_group(x, downs, routers, 0.4, True, state=KernelState())
    loss = sum((z * wz).sum() + (lg * wl).sum() for (z, lg), (wz, wl) in zip(grouped, weights))
    grouped_grads = torch.autograd.grad(loss, [x, *downs, *routers])
    singles, loss = [], 0
    for g, (down, router, (wz, wl)) in enumerate(zip(downs, routers, weights)):
        monkeypatch.setattr(common, "draw_seed", lambda g=g: projection.member_seed(77, g))
        z, lg = projection.project(x, down, router, 0.4, True, state=KernelState())
        singles.append(z)
        loss = loss + (z * wz).sum() + (lg * wl).sum()
    single_grads = torch.autograd.grad(loss, [x, *downs, *routers])
    for (z, _), single in zip(grouped, singles):
        torch.testing.assert_close(z, single, rtol=1e-12, atol=1e-12)
    for a, b in zip(grouped_grads, single_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    masks = [projection._keep_mask(x.detach(), 0.4, projection.member_seed(77, g)) for g in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_a_sibling_called_with_another_input_computes_its_own(make_tiny_model) -> None:
    """The group recognises its input by identity: k_proj fed another tensor than q_proj's gets the
    projection of that tensor, exactly what the ungrouped layer computes."""
    grouped = adapted(make_tiny_model, "molora", shared_input=True)
    alone = adapted(make_tiny_model, "molora", shared_input=False)
    attention = [m for name, m in grouped.named_modules() if name.endswith("self_attn")][0]
    attention_alone = [m for name, m in alone.named_modules() if name.endswith("self_attn")][0]
    hidden = attention.q_proj.in_features
    x, other = torch.randn(2, 5, hidden, dtype=torch.float64), torch.randn(2, 5, hidden, dtype=torch.float64)
    torch.testing.assert_close(attention.q_proj(x), attention_alone.q_proj(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention.k_proj(other), attention_alone.k_proj(other), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention.v_proj(x), attention_alone.v_proj(x), rtol=1e-12, atol=1e-12)


class _CastCounter(TorchDispatchMode):
    """Counts dtype casts (``aten._to_copy``) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_working_copies_cast_every_weight_once_a_forward_and_change_nothing(kind: str, make_tiny_model,
                                                                            monkeypatch) -> None:
    """Under a bf16 autocast the adapters' float32 weights are cast once, at the start of the model's forward,
    in a multi-tensor copy (adapters/working_copies.py): the same loss and gradients as casting at each use,
    bit for bit, fewer casts, and a weight changed after one step is seen by the next."""
    ids = torch.randint(3, 200, (2, 17))
    results, casts = {}, {}
    for working in (True, False):
        model = adapted(make_tiny_model, kind, shared_input=True).float()
        if not working:
            monkeypatch.setattr(model.working_copies, "refresh", lambda dtype: None)
        params = [p for p in model.parameters() if p.requires_grad]
        counter = _CastCounter()
        with torch.autocast("cpu", dtype=torch.bfloat16), counter:
            first = loss_and_grads(model, ids)
        with torch.no_grad():
            for param in params:
                param.mul_(1.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            second = loss_and_grads(model, ids)
        results[working], casts[working] = first + second, counter.casts
    assert casts[True] < casts[False]
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(results[True][0], results[True][len(results[True]) // 2])  # the step was seen
