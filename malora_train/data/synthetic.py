"""Built-in procedurally generated tasks with exactly checkable answers (the default run's data).

Each task enumerates a space of distinct problems; a run samples ``train + eval`` of them without
replacement (so the splits never share a problem), gives every split a balanced, shuffled list of labels
and renders each problem so that its label is the correct answer. Prompts are kept short on purpose: the
default run trains on two CPU cores for about 50 steps of 8 examples.

``sentiment``, ``category`` and ``case`` decide from the identity of a few words: the default run learns
them (README, quick start). ``compare`` (yes/no: is the first number larger?) and ``arithmetic`` (multiple
choice, the sum at a random position, distractors off by 1, 2, 10 or 11) are the harder ones, for longer runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations, permutations

from malora_train.data.rendering import RawTask, choices_instruction, numbered_labels
from malora_train.errors import ConfigError

DEFAULT_TRAIN_PER_TASK = 2000
DEFAULT_EVAL_PER_TASK = 48

POSITIVE = ["great", "tasty", "fresh", "lovely", "friendly", "superb", "charming", "pleasant", "delightful",
            "excellent", "wonderful", "cheerful", "brilliant", "elegant", "cozy", "perfect"]
NEGATIVE = ["awful", "bland", "stale", "rude", "dirty", "terrible", "boring", "noisy", "greasy", "horrible",
            "dreadful", "cold", "broken", "smelly", "gloomy", "nasty"]
NOUNS = ["food", "service", "room", "staff", "music", "coffee", "movie", "hotel", "pizza", "show", "book",
         "game", "concert", "view", "garden", "soup", "bread", "waiter", "beach", "shop", "train", "park",
         "cake", "museum"]
ADJECTIVE_PAIRS = [(i, j) for i in range(len(POSITIVE)) for j in range(len(POSITIVE)) if i != j]

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum",
              "kiwi", "lime", "papaya", "apricot", "fig"],
    "animal": ["horse", "tiger", "rabbit", "zebra", "mouse", "camel", "sheep", "eagle", "whale", "shark",
               "goat", "donkey", "otter", "wolf", "panda"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
              "violet", "teal", "maroon", "beige", "crimson"],
    "vehicle": ["car", "bus", "truck", "bicycle", "tram", "boat", "ship", "plane", "taxi", "scooter",
                "tractor", "van", "jeep", "helicopter", "canoe"],
}
CATEGORY_TRIPLES = list(permutations(range(15), 3))  # three distinct words of one category, in order

COMPARE_PAIRS = list(combinations(range(10, 100), 2))  # (smaller, larger)

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
TWO_SYLLABLE_WORDS = len(SYLLABLES) ** 2
CASES = {"upper": str.upper, "lower": str.lower, "title": str.capitalize}
ARITHMETIC_OFFSETS = [-11, -10, -2, -1, 1, 2, 10, 11]


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    labels: list[str]
    problem_count: int
    # (problem id, index of the correct label, rng for distractor order) -> instruction
    render: Callable[[int, int, random.Random], str]


def _sentiment(problem: int, label: int, rng: random.Random) -> str:
    noun, (i, j) = NOUNS[problem // len(ADJECTIVE_PAIRS)], ADJECTIVE_PAIRS[problem % len(ADJECTIVE_PAIRS)]
    words = POSITIVE if label == 0 else NEGATIVE
    return (f"Review: The {noun} was {words[i]} and {words[j]}.\nIs this review positive or negative?\n"
            "Answer format: positive/negative")


def _compare(problem: int, label: int, rng: random.Random) -> str:
    smaller, larger = COMPARE_PAIRS[problem]
    first, second = (larger, smaller) if label == 0 else (smaller, larger)
    return f"Is {first} larger than {second}?\nAnswer format: yes/no"


def _category(problem: int, label: int, rng: random.Random) -> str:
    words = list(CATEGORIES.values())[label]
    listed = ", ".join(words[i] for i in CATEGORY_TRIPLES[problem])
    return f'Which category fits "{listed}"?\nAnswer format: {"/".join(CATEGORIES)}'


def pseudo_word(problem: int) -> str:
    """Problem ids below 70^2 are two-syllable words, the rest three-syllable words."""
    if problem < TWO_SYLLABLE_WORDS:
        return SYLLABLES[problem // len(SYLLABLES)] + SYLLABLES[problem % len(SYLLABLES)]
    rest = problem - TWO_SYLLABLE_WORDS
    first, rest = divmod(rest, len(SYLLABLES) ** 2)
    return SYLLABLES[first] + SYLLABLES[rest // len(SYLLABLES)] + SYLLABLES[rest % len(SYLLABLES)]


def _case(problem: int, label: int, rng: random.Random) -> str:
    word = list(CASES.values())[label](pseudo_word(problem))
    return f'Which case is "{word}" written in?\nAnswer format: upper/lower/title'


def _arithmetic(problem: int, label: int, rng: random.Random) -> str:
    a, b = 10 + problem // 90, 10 + problem % 90
    options = [a + b + offset for offset in rng.sample(ARITHMETIC_OFFSETS, 3)]
    options.insert(label, a + b)
    return choices_instruction(f"What is {a} + {b}?", [str(n) for n in options], block_gap="\n")


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in [
        SyntheticTask("sentiment", ["positive", "negative"], len(NOUNS) * len(ADJECTIVE_PAIRS), _sentiment),
        SyntheticTask("category", list(CATEGORIES), len(CATEGORY_TRIPLES), _category),
        SyntheticTask("case", list(CASES), TWO_SYLLABLE_WORDS + len(SYLLABLES) ** 3, _case),
        SyntheticTask("compare", ["yes", "no"], len(COMPARE_PAIRS), _compare),
        SyntheticTask("arithmetic", numbered_labels("answer", 4), 90 * 90, _arithmetic),
    ]
}


def balanced_labels(count: int, num_labels: int, rng: random.Random) -> list[int]:
    """Label indices, each used floor or ceil of count / num_labels times, in random order."""
    labels = [i % num_labels for i in range(count)]
    rng.shuffle(labels)
    return labels


def generate_task(name: str, train_size: int, eval_size: int, seed: int) -> RawTask:
    task = SYNTHETIC_TASKS[name]
    if train_size + eval_size > task.problem_count:
        raise ConfigError(
            f"data.train_per_task + data.eval_per_task = {train_size + eval_size} exceeds the "
            f"{task.problem_count} distinct problems of synthetic task {name!r}"
        )
    rng = random.Random(f"malora-synthetic:{name}:{seed}")
    problems = rng.sample(range(task.problem_count), train_size + eval_size)
    label_indices = (balanced_labels(train_size, len(task.labels), rng)
                     + balanced_labels(eval_size, len(task.labels), rng))
    pairs = [(task.render(problem, label, rng), task.labels[label])
             for problem, label in zip(problems, label_indices)]
    return RawTask(name=name, labels=list(task.labels), train=pairs[:train_size], eval=pairs[train_size:])
