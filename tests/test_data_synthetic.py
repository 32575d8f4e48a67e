"""Synthetic tasks: deterministic, balanced, every label recomputed independently, disjoint splits."""

import re
from collections import Counter

import pytest

from malora_train.config import DataConfig
from malora_train.data import ANSWER_PREFIX, build_tasks
from malora_train.errors import ConfigError

# The test's own oracle lexicon (not imported from the module under test).
POSITIVE = set("great tasty fresh lovely friendly superb charming pleasant delightful excellent wonderful "
               "cheerful brilliant elegant cozy perfect".split())
NEGATIVE = set("awful bland stale rude dirty terrible boring noisy greasy horrible dreadful cold broken smelly "
               "gloomy nasty".split())


def synthetic(seed=0, **options):
    options = {"train_per_task": 400, "eval_per_task": 48, "prompt_template": "plain", **options}
    return build_tasks(DataConfig(source="synthetic", **options), seed=seed)


@pytest.fixture(scope="module")
def tasks():
    return synthetic()


def options(prompt: str, kind: str) -> list[str]:
    """The listed options in order, e.g. "Answer1: 68 Answer2: 58" -> ["68", "58"]."""
    line = next(line for line in prompt.splitlines() if line.startswith(f"{kind}1: "))
    return [value.strip() for value in re.split(rf"{kind}\d+: ", line)[1:]]


def expected_label(task: str, prompt: str) -> str:
    if task == "sentiment":
        first, second = re.search(r"was (\w+) and (\w+)\.", prompt).groups()
        assert {first, second} <= POSITIVE or {first, second} <= NEGATIVE
        return "positive" if first in POSITIVE else "negative"
    if task == "compare":
        numbers = [int(value) for value in options(prompt, "Option")]
        assert len(numbers) == 2 and numbers[0] != numbers[1]
        return f"option{numbers.index(max(numbers)) + 1}"
    if task == "uppercase":
        word = re.search(r'"(\w+)" in upper case', prompt).group(1)
        listed = options(prompt, "Answer")
        assert sum(option.isupper() for option in listed) == 1
        return f"answer{listed.index(word.upper()) + 1}"
    if task == "arithmetic":
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        listed = [int(value) for value in options(prompt, "Answer")]
        assert listed.count(a + b) == 1 and len(set(listed)) == 4
        return f"answer{listed.index(a + b) + 1}"
    raise AssertionError(task)


def test_the_four_tasks_and_their_label_sets(tasks):
    assert {name: task.labels for name, task in tasks.items()} == {
        "sentiment": ["positive", "negative"],
        "compare": ["option1", "option2"],
        "uppercase": ["answer1", "answer2", "answer3"],
        "arithmetic": ["answer1", "answer2", "answer3", "answer4"],
    }
    for task in tasks.values():
        assert len(task.train) == 400 and len(task.eval) == 48


def test_every_label_is_correct(tasks):
    for name, task in tasks.items():
        for example in task.train + task.eval:
            assert example.label == expected_label(name, example.prompt), example.prompt
            assert example.target == ANSWER_PREFIX + example.label
            assert example.task == name
            assert f"Answer format: {'/'.join(task.labels)}\n" in example.prompt
            assert re.search(task.label_pattern, example.target).group(0) == example.label


def test_labels_balanced_in_each_split(tasks):
    for task in tasks.values():
        for split in (task.train, task.eval):
            counts = Counter(example.label for example in split)
            assert set(counts) == set(task.labels)
            assert max(counts.values()) - min(counts.values()) <= 1


def test_train_and_eval_disjoint(tasks):
    for task in tasks.values():
        train_prompts = [example.prompt for example in task.train]
        assert len(set(train_prompts)) == len(train_prompts)
        assert not set(train_prompts) & {example.prompt for example in task.eval}


def test_arithmetic_and_compare_problems_never_repeat_across_splits(tasks):
    def problem(name, prompt):
        if name == "arithmetic":
            return re.search(r"What is (\d+ \+ \d+)", prompt).group(1)
        return frozenset(options(prompt, "Option"))

    for name in ("arithmetic", "compare"):
        problems = [problem(name, example.prompt) for example in tasks[name].train + tasks[name].eval]
        assert len(set(problems)) == len(problems)


def test_deterministic_for_a_seed(tasks):
    again, other = synthetic(seed=0), synthetic(seed=1)
    assert again == tasks
    assert all(other[name].train != tasks[name].train for name in tasks)


def test_prompts_are_short(tasks):
    # the default run trains on CPU: keep prompts compact (under 60 SmolLM2 tokens; about 160 characters)
    longest = max(len(example.prompt) for task in tasks.values() for example in task.train)
    assert longest <= 160


def test_subset_and_size_errors():
    assert list(synthetic(tasks=["arithmetic", "sentiment"])) == ["arithmetic", "sentiment"]
    with pytest.raises(ConfigError, match="known tasks: sentiment, compare, uppercase, arithmetic"):
        synthetic(tasks=["parity"])
    with pytest.raises(ConfigError, match="exceeds the 4005 distinct problems of synthetic task 'compare'"):
        synthetic(train_per_task=4000, eval_per_task=48)
