"""The Python API (``malora_train.get_adapted_model`` and friends) on the tiny model: its public names,
configs from the CLI's YAML files, the forward's loss against an independent computation from the router
logits, save/load round trips for every kind, LoRA merging, routing statistics, state dicts."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import malora_train
from malora_train import AdapterConfig, ConfigError, RouterConfig
from malora_train.adapters import AdaptedCausalLM, MixtureAdapterLinear, adapter_kinds, load_adapter
from malora_train.cli import compose
from malora_train.eval.routing import routing_report, start_recording, stop_recording

PUBLIC = ["AdaptedModel", "AdaptedModelOutput", "AdapterConfig", "AdapterSaving", "AdapterTrainer",
          "ConfigError",
          "HydraLoRAPeftConfig",
          "MALoRAPeftConfig", "MaloraError", "MoLoRAPeftConfig", "RouterConfig", "adapter_kinds",
          "get_adapted_model", "load_adapted_model", "load_adapter_config"]
MIXTURES = [kind for kind in adapter_kinds() if kind != "lora"]


def adapted(make_tiny_model, kind: str = "malora", seed: int = 0, **overrides) -> malora_train.AdaptedModel:
    """The tiny model with ``kind``'s preset (rank 4, no dropout unless overridden)."""
    overrides = {"rank": 4, "dropout": 0.0, **overrides}
    torch.manual_seed(seed)
    return malora_train.get_adapted_model(make_tiny_model(),
                                          malora_train.load_adapter_config(kind, **overrides))


def perturb(model: malora_train.AdaptedModel, seed: int = 1) -> None:
    """Give every adapter tensor (lora_B starts at zero) random values, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict(keep_vars=True).values():
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))


def batch(rows: int = 3, length: int = 14, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens, the last row half padding; labels mask the first 4 tokens (a prompt) and the padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 250, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length // 2:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def capture_router_inputs(model: malora_train.AdaptedModel) -> tuple[list, list]:
    """Forward hooks that keep each mixture layer's input; returns (layers, inputs filled by the next
    forward)."""
    layers = [m for m in model.base_model.modules() if isinstance(m, MixtureAdapterLinear)]
    inputs: list[torch.Tensor] = []
    for layer in layers:
        layer.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    return layers, inputs


def routing_by_hand(layer: MixtureAdapterLinear, x: torch.Tensor):
    """(probs, (T, N) slot assignments, logits) of ``layer``'s router on ``x``, from its weights alone."""
    logits = x.reshape(-1, x.shape[-1]).float() @ layer.router.detach().float().t()
    probs = logits.softmax(dim=-1)
    top = probs.topk(layer.top_k, dim=-1).indices
    return probs, torch.zeros_like(probs).scatter(1, top, 1.0), logits


# -- the public surface ---------------------------------------------------------------------------------
def test_public_names_are_listed_in_one_place_and_typed_and_documented():
    assert malora_train.__all__ == PUBLIC
    for name in PUBLIC:
        obj = getattr(malora_train, name)
        assert inspect.getdoc(obj) and not inspect.getdoc(obj).startswith(f"{name}("), \
            f"{name} has no docstring"
    callables = [getattr(malora_train, n) for n in ("get_adapted_model", "load_adapted_model",
                                                     "load_adapter_config", "adapter_kinds")]
    model_class = malora_train.AdaptedModel
    callables += [member for n, member in vars(model_class).items()
                  if not n.startswith("_") and callable(member)]
    callables += [member.fget for member in vars(model_class).values() if isinstance(member, property)]
    for function in callables:
        assert inspect.getdoc(function), f"{function.__qualname__} has no docstring"
        signature = inspect.signature(function)
        assert signature.return_annotation is not inspect.Signature.empty, function.__qualname__
        for param in signature.parameters.values():
            if param.name != "self":
                assert param.annotation is not inspect.Parameter.empty, \
                    f"{function.__qualname__}({param.name})"
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        malora_train.Trainer  # noqa: B018


def test_importing_the_package_or_its_configs_does_not_import_torch():
    code = ("import sys, malora_train; from malora_train import AdapterConfig, RouterConfig; "
            "AdapterConfig(kind='molora', router=RouterConfig(top_k=1)); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# -- configs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", adapter_kinds())
