"""Tasks described entirely in the config (``data.source=custom``): a JSON list or JSONL file of records,
an instruction template with ``{field}`` placeholders, the field holding the answer and the label set."""

from __future__ import annotations

import string
from pathlib import Path

from malora_train.config import CustomTaskConfig, DataConfig
from malora_train.data.records import Record, read_records
from malora_train.data.rendering import RawTask
from malora_train.data.splits import holdout_split
from malora_train.errors import ConfigError, DataError


def template_fields(template: str, key: str) -> list[str]:
    """The record fields a template reads; only plain ``{name}`` placeholders are allowed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"{key}: {err} (write a literal brace as {{{{ or }}}})") from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise ConfigError(f"{key}: placeholder {{{field}}} must name a record field, like {{question}}")
        fields.append(field)
    return list(dict.fromkeys(fields))


def check_custom_task(task: CustomTaskConfig, key: str) -> None:
    if not task.name.strip():
        raise ConfigError(f"{key}.name is empty")
    if not template_fields(task.prompt_template, f"{key}.prompt_template"):
        raise ConfigError(f"{key}.prompt_template has no {{field}} placeholder, so every prompt would be equal")
    target_fields = template_fields(task.target_template, f"{key}.target_template")
    if target_fields != ["label"] or not task.target_template.endswith("{label}") \
            or task.target_template.count("{label}") != 1:
        raise ConfigError(f"{key}.target_template={task.target_template!r} must end with its only placeholder "
                          "{label}, e.g. 'the correct answer is {label}'")
    if not task.answer_field:
        raise ConfigError(f"{key}.answer_field is empty")
    if len(set(task.labels)) != len(task.labels) or any(not str(label).strip() for label in task.labels):
        raise ConfigError(f"{key}.labels={list(task.labels)} must be distinct non-empty labels")


def check_custom_tasks(cfg: DataConfig) -> None:
    names = [task.name for task in cfg.custom_tasks]
    for index, task in enumerate(cfg.custom_tasks):
        check_custom_task(task, f"data.custom_tasks[{index}]")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"data.custom_tasks: task names must be unique, repeated: {', '.join(duplicates)}")


def _render(record: Record, template: str, fields: list[str]) -> str:
    values = {}
    for field in fields:
        record.scalar(field)  # names the record and field when it is missing or not text/number
        values[field] = record.fields[field]
    try:
        return template.format_map(values)
    except (ValueError, TypeError) as err:
        raise DataError(f"{record.where}: the prompt_template cannot format this record ({err})") from None


def _answer(record: Record, field: str) -> str:
    """A record's answer when the labels come from the file: an empty one would become a label."""
    value = record.scalar(field)
    if not value.strip():
        raise record.error(field, "is empty (every record needs an answer)")
    return value


def load_custom_task(task: CustomTaskConfig, cfg: DataConfig) -> RawTask:
    fields = template_fields(task.prompt_template, f"custom task {task.name}")
    paths = [Path(task.path).expanduser()] + ([Path(task.eval_path).expanduser()] if task.eval_path else [])
    splits = [read_records(path) for path in paths]
    labels = [str(label) for label in task.labels] or sorted(
        {_answer(record, task.answer_field) for records in splits for record in records}
    )
    pairs = [
        [(_render(record, task.prompt_template, fields), record.label(task.answer_field, labels))
         for record in records]
        for records in splits
    ]
    if task.eval_path:
        train, evaluation = pairs
    else:
        (only,) = pairs
        train, evaluation = holdout_split(only, [instruction for instruction, _ in only], cfg.eval_fraction,
                                          salt=f"holdout:{task.name}")
    prefix = task.target_template[: -len("{label}")].replace("{{", "{").replace("}}", "}")
    return RawTask(name=task.name, labels=labels, train=train, eval=evaluation, answer_prefix=prefix)
