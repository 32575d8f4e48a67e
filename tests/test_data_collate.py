"""encode_example / Collator: loss masking, answer kept under truncation, padding (byte-level tokenizer)."""

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from malora_train.data import IGNORE_INDEX, Collator, Example, encode_example, encode_examples
from malora_train.errors import ConfigError
from malora_train.models import builtin_tokenizer

EXAMPLE = Example(task="t", prompt="Question: is 3 > 2?\n### Response:\n", target="the correct answer is yes",
                  label="yes")


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()  # one token per byte, no special tokens added


@pytest.fixture(scope="module")
def bos_tokenizer():
    tokenizer = builtin_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_prompt_masked_target_and_eos_kept(tokenizer):
    encoded = encode_example(tokenizer, EXAMPLE, max_length=256, task_index=3)
    prompt_length = len(EXAMPLE.prompt.encode())
    assert len(encoded.input_ids) == prompt_length + len(EXAMPLE.target.encode()) + 1
    assert encoded.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert IGNORE_INDEX not in encoded.labels[prompt_length:]
    assert encoded.labels[prompt_length:] == encoded.input_ids[prompt_length:]
    assert tokenizer.decode(encoded.input_ids[:prompt_length]) == EXAMPLE.prompt
    assert tokenizer.decode(encoded.input_ids[prompt_length:-1]) == EXAMPLE.target
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.task_index == 3 and not encoded.truncated


def test_truncation_drops_prompt_from_the_left_and_keeps_the_answer(tokenizer):
    answer_length = len(EXAMPLE.target.encode()) + 1
    encoded = encode_example(tokenizer, EXAMPLE, max_length=answer_length + 10)
    assert encoded.truncated
    assert len(encoded.input_ids) == answer_length + 10
    assert tokenizer.decode(encoded.input_ids[:10]) == EXAMPLE.prompt[-10:]
    assert encoded.labels[:10] == [IGNORE_INDEX] * 10
    assert tokenizer.decode(encoded.labels[10:-1]) == EXAMPLE.target
    assert encoded.labels[-1] == tokenizer.eos_token_id


def test_truncation_keeps_a_leading_bos(bos_tokenizer):
    full = encode_example(bos_tokenizer, EXAMPLE, max_length=256)
    assert full.input_ids[0] == bos_tokenizer.bos_token_id and not full.truncated
    answer_length = len(EXAMPLE.target.encode()) + 1
    cut = encode_example(bos_tokenizer, EXAMPLE, max_length=answer_length + 6)
    assert cut.truncated and len(cut.input_ids) == answer_length + 6
    assert cut.input_ids[0] == bos_tokenizer.bos_token_id
    assert bos_tokenizer.decode(cut.input_ids[1:6]) == EXAMPLE.prompt[-5:]
    assert cut.labels[:6] == [IGNORE_INDEX] * 6


def test_max_length_too_short_for_the_answer_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="data.max_length=10 is too short for task t"):
        encode_example(tokenizer, EXAMPLE, max_length=10)


def test_batched_encoding_equals_one_by_one(tokenizer):
    examples = [EXAMPLE, Example("t", "short\n", "the correct answer is no", "no"),
                Example("t", "x" * 300, "the correct answer is yes", "yes")]
    batched = encode_examples(tokenizer, examples, max_length=128, task_index=1)
    assert batched == [encode_example(tokenizer, example, 128, task_index=1) for example in examples]
    assert [item.truncated for item in batched] == [False, False, True]


def test_collator_pads_right_and_masks_padding(tokenizer):
    short = encode_example(tokenizer, Example("t", "hi\n", "the correct answer is no", "no"), 256,
                           task_index=0)
    long = encode_example(tokenizer, EXAMPLE, 256, task_index=2)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([short, long])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    width = len(long.input_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["task_ids"].tolist() == [0, 2]
    n = len(short.input_ids)
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert batch["input_ids"][0, n:].tolist() == [tokenizer.pad_token_id] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0].tolist() == short.labels + [IGNORE_INDEX] * (width - n)
    assert batch["labels"][1].tolist() == long.labels
    assert batch["attention_mask"][1].sum().item() == width
    # labels are -100 exactly on prompt and padding: the kept positions are the answers' tokens
    kept = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    assert kept == [len(b"the correct answer is no") + 1, len(EXAMPLE.target.encode()) + 1]


def test_collator_pad_to_multiple_of(tokenizer):
    encoded = encode_example(tokenizer, EXAMPLE, 256)
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=64)([encoded])
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["input_ids"].shape[1] >= len(encoded.input_ids)
    assert batch["attention_mask"].sum().item() == len(encoded.input_ids)
