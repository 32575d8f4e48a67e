"""``predictions_<scorer>.jsonl``: one JSON line per scored example (task, id, prompt, generation,
extracted, label, correct, scorer), ordered by task and id whatever rank scored it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from malora_train.eval.evaluate import Prediction
from malora_train.run_dir import PREDICTIONS_FILE, ensure_dir, write_text_atomic


def predictions_file(folder: Path, scorer: str) -> Path:
    return Path(folder) / PREDICTIONS_FILE.format(scorer=scorer)


def write_predictions(path: Path, predictions: Iterable[Prediction], task_order: list[str]) -> Path:
    """Write ``predictions`` (from any number of ranks) sorted by task, in ``task_order``, then id."""
    position = {name: i for i, name in enumerate(task_order)}
    rows = sorted(predictions, key=lambda p: (position[p.task], p.id))
    ensure_dir(path.parent)  # a folder that cannot be made is an OutputError naming it
    write_text_atomic(path, "".join(json.dumps(p.to_json()) + "\n" for p in rows))
    return path
