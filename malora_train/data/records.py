"""Reading JSON / JSONL record files with errors that name the file, the record (or line) and the field.

These two formats are read here rather than through ``datasets``: its JSON reader names neither the line of a
syntax error nor the record of a bad field, and refuses a field whose type changes between records (a number
in one, text in the next), which hand-made task files often hold. ``task_sources`` reads the other formats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malora_train.errors import DataError

# the most characters a record's text field may hold: far beyond any data.max_length (a token is a few
# characters), and small enough that tokenising one record cannot exhaust the memory (a 50 MB field
# tokenised whole, before truncation, peaked at 9.6 GB)
MAX_FIELD_CHARS = 1_000_000


@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    where: str  # "<file> record 3" (JSON list, counting from 1) or "<file> line 3" (JSONL)

    def error(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field {field!r} {problem}")

    def text(self, field: str, allow_empty: bool = False) -> str:
        if field not in self.fields:
            raise self.error(field, "is missing "
                             f"(fields present: {', '.join(sorted(self.fields)) or 'none'})")
        value = self.fields[field]
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(field, "is empty")
        return value

    def scalar(self, field: str) -> str:
        """A text or number field as text (JSON true/false as "true"/"false")."""
        if field not in self.fields:
            raise self.error(field, "is missing "
                             f"(fields present: {', '.join(sorted(self.fields)) or 'none'})")
        value = self.fields[field]
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise self.error(field, f"must be text or a number, got {type(value).__name__}")

    def label(self, field: str, labels: list[str]) -> str:
        value = self.scalar(field)
        if value not in labels:
            raise self.error(field, f"= {value!r} is not one of the task's labels {'/'.join(labels)}")
        return value


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading BOM is dropped
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno} column {err.colno}: invalid JSON ({err.msg})") from err


def read_json(path: Path) -> Any:
    return _parse_json(_read_text(path), path)


def _refuse_single_object(text: str, path: Path) -> None:
    """A ``.json`` file, or a file spread over several lines, that holds one JSON object is not a record
    file (a one-line ``.jsonl`` file with one record is)."""
    if path.suffix.lower() == ".jsonl" and "\n" not in text.strip():
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # several objects, one a line: JSONL
    if not isinstance(whole, dict):
        return
    lists = [key for key, value in whole.items() if isinstance(value, list)]
    hint = f"; its key {lists[0]!r} holds a list: make that list the whole file" if lists else ""
    raise DataError(f"{path}: the file is one JSON object; expected a JSON list of records [{{...}}, ...] "
                    f"or JSONL (one object a line){hint}")


def read_records(path: Path) -> list[Record]:
    """A JSON file holding a list of objects, or JSONL (one object a line; blank lines skipped).

    The format is told by the first non-blank character: ``[`` is a JSON list, ``{`` is JSONL. A text field
    longer than ``MAX_FIELD_CHARS`` is a DataError naming the file, record and field.
    """
    text = _read_text(path)
    start = text.lstrip()[:1]
    if start == "[":
        rows = _parse_json(text, path)
        located = [(f"{path} record {i + 1}", row) for i, row in enumerate(rows)]
    elif start == "{":
        _refuse_single_object(text, path)
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: invalid JSON ({err.msg}); expected one object a line "
                                "(JSONL) or a JSON list") from err
    elif not start:
        raise DataError(f"{path} is empty")
    else:
        raise DataError(f"{path}: expected a JSON list of objects or JSONL, found {start!r} first")
    return located_records(located)


def located_records(located: list[tuple[str, Any]]) -> list[Record]:
    """Records from (where, row) pairs, each row checked: an object with named fields, no text field longer
    than ``MAX_FIELD_CHARS``."""
    records = []
    for where, row in located:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
        for field, value in row.items():
            if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
                raise DataError(f"{where}: field {field!r} holds {len(value):,} characters, more than the "
                                f"{MAX_FIELD_CHARS:,} a field may hold (records.MAX_FIELD_CHARS); shorten it")
        records.append(Record(fields=row, where=where))
    return records
