"""Tokenise examples (prompt masked from the loss, answer and EOS kept) and pad them into batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from malora_train.data.types import Example
from malora_train.errors import ConfigError
from malora_train.labels import IGNORE_INDEX


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt, the token ids on the target and the final EOS
    task_index: int
    truncated: bool  # prompt tokens were dropped from the left to fit max_length


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """The prompt ids training uses (with the tokenizer's own leading specials, e.g. BOS); scoring must
    tokenise prompts the same way, so it should call this too."""
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def target_token_ids(tokenizer, targets: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(targets), add_special_tokens=False)["input_ids"]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; training needs one to end each answer")
    return int(tokenizer.eos_token_id)


def join_prompt_and_target(prompt: list[int], target: list[int], eos_id: int, max_length: int,
                           keep_leading: int = 0) -> tuple[list[int], int, bool]:
    """(prompt + target + [eos], prompt length, truncated). Too long: drop prompt tokens from the left,
    after the first ``keep_leading`` ones (a BOS), so the answer is always whole."""
    answer = target + [eos_id]
    room = max_length - len(answer)
    if room < keep_leading + 1:
        raise ConfigError(f"data.max_length={max_length} is too short: an answer needs {len(answer)} tokens "
                          f"and at least {keep_leading + 1} prompt token(s) must stay")
    truncated = len(prompt) > room
    if truncated:
        prompt = prompt[:keep_leading] + prompt[len(prompt) - (room - keep_leading):]
    return prompt + answer, len(prompt), truncated


def leading_specials(tokenizer, ids: list[int]) -> int:
    """How many special tokens (BOS and the like) the tokenizer put in front of a prompt."""
    specials = set(tokenizer.all_special_ids)
    count = 0
    while count < len(ids) and ids[count] in specials:
        count += 1
    return count


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int,
                    task_index: int = 0) -> list[EncodedExample]:
    """Batched ``encode_example``: one fast-tokenizer call for all prompts, one per distinct target."""
    eos_id = _eos_id(tokenizer)
    prompts = prompt_token_ids(tokenizer, [example.prompt for example in examples])
    distinct_targets = sorted({example.target for example in examples})
    targets = dict(zip(distinct_targets, target_token_ids(tokenizer, distinct_targets)))
    keep = leading_specials(tokenizer, prompts[0]) if prompts else 0
    for example in examples:
        if len(targets[example.target]) + 1 + keep + 1 > max_length:
            raise ConfigError(f"data.max_length={max_length} is too short for task {example.task}: "
                              f"the answer {example.target!r} takes {len(targets[example.target]) + 1} "
                              "tokens with EOS")
    encoded = []
    for example, prompt in zip(examples, prompts):
        ids, prompt_length, truncated = join_prompt_and_target(prompt, targets[example.target], eos_id,
                                                               max_length, keep)
        labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
        encoded.append(EncodedExample(input_ids=ids, labels=labels, task_index=task_index,
                                      truncated=truncated))
    return encoded


def encode_example(tokenizer, example: Example, max_length: int, task_index: int = 0) -> EncodedExample:
    """Prompt ids + target ids + EOS; labels are IGNORE_INDEX on the prompt only. Prompt and target are
    tokenised separately (the prompt ids are exactly what scoring sees); too long: the prompt loses
    tokens from the left and ``truncated`` is set."""
    return encode_examples(tokenizer, [example], max_length, task_index)[0]


class Collator:
    """Pads right: input_ids with ``pad_token_id``, labels with IGNORE_INDEX, attention_mask 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token (set one, e.g. the EOS token)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        length = max(len(example.input_ids) for example in batch)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, example in enumerate(batch):
            size = len(example.input_ids)
            input_ids[row, :size] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, :size] = torch.tensor(example.labels, dtype=torch.long)
            attention_mask[row, :size] = 1
        task_ids = torch.tensor([example.task_index for example in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "task_ids": task_ids}
