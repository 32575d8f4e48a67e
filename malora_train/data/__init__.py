"""The data stage: tasks (registry and sources), the task mixture sampler, tokenisation and batching."""

from malora_train.data.collate import (
    Collator,
    EncodedExample,
    encode_example,
    encode_examples,
    prompt_token_ids,
)
from malora_train.data.mixture import TaskMixture, mixture_probabilities
from malora_train.data.rendering import ANSWER_PREFIX, PROMPT_TEMPLATES, label_pattern, render_prompt
from malora_train.data.stream import BatchStream
from malora_train.data.tasks import build_tasks, known_tasks
from malora_train.data.types import Example, TaskData
from malora_train.labels import IGNORE_INDEX

__all__ = [
    "ANSWER_PREFIX",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATES",
    "BatchStream",
    "Collator",
    "EncodedExample",
    "Example",
    "TaskData",
    "TaskMixture",
    "build_tasks",
    "encode_example",
    "encode_examples",
    "known_tasks",
    "label_pattern",
    "mixture_probabilities",
    "prompt_token_ids",
    "render_prompt",
]
