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
NEGATIVE = set("awful bland stale rude dirty terrible boring noisy greasy horrible dreadful cold broken "
               "smelly gloomy nasty".split())
CATEGORY_OF = {word: category for category, words in {
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum kiwi lime papaya apricot fig",
    "animal": "horse tiger rabbit zebra mouse camel sheep eagle whale shark goat donkey otter wolf panda",
    "color": "red blue green yellow purple pink brown black white gray violet teal maroon beige crimson",
    "vehicle": "car bus truck bicycle tram boat ship plane taxi scooter tractor van jeep helicopter canoe",
}.items() for word in words.split()}


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
        first, second = map(int, re.search(r"Is (\d+) larger than (\d+)\?", prompt).groups())
        assert first != second
        return "yes" if first > second else "no"
    if task == "category":
        words = re.search(r'Which category fits "(\w+), (\w+), (\w+)"\?', prompt).groups()
        assert len(set(words)) == 3 and len({CATEGORY_OF[word] for word in words}) == 1
        return CATEGORY_OF[words[0]]
    if task == "case":
        word = re.search(r'Which case is "([A-Za-z]+)" written in\?', prompt).group(1)
        cases = [name for name, form in (("upper", word.upper()), ("lower", word.lower()),
                                         ("title", word[0].upper() + word[1:].lower())) if form == word]
        assert len(cases) == 1
        return cases[0]
    if task == "arithmetic":
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        listed = [int(value) for value in options(prompt, "Answer")]
        assert listed.count(a + b) == 1 and len(set(listed)) == 4
        return f"answer{listed.index(a + b) + 1}"
    raise AssertionError(task)


def test_the_tasks_and_their_label_sets(tasks):
    assert {name: task.labels for name, task in tasks.items()} == {
        "sentiment": ["positive", "negative"],
        "category": ["fruit", "animal", "color", "vehicle"],
        "case": ["upper", "lower", "title"],
        "compare": ["yes", "no"],
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


def test_problems_never_repeat_across_splits(tasks):
    patterns = {"arithmetic": r"What is (\d+ \+ \d+)", "case": r'"(\w+)"'}
    for name, pattern in patterns.items():
        problems = [re.search(pattern, e.prompt).group(1).lower()
                    for e in tasks[name].train + tasks[name].eval]
        assert len(set(problems)) == len(problems), name
    pairs = [frozenset(re.findall(r"\d+", e.prompt)) for e in tasks["compare"].train + tasks["compare"].eval]
    assert len(set(pairs)) == len(pairs)


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
    with pytest.raises(ConfigError, match="known tasks: sentiment, category, case, compare, arithmetic"):
        synthetic(tasks=["sudoku"])
    with pytest.raises(ConfigError, match="exceeds the 4005 distinct problems of synthetic task 'compare'"):
        synthetic(tasks=["compare"], train_per_task=4000, eval_per_task=48)
