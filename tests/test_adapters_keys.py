"""Each adapter kind reads only its own ``adapter.*`` keys and refuses the others when they are set (differ
from the schema default), naming them; the defaults every composed config carries never trigger it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from malora_train.adapters import ADAPTER_CLASSES, adapter_kinds, layer_kwargs
from malora_train.adapters.keys import changed_keys, owns
from malora_train.cli import compose
from malora_train.config import AdapterConfig, RouterConfig
from malora_train.errors import ConfigError

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "adapter").glob("*.yaml"))

# a value away from the default for every key that some kind does not read
SET_VALUES = {
    "num_experts": 4, "lam": 0.25, "shared_rank": 16, "expert_rank": 4, "beta": 1.25, "freeze_shared": True,
    "freeze_coeff": True, "router.top_k": 1, "router.dense": True, "router.renormalize": False,
    "router.jitter_noise": 0.1, "router.balance_coef": 0.1, "router.z_loss_coef": 0.001, "router.init_std": 0.1,
}


def all_keys() -> list[str]:
    keys = []
    for field in dataclasses.fields(AdapterConfig):
        default = getattr(AdapterConfig(), field.name)
        if dataclasses.is_dataclass(default):
            keys += [f"{field.name}.{sub.name}" for sub in dataclasses.fields(default)]
        else:
            keys.append(field.name)
    return keys


def not_read_by(kind: str) -> list[str]:
    return [key for key in all_keys() if not owns(ADAPTER_CLASSES[kind].owned_keys(), key)]


def owned_settable(kind: str) -> list[str]:
    return [key for key in SET_VALUES if owns(ADAPTER_CLASSES[kind].owned_keys(), key)]


def overrides(kind: str, key: str) -> list[str]:
    value = str(SET_VALUES[key]).lower()
    return [f"adapter={kind}", f"adapter.{key}={value}"]


def test_every_key_is_read_by_every_kind_or_has_a_test_value() -> None:
    """A new AdapterConfig field must be claimed by the kinds that read it (``config_keys``)."""
    for kind in adapter_kinds():
        assert set(not_read_by(kind)) <= set(SET_VALUES), kind


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_and_the_default_config_pass(preset: str) -> None:
    cfg = compose([f"adapter={preset}"]).adapter
    layer_kwargs(cfg)
    assert not [key for key in changed_keys(cfg) if not owns(ADAPTER_CLASSES[cfg.kind].owned_keys(), key)]


@pytest.mark.parametrize("kind", adapter_kinds())
def test_switching_the_kind_of_the_default_preset_passes(kind: str) -> None:
    layer_kwargs(compose([f"adapter.kind={kind}"]).adapter)


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k in adapter_kinds() for key in not_read_by(k)])
def test_a_key_the_kind_does_not_read_is_refused_by_name(kind: str, key: str) -> None:
    cfg = compose(overrides(kind, key)).adapter
    with pytest.raises(ConfigError, match=rf"^adapter\.{key}=\S+ does not apply to adapter\.kind={kind} "):
        layer_kwargs(cfg)


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k in adapter_kinds() for key in owned_settable(k)
                                           if (k, key) != ("hydralora", "router.top_k")])  # dense: see below
def test_a_key_the_kind_reads_is_accepted(kind: str, key: str) -> None:
    layer_kwargs(compose(overrides(kind, key)).adapter)


def test_the_issue_example_names_both_keys() -> None:
    with pytest.raises(ConfigError) as err:
        layer_kwargs(compose(["adapter=molora", "adapter.lam=0.3", "adapter.beta=1.25"]).adapter)
    message = str(err.value)
    assert message.startswith("adapter.lam=0.3, adapter.beta=1.25 do not apply to adapter.kind=molora")
    assert "\n" not in message and "num_experts" in message  # what molora does read


def test_top_k_is_refused_under_dense_routing_and_read_without_it() -> None:
    with pytest.raises(ConfigError, match=r"^adapter\.router\.top_k=1 has no effect with adapter\.router\.dense=true"):
        layer_kwargs(compose(["adapter=hydralora", "adapter.router.top_k=1"]).adapter)
    assert layer_kwargs(compose(["adapter=hydralora", "adapter.router.dense=false",
                                 "adapter.router.top_k=1"]).adapter)["top_k"] == 1
    assert layer_kwargs(compose(["adapter=molora", "adapter.router.top_k=1"]).adapter)["top_k"] == 1


def test_a_key_set_to_its_default_is_indistinguishable_and_accepted() -> None:
    layer_kwargs(compose(["adapter=molora", "adapter.lam=0.5"]).adapter)


def test_own_config_narrows_a_shared_spec_to_the_kind() -> None:
    spec = AdapterConfig(kind="lora", rank=4, num_experts=4, lam=0.25, router=RouterConfig(top_k=1))
    assert ADAPTER_CLASSES["lora"].own_config(spec) == AdapterConfig(kind="lora", rank=4)
    assert ADAPTER_CLASSES["molora"].own_config(dataclasses.replace(spec, kind="molora")) == AdapterConfig(
        kind="molora", rank=4, num_experts=4, router=RouterConfig(top_k=1))


def test_training_refuses_it_before_writing_anything(run_training, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^adapter\.beta=1\.25 does not apply to adapter\.kind=lora"):
        run_training(run_dir, "adapter=lora", "adapter.beta=1.25")
    assert not run_dir.exists() or not any(run_dir.iterdir())