def test_a_preset_is_the_config_the_cli_composes(kind):
    assert malora_train.load_adapter_config(kind) == compose([f"adapter={kind}"]).adapter


def test_a_yaml_file_and_overrides_load_into_the_dataclass(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("kind: molora\nrank: 6\nrouter:\n  top_k: 3\n")
    cfg = malora_train.load_adapter_config(path, num_experts=4, router={"z_loss_coef": 0.5})
    assert cfg == AdapterConfig(kind="molora", rank=6, num_experts=4,
                                router=RouterConfig(top_k=3, z_loss_coef=0.5))


def test_bad_configs_fail_naming_the_key(tmp_path, make_tiny_model):
    with pytest.raises(ConfigError, match=r"adapter\.rnak"):
        malora_train.load_adapter_config("lora", rnak=4)
    with pytest.raises(ConfigError, match=r"adapter\.router\.top_k"):
        malora_train.load_adapter_config("molora", router={"top_k": "two"})
    with pytest.raises(ConfigError, match="neither a preset .*lora.* nor a YAML file"):
        malora_train.load_adapter_config("loar")
    with pytest.raises(ConfigError, match=r"adapter\.rank"):
        malora_train.get_adapted_model(make_tiny_model(), AdapterConfig(rank="many"))
    with pytest.raises(ConfigError, match=r"adapter\.kind='moe' is not one of"):
        malora_train.get_adapted_model(make_tiny_model(), AdapterConfig(kind="moe"))
    with pytest.raises(ConfigError, match="expected an AdapterConfig"):
        malora_train.get_adapted_model(make_tiny_model(), {"kind": "lora"})
    model = adapted(make_tiny_model, "lora")
    with pytest.raises(ConfigError, match="already holds malora-train adapters"):
        malora_train.get_adapted_model(model.base_model, AdapterConfig(kind="lora"))


# -- the forward and its loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MIXTURES)
def test_loss_is_the_hf_lm_loss_plus_the_router_losses_computed_from_the_router_logits(make_tiny_model, kind):
    model = adapted(make_tiny_model, kind, router={"balance_coef": 0.05, "z_loss_coef": 0.1})
    perturb(model)
    layers, inputs = capture_router_inputs(model)
    data = batch()
    out = model(**data)
    mask = data["attention_mask"].reshape(-1, 1).float()
    balances, z_losses = [], []
    for layer, x in zip(layers, inputs, strict=True):  # padding tokens do not count
        probs, assigned, logits = routing_by_hand(layer, x)
        share = (assigned * mask).sum(0) / mask.sum() / layer.top_k
        mean_prob = (probs * mask).sum(0) / mask.sum()
        balances.append(layer.num_experts * (share * mean_prob).sum())
        z_losses.append((torch.logsumexp(logits, -1).square() * mask[:, 0]).sum() / mask.sum())
    balance, z = torch.stack(balances).mean(), torch.stack(z_losses).mean()
    torch.testing.assert_close(out.balance_loss, balance)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.aux_loss, 0.05 * balance + 0.1 * z)
    targets = data["labels"][:, 1:]
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.loss, lm + out.aux_loss)


def test_the_routers_learn_from_the_aux_loss_in_outputs_loss(make_tiny_model):
    # at initialisation every up-projection is zero: the LM loss gives the routers no gradient at all,
    # so a router gradient from outputs.loss is the auxiliary loss's
    model = adapted(make_tiny_model, "malora")
    routers = [m.router for m in model.base_model.modules() if isinstance(m, MixtureAdapterLinear)]
    model(**batch()).lm_loss.backward()
    assert all(r.grad is None or not r.grad.any() for r in routers)
    model.zero_grad()
    model(**batch()).loss.backward()
    assert all(r.grad.abs().sum() > 0 for r in routers)


def test_num_items_in_batch_sums_the_lm_loss_and_shares_out_the_aux_loss(make_tiny_model):
    model = adapted(make_tiny_model, "molora")
    data = batch()
    plain = model(**data)
    answered = int((data["labels"][:, 1:] != -100).sum())
    step_items = 3 * answered  # this micro-batch holds a third of the step's answer tokens
    shared = model(**data, num_items_in_batch=torch.tensor(step_items))
    torch.testing.assert_close(shared.lm_loss, plain.lm_loss / 3)
    torch.testing.assert_close(shared.aux_loss, plain.aux_loss / 3)
    torch.testing.assert_close(shared.loss, shared.lm_loss + shared.aux_loss)


