"""The training data stream: every task's train split tokenised once, then global micro-batches drawn from
the task mixture, identical on every process for a seed and exactly resumable from ``state_dict``.

A batch is either ``batch_size`` padded examples (one a row) or, with ``data.packing``, ``batch_size``
rows of ``data.max_length`` tokens filled with whole examples (``packing``)."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from malora_train.config import DataConfig
from malora_train.data.collate import Collator
from malora_train.data.mixture import TaskMixture
from malora_train.data.packing import Draw, fill_rows, pack_rows
from malora_train.data.tokenized import TokenizedSplit, tokenizer_fingerprint
from malora_train.data.types import TaskData
from malora_train.errors import ConfigError

log = logging.getLogger(__name__)

POOL_BATCHES = 16  # length grouping sorts a pool of this many batches' worth of draws


def tokenized_cache_dir(cfg: DataConfig) -> Path | None:
    """``data.cache_dir`` (default ``$XDG_CACHE_HOME/malora-train/tokenized``); None with
    ``data.cache=false``."""
    if not cfg.cache:
        return None
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "malora-train" / "tokenized"


def writable_cache_dir(cfg: DataConfig) -> Path | None:
    """``tokenized_cache_dir`` when a file can be written there; else None, after one warning naming
    ``data.cache_dir``: a read-only or unmakeable cache folder costs the cache, not the run."""
    folder = tokenized_cache_dir(cfg)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        key = f"data.cache_dir={cfg.cache_dir}" if cfg.cache_dir else f"data.cache_dir (default {folder})"
        log.warning("%s: cannot write the tokenised-data cache there (%s); training without the cache "
                    "(set data.cache_dir to a writable folder, or data.cache=false)", key,
                    err.strerror or err)
        return None
    return folder


def warn_truncation(truncated: Mapping[str, int], total: int, max_length: int) -> None:
    """One warning line for the whole mixture (not one per task): how many examples lose prompt tokens."""
    counts = {name: count for name, count in truncated.items() if count}
    if counts:
        per_task = ", ".join(f"{name} {count}" for name, count in counts.items())
        log.warning("data.max_length=%d: %d of %d training examples lose prompt tokens from the left (%s)",
                    max_length, sum(counts.values()), total, per_task)


class BatchStream:
    """Deterministic stream of global micro-batches (``Collator`` output) drawn from the task mixture.

    With ``data.group_by_length`` it draws POOL_BATCHES batches' worth of examples at a time, sorts them
    by length, cuts them into batches and emits those in a seeded random order. With ``data.packing`` each
    batch is ``batch_size`` rows of ``data.max_length`` tokens, filled first-fit in draw order, one block of
    ``batch_size / blocks`` rows after the other: with one block a process (rank r takes block r), N
    processes see exactly the rows one process sees with N micro-batches a step.
    """

    def __init__(self, tasks: Mapping[str, TaskData], tokenizer, cfg: DataConfig, batch_size: int, seed: int,
                 blocks: int = 1):
        if batch_size < 1:
            raise ConfigError(f"micro batch size {batch_size} must be >= 1")
        if batch_size % blocks:
            raise ValueError(f"a batch of {batch_size} rows does not split into {blocks} blocks")
        self.task_names = list(tasks)
        self.batch_size = batch_size
        self.block_rows = batch_size // blocks
        self.seed = seed
        self.group_by_length = cfg.group_by_length
        self.packing = bool(cfg.packing)
        if self.packing and self.group_by_length:
            raise ConfigError("data.packing=true and data.group_by_length=true: packed rows have no padding "
                              "to save; set data.group_by_length=false")
        self.max_length = cfg.max_length
        cache_dir = writable_cache_dir(cfg)
        tokenizer_id = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
        self.splits = [TokenizedSplit.encode(tokenizer, task.train, cfg.max_length, index, cache_dir,
                                             tokenizer_id)
                       for index, task in enumerate(tasks.values())]
        self.truncated_in_train = {name: sum(split.truncated)
                                   for name, split in zip(self.task_names, self.splits)}
        self.train_size = sum(len(split) for split in self.splits)
        warn_truncation(self.truncated_in_train, self.train_size, cfg.max_length)
        self.mixture = TaskMixture({name: len(split) for name, split in zip(self.task_names, self.splits)},
                                   cfg.sampling, cfg.temperature, cfg.task_weights, cfg.task_caps, seed)
        self.collator = Collator(tokenizer.pad_token_id)
        self.truncated = 0  # truncated examples emitted so far
        self.batches = 0
        self._pools = 0
        self._pending: list[list[tuple[int, int]]] = []
        self._carry: Draw | None = None  # packing: the drawn example the last batch had no room for

    @property
    def truncated_total(self) -> int:
        """Training examples (over all tasks) that had to be truncated when tokenised."""
        return sum(self.truncated_in_train.values())

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.packing:
            return self._next_packed_batch()
        draws = self._next_draws()
        examples = [self.splits[task].example(index) for task, index in draws]
        self.truncated += sum(example.truncated for example in examples)
        self.batches += 1
        return self.collator(examples)

    def _next_packed_batch(self) -> dict[str, torch.Tensor]:
        rows, self._carry = self._fill_blocks(self._carry, self.mixture.draw)
        self.truncated += sum(self.splits[task].truncated[index] for row in rows for task, index in row)
        self.batches += 1
        examples = [[self.splits[task].packed(index) for task, index in row] for row in rows]
        return pack_rows(examples, self.max_length, self.collator.pad_token_id)

    def _fill_blocks(self, carry: Draw | None, draw: Callable[[], Draw]) -> tuple[list[list[Draw]], Draw]:
        """A packed batch's rows, one block of ``block_rows`` after the other; and the next carry."""
        rows: list[list[Draw]] = []
        while len(rows) < self.batch_size:
            block, carry = fill_rows(self.block_rows, self.max_length, carry, draw, self._length_of)
            rows += block
        return rows, carry

    def _length_of(self, draw: Draw) -> int:
        return self.splits[draw[0]].lengths[draw[1]]

    def batches_for_epochs(self, epochs: float) -> int:
        """How many more batches draw ``epochs`` passes over the training examples (rounded up). Packed
        batches hold a varying number of examples: their count is found by packing the coming draws
        (lengths only) on a copy of the mixture."""
        wanted = math.ceil(epochs * self.train_size)
        if not self.packing:
            return max(1, math.ceil(wanted / self.batch_size))
        mixture = copy.deepcopy(self.mixture)
        drawn, carry, batches = 0, self._carry, 0

        def draw() -> Draw:
            nonlocal drawn
            drawn += 1
            return mixture.draw()

        while drawn - (carry is not None) < wanted:
            _, carry = self._fill_blocks(carry, draw)
            batches += 1
        return max(1, batches)

    def _next_draws(self) -> list[tuple[int, int]]:
        if not self.group_by_length:
            return [self.mixture.draw() for _ in range(self.batch_size)]
        if not self._pending:
            pool = [self.mixture.draw() for _ in range(POOL_BATCHES * self.batch_size)]
            pool.sort(key=lambda draw: self.splits[draw[0]].lengths[draw[1]])  # stable: ties keep draw order
            batches = [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            random.Random(f"malora-length-groups:{self.seed}:{self._pools}").shuffle(batches)
            self._pools += 1
            self._pending = batches
        return self._pending.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"task_names": list(self.task_names), "batch_size": self.batch_size,
                "group_by_length": self.group_by_length, "packing": self.packing,
                "mixture": self.mixture.state_dict(), "truncated": self.truncated, "batches": self.batches,
                "pools": self._pools, "pending": [[list(draw) for draw in batch] for batch in self._pending],
                "carry": list(self._carry) if self._carry is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = (list(state["task_names"]), state["batch_size"], state["group_by_length"],
                 state.get("packing", False))
        if saved != (self.task_names, self.batch_size, self.group_by_length, self.packing):
            raise ConfigError(
                f"cannot resume the data stream: the checkpoint has tasks {saved[0]}, "
                f"micro-batch {saved[1]}, "
                f"group_by_length={saved[2]}, packing={saved[3]}; this run has {self.task_names}, "
                f"{self.batch_size}, {self.group_by_length}, {self.packing}"
            )
        self.mixture.load_state_dict(state["mixture"])
        self.truncated = int(state["truncated"])
        self.batches = int(state["batches"])
        self._pools = int(state["pools"])
        self._pending = [[(int(task), int(index)) for task, index in batch] for batch in state["pending"]]
        carry = state.get("carry")
        self._carry = (int(carry[0]), int(carry[1])) if carry is not None else None
