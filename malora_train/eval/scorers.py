"""The two ways to score a task's examples with a model.

``score_label_logits`` (MoE-PEFT style, fast, used during training) compares the labels' tokens under
the model at the answer position and returns one predicted label per example; ``generate_texts`` (the
LLM-Adapters protocol) returns what the model writes after each prompt, from which ``answers.py`` reads
the answer.

Routing buckets: ``task_index`` is the row of the routing-count table each example's tokens go to
(an int for all, or one per example); it only matters while routing is recorded (see routing.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from malora_train.adapters import AdaptedCausalLM
from malora_train.data.types import Example, TaskData
from malora_train.eval.encoding import (
    LabelContinuations,
    label_continuations,
    length_batches,
    pad,
    pad_id_of,
    scoring_prompts,
)
from malora_train.eval.routing import uncounted_bucket
from malora_train.labels import IGNORE_INDEX

TaskIndex = int | Sequence[int] | None


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _buckets(task_index: TaskIndex, count: int) -> list[int] | None:
    if task_index is None or isinstance(task_index, int):
        return None if task_index is None else [task_index] * count
    if len(task_index) != count:
        raise ValueError(f"task_index has {len(task_index)} entries for {count} examples")
    return list(task_index)


def _task_ids(buckets: list[int] | None, rows: Sequence[int], device) -> torch.Tensor | None:
    return None if buckets is None else torch.tensor([buckets[i] for i in rows], device=device)


@torch.no_grad()
def score_label_logits(model: AdaptedCausalLM, tokenizer, task: TaskData, examples: Sequence[Example],
                       batch_size: int, task_index: TaskIndex = None,
                       max_length: int | None = None) -> list[str]:
    """Predict each example's label from the model's scores of the labels' answer tokens.

    The input is the prompt followed by the tokens every label's target shares (the answer prefix
    and more, e.g. "... answer" before "1"/"2"). When the next token differs between all labels, one
    forward per batch decides: the argmax over those tokens' logits at the last real position. Else
    each label's full remaining target (EOS included) is scored by its summed log-probability, one
    forward per batch of candidate sets. ``max_length`` truncates prompts as training does.
    """
    continuations = label_continuations(tokenizer, task)
    prompts = scoring_prompts(tokenizer, examples, continuations.longest_answer, max_length)
    inputs = [prompt + continuations.shared for prompt in prompts]
    buckets = _buckets(task_index, len(examples))
    if continuations.one_token_decides:
        return _first_token_argmax(model, tokenizer, continuations, inputs, batch_size, buckets)
    return _sequence_logprob_argmax(model, tokenizer, continuations, inputs, batch_size, buckets)


def _first_token_argmax(model, tokenizer, continuations: LabelContinuations, inputs: list[list[int]],
                        batch_size: int, buckets: list[int] | None) -> list[str]:
    device = model_device(model)
    candidates = torch.tensor(continuations.first_tokens, device=device)
    predictions = [""] * len(inputs)
    for rows in length_batches([len(x) for x in inputs], batch_size):
        ids, mask = pad([inputs[i] for i in rows], pad_id_of(tokenizer), "right", device)
        last = mask.sum(dim=1) - 1
        logits = model.logits_at_positions(ids, mask, last, _task_ids(buckets, rows, device))
        for i, choice in zip(rows, logits[:, candidates].argmax(dim=-1).tolist()):
            predictions[i] = continuations.labels[choice]
    return predictions


def _sequence_logprob_argmax(model, tokenizer, continuations: LabelContinuations, inputs: list[list[int]],
                             batch_size: int, buckets: list[int] | None) -> list[str]:
    """Each example becomes one row per label; only the first candidate row's tokens count for
    routing, so every example's prompt is counted once, as on the one-token path."""
    device = model_device(model)
    num_labels = len(continuations.labels)
    per_forward = max(1, batch_size // num_labels)
    predictions = [""] * len(inputs)
    for rows in length_batches([len(x) for x in inputs], per_forward):
        sequences, targets, row_buckets = [], [], []
        for i in rows:
            for j, tail in enumerate(continuations.tails):
                sequences.append(inputs[i] + tail)
                targets.append([IGNORE_INDEX] * len(inputs[i]) + tail)
                if buckets is not None:
                    row_buckets.append(buckets[i] if j == 0 else uncounted_bucket(model))
        ids, mask = pad(sequences, pad_id_of(tokenizer), "right", device)
        labels, _ = pad(targets, IGNORE_INDEX, "right", device)
        task_ids = torch.tensor(row_buckets, device=device) if buckets is not None else None
        out = model(ids, attention_mask=mask, labels=labels, task_ids=task_ids)
        logprob = -out.seq_loss_sum.view(len(rows), num_labels)
        for i, choice in zip(rows, logprob.argmax(dim=-1).tolist()):
            predictions[i] = continuations.labels[choice]
    return predictions


@torch.no_grad()
def generate_texts(model: AdaptedCausalLM, tokenizer, task: TaskData, examples: Sequence[Example],
                   batch_size: int, num_beams: int = 1, max_new_tokens: int = 16,
                   task_index: TaskIndex = None, max_length: int | None = None) -> list[str]:
    """What the model writes after each prompt (greedy, or beam search with ``num_beams`` > 1), up to EOS
    or ``max_new_tokens``. While routing is recorded, the prompts' routing is counted by one extra
    prompt-only forward per batch (generation itself counts nothing). ``max_length`` truncates prompts as
    training does, leaving room for the longest label's answer (or, for open answers, ``max_new_tokens``)."""
    device = model_device(model)
    pad_token = pad_id_of(tokenizer)
    room = label_continuations(tokenizer, task).longest_answer if task.closed_targets else max_new_tokens
    inputs = scoring_prompts(tokenizer, examples, room, max_length)
    buckets = _buckets(task_index, len(examples))
    texts = [""] * len(inputs)
    for rows in length_batches([len(x) for x in inputs], batch_size):
        batch = [inputs[i] for i in rows]
        if buckets is not None and model.record_routing:
            ids, mask = pad(batch, pad_token, "right", device)
            model.logits_at_positions(ids, mask, mask.sum(dim=1) - 1, _task_ids(buckets, rows, device))
        # generation calls the HF model directly: no token mask or task ids of another batch may linger
        model.context.token_mask = None
        model.context.token_task = None
        ids, mask = pad(batch, pad_token, "left", device)
        out = model.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
            max_new_tokens=max_new_tokens, pad_token_id=pad_token, eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        for i, text in zip(rows, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)):
            texts[i] = text
    return texts
