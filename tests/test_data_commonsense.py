"""LLM-Adapters commonsense loader: the shared data (skipped when absent) and malformed files in tmp."""

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from malora_train.config import DataConfig
from malora_train.data import build_tasks
from malora_train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MALORA_SHARED_DATA", REPO.parent / "shared" / "data"))
COMMONSENSE = SHARED / "commonsense"
AVAILABLE = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
LABELS = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": ["answer1", "answer2", "answer3"],
    "winogrande": ["option1", "option2"],
    "ARC-Easy": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "ARC-Challenge": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "openbookqa": ["answer1", "answer2", "answer3", "answer4"],
}


def commonsense(root=COMMONSENSE, seed=0, **options):
    return build_tasks(DataConfig(source="llm_adapters", root=str(root), **options), seed=seed)


@pytest.fixture(scope="module")
def shared_tasks():
    if not COMMONSENSE.is_dir():
        pytest.skip(f"shared data not found at {COMMONSENSE}")
    return commonsense(tasks=AVAILABLE)


@pytest.mark.shared_data
def test_counts_per_split(shared_tasks):
    counts = {name: (len(task.train), len(task.eval)) for name, task in shared_tasks.items()}
    assert counts["boolq"] == (9427, 3270)
    assert counts["ARC-Easy"] == (2251, 2376)
    assert counts["ARC-Challenge"] == (1119, 1172)
    assert counts["openbookqa"] == (4957, 500)
    for name, total in (("piqa", 1838), ("social_i_qa", 1954), ("winogrande", 1267)):
        assert counts[name] == (total - math.ceil(0.2 * total), math.ceil(0.2 * total))
    assert list(shared_tasks) == AVAILABLE


@pytest.mark.shared_data
def test_label_sets_and_targets(shared_tasks):
    for name, task in shared_tasks.items():
        assert task.labels == LABELS[name]
        assert task.answer_prefix == "the correct answer is "
        for example in task.train + task.eval:
            assert example.label in task.labels
            assert example.target == "the correct answer is " + example.label
            assert example.prompt.startswith("Below is an instruction that describes a task.")
            assert example.prompt.endswith("### Response:\n")
            assert re.search(task.label_pattern, example.target).group(0) == example.label
    # ARC-Easy holds a few five-choice questions
    assert Counter(e.label for e in shared_tasks["ARC-Easy"].train)["answer5"] == 2


@pytest.mark.shared_data
def test_piqa_split_is_deterministic_seed_free_and_order_free(shared_tasks, tmp_path):
    piqa = shared_tasks["piqa"]
    assert not {e.prompt for e in piqa.train} & {e.prompt for e in piqa.eval}
    other_seed = commonsense(tasks=["piqa"], seed=5)["piqa"]
    assert other_seed.train == piqa.train and other_seed.eval == piqa.eval
    # the same records in reverse file order land on the same sides
    (tmp_path / "piqa").mkdir()
    records = json.loads((COMMONSENSE / "piqa" / "test.json").read_text())
    (tmp_path / "piqa" / "test.json").write_text(json.dumps(records[::-1]))
    reversed_piqa = commonsense(root=tmp_path, tasks=["piqa"])["piqa"]
    assert {e.prompt for e in reversed_piqa.eval} == {e.prompt for e in piqa.eval}


@pytest.mark.shared_data
@pytest.mark.usefixtures("shared_tasks")
def test_missing_hellaswag_fails_at_start_up_with_help():
    with pytest.raises(DataError, match=r"hellaswag not found .*data\.tasks"):
        commonsense(tasks=["boolq", "hellaswag"])
    with pytest.raises(DataError, match="hellaswag"):
        commonsense()  # empty data.tasks: every commonsense task, hellaswag included


@pytest.mark.shared_data
@pytest.mark.usefixtures("shared_tasks")
def test_caps_keep_a_stable_subset():
    capped = commonsense(tasks=["boolq"], train_per_task=100, eval_per_task=20)["boolq"]
    again = commonsense(tasks=["boolq"], train_per_task=100, eval_per_task=20, seed=9)["boolq"]
    assert (len(capped.train), len(capped.eval)) == (100, 20)
    assert capped.train == again.train and capped.eval == again.eval


# ---- tmp files: no shared data needed -------------------------------------------------------------------

def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def record(answer="true", instruction="Please answer ...: is it?\n\nAnswer format: true/false"):
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def test_label_outside_the_family_names_file_record_and_field(tmp_path):
    path = write(tmp_path / "boolq" / "train.json", [record(), record("false"), record("maybe")])
    write(tmp_path / "boolq" / "test.json", [record()])
    with pytest.raises(DataError) as err:
        commonsense(root=tmp_path, tasks=["boolq"])
    assert (f"{path} record 3: field 'answer' = 'maybe' is not one of the task's labels true/false"
            in str(err.value))


def test_missing_field_and_bad_json_are_named(tmp_path):
    path = write(tmp_path / "boolq" / "train.json", [record(), {"answer": "true"}])
    write(tmp_path / "boolq" / "test.json", [record()])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} record 2: field 'instruction' is missing"):
        commonsense(root=tmp_path, tasks=["boolq"])
    write(path, '[{"instruction": "x", "answer": "true"},\n {"instruction": "y" "answer": "true"}]')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} line 2 column \d+: invalid JSON"):
        commonsense(root=tmp_path, tasks=["boolq"])
    write(path, '[["instruction", "answer"]]')
    with pytest.raises(DataError, match="record 1: expected an object"):
        commonsense(root=tmp_path, tasks=["boolq"])


def test_only_train_file_is_split_and_empty_task_fails(tmp_path):
    write(tmp_path / "boolq" / "train.json",
          [record(["true", "false"][i % 2], f"question {i}?\n\nAnswer format: true/false")
           for i in range(10)])
    task = commonsense(root=tmp_path, tasks=["boolq"], eval_fraction=0.3)["boolq"]
    assert (len(task.train), len(task.eval)) == (7, 3)
    write(tmp_path / "piqa" / "test.json", "[]")
    with pytest.raises(DataError, match="task piqa .* has no training examples"):
        commonsense(root=tmp_path, tasks=["piqa"])


def test_root_and_task_name_errors(tmp_path):
    with pytest.raises(DataError, match="data.root=.* is not a folder"):
        commonsense(root=tmp_path / "nowhere", tasks=["boolq"])
    with pytest.raises(ConfigError, match="unknown task 'siqa' .* known tasks: boolq, piqa, social_i_qa"):
        commonsense(root=tmp_path, tasks=["siqa"])
    with pytest.raises(ConfigError, match="data.root must name"):
        build_tasks(DataConfig(source="llm_adapters", root=None, tasks=["boolq"]), seed=0)
