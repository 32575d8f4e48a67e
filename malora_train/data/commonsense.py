"""The eight commonsense tasks in the LLM-Adapters instruction format, read from a folder of JSON files.

``data.root`` holds ``<task>/{train,test}.json``: lists of ``{"instruction", "input", "output", "answer"}``.
A task with only one of the two files is split deterministically (``data.eval_fraction``, hashed on the
instruction text, independent of the seed).
"""

from __future__ import annotations

from pathlib import Path

from malora_train.config import DataConfig
from malora_train.data.records import Record, read_records
from malora_train.data.rendering import RawTask, numbered_labels
from malora_train.data.splits import holdout_split
from malora_train.errors import ConfigError, DataError

# Each task's closed label set, from its family (ARC has a few five-choice questions).
COMMONSENSE_LABELS: dict[str, list[str]] = {
    "boolq": ["true", "false"],
    "piqa": numbered_labels("solution", 2),
    "social_i_qa": numbered_labels("answer", 3),
    "hellaswag": numbered_labels("ending", 4),
    "winogrande": numbered_labels("option", 2),
    "ARC-Easy": numbered_labels("answer", 5),
    "ARC-Challenge": numbered_labels("answer", 5),
    "openbookqa": numbered_labels("answer", 4),
}


def commonsense_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root must name the folder of <task>/{{train,test}}.json for "
                          f"data.source={cfg.source} (or set MALORA_COMMONSENSE_ROOT)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is not a folder (resolved to {root.resolve()}; relative paths "
                        "start where the command runs; MALORA_COMMONSENSE_ROOT overrides the default)")
    return root


def instruction_pairs(records: list[Record], labels: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for record in records:
        instruction = record.text("instruction")
        extra = record.text("input", allow_empty=True) if "input" in record.fields else ""
        if extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        pairs.append((instruction, record.label("answer", labels)))
    return pairs


def load_llm_adapters_task(name: str, cfg: DataConfig) -> RawTask:
    root = commonsense_root(cfg)
    labels = COMMONSENSE_LABELS[name]
    folder = root / name
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"task folder {folder} not found (data.root holds: {', '.join(present) or 'nothing'}); "
            f"get the {name} files, or train without it by listing the others in data.tasks=[...]"
        )
    files = {split: folder / f"{split}.json" for split in ("train", "test")}
    existing = {split: path for split, path in files.items() if path.is_file()}
    if not existing:
        raise DataError(f"{folder} has neither train.json nor test.json")
    pairs = {split: instruction_pairs(read_records(path), labels) for split, path in existing.items()}
    if len(pairs) == 2:
        train, evaluation = pairs["train"], pairs["test"]
    else:
        (only,) = pairs.values()
        train, evaluation = holdout_split(only, [instruction for instruction, _ in only], cfg.eval_fraction,
                                          salt=f"holdout:{name}")
    return RawTask(name=name, labels=list(labels), train=train, eval=evaluation)
