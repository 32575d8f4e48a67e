"""Sequence packing: whole examples laid one after another into rows of a fixed length, so every
training batch has the same shape and almost no padding.

Examples are drawn in the mixture's order and placed first-fit into the batch's rows; the first one that
fits in no row starts the next batch (``RowFiller``). ``pack_rows`` lays them out: positions restart at 0
for each example and for the padding tail, which forms one more segment of its own; ``document_ids``
tells the model which tokens may attend to which (``malora_train.attention``), and ``task_ids`` gives
each token's task. Labels keep the unpacked convention: prompt and padding tokens are IGNORE_INDEX, so
the loss never pairs the last token of one example with the first of the next (a prompt token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from malora_train.labels import IGNORE_INDEX

Draw = tuple[int, int]  # (task index, example index)


class RowFiller:
    """First-fit placement of examples (by length) into ``rows`` rows of ``length`` tokens."""

    def __init__(self, rows: int, length: int) -> None:
        self.rows = rows
        self.length = length
        self.placed: list[list[Draw]] = [[] for _ in range(rows)]
        self.room = [length] * rows

    def place(self, draw: Draw, size: int) -> bool:
        """Put the example into the first row with room; False when no row has room (the batch is full)."""
        if size > self.length:
            raise ValueError(f"an example of {size} tokens cannot fit a packed row of {self.length}")
        for row, free in enumerate(self.room):
            if size <= free:
                self.placed[row].append(draw)
                self.room[row] -= size
                return True
        return False


def fill_rows(rows: int, length: int, carry: Draw | None, draw: Callable[[], Draw],
              size_of: Callable[[Draw], int]) -> tuple[list[list[Draw]], Draw]:
    """One batch of packed rows: ``carry`` (the example left over from the last batch) first, then new
    draws until one fits nowhere; returns the rows and that example, the next batch's carry."""
    filler = RowFiller(rows, length)
    nxt = carry if carry is not None else draw()
    while filler.place(nxt, size_of(nxt)):
        nxt = draw()
    return filler.placed, nxt


def pack_rows(examples: Sequence[Sequence[tuple[torch.Tensor, int, int]]], length: int,
              pad_token_id: int) -> dict[str, torch.Tensor]:
    """Lay out rows of (token ids, prompt length, task index) examples into (B, length) tensors:
    input_ids, labels, attention_mask (1 on real tokens), position_ids, document_ids, task_ids."""
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    document_ids = torch.zeros((batch, length), dtype=torch.long)
    task_ids = torch.zeros((batch, length), dtype=torch.long)
    positions = torch.arange(length)
    for row, row_examples in enumerate(examples):
        start = 0
        for document, (ids, prompt_length, task) in enumerate(row_examples):
            end = start + ids.numel()
            input_ids[row, start:end] = ids
            labels[row, start + prompt_length:end] = ids[prompt_length:]
            attention_mask[row, start:end] = 1
            position_ids[row, start:end] = positions[:end - start]
            document_ids[row, start:end] = document
            task_ids[row, start:end] = task
            start = end
        position_ids[row, start:] = positions[:length - start]  # the padding tail: a segment of its own
        document_ids[row, start:] = len(row_examples)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids,
            "position_ids": position_ids, "document_ids": document_ids}
