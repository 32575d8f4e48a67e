"""TaskMixture: target frequencies, determinism, exact resume, caps/weights, per-task epochs, errors."""

import json
import math
from collections import Counter

import pytest

from malora_train.data.mixture import TaskMixture, mixture_probabilities
from malora_train.errors import ConfigError

SIZES = {"small": 100, "medium": 300, "large": 600}
DRAWS = 10_000


def observed_frequencies(mixture: TaskMixture, draws: int = DRAWS) -> dict[str, float]:
    counts = Counter(mixture.names[mixture.draw()[0]] for _ in range(draws))
    return {name: counts[name] / draws for name in mixture.names}


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ("proportional", {"small": 0.1, "medium": 0.3, "large": 0.6}),
        ("uniform", {"small": 1 / 3, "medium": 1 / 3, "large": 1 / 3}),
        # temperature T=2: p ∝ sqrt(n)
        ("temperature", {name: math.sqrt(n) / sum(math.sqrt(m) for m in SIZES.values())
                         for name, n in SIZES.items()}),
    ],
)
def test_frequencies_match_targets(sampling, expected):
    mixture = TaskMixture(SIZES, sampling=sampling, temperature=2.0, seed=3)
    assert mixture.probabilities == pytest.approx(expected, abs=1e-12)
    observed = observed_frequencies(mixture)
    for name in SIZES:
        assert abs(observed[name] - expected[name]) < 0.02, (name, observed)


def test_temperature_interpolates_between_proportional_and_uniform():
    low = mixture_probabilities(SIZES, "temperature", temperature=1.0)
    high = mixture_probabilities(SIZES, "temperature", temperature=1000.0)
    assert low == pytest.approx(mixture_probabilities(SIZES, "proportional"))
    assert high == pytest.approx(mixture_probabilities(SIZES, "uniform"), abs=1e-3)


def test_caps_and_weights():
    sizes = {"a": 100, "b": 10_000}
    capped = TaskMixture(sizes, caps={"b": 100}, seed=0)
    assert capped.probabilities == pytest.approx({"a": 0.5, "b": 0.5})
    weighted = TaskMixture(sizes, caps={"b": 100}, weights={"a": 3.0}, seed=0)
    assert weighted.probabilities == pytest.approx({"a": 0.75, "b": 0.25})
    observed = observed_frequencies(weighted)
    assert abs(observed["a"] - 0.75) < 0.02
    # the cap only changes the probability: examples still come from the whole task
    big_indices = {index for task, index in (weighted.draw() for _ in range(DRAWS)) if task == 1}
    assert max(big_indices) > 100


def test_zero_weight_task_is_never_drawn():
    mixture = TaskMixture({"a": 10, "b": 10, "c": 10}, weights={"b": 0.0, "c": 0.0}, seed=1)
    assert {mixture.draw()[0] for _ in range(2000)} == {0}


def test_deterministic_for_a_seed():
    a, b, c = TaskMixture(SIZES, seed=7), TaskMixture(SIZES, seed=7), TaskMixture(SIZES, seed=8)
    run_a = [a.draw() for _ in range(500)]
    assert run_a == [b.draw() for _ in range(500)]
    assert run_a != [c.draw() for _ in range(500)]


@pytest.mark.parametrize("sampling", ["proportional", "temperature"])
def test_resume_gives_identical_continuation(sampling):
    sizes = {"a": 7, "b": 13, "c": 29}  # small: the resume point falls mid-epoch after several wraps
    reference = TaskMixture(sizes, sampling=sampling, seed=11)
    uninterrupted = [reference.draw() for _ in range(1000)]
    first = TaskMixture(sizes, sampling=sampling, seed=11)
    for _ in range(333):
        first.draw()
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = TaskMixture(sizes, sampling=sampling, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.draw() for _ in range(667)] == uninterrupted[333:]
    assert resumed.epochs == reference.epochs


def test_resume_refuses_other_tasks_or_seed():
    state = TaskMixture({"a": 5, "b": 6}, seed=0).state_dict()
    with pytest.raises(ConfigError, match="cannot resume"):
        TaskMixture({"a": 5, "b": 7}, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="cannot resume"):
        TaskMixture({"a": 5, "b": 6}, seed=1).load_state_dict(state)


def test_each_epoch_is_a_fresh_permutation_and_epochs_count_draws():
    sizes = {"a": 5, "b": 7}
    mixture = TaskMixture(sizes, sampling="uniform", seed=2)
    per_task: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(400):
        task, index = mixture.draw()
        per_task[task].append(index)
    for task, size in enumerate(sizes.values()):
        drawn = per_task[task]
        epochs = [drawn[i:i + size] for i in range(0, len(drawn) - size + 1, size)]
        assert len(epochs) >= 20
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs)  # each example once an epoch
        assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled when the epoch wraps
        assert mixture.epochs[mixture.names[task]] == pytest.approx(len(drawn) / size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling": "balanced"}, "data.sampling"),
        ({"sampling": "temperature", "temperature": 0.0}, "data.temperature"),
        ({"sampling": "temperature", "temperature": -1.0}, "data.temperature"),
        ({"weights": {"nope": 1.0}}, "data.task_weights names unknown task 'nope'"),
        ({"caps": {"nope": 10}}, "data.task_caps names unknown task 'nope'"),
        ({"weights": {"a": -1.0}}, "data.task_weights.a"),
        ({"weights": {"a": 0.0, "b": 0.0}}, "every task weight 0"),
        ({"caps": {"a": 0}}, "data.task_caps.a"),
    ],
)
def test_bad_options_fail_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TaskMixture({"a": 5, "b": 6}, **kwargs)
