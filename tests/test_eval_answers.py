"""Answers read from generated text (the LLM-Adapters math protocol for numbers, letters for multiple
choice), the scorer each task gets (open answers and many labels go to generation), and the predictions
an evaluation returns and writes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from malora_train.config import EvalConfig
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError
from malora_train.eval import (
    AnswerReader,
    Prediction,
    evaluate,
    extract_letter,
    extract_number,
    predictions_file,
    scorer_notes,
    task_scorers,
    write_predictions,
)

# -- extraction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "extracted", "label", "correct"), [
    ("the answer is 576", "576", "576.0", True),  # compared as numbers, not strings
    ("He has 3.0 apples, so the answer is 18.0", "18.0", "18", True),  # the last number, not the first
    ("The total is 1,200.0 dollars", "1200.0", "1,200", True),  # commas removed on both sides
    ("It fell by -4.5 degrees", "-4.5", "-4.5", True),
    ("about 0.3334", "0.3334", "0.3333", True),  # within eval.number_tolerance (1e-3)
    ("about 0.335", "0.335", "0.3333", False),
    ("I cannot tell", "", "7", False),
])
def test_numbers_follow_the_llm_adapters_math_protocol(text, extracted, label, correct):
    reader = AnswerReader(number_task([]), tolerance=1e-3)
    assert extract_number(text) == extracted
    assert reader.extract(text) == extracted
    assert reader.is_correct(reader.extract(text), label) is correct


@pytest.mark.parametrize(("text", "letter"), [
    ("Answer: (C)", "C"),  # the A of "Answer" is inside a word
    ("A train leaves at 3; option B is too slow, so the answer is D.", "D"),  # the rationale comes first
    ("E", "E"),
    ("ABCDE is not an answer", ""),
    ("the answer is F", ""),  # not one of the task's letters
])
def test_letters_are_the_last_standalone_choice(text, letter):
    assert extract_letter(["A", "B", "C", "D", "E"], text) == letter


def test_labels_keep_the_first_match():
    task = TaskData("t", ["answer1", "answer2"], "the correct answer is ",
                    r"(?<!\w)(?:answer1|answer2)(?!\w)")
    reader = AnswerReader(task, tolerance=0.0)
    assert reader.extract("the correct answer is answer2, not answer1") == "answer2"
    assert reader.is_correct("answer2", "answer2") and not reader.is_correct("answer1", "answer2")


# -- which scorer a task gets ---------------------------------------------------------------------------

def number_task(examples: list[Example], name: str = "math") -> TaskData:
    return TaskData(name, [], "The answer is ", "", eval=examples, answer_type="number")


def label_task(name: str, labels: list[str], examples: list[Example] | None = None) -> TaskData:
    pattern = rf"(?<!\w)(?:{'|'.join(sorted(labels, key=len, reverse=True))})(?!\w)"
    return TaskData(name, labels, "the correct answer is ", pattern, eval=examples or [])


def test_label_logits_leaves_open_answers_rationales_and_many_labels_to_generation():
    rationale = label_task("why", ["yes", "no"])
    rationale.per_example_targets = True
    tasks = {"small": label_task("small", ["yes", "no"]), "numbers": number_task([]), "why": rationale,
             "wide": label_task("wide", [str(n) for n in range(40)])}
    cfg = EvalConfig(scorer="label_logits", max_labels=32)
    assert task_scorers(tasks, cfg) == {"small": "label_logits", "numbers": "generate", "why": "generate",
                                        "wide": "generate"}
    assert scorer_notes(tasks, cfg) == [
        "eval.scorer=label_logits: task numbers is scored with generate: its answers are open numbers",
        "eval.scorer=label_logits: task why is scored with generate: its targets hold text of their own "
        "(a rationale)",
        "eval.scorer=label_logits: task wide is scored with generate: it has 40 labels, more than "
        "eval.max_labels=32 (label_logits would score every one of them for every example)",
    ]
    assert task_scorers(tasks, EvalConfig(scorer="label_logits", max_labels=40))["wide"] == "label_logits"
    assert set(task_scorers(tasks, EvalConfig(scorer="generate")).values()) == {"generate"}
    assert scorer_notes(tasks, EvalConfig(scorer="generate")) == []


def test_eval_settings_are_checked():
    task = {"t": number_task([Example("t", "p", "The answer is 1", "1")])}
    for key, value in (("max_examples", 0), ("max_labels", 0), ("number_tolerance", -1.0)):
        with pytest.raises(ConfigError, match=f"eval.{key}={value}"):
            evaluate(ScriptedWriter({}), None, task, EvalConfig(**{key: value}))


# -- evaluation end to end with a model that writes scripted answers -------------------------------------

class ScriptedWriter(nn.Module):
    """A stand-in for AdaptedCausalLM whose ``model.generate`` writes ``replies[n]`` after a prompt that
    contains ``id=n;`` (it has no logits: label-logit scoring would fail)."""

    def __init__(self, replies: dict[int, str]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.replies = replies
        self.record_routing = False
        self.context = type("Context", (), {"token_mask": None, "token_task": None})()
        self.tokenizer = None
        self.generated = 0

    @property
    def model(self) -> ScriptedWriter:  # the wrapped HF model, whose generate() the scorer calls
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            reply = self.replies[int(re.search(r"id=(\d+);", prompt).group(1))]
            rows.append(self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [eos_token_id])
        self.generated += len(rows)
        width = max(map(len, rows))
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], dim=1)


def scripted(tokenizer, replies: dict[int, str]) -> ScriptedWriter:
    writer = ScriptedWriter(replies)
    writer.tokenizer = tokenizer
    return writer


MATH = [  # (label, what the model writes)
    ("576.0", "the answer is 576"),
    ("18", "He has 3.0 apples, so the answer is 18.0"),
    ("1,200.0", "The total is 1,200"),
    ("7", "I do not know"),
    ("2.5", "2.5"),
]


def math_examples() -> list[Example]:
    return [Example("math", f"Question id={i}; ###", f"The answer is {label}", label)
            for i, (label, _) in enumerate(MATH)]


def test_numeric_task_is_scored_by_the_math_protocol_with_predictions(tiny_tokenizer):
    task = number_task(math_examples())
    model = scripted(tiny_tokenizer, {i: reply for i, (_, reply) in enumerate(MATH)})
    result = evaluate(model, tiny_tokenizer, {"math": task},
                      EvalConfig(scorer="label_logits", max_new_tokens=64))
    assert result.scores["math"].correct == 4 and result.scores["math"].total == 5
    assert result.predictions["math"][1] == Prediction(
        task="math", id=1, prompt="Question id=1; ###", generation="He has 3.0 apples, so the answer is 18.0",
        extracted="18.0", label="18", correct=True, scorer="generate")
    assert [p.correct for p in result.predictions["math"]] == [True, True, True, False, True]
    assert [p.extracted for p in result.predictions["math"]] == ["576", "18.0", "1200", "", "2.5"]


def test_max_examples_scores_the_first_examples_of_each_task(tiny_tokenizer):
    task = number_task(math_examples())
    model = scripted(tiny_tokenizer, {i: reply for i, (_, reply) in enumerate(MATH)})
    result = evaluate(model, tiny_tokenizer, {"math": task}, EvalConfig(scorer="generate", max_examples=2))
    assert [p.id for p in result.predictions["math"]] == [0, 1] and model.generated == 2
    assert result.scores["math"].total == 2


def test_a_task_with_many_labels_is_generated_not_scored_label_by_label(tiny_tokenizer):
    labels = [str(n) for n in range(100, 140)]
    examples = [Example("wide", f"Pick id={i}; ###", "the correct answer is " + labels[i], labels[i])
                for i in range(3)]
    model = scripted(tiny_tokenizer, {0: "the correct answer is 100", 1: "the correct answer is 7", 2: "139"})
    result = evaluate(model, tiny_tokenizer, {"wide": label_task("wide", labels, examples)},
                      EvalConfig(max_labels=32))
    assert [(p.scorer, p.extracted, p.correct) for p in result.predictions["wide"]] == [
        ("generate", "100", True), ("generate", "", False), ("generate", "139", False)]


def test_predictions_file_is_ordered_by_task_and_id_whatever_rank_wrote_them(tmp_path):
    def prediction(task: str, i: int) -> Prediction:
        return Prediction(task, i, f"prompt {i}", None, "yes", "yes" if i % 2 else "no", bool(i % 2),
                          "label_logits")

    rank0 = [prediction("b", 0), prediction("b", 2), prediction("a", 0), prediction("a", 2)]
    rank1 = [prediction("b", 1), prediction("a", 1)]
    path = write_predictions(predictions_file(tmp_path / "eval" / "step_3", "label_logits"), rank0 + rank1,
                             ["b", "a"])
    assert path == tmp_path / "eval" / "step_3" / "predictions_label_logits.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(row["task"], row["id"]) for row in lines] == [("b", 0), ("b", 1), ("b", 2),
                                                           ("a", 0), ("a", 1), ("a", 2)]
    assert lines[1] == {"task": "b", "id": 1, "prompt": "prompt 1", "generation": None, "extracted": "yes",
                        "label": "yes", "correct": True, "scorer": "label_logits"}