def test_without_labels_there_is_no_loss_but_the_aux_loss_is_there(make_tiny_model):
    model = adapted(make_tiny_model, "molora")
    data = batch()
    out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    assert out.loss is None and out.lm_loss is None
    assert out.aux_loss > 0 and out.logits.shape == (*data["input_ids"].shape, 260)
    lora = adapted(make_tiny_model, "lora")(**data)
    assert lora.aux_loss == 0 and lora.balance_loss is None and lora.z_loss is None
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(attention_mask=data["attention_mask"])


def test_inputs_embeds_route_like_input_ids(make_tiny_model):
    model = adapted(make_tiny_model, "molora")
    perturb(model)
    data = batch()
    embeds = model.base_model.get_input_embeddings()(data["input_ids"])
    by_ids = model(**data)
    by_embeds = model(inputs_embeds=embeds, attention_mask=data["attention_mask"], labels=data["labels"])
    torch.testing.assert_close(by_embeds.loss, by_ids.loss)
    torch.testing.assert_close(by_embeds.balance_loss, by_ids.balance_loss)


def test_generate_uses_the_adapters(make_tiny_model):
    model = adapted(make_tiny_model, "molora").eval()
    perturb(model)
    prompt = batch(rows=1)["input_ids"][:, :6]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    greedy = prompt
    with torch.no_grad():
        for _ in range(4):
            greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, greedy)


# -- parameters, files ----------------------------------------------------------------------------------
def test_print_trainable_parameters_prints_peft_s_line(make_tiny_model, capsys):
    model = adapted(make_tiny_model, "lora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    assert model.parameter_report()["trainable"] == trainable


@pytest.mark.parametrize("kind", adapter_kinds())
def test_save_and_load_round_trip(tmp_path, make_tiny_model, kind):
    model = adapted(make_tiny_model, kind)
    perturb(model)
    data = batch()
    model.eval()
    expected = model(**data)
    assert model.save_adapter(tmp_path / "adapter") == tmp_path / "adapter"

    loaded = malora_train.load_adapted_model(make_tiny_model(), tmp_path / "adapter")
    assert loaded.adapter_config == model.adapter_config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for (key, value), (other_key, other) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert key == other_key and torch.equal(value, other)
    got = loaded(**data)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    # the CLI reads the same files
    cli_model = load_adapter(make_tiny_model(), tmp_path / "adapter").eval()
    cli_logits = cli_model.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(cli_logits, expected.logits)

    trainable = malora_train.load_adapted_model(make_tiny_model().train(), tmp_path / "adapter",
                                                is_trainable=True)
    assert trainable.training  # the base model's mode
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(trainable.state_dict())


def test_loading_a_folder_without_an_adapter_names_the_file(tmp_path, make_tiny_model):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        malora_train.load_adapted_model(make_tiny_model(), tmp_path)


def test_state_dict_holds_the_adapter_tensors_only_and_loads_back_strictly(make_tiny_model):
    model = adapted(make_tiny_model, "malora", freeze_shared=True)
    state = model.state_dict()
    layers = [m for m in model.base_model.modules() if isinstance(m, MixtureAdapterLinear)]
    assert len(state) == sum(len(layer.tensor_kinds) for layer in layers)
    assert all(key.startswith("base_model.model.layers.") for key in state)
    assert any(key.endswith(".shared_A") for key in state)  # frozen by the ablation, still the adapter's
    other = adapted(make_tiny_model, "malora", seed=5, freeze_shared=True)
    assert other.load_state_dict(state) == ([], [])
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in state.items())
    first = next(iter(state))
    with pytest.raises(RuntimeError, match="missing adapter tensors"):
        other.load_state_dict({k: v for k, v in state.items() if k != first})
    result = other.load_state_dict({**state, "extra": torch.zeros(1)}, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["extra"]
    # nested in another module, the prefix is kept
    assert set(torch.nn.ModuleDict({"inner": model}).state_dict()) == {f"inner.{k}" for k in state}


def test_merge_and_unload_gives_plain_lora_s_outputs(make_tiny_model):
    model = adapted(make_tiny_model, "lora").eval()
    perturb(model)
    data = batch()
    expected = model(**data).logits
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="merge_and_unload needs adapter kind lora; molora routes"):
        adapted(make_tiny_model, "molora").merge_and_unload()


