"""The training data stream: every task's train split tokenised once, then global micro-batches drawn from
the task mixture, identical on every process for a seed and exactly resumable from ``state_dict``."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from malora_train.config import DataConfig
from malora_train.data.collate import Collator, EncodedExample, encode_examples
from malora_train.data.mixture import TaskMixture
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError
from malora_train.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

ENCODE_CHUNK = 4096  # examples tokenised per call: bounds the memory of Python lists of token ids
POOL_BATCHES = 16  # length grouping sorts a pool of this many batches' worth of draws


class TokenizedSplit:
    """A task's encoded examples stored compactly (one flat int32 tensor), expanded on demand."""

    def __init__(self, tokenizer, examples: Sequence[Example], max_length: int, task_index: int):
        self.task_index = task_index
        chunks, prompt_lengths, truncated, lengths = [], [], [], []
        for start in range(0, len(examples), ENCODE_CHUNK):
            encoded = encode_examples(tokenizer, examples[start:start + ENCODE_CHUNK], max_length, task_index)
            chunks.append(torch.tensor([i for example in encoded for i in example.input_ids], dtype=torch.int32))
            lengths += [len(example.input_ids) for example in encoded]
            prompt_lengths += [example.labels.count(IGNORE_INDEX) for example in encoded]
            truncated += [example.truncated for example in encoded]
        self.ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)
        self.lengths = lengths
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.prompt_lengths = prompt_lengths
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int) -> EncodedExample:
        ids = self.ids[self.offsets[index]:self.offsets[index + 1]].tolist()
        prompt_length = self.prompt_lengths[index]
        return EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt_length + ids[prompt_length:],
                              task_index=self.task_index, truncated=self.truncated[index])


class BatchStream:
    """Deterministic stream of global micro-batches (``Collator`` output) drawn from the task mixture.

    With ``data.group_by_length`` it draws POOL_BATCHES batches' worth of examples at a time, sorts them
    by length, cuts them into batches and emits those in a seeded random order.
    """

    def __init__(self, tasks: Mapping[str, TaskData], tokenizer, cfg: DataConfig, batch_size: int, seed: int):
        if batch_size < 1:
            raise ConfigError(f"micro batch size {batch_size} must be >= 1")
        self.task_names = list(tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = cfg.group_by_length
        self.splits = [TokenizedSplit(tokenizer, task.train, cfg.max_length, index)
                       for index, task in enumerate(tasks.values())]
        self.truncated_in_train = {name: sum(split.truncated) for name, split in zip(self.task_names, self.splits)}
        for name, count in self.truncated_in_train.items():
            if count:
                log.warning("task %s: %d of %d training examples are longer than data.max_length=%d and lose "
                            "prompt tokens from the left", name, count, len(tasks[name].train), cfg.max_length)
        self.train_size = sum(len(split) for split in self.splits)
        self.mixture = TaskMixture({name: len(split) for name, split in zip(self.task_names, self.splits)},
                                   cfg.sampling, cfg.temperature, cfg.task_weights, cfg.task_caps, seed)
        self.collator = Collator(tokenizer.pad_token_id)
        self.truncated = 0  # truncated examples emitted so far
        self.batches = 0
        self._pools = 0
        self._pending: list[list[tuple[int, int]]] = []

    @property
    def truncated_total(self) -> int:
        """Training examples (over all tasks) that had to be truncated when tokenised."""
        return sum(self.truncated_in_train.values())

    def next_batch(self) -> dict[str, torch.Tensor]:
        draws = self._next_draws()
        examples = [self.splits[task].example(index) for task, index in draws]
        self.truncated += sum(example.truncated for example in examples)
        self.batches += 1
        return self.collator(examples)

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
                "group_by_length": self.group_by_length, "mixture": self.mixture.state_dict(),
                "truncated": self.truncated, "batches": self.batches, "pools": self._pools,
                "pending": [[list(draw) for draw in batch] for batch in self._pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = (list(state["task_names"]), state["batch_size"], state["group_by_length"])
        if saved != (self.task_names, self.batch_size, self.group_by_length):
            raise ConfigError(
                f"cannot resume the data stream: the checkpoint has tasks {saved[0]}, micro-batch {saved[1]}, "
                f"group_by_length={saved[2]}; this run has {self.task_names}, {self.batch_size}, "
                f"{self.group_by_length}"
            )
        self.mixture.load_state_dict(state["mixture"])
        self.truncated = int(state["truncated"])
        self.batches = int(state["batches"])
        self._pools = int(state["pools"])
        self._pending = [[(int(task), int(index)) for task, index in batch] for batch in state["pending"]]
