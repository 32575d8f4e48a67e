"""Token ids for scoring, built exactly as training builds an example (data/collate.py): the prompt
tokenised on its own (with whatever special tokens the tokenizer adds, e.g. BOS), then the target
tokenised on its own without special tokens, then EOS; a prompt too long for ``max_length`` loses
tokens from the left. Scoring must see the token sequences training taught."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from malora_train.data.answers import ANSWER_TYPES, parse_number
from malora_train.data.collate import (
    join_prompt_and_target,
    leading_specials,
    prompt_token_ids,
    target_token_ids,
)
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError, DataError


@dataclass(frozen=True)
class LabelContinuations:
    """Each label's answer ``answer_prefix + label + answer_suffix + EOS`` split into the tokens every
    label's answer starts with (``shared``) and the label's own remaining tokens (``tails``, never empty)."""

    labels: list[str]
    shared: list[int]
    tails: list[list[int]]
    longest_answer: int  # tokens of the longest label's answer, EOS included (for prompt truncation)

    @property
    def first_tokens(self) -> list[int]:
        return [tail[0] for tail in self.tails]

    @property
    def one_token_decides(self) -> bool:
        """True when the first token after ``shared`` differs between every pair of labels."""
        return len(set(self.first_tokens)) == len(self.labels)


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; every answer ends with one in training and "
                          "scoring")
    return int(tokenizer.eos_token_id)


def label_continuations(tokenizer, task: TaskData) -> LabelContinuations:
    """Tokenise each full target (not the label alone: BPE merges across the prefix/label boundary
    differ) and take the longest common token prefix as the shared part."""
    targets = target_token_ids(tokenizer, [task.answer_prefix + label + task.answer_suffix
                                           for label in task.labels])
    answers = [list(target) + [eos_id(tokenizer)] for target in targets]
    for i, answer in enumerate(answers):
        if answer in answers[:i]:
            raise DataError(f"task {task.name}: labels {task.labels[answers.index(answer)]!r} and "
                            f"{task.labels[i]!r} tokenise identically and cannot be told apart")
    shared = 0
    while len({answer[shared] for answer in answers}) == 1:  # ends: distinct answers differ somewhere
        shared += 1
    return LabelContinuations(list(task.labels), answers[0][:shared], [a[shared:] for a in answers],
                              max(len(answer) for answer in answers))


def scoring_prompts(tokenizer, examples: Sequence[Example], answer_tokens: int,
                    max_length: int | None) -> list[list[int]]:
    """The examples' prompt ids; with ``max_length``, truncated from the left as training truncates a
    prompt followed by an answer of ``answer_tokens`` tokens (EOS included)."""
    prompts = [list(ids) for ids in prompt_token_ids(tokenizer, [ex.prompt for ex in examples])]
    if max_length is None or not prompts:
        return prompts
    keep = leading_specials(tokenizer, prompts[0])
    eos = eos_id(tokenizer)
    stand_in = [eos] * (answer_tokens - 1)  # only its length matters
    truncated = []
    for prompt in prompts:
        ids, prompt_length, _ = join_prompt_and_target(prompt, stand_in, eos, max_length, keep)
        truncated.append(ids[:prompt_length])
    return truncated


def check_task(task: TaskData, examples: Sequence[Example], split: str) -> None:
    """Scoring assumes a distinct label set (closed, except for numbers: any number is an answer) and,
    unless the task has per-example targets, targets of the form ``answer_prefix + label + answer_suffix``."""
    if task.answer_type not in ANSWER_TYPES:
        raise DataError(f"task {task.name}: answer_type {task.answer_type!r} is not one of "
                        f"{', '.join(ANSWER_TYPES)}")
    if not task.labels and task.answer_type != "number":
        raise DataError(f"task {task.name}: the label set is empty")
    if len(set(task.labels)) != len(task.labels):
        raise DataError(f"task {task.name}: the label set {task.labels} has duplicates")
    known = set(task.labels)
    for index, example in enumerate(examples):
        where = f"task {task.name}, {split} example {index}"
        if task.answer_type == "number":
            if parse_number(example.label) is None:
                raise DataError(f"{where}: label {example.label!r} is not a number")
        elif example.label not in known:
            raise DataError(f"{where}: label {example.label!r} is not one of {task.labels}")
        expected = task.answer_prefix + example.label + task.answer_suffix
        if not task.per_example_targets and example.target != expected:
            raise DataError(f"{where}: target {example.target!r} is not "
                            f"answer_prefix + label + answer_suffix ({expected!r})")


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device):
    """(input_ids, attention_mask) of ``rows`` padded on ``side`` ("right" or "left") to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0  # masked out anyway


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little on padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