# -- routing statistics ---------------------------------------------------------------------------------
def test_routing_stats_count_each_task_s_tokens_per_layer(make_tiny_model):
    model = adapted(make_tiny_model, "molora").eval()
    perturb(model)
    layers, inputs = capture_router_inputs(model)
    names = [n for n, m in model.base_model.named_modules() if isinstance(m, MixtureAdapterLinear)]
    data = batch(rows=4)
    task_ids = torch.tensor([1, 0, 1, 1])
    with torch.no_grad(), model.recording_routing(["first", "second"]):
        model(**data, task_ids=task_ids)
    stats = model.routing_stats()
    mask = data["attention_mask"].reshape(-1, 1).float()
    token_task = task_ids.view(-1, 1).expand_as(data["input_ids"]).reshape(-1)
    for name, layer, x in zip(names, layers, inputs, strict=True):
        _, assigned, _ = routing_by_hand(layer, x)
        for task in (0, 1):
            counts = (assigned * mask * (token_task == task).unsqueeze(1)).sum(0)
            expected = (counts / counts.sum()).double()
            torch.testing.assert_close(torch.tensor(stats["layers"][name][task], dtype=torch.float64),
                                       expected)
    real = data["attention_mask"].sum(1)
    assert stats["tokens"] == {"first": int(real[1]), "second": int(real[0] + real[2] + real[3])}
    assert (stats["tasks"] == ["first", "second"] and stats["top_k"] == 2
            and len(stats["layers"]) == len(layers))
    json.dumps(stats)  # what routing.json holds

    with torch.no_grad(), model.recording_routing():  # without task names: one row for all tokens
        model(**data)
    assert model.routing_stats()["tokens"] == {"all": int(real.sum())}


def test_routing_stats_are_what_the_cli_reports_for_the_same_tokens(make_tiny_model):
    model = adapted(make_tiny_model, "malora").eval()
    perturb(model)
    data = batch(rows=4)
    task_ids = torch.tensor([2, 0, 1, 0])
    names = ["a", "b", "c"]
    with torch.no_grad(), model.recording_routing(names):
        model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], task_ids=task_ids)
    # a copy, taken now: the CLI's model below shares the adapter layers, whose counters it resets and fills
    api_stats = copy.deepcopy(model.routing_stats())
    wrapper = model.adapted_lm
    cli = AdaptedCausalLM(model.base_model, model.adapter_config, wrapper.context, wrapper.targets)
    start_recording(cli, len(names))
    last = data["attention_mask"].sum(1) - 1
    cli.logits_at_positions(data["input_ids"], data["attention_mask"], last, task_ids)
    stop_recording(cli)
    real = data["attention_mask"].sum(1)
    assert api_stats["tokens"] == {"a": int(real[1] + real[3]), "b": int(real[2]), "c": int(real[0])}
    assert api_stats == routing_report(cli, names)


def test_routing_stats_need_task_ids_in_range(make_tiny_model):
    model = adapted(make_tiny_model, "molora")
    data = batch()
    assert model.routing_stats() is None
    with model.recording_routing(["a", "b"]):
        with pytest.raises(ValueError, match="needs task_ids"):
            model(**data)
        with pytest.raises(ValueError, match=r"one index in \[0, 2\) per row"):
            model(**data, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="task_names is empty"):
        with model.recording_routing([]):
            pass
    assert adapted(make_tiny_model, "lora").routing_stats() is None


def test_a_recomputing_backward_does_not_count_tokens_twice(make_tiny_model):
    model = adapted(make_tiny_model, "molora").train()  # HF checkpoints only in training mode
    model.activation_checkpointing_enable()
    data = batch()
    with model.recording_routing():
        model(**data).loss.backward()
    assert model.routing_stats()["tokens"] == {"all": int(data["attention_mask"].sum())}


def test_reentrant_checkpointing_is_refused_for_routers(make_tiny_model):
    with pytest.raises(ConfigError, match="use_reentrant=True would drop the routers' auxiliary loss"):
        adapted(make_tiny_model, "malora").activation_checkpointing_enable({"use_reentrant": True})
    model = adapted(make_tiny_model, "molora")
    model.gradient_checkpointing_enable()
    assert model.base_model.is_activation_checkpointing
