"""Adapters inside the tiny model: target matching and freezing, padding-invariant losses, fast ==
reference, and gradient checkpointing."""

from __future__ import annotations

import re

import pytest
import torch
from adapter_specs import kind_config
from torch.utils._python_dispatch import TorchDispatchMode

from malora_train.adapters import (
    AdaptedCausalLM,
    adapter_kinds,
    adapter_layers,
    match_targets,
    remove_adapters,
)
from malora_train.config import AdapterConfig, RouterConfig
from malora_train.errors import ConfigError
from malora_train.labels import IGNORE_INDEX
from malora_train.train.recompute import MATRIX_PRODUCTS, enable_activation_checkpointing, kept_linears
from malora_train.train.recompute import check_setting as check_recompute_setting

KINDS = adapter_kinds()
MIXTURES = ["molora", "malora", "hydralora"]
TENSORS = {
    "lora": ["lora_A", "lora_B"],
    "molora": ["router", "lora_A", "lora_B"],
    "malora": ["router", "shared_A", "coeff_P", "lora_B"],
    "hydralora": ["router", "lora_A", "lora_B"],
}
LAYERS = 2


def _names(*modules: str) -> set[str]:
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{parents[m]}.{m}" for i in range(LAYERS) for m in modules}


def _adapted(make_tiny_model, kind: str, seed: int = 0, **overrides) -> AdaptedCausalLM:
    """The tiny model with ``kind`` adapters whose tensors are all random (B would start at zero)."""
    router = RouterConfig(**overrides.pop("router", {}))
    cfg = kind_config(kind, dropout=overrides.pop("dropout", 0.0), router=router, **overrides)
    model = AdaptedCausalLM.from_base(make_tiny_model(0), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model.model):
            for name in layer.tensor_kinds:
                param = getattr(layer, name)
                scale = 0.5 if name == "router" else 0.05
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


