"""Deterministic, seed-independent choices over records: held-out splits and size caps.

Both rank records by a salted SHA-256 of their text, so the same record lands on the same side in every
run, on every machine, whatever the file order or the training seed (eval sets stay comparable).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def stable_order(keys: Sequence[str], salt: str) -> list[int]:
    """Indices of ``keys`` ordered by hash(salt, key); ties (equal keys) keep their file order."""
    digests = [hashlib.sha256(f"{salt}\0{key}".encode()).digest() for key in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], i))


def holdout_split(items: Sequence[T], keys: Sequence[str], fraction: float,
                  salt: str) -> tuple[list[T], list[T]]:
    """Split into (train, eval) with ``ceil(fraction * n)`` eval items; both keep the original order."""
    order = stable_order(keys, salt)
    held_out = set(order[: math.ceil(fraction * len(items))])
    train = [item for i, item in enumerate(items) if i not in held_out]
    evaluation = [item for i, item in enumerate(items) if i in held_out]
    return train, evaluation


def stable_subset(items: Sequence[T], keys: Sequence[str], limit: int | None, salt: str) -> list[T]:
    """At most ``limit`` items (all when None), chosen by hash, in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    kept = set(stable_order(keys, salt)[:limit])
    return [item for i, item in enumerate(items) if i in kept]
