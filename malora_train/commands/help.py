"""``--help`` pages: how a command is called, its config groups and their options, and every key it
reads with its default (after the group options chosen, by default the default ones) and its one-line
description. The adapter's keys are those of the chosen kind (``adapter=lora --help``: LoRA's). The
descriptions are the comments on the schema's fields in ``malora_train/config.py`` (on the field's line, or
the comment lines just above it), so a new field documents itself where it is declared.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from collections.abc import Iterator
from typing import Any

import yaml
from omegaconf import OmegaConf

from malora_train import config as schema
from malora_train.config import CONF_DIR, Config

GROUPS = ("model", "adapter", "data", "trainer")  # the folders of conf/ that are config groups


@dataclasses.dataclass(frozen=True)
class Page:
    usage: str
    about: str
    sections: tuple[str, ...]  # the top-level keys whose keys the page lists
    groups: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    examples: tuple[str, ...]


COMMON_OPTIONS = (
    ("--config-dir DIR", "also look for group options in DIR (DIR/data/mine.yaml is data=mine)"),
    ("-h, --help", "this page"),
)
PAGES = {
    "malora-train": Page(
        usage="malora-train [group=option ...] [key=value ...] [-m] [--config-dir DIR]",
        about="Fine-tune a causal LM on a mixture of tasks with a LoRA, MoLoRA, MALoRA or HydraLoRA adapter.",
        sections=("seed", "model", "adapter", "data", "trainer", "eval", "logger"),
        groups=GROUPS,
        options=(("-m, --multirun", "one job per combination of comma-separated values (a sweep)"),
                 ("hydra/launcher=...", "slurm (a SLURM job per sweep point) | gpu_pool (one GPU per job)"),
                 ("hydra/sweeper=...", "optuna_search (an Optuna search instead of the grid)"),
                 ("hydra.run.dir=DIR", "the run directory (default outputs/<date>/<time>_<pid>)"),
                 ("--cfg job", "print the composed config and exit"),
                 *COMMON_OPTIONS,
                 ("--hydra-help", "Hydra's own flags")),
        examples=("malora-train adapter=lora trainer.max_steps=100",
                  "malora-train trainer.resume=auto hydra.run.dir=outputs/2026-01-01/12-00-00_4711",
                  "malora-train -m adapter=lora,molora,malora seed=0,1"),
    ),
    "malora-eval": Page(
        usage="malora-eval [RUN_DIR] [eval.run_dir=DIR | eval.adapter_path=DIR] [key=value ...]",
        about="Per-task accuracy of a base model plus an adapter; a run directory brings its own config "
              "(the command line goes on top). The report and predictions_<scorer>.jsonl go to "
              "eval.output_dir (default: RUN_DIR/eval/). eval.export=merged writes a LoRA-merged model.",
        sections=("seed", "model", "data", "eval"),
        groups=("model", "data"),
        options=(("RUN_DIR", "a run directory, the same as eval.run_dir=RUN_DIR"), *COMMON_OPTIONS),
        examples=("malora-eval outputs/2026-01-01/12-00-00_4711 eval.scorer=generate",
                  "malora-eval multirun/2026-01-01/12-00-00_4711/3_adapter.rank=8,seed=0",
                  "malora-eval model=smollm2_135m data=synthetic eval.adapter_path=path/to/adapter"),
    ),
    "malora-inspect": Page(
        usage="malora-inspect [group=option ...] [key=value ...]",
        about="Trainable-parameter report of an adapter on a model, built on the meta device (nothing "
              "allocated).",
        sections=("model", "adapter", "inspect"),
        groups=("model", "adapter"),
        options=COMMON_OPTIONS,
        examples=("malora-inspect model=llama2_7b adapter=malora",
                  "malora-inspect model=llama2_7b adapter=lora inspect.json=true"),
    ),
}


# -- descriptions from the schema's comments ----------------------------------------------------------------
def field_comments() -> dict[str, dict[str, str]]:
    """class name -> field name -> the field's comment, read from config.py's source."""
    source = inspect.getsource(schema)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields[item.target.id] = _comment_of(item, comments, lines)
    return found


def _comment_of(item: ast.AnnAssign, comments: dict[int, str], lines: list[str]) -> str:
    """The comment on the field's last line, else the comment-only lines right above it."""
    if item.end_lineno in comments:
        return comments[item.end_lineno]
    above = []
    number = item.lineno - 1
    while number in comments and lines[number - 1].lstrip().startswith("#"):
        above.insert(0, comments[number])
        number -= 1
    return " ".join(above)


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    default: Any
    description: str


def key_docs(defaults: Any, root: type = Config) -> list[KeyDoc]:
    """Every leaf key of the schema (from ``root``) with its value in ``defaults`` (a composition) and its
    description; a node's keys are those of its class in ``defaults`` (the chosen adapter kind's), else of
    the schema's. A list of dataclasses (``data.custom_tasks``) lists its element's keys as ``[i].key``."""
    return list(_walk(root, defaults, "", field_comments()))


def _walk(cls: type, values: Any, prefix: str, comments: dict[str, dict[str, str]]) -> Iterator[KeyDoc]:
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        key = f"{prefix}{fld.name}"
        hint = hints[fld.name]
        value = OmegaConf.select(values, fld.name) if values is not None else None
        description = next((comments[k.__name__][fld.name] for k in cls.__mro__
                            if fld.name in comments.get(k.__name__, {})), "")
        if dataclasses.is_dataclass(hint):
            node_type = OmegaConf.get_type(value) if OmegaConf.is_config(value) else None
            node_type = node_type if dataclasses.is_dataclass(node_type) else hint
            yield from _walk(node_type, value, f"{key}.", comments)
            continue
        yield KeyDoc(key, value, description)
        element = (typing.get_args(hint) or [None])[0]
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(element):
            yield from _walk(element, None, f"{key}[i].", comments)


# -- the page ------------------------------------------------------------------------------------------
def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def default_options() -> dict[str, str]:
    """group -> the option ``conf/config.yaml``'s defaults list picks."""
    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", [])
    return {key: value for entry in defaults if isinstance(entry, dict) for key, value in entry.items()}


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, dict)):
        text = str(value).replace("'", "").replace(" ", "")
        return text if len(text) <= 16 else text[:13] + "..."
    return str(value)


def help_page(program: str, defaults: Any) -> str:
    """The ``--help`` text of ``program`` (a ``malora-*`` command) over ``defaults``, the composition of the
    command line's group options and keys (None: the schema's keys without values)."""
    page = PAGES[program]
    chosen = default_options()
    lines = [f"usage: {page.usage}", "", page.about, "", "config groups (group=option; * the default):"]
    for group in page.groups:
        options = [f"{name}*" if name == chosen.get(group) else name for name in group_options(group)]
        lines.append(f"  {group:<10}{', '.join(options)}")
    lines += ["", "keys (key=value; the default after the chosen group options; adapter.*: its kind's):"]
    for doc in key_docs(defaults):
        if doc.key.split(".", 1)[0].split("[", 1)[0] not in page.sections:
            continue
        value = _value(doc.default) if "[i]." not in doc.key else ""
        lines.append(f"  {doc.key:<34}{value:<18}{doc.description}".rstrip())
    lines += ["", "options:"]
    lines += [f"  {flag:<22}{text}" for flag, text in page.options]
    lines += ["", "examples:"] + [f"  {example}" for example in page.examples]
    lines += ["", f"configs: {CONF_DIR}",
              f"  (accelerate launch --config_file {CONF_DIR / 'accelerate'}/ddp.yaml ...)"]
    return "\n".join(lines)
