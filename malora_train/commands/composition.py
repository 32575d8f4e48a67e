"""The config a command runs with, settled at Hydra's stage, before anything is loaded or written.

- ``parse_command_line``: ``--help``, ``--config-dir DIR``, a plain run-directory argument, and path values
  that Hydra's override grammar rejects unquoted (a sweep job folder ``3_adapter.rank=8,seed=0``) quoted
  for it, so a path can be pasted as it is.
- ``compose_config``: the packaged configs (plus a user's ``--config-dir``) with the command line.
- ``run_config``: a run directory's saved ``config.yaml`` (read as plain data) with the keys and groups
  the command line names put on top; settings that run code (``CODE_KEYS``) come from the command line
  only. ``malora-eval eval.run_dir=D`` and a resumed ``malora-train`` start from it; a resume refuses
  overrides that change the tensors' shapes (``SHAPE_KEYS``).
- ``describe_hydra_error``: Hydra's and OmegaConf's multi-line errors as one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from malora_train.config import (
    CODE_KEYS,
    CONF_DIR,
    SHAPE_KEYS,
    AdapterConfig,
    Config,
    escape_interpolations,
    names_a_dataset_id,
    register_configs,
    saved_adapter_keys,
    unknown_adapter_key,
)
from malora_train.errors import ConfigError, DataError
from malora_train.run_dir import CONFIG_FILE, read_text

# keys whose values are paths: quoted for Hydra when they hold characters its grammar rejects unquoted
PATH_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "eval.run_dir", "eval.adapter_path", "eval.output_dir",
             "trainer.resume", "model.name_or_path", "model.cache_dir", "data.root")
# characters Hydra accepts in an unquoted value (besides letters and digits)
UNQUOTED_CHARS = set("_/-\\+.$%*@?|: ")
HELP_FLAGS = ("-h", "--help")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


@dataclasses.dataclass
class CommandLine:
    overrides: list[str]  # key=value and group=option, path values quoted for Hydra
    config_dirs: list[str] = dataclasses.field(default_factory=list)  # --config-dir: absolute folders
    paths: list[str] = dataclasses.field(default_factory=list)  # plain arguments naming existing folders
    help: bool = False


def quote_path_value(arg: str) -> str:
    """``eval.run_dir=multirun/x/3_adapter.rank=8,seed=0`` -> ``eval.run_dir='multirun/...'``: path keys
    take any path; other overrides are left to Hydra."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+~") not in PATH_KEYS or value[:1] in ("'", '"'):
        return arg
    if all(ch.isalnum() or ch in UNQUOTED_CHARS for ch in value) or "'" in value or value.endswith("\\"):
        return arg
    return f"{key}='{value}'"


def parse_command_line(argv: list[str], program: str, run_dir_argument: bool = False) -> CommandLine:
    """Split a ``malora-eval``/``malora-inspect`` command line (``malora-train`` hands its flags to Hydra).
    ``run_dir_argument``: a plain argument that names a folder is a run directory."""
    line = CommandLine(overrides=[])
    args = iter(argv)
    for arg in args:
        if arg in HELP_FLAGS:
            line.help = True
        elif arg in CONFIG_DIR_FLAGS or arg.startswith("--config-dir="):
            folder = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not Path(folder).is_dir():
                raise ConfigError(f"--config-dir {folder}: no such folder")
            line.config_dirs.append(str(Path(folder).resolve()))
        elif run_dir_argument and not arg.startswith("-") and os.path.isdir(arg):
            line.paths.append(arg)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg} (see {program} --help)")
        else:
            line.overrides.append(quote_path_value(arg))
    return line


def parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's parse of ``key=value`` overrides (errors as one line)."""
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(describe_hydra_error(err)) from None


def override_value(overrides: list[str], key: str) -> Any:
    """The value the command line gives ``key`` (the last one wins), None when it gives none."""
    values = [o.value() for o in parse_overrides([a for a in overrides if "=" in a and not a.startswith("-")])
              if o.key_or_group == key]
    return values[-1] if values else None