def _batch(lengths: list[tuple[int, int]], width: int, seed: int = 0):
    """Right-padded rows of ``prompt`` + ``answer`` random tokens; labels only on answers; pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, answer) in enumerate(lengths):
        tokens = torch.randint(3, 260, (prompt + answer,), generator=gen)
        input_ids[row, :prompt + answer] = tokens
        attention_mask[row, :prompt + answer] = 1
        labels[row, prompt:prompt + answer] = tokens[prompt:]
    return input_ids, attention_mask, labels


# -- target matching and freezing ---------------------------------------------------------------------

@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj", "v_proj"], _names("q_proj", "v_proj")),
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", _names("q_proj", "v_proj")),
    (r".*\.mlp\..*", _names("gate_proj", "up_proj", "down_proj")),
    ("all-linear", _names("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (["layers.1.mlp.down_proj"], {"model.layers.1.mlp.down_proj"}),
])
def test_target_matching(targets, expected: set[str], make_tiny_model) -> None:
    model = make_tiny_model(0)
    assert set(match_targets(model, targets)) == expected
    assert "lm_head" not in match_targets(model, "all-linear")


@pytest.mark.parametrize("targets", [["qkv_proj"], "q_proj", r"model\.layers\.\d+\.attn\..*", "(unclosed"])
def test_targets_matching_nothing_are_a_config_error(targets, make_tiny_model) -> None:
    """A bare name as a string is a regex (full match), as in PEFT: 'q_proj' matches no full path."""
    with pytest.raises(ConfigError, match=re.escape("adapter.target_modules")):
        AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind="lora", target_modules=targets))


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_tensors_are_trainable(kind: str, make_tiny_model) -> None:
    model = AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind=kind))
    expected = {f"model.{layer}.{tensor}" for layer in _names("q_proj", "k_proj", "v_proj", "gate_proj",
                                                              "up_proj", "down_proj")
                for tensor in TENSORS[kind]}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert sorted(model.targets) == sorted(n.removeprefix("model.").rsplit(".", 1)[0] for n in expected
                                           if n.endswith("lora_B"))


@pytest.mark.parametrize("kind", KINDS)
def test_removing_the_adapters_gives_the_base_model_back(kind: str, make_tiny_model) -> None:
    base = make_tiny_model(0)
    plain = {name: type(module) for name, module in base.named_modules()}
    ids = torch.tensor([[5, 9, 2, 7]])
    expected = base(ids).logits
    AdaptedCausalLM.from_base(base, kind_config(kind))
    assert list(adapter_layers(base))
    assert remove_adapters(base) is base
    assert {name: type(module) for name, module in base.named_modules()} == plain
    torch.testing.assert_close(base(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_and_reference_give_the_same_model_loss_and_gradients(kind: str, make_tiny_model) -> None:
    input_ids, attention_mask, labels = _batch([(5, 4), (3, 7), (8, 2)], width=12)
    results = {}
    for impl in ("fast", "reference"):
        model = _adapted(make_tiny_model, kind, impl=impl).train()
        out = model(input_ids, attention_mask, labels)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[impl] = (out, grads)
    (fast, fast_grads), (ref, ref_grads) = results["fast"], results["reference"]
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-6, atol=1e-6)
    if kind != "lora":
        torch.testing.assert_close(fast.balance_loss, ref.balance_loss, rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_every_trainable_tensor_gets_a_gradient_in_the_fast_path(kind: str, make_tiny_model) -> None:
    """No unused parameters, so DDP needs no find_unused_parameters (top-1 of 8 on few tokens)."""
    model = _adapted(make_tiny_model, kind, router={"top_k": 1}).train()
    input_ids, attention_mask, labels = _batch([(2, 2)], width=4)
    model(input_ids, attention_mask, labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


# -- padding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MIXTURES)
def test_padding_changes_neither_the_lm_loss_nor_the_balance_loss(kind: str, make_tiny_model) -> None:
    model = _adapted(make_tiny_model, kind).eval()
    rows = [(6, 3), (2, 5), (9, 1)]
    outs = [model(*_batch(rows, width)) for width in (10, 17, 29)]
    alone = model(*_batch(rows[:1], 9))  # the first row without any padding
    padded_alone = model(*_batch(rows[:1], 21))
    for out in outs[1:]:
        torch.testing.assert_close(out.lm_loss, outs[0].lm_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.balance_loss, outs[0].balance_loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(out.seq_tokens, torch.tensor([3, 5, 1]))
    torch.testing.assert_close(padded_alone.lm_loss, alone.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded_alone.balance_loss, alone.balance_loss, rtol=1e-6, atol=1e-6)
    # the check has teeth: counting the pad tokens in the router statistics moves the balance loss
    input_ids, _, labels = _batch(rows, 29)
    unmasked = model(input_ids, None, labels)
    assert abs(unmasked.balance_loss.item() - outs[0].balance_loss.item()) > 1e-4


# -- gradient checkpointing ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [True, "selective"])
@pytest.mark.parametrize("kind", ["molora", "malora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind: str, setting, make_tiny_model):
    input_ids, attention_mask, labels = _batch([(5, 4), (3, 7)], width=11)
    results = []
    for checkpointing in (False, setting):
        model = _adapted(make_tiny_model, kind, dropout=0.1,
                         router={"balance_coef": 0.01, "z_loss_coef": 0.001})
        if checkpointing:
            keeps = KEEPS if checkpointing == "selective" else None
            enable_activation_checkpointing(model.model, keeps=keeps)
            assert model.model.is_activation_checkpointing
        model.train()
        torch.manual_seed(5)  # the same dropout masks in both runs (checkpointing replays the RNG)
        out = model(input_ids, attention_mask, labels)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert plain.aux_loss > 0
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ckpt.aux_loss, plain.aux_loss, rtol=1e-6, atol=1e-7)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        assert grad is not None and ckpt_grads[name] is not None, name
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    router_grads = [g for n, g in plain_grads.items() if n.endswith("router")]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)


KEEPS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]  # trainer.checkpointing_keeps' default


class _ProductCount(TorchDispatchMode):
    """Counts the matrix products dispatched below any selective-checkpoint mode (a product the recompute
    takes from the saved outputs never gets here)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATRIX_PRODUCTS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keeps", [KEEPS, ["gate_proj", "up_proj"]])
