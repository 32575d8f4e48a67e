"""Where a custom task's records come from (``data.custom_tasks[i].path``): a JSON or JSONL file (read by
``records``), a CSV, TSV or Parquet file, a local dataset folder or a hub dataset id with a split, the last
four through ``datasets.load_dataset`` (offline, only what its cache already holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from malora_train.config import TASK_FILE_SUFFIXES
from malora_train.data.records import Record, located_records, read_records
from malora_train.errors import DataError

RECORD_FILE_SUFFIXES = (".json", ".jsonl")
# a table file's suffix -> (datasets' builder, its options)
TABLE_FILES: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}
assert set(RECORD_FILE_SUFFIXES) | set(TABLE_FILES) == set(TASK_FILE_SUFFIXES)


def read_task_records(path: str, split: str, subset: str | None, key: str) -> list[Record]:
    """The records at ``path`` (``key`` names it in errors): a file's rows, or a dataset folder's or hub
    id's ``split`` (its configuration ``subset``, if it has several)."""
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if suffix in RECORD_FILE_SUFFIXES:
        return read_records(local)
    if suffix in TABLE_FILES:
        if not local.is_file():
            raise DataError(f"file not found: {local}")
        builder, options = TABLE_FILES[suffix]
        rows = _load_dataset(key, path, builder, data_files=str(local), split="train", **options)
        where = str(local)
    else:
        rows = _load_dataset(key, path, path, name=subset, split=split)
        where = f"{path} split {split}"
    return located_records([(f"{where} row {index + 1}", row) for index, row in enumerate(rows)])


def _load_dataset(key: str, shown: str, *args: Any, **kwargs: Any):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # the datasets library raises many kinds; all mean "cannot load it"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{key}={shown!r}: could not load it ({type(err).__name__}: {first_line}); a hub "
                        "dataset id is read from the datasets cache when offline (HF_DATASETS_OFFLINE=1)"
                        ) from None
