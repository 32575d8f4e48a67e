"""Each adapter kind has its own config class holding only the keys it reads: a key another kind reads is
unknown to it (on the command line, in a YAML file, from Python), every value is checked when the config
is made, naming the key, and every key is documented. Files written when the adapter config was one flat
union of every kind's keys still load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from malora_train.adapters import ADAPTER_CLASSES, adapter_kinds
from malora_train.commands.composition import compose_config, to_config
from malora_train.commands.help import key_docs
from malora_train.config import (
    ADAPTER_CONFIGS,
    FLAT_ADAPTER_DEFAULTS,
    AdapterConfig,
    MoLoRAConfig,
    RouterConfig,
    saved_adapter_keys,
)
from malora_train.errors import ConfigError

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "adapter").glob("*.yaml"))

# a value away from the default for every key that some kind does not read
SET_VALUES = {
    "num_experts": 4, "lam": 0.25, "shared_rank": 16, "expert_rank": 4, "beta": 1.25, "freeze_shared": True,
    "freeze_coeff": True, "router.top_k": 1, "router.dense": True, "router.renormalize": False,
    "router.jitter_noise": 0.1, "router.balance_coef": 0.1, "router.z_loss_coef": 0.001,
    "router.init_std": 0.1, "router.init": "kaiming", "router.lr_scale": 10.0,
}


def keys_of(cls: type) -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        if field.name == "router":
            keys += [f"router.{sub.name}" for sub in dataclasses.fields(RouterConfig)]
        else:
            keys.append(field.name)
    return keys


def all_keys() -> list[str]:
    return list(dict.fromkeys(key for cls in ADAPTER_CONFIGS.values() for key in keys_of(cls)))


def not_read_by(kind: str) -> list[str]:
    return [key for key in all_keys() if key not in keys_of(ADAPTER_CONFIGS[kind])]


def owned_settable(kind: str) -> list[str]:
    return [key for key in SET_VALUES if key in keys_of(ADAPTER_CONFIGS[kind])]


def overrides(kind: str, key: str) -> list[str]:
    value = str(SET_VALUES[key]).lower()
    return [f"adapter={kind}", f"adapter.{key}={value}"]


def composed(argv: list[str]) -> AdapterConfig:
    return to_config(compose_config(argv)).adapter


def test_every_kind_has_a_config_class_and_a_layer() -> None:
    assert set(ADAPTER_CONFIGS) == set(adapter_kinds()) == set(PRESETS)
    for kind, cls in ADAPTER_CONFIGS.items():
        assert cls().kind == kind and ADAPTER_CLASSES[kind].kind == kind


def test_every_key_is_read_by_every_kind_or_has_a_test_value() -> None:
    """A new key that only some kinds read must be given a test value here."""
    for kind in adapter_kinds():
        assert set(not_read_by(kind)) <= set(SET_VALUES), kind


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_composes_into_its_kinds_class_and_documents_every_key(preset: str) -> None:
    defaults = compose_config([f"adapter={preset}"])
    cfg = to_config(defaults).adapter
    assert type(cfg) is ADAPTER_CONFIGS[preset]
    docs = {doc.key: doc for doc in key_docs(defaults) if doc.key.startswith("adapter.")}
    assert sorted(docs) == sorted(f"adapter.{key}" for key in keys_of(type(cfg)))
    assert [key for key, doc in docs.items() if not doc.description] == []


@pytest.mark.parametrize("kind", adapter_kinds())
def test_adapter_equals_kind_selects_the_kind(kind: str) -> None:
    assert composed([f"adapter={kind}"]).kind == kind


def test_the_kind_is_chosen_by_the_group_not_by_adapter_kind() -> None:
    with pytest.raises(ConfigError, match=r"^adapter\.kind=lora is not the kind of MALoRAConfig; choose the "
                                          r"kind with adapter=lora$"):
        composed(["adapter.kind=lora"])


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k in adapter_kinds() for key in not_read_by(k)])
def test_a_key_the_kind_does_not_read_is_unknown_by_name(kind: str, key: str) -> None:
    top = key.split(".")[0]
    unknown = rf"^adapter\.{top}: no such config key for adapter={kind} \(read by "
    with pytest.raises(ConfigError, match=unknown):
        compose_config(overrides(kind, key))


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k in adapter_kinds() for key in owned_settable(k)
                                           if (k, key) != ("hydralora", "router.top_k")])  # dense: see below
def test_a_key_the_kind_reads_is_accepted(kind: str, key: str) -> None:
    composed(overrides(kind, key))


def test_the_issue_example_names_the_key_and_who_reads_it() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["adapter=molora", "adapter.lam=0.3", "adapter.beta=1.25"])
    assert str(err.value) == "adapter.lam: no such config key for adapter=molora (read by malora)"


def test_top_k_is_refused_under_dense_routing_and_read_without_it() -> None:
    with pytest.raises(ConfigError, match=r"^adapter\.router\.top_k=1 has no effect with "
                                          r"adapter\.router\.dense=true"):
        composed(["adapter=hydralora", "adapter.router.top_k=1"])
    sparse = composed(["adapter=hydralora", "adapter.router.dense=false", "adapter.router.top_k=1"])
    assert sparse.active_experts() == 1
    assert composed(["adapter=molora", "adapter.router.top_k=1"]).active_experts() == 1


def test_a_key_of_another_kind_is_unknown_even_at_its_default() -> None:
    with pytest.raises(ConfigError, match=r"^adapter\.lam: no such config key for adapter=molora"):
        compose_config(["adapter=molora", "adapter.lam=0.5"])
    with pytest.raises(ConfigError, match=r"^adapter\.num_experts: no such config key for adapter=lora"):
        compose_config(["adapter=lora", "+adapter.num_experts=8"])


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k in adapter_kinds() for key in not_read_by(k)
                                           if "." not in key])
def test_each_kinds_class_refuses_another_kinds_key_from_python(kind: str, key: str) -> None:
    unknown = rf"^adapter\.{key}: no such config key for adapter={kind} \(read by "
    with pytest.raises(ConfigError, match=unknown):
        ADAPTER_CONFIGS[kind](**{key: SET_VALUES[key]})
    with pytest.raises(ConfigError, match=unknown):
        AdapterConfig(kind=kind, **{key: SET_VALUES[key]})


def test_adapter_config_builds_the_class_of_its_kind() -> None:
    assert type(AdapterConfig()) is ADAPTER_CONFIGS["malora"]  # the default run's kind
    cfg = AdapterConfig(kind="molora", rank=4, router=RouterConfig(top_k=1))
    assert cfg == MoLoRAConfig(rank=4, router=RouterConfig(top_k=1))
    assert dataclasses.replace(cfg, rank=2).rank == 2
    with pytest.raises(ConfigError, match=r"^adapter\.rnak: no such config key \(did you mean adapter\.rank"):
        AdapterConfig(kind="lora", rnak=4)


@pytest.mark.parametrize(("keys", "message"), [
    ({"kind": "lora", "rank": 0}, "adapter.rank=0 must be >= 1"),
    ({"kind": "lora", "impl": "slow"}, "adapter.impl='slow' is not one of fast, reference"),
    ({"kind": "lora", "dropout": 1.0}, "adapter.dropout=1.0 must be in [0, 1)"),
    ({"kind": "lora", "alpha": -1.0}, "adapter.alpha=-1.0 must be > 0"),
    ({"kind": "lora", "rank": "many"}, "adapter.rank: Value 'many' of type 'str' could not be converted to "),
    ({"kind": "molora", "num_experts": 0}, "adapter.num_experts=0 must be >= 1"),
    ({"kind": "molora", "router": RouterConfig(top_k=3), "num_experts": 2},
     "adapter.router.top_k=3 must be in [1, adapter.num_experts=2]"),
    ({"kind": "malora", "lam": 1.5}, "adapter.lam=1.5 must be in (0, 1]"),
    ({"kind": "malora", "shared_rank": 4, "expert_rank": 8}, "adapter.expert_rank (r-bar=8) must not "),
    ({"kind": "malora", "beta": 0.0}, "adapter.beta=0.0 must be > 0"),
])
def test_each_value_is_checked_when_the_config_is_made(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        AdapterConfig(**keys)
    assert str(err.value).startswith(message)


def test_training_refuses_it_before_writing_anything(run_training, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_training(run_dir, "adapter=lora", "adapter.beta=1.25")
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("malora-train: error: adapter.beta: no such config key for adapter=lora")
    assert not run_dir.exists() or not any(run_dir.iterdir())


# -- files written when every kind's keys were in one flat config -------------------------------------------
def flat_section(kind: str, **keys) -> dict:
    """An ``adapter:`` section as the flat config of earlier versions saved it: every kind's keys."""
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    base = {"kind": kind, "target_modules": targets, "rank": 8, "alpha": None, "dropout": 0.05,
            "use_rslora": False, "impl": "fast", "shared_input": True}
    flat = {**base, **FLAT_ADAPTER_DEFAULTS, **keys}
    flat["router"] = {**FLAT_ADAPTER_DEFAULTS["router"], **keys.get("router", {})}
    return flat