# -- composing -------------------------------------------------------------------------------------------
def compose_config(overrides: list[str], config_dirs: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` as ``malora-train`` would (without ``hydra``)."""
    from hydra import compose, initialize_config_dir

    if config_dirs:
        overrides = [*overrides, f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"]
    register_configs()  # the schemas conf/config.yaml and conf/adapter/*.yaml start from
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe_hydra_error(err)) from None
    check_known_keys(cfg)
    return settle_data_paths(settle_model(cfg, overrides))


def settle_model(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``model.name_or_path`` as the config to save: a local folder made absolute (a resume or
    ``malora-eval`` from another directory finds it); over a preset of another source
    (``model.name_or_path=/path/merged`` on the default SmolLM2 package) the config says what is loaded:
    ``source: pretrained``, the preset's ``architecture`` dropped, and ``name`` the folder or hub id, unless
    the command line names ``model.name`` itself."""
    model = cfg.get("model") if isinstance(cfg, DictConfig) else None
    location = model.get("name_or_path") if model is not None else None
    if not location:
        return cfg
    path = Path(str(location)).expanduser()
    if path.is_dir():
        model.name_or_path = location = str(path.resolve())
    if model.get("source") != "pretrained":
        model.source = "pretrained"
        model.architecture = {}
        if override_value([o for o in overrides if not o.startswith("hydra.")], "model.name") is None:
            model.name = str(location)
    return cfg


def settle_data_paths(cfg: DictConfig) -> DictConfig:
    """The data's relative paths (``data.root``, ``data.cache_dir``, each custom task's ``path`` and
    ``eval_path``, unless a hub dataset id) made absolute against the folder the command starts in, so the
    saved config works from anywhere (``malora-eval <run>``, a resume); each one changed is kept as written in
    ``data.paths_as_written``."""
    data = cfg.get("data") if isinstance(cfg, DictConfig) else None
    if data is None:
        return cfg
    places = [(data, key, f"data.{key}") for key in ("root", "cache_dir")]
    tasks = data.get("custom_tasks") or []
    places += [(task, key, f"data.custom_tasks[{i}].{key}") for i, task in enumerate(tasks)
               for key in ("path", "eval_path")]
    written = {}
    for node, key, name in places:
        if key not in node or OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if node is not data and isinstance(value, str) and names_a_dataset_id(value):
            continue  # a hub dataset id, not a path
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            node[key] = os.path.abspath(Path(value).expanduser())
            written[name] = value
    if written:
        data.paths_as_written = {**(data.get("paths_as_written") or {}), **written}
    return cfg


def without_hydra(config: DictConfig) -> DictConfig:
    """A copy of a composed config without Hydra's own ``hydra`` node (what a job receives)."""
    cfg = config.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def check_known_keys(cfg: DictConfig) -> None:
    """``+foo=1`` adds a top-level key the schema does not have, ``+adapter.lam=0.3`` a key the adapter kind's
    config does not have: refuse them like any other typo."""
    known = {f.name for f in dataclasses.fields(Config)} | {"hydra"}
    unknown = [key for key in cfg if key not in known]
    if unknown:
        raise ConfigError(_unknown_key(str(unknown[0]), sorted(known - {"hydra"})))
    if "adapter" in cfg and not OmegaConf.is_missing(cfg, "adapter"):
        adapter_type = OmegaConf.get_type(cfg, "adapter")
        own = {f.name for f in dataclasses.fields(adapter_type)}
        extra = [str(key) for key in cfg.adapter if key not in own]
        if extra:
            raise ConfigError(unknown_adapter_key(adapter_type, extra[0]))


def to_config(cfg: DictConfig) -> Config:
    """The typed config object (dataclasses) the rest of the code takes."""
    check_known_keys(cfg)
    try:
        return OmegaConf.to_object(without_hydra(cfg) if "hydra" in cfg else cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_hydra_error(err)) from None


# -- a run directory's config ----------------------------------------------------------------------------
def saved_config(run_dir: Path, key: str) -> DictConfig:
    """The run's ``config.yaml`` merged into the schema, read as plain data (``${...}`` stays text); its
    adapter section goes into its kind's config (``config.saved_adapter_keys``: an earlier version's file
    holds every kind's keys)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{key}={run_dir}: no {CONFIG_FILE} (is it a malora-train run directory?)")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    data = escape_interpolations(data)
    adapter_type, adapter = saved_adapter_keys(data.get("adapter", {}), str(path))
    try:
        schema = OmegaConf.structured(Config)
        schema.adapter = OmegaConf.structured(adapter_type)
        return OmegaConf.merge(schema, {**data, "adapter": adapter})
    except OmegaConfBaseException as err:
        raise DataError(f"{path}: {describe_hydra_error(err)}") from None


def run_config(run_dir: Path, composed: DictConfig, overrides: list[str], key: str) -> DictConfig:
    """The run's saved config with each key or group the command line names taken from ``composed`` (the
    default composition with that command line), and ``CODE_KEYS`` always from the command line."""
    merged = saved_config(run_dir, key)
    named = [o.key_or_group for o in parse_overrides([a for a in overrides if "=" in a or a.startswith("~")])]
    try:
        for name in [*named, *CODE_KEYS]:
            if name.split(".", 1)[0] in merged:
                OmegaConf.update(merged, name, OmegaConf.select(composed, name), merge=False)
    except OmegaConfBaseException as err:  # a key the saved adapter kind does not have (adapter.lam on LoRA)
        raise ConfigError(describe_hydra_error(err)) from None
    return merged


def check_same_shapes(run_dir: Path, saved: DictConfig, merged: DictConfig) -> None:
    """A resumed run keeps the model and adapter its checkpoint was trained with."""
    for key in SHAPE_KEYS:
        before, after = (_plain(OmegaConf.select(c, key)) for c in (saved, merged))
        if before != after:
            raise ConfigError(f"{key}={_show(after)} differs from {_show(before)} in "
                              f"{Path(run_dir) / CONFIG_FILE}: "
                              "a run resumes with the model and adapter it was trained with (start a new "
                              "run to change them)")


def resumed_run_dir(overrides: list[str]) -> Path | None:
    """The run directory a ``malora-train`` command line resumes: ``hydra.run.dir=D`` with
    ``trainer.resume`` set and ``D/config.yaml`` present; else None (a fresh run)."""
    run_dir = override_value(overrides, "hydra.run.dir")
    if not override_value(overrides, "trainer.resume") or not isinstance(run_dir, str):
        return None
    return Path(run_dir) if (Path(run_dir) / CONFIG_FILE).is_file() else None


def job_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> DictConfig:
    """What a ``malora-train`` job runs with: Hydra's composition, or, resuming a run directory that holds
    a config, that run's config with the command line on top (shape changes refused)."""
    cfg = settle_data_paths(settle_model(without_hydra(cfg), overrides))
    if not OmegaConf.select(cfg, "trainer.resume") or not (Path(run_dir) / CONFIG_FILE).is_file():
        return cfg
    merged = run_config(run_dir, cfg, overrides, key="hydra.run.dir")  # the run's own labels
    check_same_shapes(run_dir, saved_config(run_dir, "hydra.run.dir"), merged)
    return merged


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


# -- one-line errors -------------------------------------------------------------------------------------
def _unknown_key(full_key: str, siblings: list[str]) -> str:
    parent, _, name = full_key.rpartition(".")
    close = difflib.get_close_matches(name, siblings, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return f"{full_key}: no such config key{hint}"


def describe_hydra_error(err: BaseException) -> str:
    """One line naming the key (or option, or override) for the errors Hydra and OmegaConf raise while
    composing: unknown key, wrong type, unknown group option, malformed override, a sweep without -m."""
    text = " ".join(str(err).split())
    in_file = text.startswith("In '")  # Hydra's error about a config file, which chains its cause implicitly
    chained = err.__context__ if in_file and err.__cause__ is None else err.__cause__
    cause = chained if isinstance(chained, OmegaConfBaseException) else err
    where = text.split(": ", 1)[0] + ": " if in_file and cause is not err else ""  # names the file
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(err.options)}"
    if isinstance(err, OverrideParseException):
        lines = [ln for ln in str(err.message or "").splitlines() if ln and not ln.startswith("See https")]
        reason = lines[-1] if lines else "malformed"
        if "missing EQUAL" in reason:
            reason = "expected key=value or group=option"
        return f"cannot parse override {err.override!r}: {reason} (see Hydra's override grammar)"
    if text.startswith("Ambiguous value for argument"):
        arg = text.split("'")[1] if "'" in text else text
        return (f"{arg}: a comma-separated value is a sweep: add -m to run one job per value, or write "
                "[a,b] for a list or 'a,b' for a string")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        parent = cause.parent_node
        parent_type = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if isinstance(parent_type, type) and issubclass(parent_type, AdapterConfig):
            return where + unknown_adapter_key(parent_type, str(cause.full_key).removeprefix("adapter."))
        siblings = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
        return where + _unknown_key(str(cause.full_key), siblings)
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{where}{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if err.__cause__ is not None:
        lines += [ln.strip() for ln in str(err.__cause__).splitlines() if ln.strip()]
    keep = [ln for ln in lines
            if not ln.startswith(("To append", "reference_type", "object_type", "See https"))]
    return " | ".join(keep) or type(err).__name__
