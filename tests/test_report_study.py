"""malora-report's study parts on hand-made run folders: the paired comparison over seeds (checked against a
computation written out here and against printed t tables), several sweeps in one report, step time, and
the routing section (shares, entropies and the mutual information computed here by hand)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from malora_train.commands.report import main
from malora_train.commands.study_routing import routing_markdown
from malora_train.commands.study_stats import LARGER, WITHIN, paired_comparison, t_quantile, two_sided_p

TASKS = ("boolq", "piqa")


def write_run(job_dir: Path, overrides: list[str], kind: str, accuracy: dict[str, float],
              train_time_s: float = 4.0, routing: dict | None = None) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "metrics.jsonl").write_text(json.dumps({"step": 8, "lm_loss": 1.0}) + "\n")
    summary = {"status": "completed", "adapter": kind, "steps": 8, "train_time_s": train_time_s,
               "tokens_per_s": 100.0, "trainable_params": 1000 if kind == "lora" else 1200,
               "eval_after": accuracy, "eval_after_average": statistics.fmean(accuracy.values())}
    (job_dir / "summary.json").write_text(json.dumps(summary))
    if routing is not None:
        (job_dir / "routing.json").write_text(json.dumps(routing))


def make_sweep(root: Path, methods: dict[str, list[float]], variant_key: str = "+variant") -> Path:
    """One run per method and seed; ``methods[name][seed]`` is the run's average accuracy (boolq gets it + 1,
    piqa it - 1)."""
    for name, averages in methods.items():
        for seed, average in enumerate(averages):
            overrides = [f"{variant_key}={name}", f"seed={seed}"]
            write_run(root / f"{name}_{seed}", overrides, "lora" if name == "lora" else "malora",
                      {"boolq": average + 1, "piqa": average - 1})
    return root


def comparison_line(report: str, first: str, second: str) -> list[str]:
    line = next(line for line in report.splitlines()
                if line.startswith(f"| `+variant={first}` | `+variant={second}`"))
    return [cell.strip() for cell in line.strip("|").split("|")]


# -- the statistics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("df", "printed"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                             (29, 2.045)])
def test_t_quantile_matches_the_printed_table(df: int, printed: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-4)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 9.0])
def test_p_value_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t: float) -> None:
    assert two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)  # Cauchy
    assert two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


def test_paired_comparison_by_hand_both_verdicts() -> None:
    a = {"0": 61.0, "1": 58.5, "2": 63.2}
    steady = {"0": 59.0, "1": 56.4, "2": 61.3}  # A - B = 2.0, 2.1, 1.9
    noisy = {"0": 58.0, "1": 60.5, "2": 62.7}  # A - B = 3.0, -2.0, 0.5
    for b, verdict in ((steady, LARGER), (noisy, WITHIN)):
        differences = [a[s] - b[s] for s in ("0", "1", "2")]
        mean, std = (sum(differences) / 3,
                     math.sqrt(sum((d - sum(differences) / 3) ** 2 for d in differences) / 2))
        result = paired_comparison("A", "B", a, b)
        assert result.differences == pytest.approx(differences)
        assert (result.mean, result.std) == pytest.approx((mean, std))
        assert result.t == pytest.approx(mean / (std / math.sqrt(3)))
        assert result.critical_t == pytest.approx(4.303, abs=5e-4)
        assert result.verdict == verdict
        assert (abs(result.t) > 4.303) == (verdict == LARGER)
    assert paired_comparison("A", "B", a, noisy).wins == 2
    identical = paired_comparison("A", "B", {"0": 2.0, "1": 3.0}, {"0": 1.0, "1": 2.0})  # std 0, mean 1
    assert (identical.t, identical.verdict) == (math.inf, LARGER)
    assert paired_comparison("A", "B", {"0": 1.0, "1": 2.0}, {"0": 1.0, "1": 2.0}).verdict == WITHIN
    assert paired_comparison("A", "B", {"0": 1.0}, {"1": 1.0}) is None


# -- the report -------------------------------------------------------------------------------------------

def test_report_prints_the_paired_comparison_of_every_two_configurations(tmp_path: Path, capsys) -> None:
    root = make_sweep(tmp_path / "sweep", {"lora": [59.0, 56.4, 61.3], "malora": [61.0, 58.5, 63.2],
                                            "molora": [62.0, 54.5, 61.8]})
    main([str(root)])
    report = capsys.readouterr().out
    malora_lora = comparison_line(report, "malora", "lora")
    assert malora_lora[2:5] == ["3", "0: +2.00, 1: +2.10, 2: +1.90", "+2.00 ± 0.10"]
    assert malora_lora[5] == f"{2.0 / (0.1 / math.sqrt(3)):.2f}"
    assert (malora_lora[7], malora_lora[8]) == ("3/3", LARGER)
    # molora - lora = 3.0, -1.9, 0.5: the better mean first, within the noise
    molora_lora = comparison_line(report, "molora", "lora")
    assert molora_lora[4] == (f"+{statistics.fmean([3.0, -1.9, 0.5]):.2f} ± "
                              f"{statistics.stdev([3.0, -1.9, 0.5]):.2f}")
    assert (molora_lora[7], molora_lora[8]) == ("2/3", WITHIN)
    assert sum(line.startswith("| `+variant=") and "seed noise" in line for line in report.splitlines()) == 3
    step_time = [c.strip() for c in next(row for row in report.splitlines()
                                         if row.startswith("| `+variant=lora`"))
                 .strip("|").split("|")][-1]
    assert step_time == "0.500 ± 0.000"  # 4 s of training over 8 steps, each seed


def test_two_sweeps_are_reported_together_and_paired_by_seed(tmp_path: Path, capsys) -> None:
    first = make_sweep(tmp_path / "commonsense", {"lora": [50.0, 52.0], "malora_intra": [51.0, 54.0]})
    second = make_sweep(tmp_path / "ablations", {"malora_lam025": [50.5, 53.0]})
    main([str(first), str(second), "--out", str(tmp_path / "report")])
    report = capsys.readouterr().out
    assert comparison_line(report, "malora_intra", "malora_lam025")[3] == "0: +0.50, 1: +1.00"
    assert (tmp_path / "report" / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert not (first / "report.md").exists()


def routing_file(layers: dict[str, list[list[float]]], tokens: dict[str, int]) -> dict:
    names = list(layers)
    average = [[sum(layers[n][t][e] for n in names) / len(names) for e in range(4)] for t in range(2)]
    return {"tasks": list(TASKS), "num_experts": 4, "top_k": 2, "dense": False, "tokens": tokens,
            "layers": layers, "average": average}


def test_routing_section_shares_entropy_and_mutual_information(tmp_path: Path, capsys) -> None:
    # layer 0: boolq on experts 0-1 and piqa on 2-3 (disjoint): entropies 1 bit, I = 1 bit with equal tokens;
    # layer 1: both tasks spread alike over all four: entropies 2 bits, I = 0. Two modules per layer, and
    # the second seed routes layer 1 the same way, so the seed mean is the same table.
    split, spread = [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], [[0.25] * 4, [0.25] * 4]
    layers = {"model.layers.0.self_attn.q_proj": split, "model.layers.0.mlp.up_proj": split,
              "model.layers.1.self_attn.q_proj": spread, "model.layers.1.mlp.up_proj": spread}
    for seed in (0, 1):
        write_run(tmp_path / f"malora_{seed}", ["+variant=malora", f"seed={seed}"], "malora",
                  {"boolq": 60.0, "piqa": 50.0}, routing=routing_file(layers, {"boolq": 30, "piqa": 30}))
    write_run(tmp_path / "lora_0", ["+variant=lora", "seed=0"], "lora", {"boolq": 60.0, "piqa": 50.0})
    main([str(tmp_path)])
    report = capsys.readouterr().out
    section = report.split("### Routing", 1)[1]
    assert "+variant=lora" not in section  # no mixture, no routing
    lines = section.splitlines()
    assert "| boolq | 37.5 | 37.5 | 12.5 | 12.5 |" in lines  # (50 + 25) / 2 over the two layers
    assert "| 0 | 1.00 | 1.00 | 1.000 |" in lines
    assert "| 1 | 2.00 | 2.00 | 0.000 |" in lines
    # unequal tokens: I = H(marginal) - mean H(row) with weights 3/4, 1/4
    # (layer 0 marginal .375,.375,.125,.125)
    for seed in (0, 1):
        (tmp_path / f"malora_{seed}" / "routing.json").write_text(
            json.dumps(routing_file(layers, {"boolq": 90, "piqa": 30})))
    main([str(tmp_path)])
    marginal = [0.375, 0.375, 0.125, 0.125]
    expected = -sum(p * math.log2(p) for p in marginal) - 1.0
    assert f"| 0 | 1.00 | 1.00 | {expected:.3f} |" in capsys.readouterr().out.splitlines()


def test_routing_bounds_mutual_information_by_the_fewer_of_tasks_and_experts() -> None:
    # I(task; expert) <= min(H(task), H(expert)): 11 tasks on 8 experts can share at most 3 bits, not log2 11
    tasks = [f"task{t}" for t in range(11)]
    routing = {"tasks": tasks, "num_experts": 8, "seeds": 1, "top_k": 2, "share": [[1 / 8] * 8] * 11,
               "layers": [{"layer": 0, "entropy": [3.0] * 11, "mutual_information": 0.0}]}
    assert "(max 3.00 and 3.00)" in routing_markdown("+variant=molora", routing)
    assert "(max 3.00 and 1.00)" in routing_markdown("+variant=molora", {**routing, "tasks": tasks[:2]})
