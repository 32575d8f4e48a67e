"""Behaviours that planted bugs showed no test covered (issue 26): each test here fails when the behaviour
is broken."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from malora_train.data.packing import pack_rows
from malora_train.labels import loss_targets
from malora_train.train.step_stats import WindowStats


def window_tokens(host: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, int]:
    """tokens/<task> of a logging window holding one forward of ``host``."""
    window = WindowStats(tasks, [], torch.device("cpu"))
    host = {**host, **loss_targets(host["labels"], host["task_ids"])}
    k = host["loss_task"].numel()
    out = types.SimpleNamespace(loss_task=host["loss_task"], token_loss=torch.ones(k),
                                aux_loss=torch.zeros(()), balance_loss=None, router_entropy=None,
                                layer_balance=None, loss=torch.ones(()))
    window.add_forward(out, host)
    window.add_step(int(host["attention_mask"].sum()), k, None)
    metrics, _, _ = window.read(lambda t: t, 1, False)
    return {task: metrics[f"tokens/{task}"] for task in tasks}


def test_per_task_token_counts_under_packing_leave_the_padding_out():
    # row 0: an example of task 1 (5 tokens) and one of task 2 (3 tokens), 8 padding tokens; row 1: task 1 (4
    # tokens), 12 padding tokens. The padding's task id is 0: counting it would credit task 0 with 20 tokens.
    def example(n: int, task: int) -> tuple[torch.Tensor, int, int]:  # n tokens, a 2-token prompt
        return torch.arange(3, 3 + n), 2, task

    packed = pack_rows([[example(5, 1), example(3, 2)], [example(4, 1)]], 16, pad_token_id=0)
    assert window_tokens(packed, ["t0", "t1", "t2"]) == {"t0": 0, "t1": 9, "t2": 3}


def test_per_task_token_counts_of_padded_rows_leave_the_padding_out():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.where(mask.bool(), torch.tensor([[-100, 5, 6, 0, 0]] * 3), torch.tensor(-100))
    host = {"input_ids": torch.ones_like(mask), "attention_mask": mask, "labels": labels,
            "task_ids": torch.tensor([0, 1, 0])}
    assert window_tokens(host, ["t0", "t1"]) == {"t0": 5, "t1": 5}


# -- the numeric scorer at its tolerance ------------------------------------------------------------------

@pytest.mark.parametrize(("tolerance", "generated", "gold", "correct"), [
    (0.0, "the answer is 18.0", "18", True),  # equal numbers, written differently
    (0.0, "the answer is 18.0001", "18", False),  # tolerance 0: exact, however close
    (0.5, "the answer is 2.5", "2", True),  # exactly at the tolerance (binary-exact numbers): correct
    (0.5, "the answer is 1.5", "2", True),
    (0.5, "the answer is 2.50001", "2", False),  # just past it
    (0.25, "the answer is 1.75", "2", True),
    (0.25, "the answer is 1.74", "2", False),
])
def test_the_numeric_scorer_at_its_tolerance(monkeypatch, tolerance, generated, gold, correct):
    """Through ``evaluate`` (generation replaced by the text given), so ``eval.number_tolerance`` is the
    value the scorer uses, 0 included."""
    from malora_train.config import EvalConfig
    from malora_train.data.tasks import TaskData
    from malora_train.data.types import Example
    evaluate_module = importlib.import_module("malora_train.eval.evaluate")

    example = Example("math", "q", f"The answer is {gold}", gold)
    task = TaskData("math", [], "The answer is ", "", eval=[example], answer_type="number")
    monkeypatch.setattr(evaluate_module, "_score", lambda *args, **kwargs: [generated])
    cfg = EvalConfig(scorer="generate", number_tolerance=tolerance)
    result = evaluate_module.evaluate(torch.nn.Linear(1, 1), None, {"math": task}, cfg)
    [prediction] = result.predictions["math"]
    assert prediction.correct is correct
    assert result.scores["math"].correct == int(correct)


# -- the paired t-test ------------------------------------------------------------------------------------

# 2 * scipy.stats.t.sf(t, df) (scipy 1.17.1); the 0.05 rows are the textbook two-sided 5% critical values
# (t_{0.975, 3} = 3.182446, t_{0.975, 9} = 2.262157)
T_REFERENCES = [
    (0.5, 3, 0.651447964848151),
    (2.0, 4, 0.11611652351681556),
    (3.182446305284263, 3, 0.05),
    (1.0, 9, 0.3434363961379136),
    (2.262157162740992, 9, 0.05),
    (4.5, 7, 0.0027983300778426316),
    (0.1, 30, 0.9210096117902712),
    (2.5, 29, 0.018325344338426086),
    (6.0, 5, 0.0018461382895940143),
]


@pytest.mark.parametrize(("t", "df", "p"), T_REFERENCES)
def test_the_t_tests_p_value_matches_reference_values(t, df, p):
    from malora_train.commands.study_stats import t_quantile, two_sided_p

    assert two_sided_p(t, df) == pytest.approx(p, rel=1e-8)
    assert two_sided_p(-t, df) == pytest.approx(p, rel=1e-8)
    if p == 0.05:
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-8)


def test_the_paired_comparison_matches_a_reference_paired_t_test():
    from malora_train.commands.study_stats import LARGER, paired_comparison

    a = {"0": 71.2, "1": 69.8, "2": 70.5, "3": 72.0, "4": 70.9}
    b = {"0": 70.1, "1": 69.9, "2": 69.7, "3": 71.2, "4": 70.0}
    result = paired_comparison("A", "B", a, b)
    # scipy.stats.ttest_rel(a, b) (scipy 1.17.1): statistic 3.3756997551928425, pvalue 0.027896171107907666
    assert result.t == pytest.approx(3.3756997551928425, rel=1e-9)
    assert result.p_value == pytest.approx(0.027896171107907666, rel=1e-8)
    assert result.verdict == LARGER and (result.wins, result.losses) == (4, 1)


# -- preflight's ranges ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["max_grad_norm", "weight_decay"])
def test_preflight_refuses_a_negative_max_grad_norm_or_weight_decay(key):
    """A negative ``max_grad_norm`` would silently turn clipping off; a negative weight decay grows the
    weights. 0 is allowed (no clipping, no decay)."""
    from malora_train.cli import compose
    from malora_train.errors import ConfigError
    from malora_train.train.preflight import check_config

    check_config(compose(["model=tiny", f"trainer.{key}=0"]))
    with pytest.raises(ConfigError, match=rf"^trainer.{key}=-0.5 must be >= 0$"):
        check_config(compose(["model=tiny", f"trainer.{key}=-0.5"]))
