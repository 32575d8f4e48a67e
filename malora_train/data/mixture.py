"""Which task the next training example comes from (proportional, uniform or temperature sampling), and
which example of it: a seeded permutation per task, reshuffled each time that task's epoch wraps."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from malora_train.errors import ConfigError, DataError

SAMPLING = ("proportional", "uniform", "temperature")


def check_mixture_options(names: Sequence[str], sampling: str, temperature: float,
                          weights: Mapping[str, float] | None, caps: Mapping[str, int] | None) -> None:
    if sampling not in SAMPLING:
        raise ConfigError(f"data.sampling={sampling!r} is not one of {', '.join(SAMPLING)}")
    if sampling == "temperature" and not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"data.temperature={temperature} must be a positive number "
                          "for data.sampling=temperature")
    for key, mapping in (("data.task_weights", weights or {}), ("data.task_caps", caps or {})):
        unknown = [name for name in mapping if name not in names]
        if unknown:
            raise ConfigError(f"{key} names unknown task {unknown[0]!r} (tasks: {', '.join(names)})")
    for name, weight in (weights or {}).items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"data.task_weights.{name}={weight!r} must be a number >= 0")
    if weights and all(weights.get(name, 1.0) == 0 for name in names):
        raise ConfigError("data.task_weights gives every task weight 0")
    for name, cap in (caps or {}).items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"data.task_caps.{name}={cap!r} must be a whole number >= 1")


def mixture_probabilities(sizes: Mapping[str, int], sampling: str = "proportional", temperature: float = 2.0,
                          weights: Mapping[str, float] | None = None,
                          caps: Mapping[str, int] | None = None) -> dict[str, float]:
    """p_task: proportional p ∝ n, uniform p = 1/T, temperature p ∝ n^(1/T); a cap replaces n by min(n, cap)
    first; weights multiply the result, which is then renormalised."""
    caps, weights = caps or {}, weights or {}
    sizes_capped = {name: min(size, caps.get(name, size)) for name, size in sizes.items()}
    if sampling == "uniform":
        raw = {name: 1.0 for name in sizes}
    elif sampling == "temperature":
        raw = {name: float(size) ** (1.0 / temperature) for name, size in sizes_capped.items()}
    else:
        raw = {name: float(size) for name, size in sizes_capped.items()}
    weighted = {name: value * weights.get(name, 1.0) for name, value in raw.items()}
    total = sum(weighted.values())
    return {name: value / total for name, value in weighted.items()}


class TaskMixture:
    """Draws (task index, example index) pairs; deterministic for a seed and exactly resumable.

    The task choice uses one seeded generator whose state is saved; the order within a task is a
    permutation derived from (seed, task, epoch), so it never needs saving, only the per-task draw counts.
    """

    def __init__(self, sizes: Mapping[str, int], sampling: str = "proportional", temperature: float = 2.0,
                 weights: Mapping[str, float] | None = None, caps: Mapping[str, int] | None = None,
                 seed: int = 0):
        self.names = list(sizes)
        check_mixture_options(self.names, sampling, temperature, weights, caps)
        for name, size in sizes.items():
            if size < 1:
                raise DataError(f"task {name} has no training examples")
        self.sizes = [int(sizes[name]) for name in self.names]
        self.seed = seed
        self.probabilities = mixture_probabilities(sizes, sampling, temperature, weights, caps)
        self._cumulative = list(itertools.accumulate(self.probabilities[name] for name in self.names))
        self._last_sampled = max(i for i, name in enumerate(self.names) if self.probabilities[name] > 0)
        self._rng = random.Random(f"malora-mixture:{seed}")
        self._drawn = [0] * len(self.names)
        self._permutations: dict[int, tuple[int, list[int]]] = {}  # task -> (epoch, order); a cache

    def draw(self) -> tuple[int, int]:
        task = bisect.bisect_right(self._cumulative, self._rng.random() * self._cumulative[-1])
        task = min(task, self._last_sampled)  # float rounding can leave the draw at the very end
        epoch, position = divmod(self._drawn[task], self.sizes[task])
        self._drawn[task] += 1
        return task, self._permutation(task, epoch)[position]

    def _permutation(self, task: int, epoch: int) -> list[int]:
        cached = self._permutations.get(task)
        if cached is None or cached[0] != epoch:
            order = list(range(self.sizes[task]))
            random.Random(f"malora-mixture:{self.seed}:{self.names[task]}:{epoch}").shuffle(order)
            cached = self._permutations[task] = (epoch, order)
        return cached[1]

    @property
    def epochs(self) -> dict[str, float]:
        """Examples drawn so far divided by the task's size."""
        return {name: drawn / size for name, drawn, size in zip(self.names, self._drawn, self.sizes)}

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"seed": self.seed, "names": list(self.names), "sizes": list(self.sizes),
                "drawn": list(self._drawn), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = (list(state["names"]), list(state["sizes"]), state["seed"])
        if saved != (self.names, self.sizes, self.seed):
            raise ConfigError(
                "cannot resume the task mixture: the checkpoint was made with tasks "
                f"{dict(zip(saved[0], saved[1]))} and seed {saved[2]}, this run has "
                f"{dict(zip(self.names, self.sizes))} and seed {self.seed}"
            )
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._drawn = [int(count) for count in state["drawn"]]
