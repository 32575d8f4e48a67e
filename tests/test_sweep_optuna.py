"""``hydra/sweeper=optuna_search``: Optuna draws the expert rank, the number of experts and the learning rate
from the preset's space, maximises the runs' average accuracy, and a failed trial does not end the study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

RANKS, EXPERTS = {4, 8, 16}, {4, 8, 16}


def trials(sweep_dir: Path) -> dict[Path, dict[str, str]]:
    """Each trial's folder and its overrides as key -> value."""
    found = {}
    for overrides in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        found[overrides.parent.parent] = dict(o.split("=", 1) for o in yaml.safe_load(overrides.read_text()))
    return found


# job folders are named by number: the drawn learning rate's digits make the default names too long

def test_the_preset_searches_rank_experts_and_lr_for_the_best_accuracy(tmp_path: Path, train_cli,
                                                                       tiny_training_overrides) -> None:
    sweep_dir = tmp_path / "multirun"
    status = train_cli("-m", "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=2",
                       *tiny_training_overrides, "trainer.max_steps=2", "data.eval_per_task=2",
                       "adapter=molora", f"hydra.sweep.dir={sweep_dir}",
                       "hydra.sweep.subdir=${hydra.job.num}")
    assert status == 0
    found = trials(sweep_dir)
    assert len(found) == 2
    accuracies = []
    for folder, overrides in found.items():
        assert int(overrides["adapter.rank"]) in RANKS and int(overrides["adapter.num_experts"]) in EXPERTS
        assert 1e-5 <= float(overrides["trainer.lr"]) <= 1e-3
        summary = json.loads((folder / "summary.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["adapter"]["rank"] == int(overrides["adapter.rank"])  # the drawn values were trained
        assert config["trainer"]["lr"] == float(overrides["trainer.lr"])
        accuracies.append(summary["eval_after_average"])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(accuracies)  # maximised: the objective is the average accuracy
    assert set(results["best_params"]) == {"adapter.rank", "adapter.num_experts", "trainer.lr"}


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path: Path, train_cli,
                                                          tiny_training_overrides) -> None:
    """The preset's search space replaced by one dimension, rank 0 or 2, and the sampler seeded so that the
    two trials draw both (checked below): rank 0 fails, rank 2 trains."""
    sweep_dir = tmp_path / "multirun"
    status = train_cli("-m", "hydra/sweeper=optuna_search", "hydra.sweeper.sampler.seed=0",
                       "hydra.sweeper.n_trials=2", "hydra.sweeper.params=null", "adapter.rank=choice(0,2)",
                       "adapter.num_experts=4", *tiny_training_overrides, "trainer.max_steps=1",
                       "data.eval_per_task=2", "adapter=molora", f"hydra.sweep.dir={sweep_dir}",
                       "hydra.sweep.subdir=${hydra.job.num}")
    assert status == 2  # the study finished; one trial failed
    found = trials(sweep_dir)
    assert sorted(o["adapter.rank"] for o in found.values()) == ["0", "2"]
    [failed] = [folder for folder, o in found.items() if o["adapter.rank"] == "0"]
    [completed] = [folder for folder, o in found.items() if o["adapter.rank"] == "2"]
    assert json.loads((failed / "failure.json").read_text())["error"] == "adapter.rank=0 must be >= 1"
    accuracy = json.loads((completed / "summary.json").read_text())["eval_after_average"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"adapter.rank": 2} and math.isclose(results["best_value"], accuracy)
