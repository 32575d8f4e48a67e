"""``data.prompt_template=chat``: prompts written by the tokenizer's own chat template, for instruct models.

The instruction is the user's turn and the prompt ends with the assistant's header
(``add_generation_prompt``), so the target (the answer) is the assistant's turn; training closes it
with the EOS token, which instruct tokenizers make their end-of-turn token (``<|im_end|>``,
``<|eot_id|>``). Everything up to the assistant's header is prompt, so the loss covers the answer only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from malora_train.errors import ConfigError

log = logging.getLogger(__name__)
PROBE = "MALORA_ANSWER_PROBE"  # an assistant turn's text, to see what the template writes after it


def user_turn(instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction}]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of a text by itself."""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def warn_unless_turns_end_with_eos(tokenizer) -> None:
    conversation = [*user_turn("?"), {"role": "assistant", "content": PROBE}]
    after = tokenizer.apply_chat_template(conversation, tokenize=False).split(PROBE, 1)[-1].lstrip()
    eos = tokenizer.eos_token
    if eos and not after.startswith(eos):
        log.warning("data.prompt_template=chat: the chat template ends an assistant turn with %r, "
                    "not with the EOS token %r that ends every answer in training and stops generation",
                    after[:20], eos)


def chat_renderer(tokenizer) -> Callable[[str], str]:
    """instruction -> the chat template's text up to the assistant's turn. A BOS the template writes is
    dropped when the tokenizer adds its own, so the tokenised prompt has one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.prompt_template=chat needs a tokenizer with a chat template (an instruct "
                          "model's); this model's tokenizer has none: use data.prompt_template=alpaca")
    warn_unless_turns_end_with_eos(tokenizer)
    bos = tokenizer.bos_token if adds_bos(tokenizer) else None

    def render(instruction: str) -> str:
        text = tokenizer.apply_chat_template(user_turn(instruction), tokenize=False,
                                             add_generation_prompt=True)
        return text[len(bos):] if bos and text.startswith(bos) else text

    return render
