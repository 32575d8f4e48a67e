"""``data.prompt_template=chat``: the tokenizer's chat template writes the prompt up to the assistant's
turn, the answer is that turn (closed by EOS) and the only part with a loss; one BOS; clear errors."""

from __future__ import annotations

import logging

import pytest

from malora_train.config import DataConfig
from malora_train.data import IGNORE_INDEX, build_tasks, encode_example
from malora_train.errors import ConfigError
from malora_train.models import builtin_tokenizer

# ChatML with a system turn, as SmolLM2-Instruct and Qwen write it: the tokenizer's EOS (<|im_end|> there,
# <|eos|> for the tiny model's tokenizer) closes each turn
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.{{ eos_token }}\n"
          "{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template: str = CHATML):
    """The tiny model's byte tokenizer with a chat template (no new tokens: the tiny model has none)."""
    tokenizer = builtin_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def chat_tasks(tokenizer, **options):
    cfg = DataConfig(source="synthetic", tasks=["sentiment"], train_per_task=4, eval_per_task=2,
                     prompt_template="chat", **options)
    return build_tasks(cfg, seed=0, tokenizer=tokenizer)


def test_the_prompt_is_the_chat_up_to_the_assistant_turn_and_the_loss_is_on_the_answer():
    tokenizer = chat_tokenizer()
    plain = build_tasks(DataConfig(source="synthetic", tasks=["sentiment"], train_per_task=4, eval_per_task=2,
                                   prompt_template="plain"), seed=0)["sentiment"]
    task = chat_tasks(tokenizer)["sentiment"]
    instruction = plain.train[0].prompt.removesuffix("\n### Response:\n")
    example = task.train[0]
    assert example.prompt == (f"<|im_start|>system\nYou are helpful.<|eos|>\n<|im_start|>user\n{instruction}"
                              "<|eos|>\n<|im_start|>assistant\n")
    assert example.target == plain.train[0].target == "the correct answer is " + example.label

    encoded = encode_example(tokenizer, example, max_length=256)
    answer = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    prompt_length = len(encoded.labels) - len(answer)
    assert encoded.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length  # system, user, assistant header
    assert tokenizer.decode(encoded.input_ids[:prompt_length]) == example.prompt
    assert answer == (tokenizer(example.target, add_special_tokens=False)["input_ids"]
                      + [tokenizer.eos_token_id])
    assert tokenizer.decode(answer[-1:]) == "<|eos|>"  # the assistant's turn ends as the template ends it


def test_a_bos_written_by_the_template_is_not_doubled():
    from tokenizers.processors import TemplateProcessing

    tokenizer = chat_tokenizer("{{ bos_token }}" + CHATML)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # this tokenizer adds its own BOS
    example = chat_tasks(tokenizer)["sentiment"].train[0]
    assert example.prompt.startswith("<|im_start|>system")
    ids = encode_example(tokenizer, example, max_length=256).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_chat_needs_a_chat_template_and_warns_when_turns_do_not_end_with_eos(caplog):
    with pytest.raises(ConfigError, match="data.prompt_template=chat needs a tokenizer with a chat template"):
        chat_tasks(builtin_tokenizer())
    with pytest.raises(ConfigError,
                       match="data.prompt_template='chatml' is not one of auto, alpaca, plain, chat"):
        build_tasks(DataConfig(source="synthetic", prompt_template="chatml"), seed=0)
    with caplog.at_level(logging.WARNING, logger="malora_train.data.chat"):
        chat_tasks(chat_tokenizer(CHATML.replace("{{ eos_token }}", "<|im_end|>")))
    assert [r.getMessage() for r in caplog.records] == [
        "data.prompt_template=chat: the chat template ends an assistant turn with '<|im_end|>\\n', "
        "not with the EOS token '<|eos|>' that ends every answer in training and stops generation"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="malora_train.data.chat"):
        chat_tasks(chat_tokenizer())
    assert caplog.records == []


def test_a_run_trains_and_evaluates_on_chat_prompts(tmp_path, run_training, monkeypatch):
    import malora_train.models

    monkeypatch.setattr(malora_train.models, "builtin_tokenizer", chat_tokenizer)
    run_dir = tmp_path / "run"
    summary = run_training(run_dir, "data.prompt_template=chat", "trainer.max_steps=2", "eval.max_examples=2",
                           "eval.scorer=generate", "eval.max_new_tokens=4")
    assert summary["status"] == "completed" and set(summary["eval_after"]) == {
        "sentiment", "category", "case", "compare", "arithmetic"}
    first = (run_dir / "eval" / "step_2" / "predictions_generate.jsonl").read_text().splitlines()[0]
    assert '"prompt": "<|im_start|>system\\nYou are helpful.<|eos|>\\n<|im_start|>user\\n' in first


def test_the_default_template_follows_the_model(tmp_path, run_training, monkeypatch, caplog):
    import malora_train.models
    from malora_train.data.rendering import choose_template

    assert choose_template("auto", "plain", chat_tokenizer()) == "chat"
    assert choose_template("auto", "plain", builtin_tokenizer()) == "plain"
    assert choose_template("auto", "alpaca", None) == "alpaca"
    assert choose_template("plain", "alpaca", chat_tokenizer()) == "plain"  # a template named is kept
    with pytest.raises(ConfigError, match="data.prompt_template_fallback='chat' is not one of alpaca, plain"):
        choose_template("auto", "chat", None)
    assert DataConfig().prompt_template == "auto"

    # the synthetic mixture: auto, plain prompts for a tokenizer without a chat template (the tiny model's)
    with caplog.at_level(logging.INFO, logger="malora_train"):
        summary = run_training(tmp_path / "plain", "trainer.max_steps=1", "trainer.eval_after=false")
    assert summary["prompt_template"] == "plain"
    assert "prompt template: plain (data.prompt_template=auto: the tokenizer has no chat template)" \
        in caplog.text

    monkeypatch.setattr(malora_train.models, "builtin_tokenizer", chat_tokenizer)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="malora_train"):
        summary = run_training(tmp_path / "chat", "trainer.max_steps=1", "trainer.eval_after=false")
    assert summary["prompt_template"] == "chat"
    assert "prompt template: chat (data.prompt_template=auto: the tokenizer has a chat template)" \
        in caplog.text
