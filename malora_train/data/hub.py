"""The commonsense tasks from their original Hugging Face hub datasets, converted to the LLM-Adapters
instruction format (``data.source=hub``; needs network or a filled datasets cache).

BoolQ is rendered without its passage, as LLM-Adapters and MoE-PEFT do. Splits: each dataset's train
split for training and its labelled evaluation split (validation, or test where labels are public).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from malora_train.config import DataConfig
from malora_train.data.commonsense import COMMONSENSE_LABELS
from malora_train.data.rendering import RawTask, choices_instruction
from malora_train.errors import DataError

Row = Mapping[str, Any]
ANSWER_QUESTION = "Please choose the correct answer to the question: "


def _text(row: Row, field: str) -> str:
    if field not in row:
        raise ValueError(f"field {field!r} is missing")
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {field!r} must be non-empty text, got {value!r}")
    return value.strip()


def _position(row: Row, field: str, first: int, count: int) -> int:
    """A label stored as an int or numeric string counting from ``first``, as a 0-based position."""
    value = row.get(field)
    try:
        position = int(value) - first
    except (TypeError, ValueError):
        raise ValueError(f"field {field!r} = {value!r} is not a number") from None
    if not 0 <= position < count:
        raise ValueError(f"field {field!r} = {value!r} is out of range for {count} options")
    return position


def convert_boolq(row: Row) -> tuple[str, str]:
    question = _text(row, "question")
    if not question.endswith("?"):
        question += "?"
    answer = row.get("answer")
    if not isinstance(answer, bool):
        raise ValueError(f"field 'answer' = {answer!r} is not true/false")
    instruction = f"Please answer the following question with true or false, question: {question}\n\n" \
                  "Answer format: true/false"
    return instruction, "true" if answer else "false"


def convert_piqa(row: Row) -> tuple[str, str]:
    options = [_text(row, "sol1"), _text(row, "sol2")]
    question = f"Please choose the correct solution to the question: {_text(row, 'goal')}"
    position = _position(row, "label", 0, 2)
    return (choices_instruction(question, options, kind="solution", separator="\n\n"),
            f"solution{position + 1}")


def convert_social_i_qa(row: Row) -> tuple[str, str]:
    options = [_text(row, field) for field in ("answerA", "answerB", "answerC")]
    question = f"{ANSWER_QUESTION}{_text(row, 'context')} {_text(row, 'question')}"
    return choices_instruction(question, options), f"answer{_position(row, 'label', 1, 3) + 1}"


def convert_hellaswag(row: Row) -> tuple[str, str]:
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != 4:
        raise ValueError(f"field 'endings' must be a list of 4 endings, got {endings!r}")
    question = ("Please choose the correct ending to complete the given sentence: "
                f"{_text(row, 'activity_label')}: {_text(row, 'ctx')}")
    options = [str(ending).strip() for ending in endings]
    return choices_instruction(question, options, kind="ending"), f"ending{_position(row, 'label', 0, 4) + 1}"


def convert_winogrande(row: Row) -> tuple[str, str]:
    sentence, first, second = _text(row, "sentence"), _text(row, "option1"), _text(row, "option2")
    instruction = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                   f"{sentence}\n\nOption1: {first} Option2: {second} Answer format: option1/option2")
    return instruction, f"option{_position(row, 'answer', 1, 2) + 1}"


def _lettered_choices(row: Row, question_field: str) -> tuple[str, str]:
    """ARC / OpenBookQA: ``choices = {"text": [...], "label": ["A", ...]}`` and an ``answerKey``."""
    choices = row.get("choices")
    if not isinstance(choices, Mapping) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]):
        raise ValueError(f"field 'choices' must hold equal-length 'text' and 'label' lists, got {choices!r}")
    keys = [str(key) for key in choices["label"]]
    answer_key = str(row.get("answerKey"))
    if answer_key not in keys:
        raise ValueError(f"field 'answerKey' = {answer_key!r} is not one of the choice labels {keys}")
    options = [str(text).strip() for text in choices["text"]]
    instruction = choices_instruction(f"{ANSWER_QUESTION}{_text(row, question_field)}", options)
    return instruction, f"answer{keys.index(answer_key) + 1}"


def convert_arc(row: Row) -> tuple[str, str]:
    return _lettered_choices(row, "question")


def convert_openbookqa(row: Row) -> tuple[str, str]:
    return _lettered_choices(row, "question_stem")


@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    train_split: str
    eval_split: str
    convert: Callable[[Row], tuple[str, str]]


HUB_DATASETS: dict[str, HubDataset] = {
    "boolq": HubDataset("google/boolq", None, "train", "validation", convert_boolq),
    "piqa": HubDataset("ybisk/piqa", None, "train", "validation", convert_piqa),
    "social_i_qa": HubDataset("allenai/social_i_qa", None, "train", "validation", convert_social_i_qa),
    "hellaswag": HubDataset("Rowan/hellaswag", None, "train", "validation", convert_hellaswag),
    "winogrande": HubDataset("allenai/winogrande", "winogrande_debiased", "train", "validation",
                             convert_winogrande),
    "ARC-Easy": HubDataset("allenai/ai2_arc", "ARC-Easy", "train", "test", convert_arc),
    "ARC-Challenge": HubDataset("allenai/ai2_arc", "ARC-Challenge", "train", "test", convert_arc),
    "openbookqa": HubDataset("allenai/openbookqa", "main", "train", "test", convert_openbookqa),
}


def convert_rows(name: str, rows: Any, where: str) -> list[tuple[str, str]]:
    """Convert every row, checking each label is in the task's label set; errors name the row."""
    convert, labels = HUB_DATASETS[name].convert, COMMONSENSE_LABELS[name]
    pairs = []
    for index, row in enumerate(rows):
        try:
            instruction, label = convert(row)
            if label not in labels:
                raise ValueError(f"answer {label!r} is not one of the task's labels {'/'.join(labels)}")
        except ValueError as err:
            raise DataError(f"{where} row {index}: {err}") from None
        pairs.append((instruction, label))
    return pairs


def load_hub_task(name: str, cfg: DataConfig) -> RawTask:
    import datasets

    source = HUB_DATASETS[name]
    splits = {}
    for split in (source.train_split, source.eval_split):
        where = (f"hub dataset {source.path}" + (f" ({source.config})" if source.config else "")
                 + f" split {split}")
        try:
            rows = datasets.load_dataset(source.path, source.config, split=split)
        except Exception as err:  # the datasets library raises many kinds; all mean "cannot load it"
            raise DataError(f"could not load {where} for task {name}: {type(err).__name__}: {err} "
                            "(offline? HF_DATASETS_OFFLINE=1 needs a filled cache)") from err
        splits[split] = convert_rows(name, rows, where)
    return RawTask(name=name, labels=list(COMMONSENSE_LABELS[name]), train=splits[source.train_split],
                   eval=splits[source.eval_split])