@pytest.mark.parametrize("kind", ["lora", "malora"])
def test_selective_checkpointing_recomputes_all_but_the_kept_projections(kind: str, keeps, make_tiny_model):
    """The backward of ``true`` runs every frozen product of the forward again; ``selective`` runs all but
    those of the kept projections (one each per layer), and keeps exactly those, adapted (q, v, gate, up by
    default: its frozen ``base``) or not (k)."""
    input_ids, attention_mask, labels = _batch([(5, 4), (3, 7)], width=11)
    backward_products = {}
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # k_proj stays plain
    for setting in (False, True, "selective"):
        model = _adapted(make_tiny_model, kind, target_modules=targets)
        if setting:
            enable_activation_checkpointing(model.model, keeps=keeps if setting == "selective" else None)
        model.train()
        loss = model(input_ids, attention_mask, labels).loss
        with _ProductCount() as counter:
            loss.backward()
        backward_products[setting] = counter.count
    layers = model.model.config.num_hidden_layers
    block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp",
             "up_proj": "mlp"}
    adapted = {name.rpartition(".")[2] for name, _ in adapter_layers(model.model)}
    assert "k_proj" not in adapted and {"q_proj", "gate_proj"} <= adapted
    assert sorted(name for name, _ in kept_linears(model.model, keeps)) == sorted(
        f"model.layers.{i}.{block[p]}.{p}" + (".base" if p in adapted else "")
        for i in range(layers) for p in keeps)
    kept = len(keeps) * layers
    recomputed = backward_products[True] - backward_products[False]
    assert recomputed > kept
    assert backward_products["selective"] - backward_products[False] == recomputed - kept


def test_selective_checkpointing_needs_a_kept_projection(make_tiny_model) -> None:
    model = _adapted(make_tiny_model, "lora")
    with pytest.raises(ConfigError, match=r"trainer.checkpointing_keeps=\[fc1\]: this model has no linear"):
        enable_activation_checkpointing(model.model, keeps=["fc1"])


def test_router_gradient_includes_the_auxiliary_loss(make_tiny_model) -> None:
    """With B = 0 the LM loss cannot reach the router: any router gradient comes from the aux loss."""
    input_ids, attention_mask, labels = _batch([(5, 4), (3, 7)], width=11)
    grads = {}
    for coef in (0.0, 0.01):
        cfg = AdapterConfig(kind="malora", dropout=0.0, router=RouterConfig(balance_coef=coef))
        model = AdaptedCausalLM.from_base(make_tiny_model(0), cfg).train()
        model(input_ids, attention_mask, labels).loss.backward()
        grads[coef] = [layer.router.grad for _, layer in adapter_layers(model.model)]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads[0.0])
    assert all(g.abs().sum() > 0 for g in grads[0.01])


# -- the seam for a forward through the wrapped model itself (the Python API's) -----------------------------

@pytest.mark.parametrize("kind", ["lora", "malora"])
def test_routing_forward_and_router_losses_give_the_forwards_router_losses(kind: str, make_tiny_model):
    """A forward of the wrapped HF model inside ``routing_forward`` leaves the router losses that
    ``AdaptedCausalLM``'s own forward adds; after the block nothing is collected or counted."""
    model = _adapted(make_tiny_model, kind, router={"balance_coef": 0.01, "z_loss_coef": 0.001}).eval()
    input_ids, attention_mask, labels = _batch([(5, 4), (3, 7)], width=11)
    own = model(input_ids, attention_mask, labels)
    with model.routing_forward(input_ids, attention_mask, task_ids=torch.tensor([0, 1])):
        assert model.context.collect
        model.model(input_ids=input_ids, attention_mask=attention_mask)
    assert not model.context.collect and model.context.token_task is None
    losses = model.router_losses(own.lm_loss)
    torch.testing.assert_close(losses.aux, own.aux_loss, rtol=1e-5, atol=1e-7)
    if kind == "lora":
        assert losses.aux == 0 and losses.balance is None and losses.z is None and losses.entropy is None
        return
    assert losses.aux > 0
    torch.testing.assert_close(losses.balance, own.balance_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses.z, own.z_loss, rtol=1e-5, atol=1e-7)


def test_selective_checkpointing_needs_a_projection_named() -> None:
    with pytest.raises(ConfigError, match="selective needs trainer.checkpointing_keeps to name at least one"):
        check_recompute_setting("selective", [])
    check_recompute_setting(True, [])  # true keeps nothing and needs no names
