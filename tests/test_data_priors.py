"""malora_train/data/priors.py: what answering from the prior alone scores, on the examples a run
evaluates."""

import json
import re
from collections import Counter
from pathlib import Path

from malora_train.config import DataConfig
from malora_train.data import build_tasks
from malora_train.data.priors import TaskPrior, answer_priors, priors_markdown


def skewed_bigbench_task(root: Path, name: str, count: int) -> None:
    """Three fixed answer texts, "neutral" correct 7 times in 10; the loader shuffles their positions."""
    examples = []
    for i in range(count):
        correct = "neutral" if i % 10 < 7 else "supportive"
        scores = {text: int(text == correct) for text in ("neutral", "supportive", "unsupportive")}
        examples.append({"input": f"Post number {i}: how supportive is it?", "target_scores": scores})
    (root / name).mkdir(parents=True)
    (root / name / "task.json").write_text(json.dumps({"name": name, "examples": examples}))


def test_bigbench_prior_counts_answer_texts_not_shuffled_positions(tmp_path: Path) -> None:
    skewed_bigbench_task(tmp_path, "support", 200)
    cfg = DataConfig(source="bigbench", root=str(tmp_path), tasks=["support"], eval_fraction=0.3,
                     eval_per_task=50)
    [prior] = answer_priors(cfg)
    # independently: the evaluated examples as a run renders them, the correct text read from each prompt
    evaluated = build_tasks(cfg, seed=0)["support"].eval
    texts = [re.search(rf"Answer{int(e.label.removeprefix('answer'))}: (\w+)", e.prompt).group(1)
             for e in evaluated]
    (text, count), = Counter(texts).most_common(1)
    (label, label_count), = Counter(e.label for e in evaluated).most_common(1)
    assert prior == TaskPrior("support", 50, label, 100 * label_count / 50, text, 100 * count / 50)
    assert text == "neutral" and prior.answer_share > prior.label_share  # the positions hide the prior


def test_without_answer_texts_the_label_is_the_answer() -> None:
    cfg = DataConfig(source="synthetic", tasks=["sentiment", "category"], train_per_task=8, eval_per_task=12)
    priors = answer_priors(cfg, seed=3)
    for prior, task in zip(priors, build_tasks(cfg, seed=3).values()):
        (label, count), = Counter(e.label for e in task.eval).most_common(1)
        assert (prior.task, prior.examples, prior.label, prior.answer) == (task.name, 12, label, label)
        assert prior.label_share == prior.answer_share == 100 * count / 12


def test_markdown_keeps_one_row_a_task() -> None:
    long = "a | b\nc " + "x" * 80
    table = priors_markdown([TaskPrior("t", 4, "answer1", 50.0, long, 25.0)])
    row = table.splitlines()[2]
    assert row.startswith("| t | 4 | answer1 | 50.00 | a \\| b c x") and row.endswith("… | 25.00 |")
    assert len(table.splitlines()) == 3
