"""Tasks described entirely in the config (``data.source=custom``): records from a file, a dataset folder or a
hub dataset id (``task_sources``),
an instruction template with ``{field}`` placeholders, the field holding the answer, the kind of answer
(a label set, a number, a letter) and a target template: fixed text around ``{label}``, or with record
fields too (``{rationale} The answer is {label}.``), trained on whole."""

from __future__ import annotations

import string

from malora_train.config import CustomTaskConfig, DataConfig, names_a_file
from malora_train.data.answers import ANSWER_TYPES, DEFAULT_LETTERS, is_letter, parse_number
from malora_train.data.records import Record
from malora_train.data.rendering import Pair, RawTask
from malora_train.data.splits import holdout_split
from malora_train.data.task_sources import read_task_records
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


def placeholder_count(template: str, name: str) -> int:
    return sum(field == name for _, field, _, _ in string.Formatter().parse(template))


def check_custom_task(task: CustomTaskConfig, key: str) -> None:
    if not task.name.strip():
        raise ConfigError(f"{key}.name is empty")
    if not template_fields(task.prompt_template, f"{key}.prompt_template"):
        raise ConfigError(f"{key}.prompt_template has no {{field}} placeholder, "
                          "so every prompt would be equal")
    target_fields = template_fields(task.target_template, f"{key}.target_template")
    if placeholder_count(task.target_template, "label") > 1:
        raise ConfigError(f"{key}.target_template={task.target_template!r} names {{label}} more than once")
    if not target_fields:
        raise ConfigError(f"{key}.target_template={task.target_template!r} needs {{label}} "
                          "(or record fields, e.g. '{rationale} The answer is {label}.'), "
                          "else every target would be equal")
    if not task.answer_field:
        raise ConfigError(f"{key}.answer_field is empty")
    if task.eval_split and task.eval_path:
        raise ConfigError(f"{key}: set eval_path (a file of evaluation records) or eval_split (a split of "
                          "the dataset at path), not both")
    if task.eval_split and names_a_file(task.path):
        raise ConfigError(f"{key}.eval_split={task.eval_split!r}: {task.path} is a file, which has no "
                          "splits; give the evaluation records as eval_path")
    if task.answer_type not in ANSWER_TYPES:
        raise ConfigError(f"{key}.answer_type={task.answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    if len(set(task.labels)) != len(task.labels) or any(not str(label).strip() for label in task.labels):
        raise ConfigError(f"{key}.labels={list(task.labels)} must be distinct non-empty labels")
    if task.answer_type == "number" and task.labels:
        raise ConfigError(f"{key}.labels must be empty for answer_type=number (any number is an answer)")
    if task.answer_type == "letter" and not all(is_letter(str(label)) for label in task.labels):
        raise ConfigError(f"{key}.labels={list(task.labels)} must be capital letters for answer_type=letter "
                          f"(empty: {'/'.join(DEFAULT_LETTERS)})")


def check_custom_tasks(cfg: DataConfig) -> None:
    names = [task.name for task in cfg.custom_tasks]
    for index, task in enumerate(cfg.custom_tasks):
        check_custom_task(task, f"data.custom_tasks[{index}]")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"data.custom_tasks: task names must be unique, repeated: {', '.join(duplicates)}")


def _render(record: Record, template: str, fields: list[str], label: str | None = None) -> str:
    values = {}
    for field in fields:
        if field == "label" and label is not None:
            values[field] = label
            continue
        record.scalar(field)  # names the record and field when it is missing or not text/number
        values[field] = record.fields[field]
    try:
        return template.format_map(values)
    except (ValueError, TypeError) as err:
        raise DataError(f"{record.where}: the template {template!r} cannot format this record "
                        f"({err})") from None


def _file_label(record: Record, field: str) -> str:
    """A record's answer when the labels come from the file: an empty one would become a label."""
    value = record.scalar(field)
    if not value.strip():
        raise record.error(field, "is empty (every record needs an answer)")
    return value


def _label_set(task: CustomTaskConfig, splits: list[list[Record]]) -> list[str]:
    if task.labels:
        return [str(label) for label in task.labels]
    if task.answer_type == "letter":
        return list(DEFAULT_LETTERS)
    if task.answer_type == "number":
        return []
    return sorted({_file_label(record, task.answer_field) for records in splits for record in records})


def _answer(record: Record, task: CustomTaskConfig, labels: list[str]) -> str:
    if task.answer_type != "number":
        return record.label(task.answer_field, labels)
    value = record.scalar(task.answer_field)
    if parse_number(value) is None:
        raise record.error(task.answer_field, f"= {value!r} is not a number (answer_type=number)")
    return value


def _fixed_text_around_label(template: str) -> tuple[str, str]:
    """(prefix, suffix) of a target template whose only placeholder is {label}, braces unescaped."""
    before, after = (text.replace("{{", "{").replace("}}", "}") for text in template.split("{label}"))
    return before, after


def load_custom_task(task: CustomTaskConfig, cfg: DataConfig) -> RawTask:
    fields = template_fields(task.prompt_template, f"custom task {task.name}")
    target_fields = template_fields(task.target_template, f"custom task {task.name}")
    key = f"custom task {task.name}"
    splits = [read_task_records(task.path, task.split, task.subset, f"{key} path")]
    if task.eval_path:
        splits.append(read_task_records(task.eval_path, task.split, task.subset, f"{key} eval_path"))
    elif task.eval_split:
        splits.append(read_task_records(task.path, task.eval_split, task.subset, f"{key} eval_split"))
    labels = _label_set(task, splits)
    per_example = target_fields != ["label"]  # the target reads record fields (a rationale)

    def pair(record: Record) -> Pair:
        label = _answer(record, task, labels)
        target = _render(record, task.target_template, target_fields, label) if per_example else None
        return Pair(_render(record, task.prompt_template, fields), label, target)

    pairs = [[pair(record) for record in records] for records in splits]
    if len(pairs) == 2:
        train, evaluation = pairs
    else:
        (only,) = pairs
        train, evaluation = holdout_split(only, [p.instruction for p in only], cfg.eval_fraction,
                                          salt=f"holdout:{task.name}")
    prefix, suffix = ("", "") if per_example else _fixed_text_around_label(task.target_template)
    return RawTask(name=task.name, labels=labels, train=train, eval=evaluation, answer_prefix=prefix,
                   answer_suffix=suffix, answer_type=task.answer_type)