def test_the_former_defaults_are_those_of_the_flat_config() -> None:
    """Each kind's class keeps the defaults the flat config had (MALoRA's class has every key)."""
    malora = dataclasses.asdict(ADAPTER_CONFIGS["malora"]())
    assert {key: malora[key] for key in FLAT_ADAPTER_DEFAULTS} == FLAT_ADAPTER_DEFAULTS


@pytest.mark.parametrize("kind", adapter_kinds())
def test_an_old_flat_section_loads_into_its_kinds_class(kind: str) -> None:
    router = {"dense": True, "balance_coef": 0.0} if kind == "hydralora" else {}
    cls, keys = saved_adapter_keys(flat_section(kind, rank=4, router=router), "config.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), keys))
    assert type(cfg) is ADAPTER_CONFIGS[kind] and cfg.rank == 4
    mixture = {"router": RouterConfig(**router)} if kind != "lora" else {}
    assert cfg == AdapterConfig(kind=kind, rank=4, **mixture)


def test_an_old_flat_section_with_a_foreign_key_set_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"^config\.yaml: adapter\.router\.top_k=1 is set, but adapter=lora "
                                          r"does not read it \(read by molora, malora, hydralora\)$"):
        saved_adapter_keys(flat_section("lora", router={"top_k": 1}), "config.yaml")
    with pytest.raises(ConfigError, match=r"^config\.yaml: adapter\.lam=0\.25 is set, but adapter=molora"):
        saved_adapter_keys(flat_section("molora", lam=0.25), "config.yaml")
