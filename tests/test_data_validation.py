"""data.validation_fraction / data.eval_split: a validation split carved from each task's training
examples, deterministic (the same in every run and seed), disjoint from what trains, and what evaluation
scores with data.eval_split=validation (issue 27.1: the learning rate chosen without the test set)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from malora_train.config import DataConfig
from malora_train.data.rendering import RawTask
from malora_train.data.tasks import read_tasks, validation_split
from malora_train.errors import ConfigError


def synthetic(**keys) -> DataConfig:
    return DataConfig(name="synthetic", source="synthetic", train_per_task=200, eval_per_task=20, **keys)


def test_the_validation_split_is_carved_from_training_deterministic_and_disjoint():
    plain = read_tasks(synthetic(), seed=0)
    carved = read_tasks(synthetic(validation_fraction=0.1), seed=0)
    scored = read_tasks(synthetic(validation_fraction=0.1, eval_split="validation"), seed=0)
    for name, raw in plain.items():
        train, test = carved[name].train, carved[name].eval
        validation = scored[name].eval
        assert test == raw.eval  # the test split is untouched
        assert scored[name].train == train  # the same examples train whichever split is scored
        assert len(validation) == math.ceil(0.1 * len(raw.train))
        assert sorted(train + validation) == sorted(raw.train)  # every training example on one side
        assert not {p[0] for p in validation} & {p[0] for p in train}  # never trained on
        # the same split again, and in the file order of the training examples
        assert read_tasks(synthetic(validation_fraction=0.1, eval_split="validation"), seed=0)[name].eval \
            == validation
        assert [p for p in raw.train if p in validation] == validation


def test_the_split_depends_on_the_examples_not_on_their_order_or_the_seed():
    pairs = [(f"question {i}", "yes" if i % 2 else "no") for i in range(100)]
    raw = RawTask(name="t", labels=["no", "yes"], train=pairs)
    _, validation = validation_split(raw, 0.2)
    _, shuffled = validation_split(dataclasses.replace(raw, train=pairs[::-1]), 0.2)
    assert sorted(validation) == sorted(shuffled) and len(validation) == 20
    _, other_task = validation_split(dataclasses.replace(raw, name="u"), 0.2)
    assert sorted(other_task) != sorted(validation)  # salted by the task's name


@pytest.mark.parametrize(("keys", "message"), [
    ({"validation_fraction": 1.0}, r"data.validation_fraction=1.0 must be in \[0, 1\)"),
    ({"eval_split": "dev"}, "data.eval_split='dev' is not one of test, validation"),
    ({"eval_split": "validation"}, "data.eval_split=validation needs a validation split"),
])
def test_the_settings_are_checked(keys, message):
    with pytest.raises(ConfigError, match=message):
        read_tasks(synthetic(**keys), seed=0)
