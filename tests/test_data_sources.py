"""BIG-bench task.json loader, custom tasks (JSON/JSONL, table files, dataset folders and ids), hub converters
(in memory) and the fetch script."""

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from script_modules import script_fixture

from malora_train.config import CustomTaskConfig, DataConfig
from malora_train.data import build_tasks, hub
from malora_train.data.records import read_records
from malora_train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ---- BIG-bench --------------------------------------------------------------------------------------------

def bigbench_example(i: int, choices: int = 3) -> dict:
    # the correct choice is listed first, as in many BIG-bench files: the loader must shuffle
    scores = {f"right {i}": 1} | {f"wrong {i}.{k}": 0 for k in range(choices - 1)}
    return {"input": f"Question number {i}?", "target_scores": scores}


def bigbench(root: Path, tasks: list[str], **options):
    return build_tasks(DataConfig(source="bigbench", root=str(root), tasks=tasks, **options), seed=0)


def test_bigbench_rendering_shuffling_and_split(tmp_path):
    examples = [bigbench_example(i, choices=2 + i % 3) for i in range(50)]
    write(tmp_path / "quiz" / "task.json", {"name": "quiz", "task_prefix": "", "examples": examples})
    task = bigbench(tmp_path, ["quiz"], eval_fraction=0.2)["quiz"]
    assert task.labels == ["answer1", "answer2", "answer3", "answer4"]
    assert (len(task.train), len(task.eval)) == (40, 10)
    labels = set()
    for example in task.train + task.eval:
        number = re.search(r"Question number (\d+)\?", example.prompt).group(1)
        position = int(example.label.removeprefix("answer"))
        assert re.search(rf"Answer{position}: right {number}\s", example.prompt)
        assert example.prompt.count("right") == 1
        assert example.target == "the correct answer is " + example.label
        listed = len(re.findall(r"Answer\d: ", example.prompt))
        assert f"Answer format: {'/'.join(f'answer{k + 1}' for k in range(listed))}\n" in example.prompt
        labels.add(example.label)
    assert len(labels) >= 3  # shuffled: the correct answer is not always first
    assert bigbench(tmp_path, ["quiz"], eval_fraction=0.2)["quiz"] == task


def test_bigbench_subtasks_are_merged_and_repeats_dropped(tmp_path):
    write(tmp_path / "cause" / "task.json", {"name": "cause", "keywords": []})
    write(tmp_path / "cause" / "a" / "task.json",
          {"task_prefix": "Which makes more sense?",
           "examples": [{"input": "", "target_scores": {"x": 1, "y": 0}},
                        {"input": "", "target_scores": {"u": 0, "v": 1}}]})
    write(tmp_path / "cause" / "b_no_prompt" / "task.json",  # same items, no wording: dropped
          {"task_prefix": "", "examples": [{"input": "", "target_scores": {"x": 1, "y": 0}}]})
    write(tmp_path / "cause" / "c" / "task.json",
          {"examples": [{"input": "Which came first?", "target_scores": {"p": 1, "q": 0}},
                        {"input": "Tie?", "target_scores": {"r": 1, "s": 1}}]})  # two best answers: skipped
    task = bigbench(tmp_path, ["cause"], eval_fraction=0.34)["cause"]
    prompts = [example.prompt for example in task.train + task.eval]
    assert len(prompts) == 3
    assert sum("Which makes more sense?" in prompt for prompt in prompts) == 2
    assert not any("Tie?" in prompt for prompt in prompts)


def test_bigbench_errors(tmp_path):
    with pytest.raises(DataError, match=r"fetch_bigbench\.py --tasks absent"):
        bigbench(tmp_path, ["absent"])
    path = write(tmp_path / "gen" / "task.json",
                 {"examples": [bigbench_example(0), {"input": "x", "target": "y"}]})
    with pytest.raises(DataError,
                       match=rf"{re.escape(str(path))} example 2: field 'target_scores' is missing"):
        bigbench(tmp_path, ["gen"])
    write(path, {"examples": [{"input": "x", "target_scores": {"a": "high", "b": 0}}]})
    with pytest.raises(DataError, match="example 1: field 'target_scores' gives 'a' the score 'high'"):
        bigbench(tmp_path, ["gen"])


def test_bigbench_empty_task_list_means_every_fetched_task(tmp_path):
    for name in ("b_task", "a_task"):
        write(tmp_path / name / "task.json", {"examples": [bigbench_example(i) for i in range(6)]})
    assert list(bigbench(tmp_path, [])) == ["a_task", "b_task"]
    with pytest.raises(DataError, match="no <task>/task.json under data.root"):
        bigbench(tmp_path / "empty", [])


# ---- custom tasks ----------------------------------------------------------------------------------------

def custom(tasks: list[CustomTaskConfig], **options):
    return build_tasks(DataConfig(source="custom", custom_tasks=tasks, prompt_template="plain", **options),
                       seed=0)


def review_task(path: Path, **fields) -> CustomTaskConfig:
    spec = {"name": "reviews",
            "prompt_template": "About the {aspect}: {text}\nAnswer format: positive/negative",
            "answer_field": "sentiment", **fields}
    return CustomTaskConfig(path=str(path), **spec)


def test_custom_jsonl_with_derived_labels_and_holdout(tmp_path):
    rows = [{"aspect": "screen", "text": f"review {i}", "sentiment": ["positive", "negative"][i % 2]}
            for i in range(20)]
    path = write(tmp_path / "reviews.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    task = custom([review_task(path)], eval_fraction=0.25)["reviews"]
    assert task.labels == ["negative", "positive"]
    assert (len(task.train), len(task.eval)) == (15, 5)
    example = task.train[0]
    assert (example.prompt.startswith("About the screen: review ")
            and example.prompt.endswith("### Response:\n"))
    assert example.target == "the correct answer is " + example.label


def test_an_evaluation_set_that_repeats_training_examples_is_one_warning_per_task(tmp_path, caplog):
    rows = [{"aspect": "screen", "text": f"review {i}", "sentiment": ["positive", "negative"][i % 2]}
            for i in range(20)]
    path = write(tmp_path / "reviews.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    part = write(tmp_path / "part.jsonl", "\n".join(json.dumps(row) for row in rows[:3]) + "\n")
    other = write(tmp_path / "other.jsonl", json.dumps({**rows[0], "text": "unseen"}) + "\n")
    tasks = [review_task(path, eval_path=str(path)), review_task(path, name="partly", eval_path=str(part)),
             review_task(path, name="apart", eval_path=str(other))]
    with caplog.at_level("WARNING", logger="malora_train.data.tasks"):
        custom(tasks)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "task reviews: 20 of 20 evaluation examples repeat a training example's instruction",
        "task partly: 3 of 3 evaluation examples repeat a training example's instruction"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="malora_train.data.tasks"):
        custom([review_task(path)], eval_fraction=0.25)  # a held-out share: no overlap
    assert caplog.records == []


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_record_field_over_the_size_limit_is_one_line_naming_file_record_and_field(tmp_path, suffix):
    from malora_train.data.records import MAX_FIELD_CHARS

    rows = [{"aspect": "screen", "text": f"review {i}", "sentiment": "positive"} for i in range(3)]
    rows[1]["text"] = "x" * (MAX_FIELD_CHARS + 1)
    content = "\n".join(json.dumps(row) for row in rows) if suffix == ".jsonl" else rows
    path = write(tmp_path / f"reviews{suffix}", content)
    where = f"{path} line 2" if suffix == ".jsonl" else f"{path} record 2"
    with pytest.raises(DataError) as err:
        custom([review_task(path)])
    limit = f"{MAX_FIELD_CHARS:,} a field may hold (records.MAX_FIELD_CHARS)"
    assert str(err.value) == (f"{where}: field 'text' holds {MAX_FIELD_CHARS + 1:,} characters, more than "
                              f"the {limit}; shorten it")
    rows[1]["text"] = "x" * MAX_FIELD_CHARS  # at the limit: read
    path.write_text("\n".join(json.dumps(row) for row in rows) if suffix == ".jsonl" else json.dumps(rows))
    assert len(read_records(path)) == 3


def test_custom_json_list_eval_file_and_target_template(tmp_path):
    train = write(tmp_path / "train.json", [{"q": "2+2", "a": 4}, {"q": "1+2", "a": 3}])
    evaluation = write(tmp_path / "eval.json", [{"q": "1+3", "a": 4}])
    spec = CustomTaskConfig(name="sums", path=str(train), eval_path=str(evaluation),
                            prompt_template="What is {q}?", answer_field="a", labels=["3", "4"],
                            target_template="Answer: {label}")
    task = custom([spec])["sums"]
    assert [(e.prompt, e.target, e.label) for e in task.eval] == [
        ("What is 1+3?\n### Response:\n", "Answer: 4", "4")]
    assert task.answer_prefix == "Answer: " and len(task.train) == 2


def test_custom_malformed_records_name_file_line_and_field(tmp_path):
    path = write(tmp_path / "r.jsonl", '{"aspect": "a", "text": "t", "sentiment": "positive"}\n'
                                       '{"aspect": "a", "sentiment": "negative"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} line 2: field 'text' is missing"):
        custom([review_task(path)])
    write(path, '{"aspect": "a", "text": "t", "sentiment": "positive"}\n{"aspect": "a", "text": "t"\n')
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        custom([review_task(path)])
    write(path, '{"aspect": "a", "text": "t", "sentiment": "meh"}\n')
    with pytest.raises(DataError, match=r"line 1: field 'sentiment' = 'meh' is not one of the task's labels"):
        custom([review_task(path, labels=["positive", "negative"])])
    write(path, '{"aspect": ["a"], "text": "t", "sentiment": "positive"}\n')
    with pytest.raises(DataError, match=r"line 1: field 'aspect' must be text or a number, got list"):
        custom([review_task(path)])
    with pytest.raises(DataError, match="file not found"):
        custom([review_task(tmp_path / "missing.jsonl")])


def test_custom_empty_answer_is_not_a_label(tmp_path):
    """With ``labels: []`` the labels come from the file: an empty answer is an error naming the record."""
    path = write(tmp_path / "r.json", [{"aspect": "a", "text": "t", "sentiment": "positive"},
                                       {"aspect": "a", "text": "u", "sentiment": "  "}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} record 2: field 'sentiment' is empty"):
        custom([review_task(path)])


@pytest.mark.parametrize("layout", ["one line", "indented"])
def test_a_json_file_holding_one_object_says_so(tmp_path, layout):
    records = [{"aspect": "a", "text": "t", "sentiment": "positive"}]
    path = write(tmp_path / "r.json",
                 json.dumps({"data": records}, indent=2 if layout == "indented" else None))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the file is one JSON object; expected a "
                                        r"JSON list of records .* its key 'data' holds a list"):
        custom([review_task(path)])
    one_record = write(tmp_path / "one.jsonl", json.dumps(records[0]) + "\n")  # JSONL with one record is fine
    assert [r.fields for r in read_records(one_record)] == records


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt_template": "no placeholders"}, r"custom_tasks\[0\]\.prompt_template has no \{field\}"),
        ({"prompt_template": "{0} and {x.y}"}, r"placeholder \{0\} must name a record field"),
        ({"target_template": "{label} or {label}"},
         r"custom_tasks\[0\]\.target_template=.* names \{label\} more"),
        ({"target_template": "always the same"}, r"custom_tasks\[0\]\.target_template=.* needs \{label\}"),
        ({"labels": ["a", "a"]}, r"custom_tasks\[0\]\.labels=\['a', 'a'\] must be distinct"),
        ({"answer_type": "digits"},
         r"custom_tasks\[0\]\.answer_type='digits' is not one of label, number, letter"),
        ({"answer_type": "number", "labels": ["1", "2"]},
         r"custom_tasks\[0\]\.labels must be empty for answer_type"),
        ({"answer_type": "letter", "labels": ["A", "b"]},
         r"custom_tasks\[0\]\.labels=\['A', 'b'\] must be capital"),
        ({"eval_split": "test"}, r"custom_tasks\[0\]\.eval_split='test': .*r\.jsonl is a file, which has"),
        ({"eval_split": "test", "eval_path": "e.jsonl"}, r"custom_tasks\[0\]: set eval_path .* not both"),
    ],
)
def test_custom_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        custom([review_task(tmp_path / "r.jsonl", **change)])


def review_rows(count: int = 12) -> list[dict]:
    return [{"aspect": "screen", "text": f"review {i}", "sentiment": ["positive", "negative"][i % 2],
             "stars": i % 5 + 1} for i in range(count)]


def examples(task) -> list[tuple[str, str]]:
    return [(e.prompt, e.label) for e in task.train + task.eval]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_table_files_give_the_task_their_jsonl_gives(tmp_path, suffix):
    import datasets

    rows = review_rows()
    jsonl = write(tmp_path / "reviews.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    table = tmp_path / f"reviews{suffix}"
    frame = datasets.Dataset.from_list(rows)
    if suffix == ".parquet":
        frame.to_parquet(str(table))
    else:
        frame.to_csv(str(table), index=False, sep="\t" if suffix == ".tsv" else ",")
    expected = custom([review_task(jsonl)], eval_fraction=0.25)["reviews"]
    task = custom([review_task(table)], eval_fraction=0.25)["reviews"]
    assert examples(task) == examples(expected) and len(task.eval) == 3
    # a number column (stars) is read as the number's text, as from JSON
    stars = custom([review_task(table, answer_field="stars", answer_type="number")])["reviews"]
    assert sorted({e.label for e in stars.train + stars.eval}) == ["1", "2", "3", "4", "5"]


def test_a_dataset_folder_trains_on_its_split_and_evaluates_on_eval_split(tmp_path):
    import datasets

    folder = tmp_path / "reviews_dataset"
    folder.mkdir()
    rows = review_rows(10)
    datasets.Dataset.from_list(rows[:8]).to_csv(str(folder / "train.csv"), index=False)
    datasets.Dataset.from_list(rows[8:]).to_csv(str(folder / "test.csv"), index=False)
    task = custom([review_task(folder, eval_split="test")])["reviews"]
    assert [e.prompt.split(": ")[1].split("\n")[0] for e in task.eval] == ["review 8", "review 9"]
    assert len(task.train) == 8
    with pytest.raises(DataError, match=r"^custom task reviews eval_split=.*: could not load .*validation"):
        custom([review_task(folder, eval_split="validation")])


def test_a_dataset_id_not_in_the_offline_cache_is_one_line_naming_the_task(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as caught:
        custom([review_task(Path("nobody-here/no-such-dataset"))])
    message = str(caught.value)
    assert message.startswith("custom task reviews path='nobody-here/no-such-dataset': could not load it")
    assert "\n" not in message and "HF_DATASETS_OFFLINE" in message


def test_a_dataset_id_is_kept_as_written_while_a_relative_file_is_made_absolute(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from malora_train.commands.composition import settle_data_paths

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "mine.jsonl", "{}\n")
    cfg = OmegaConf.create({"data": {"custom_tasks": [
        {"path": "someone/reviews", "eval_path": None}, {"path": "mine.jsonl", "eval_path": "later.csv"}]}})
    data = settle_data_paths(cfg).data
    assert data.custom_tasks[0].path == "someone/reviews"
    assert data.custom_tasks[1].path == str(tmp_path / "mine.jsonl")
    assert data.custom_tasks[1].eval_path == str(tmp_path / "later.csv")  # a file's suffix: a path to be


def math_records(tmp_path: Path) -> Path:
    rows = [{"question": "Tom has 3 bags of 6 apples. How many apples?",
             "rationale": "3 bags of 6 make 3 * 6.", "answer": 18},
            {"question": "What is 1,000 + 200?", "rationale": "Add them.", "answer": "1,200"},
            {"question": "Half of 5?", "rationale": "5 / 2 = 2.5", "answer": 2.5}]
    return write(tmp_path / "math.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")


def math_task(path: Path, **fields) -> CustomTaskConfig:
    spec = {"name": "math", "path": str(path), "eval_path": str(path), "prompt_template": "{question}",
            "answer_field": "answer", "answer_type": "number", "target_template": "The answer is {label}.",
            **fields}
    return CustomTaskConfig(**spec)


def test_custom_number_task_has_open_numeric_labels_and_fixed_text_around_them(tmp_path):
    task = custom([math_task(math_records(tmp_path))])["math"]
    assert task.answer_type == "number" and task.labels == [] and task.label_pattern == ""
    assert (task.answer_prefix, task.answer_suffix) == ("The answer is ", ".")
    assert [(e.label, e.target) for e in task.eval] == [("18", "The answer is 18."),
                                                        ("1,200", "The answer is 1,200."),
                                                        ("2.5", "The answer is 2.5.")]
    assert not task.per_example_targets and not task.closed_targets  # open answers: only generation scores it


def test_custom_target_with_a_rationale_is_trained_on_whole(tmp_path, tiny_tokenizer):
    from malora_train.data import IGNORE_INDEX, encode_example

    spec = math_task(math_records(tmp_path), target_template="{rationale} So the answer is {label}.")
    task = custom([spec])["math"]
    assert task.per_example_targets and (task.answer_prefix, task.answer_suffix) == ("", "")
    example = task.train[0]
    assert example.target == "3 bags of 6 make 3 * 6. So the answer is 18." and example.label == "18"
    encoded = encode_example(tiny_tokenizer, example, max_length=256)
    answer = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(answer, skip_special_tokens=True) == example.target  # the rationale too
    assert answer[-1] == tiny_tokenizer.eos_token_id
    assert (encoded.labels[:len(encoded.labels) - len(answer)]
            == [IGNORE_INDEX] * (len(encoded.labels) - len(answer)))


def test_custom_number_and_letter_answers_are_checked(tmp_path):
    path = write(tmp_path / "bad.jsonl",
                 '{"question": "q", "answer": "18"}\n{"question": "q2", "answer": "eighteen"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'answer' = 'eighteen' is not a number"):
        custom([math_task(path)])
    letters = write(tmp_path / "aqua.jsonl",
                    '{"question": "q", "answer": "C"}\n{"question": "q2", "answer": "F"}\n')
    spec = math_task(letters, answer_type="letter", target_template="The answer is {label}")
    with pytest.raises(DataError, match=r"aqua.jsonl line 2: field 'answer' = 'F' is not one of the task's "
                                        r"labels A/B/C/D/E"):
        custom([spec])
    write(letters, '{"question": "q", "answer": "C"}\n{"question": "q2", "answer": "A"}\n')
    task = custom([spec])["math"]
    assert task.answer_type == "letter" and task.labels == ["A", "B", "C", "D", "E"] and task.closed_targets


def test_custom_names_unique_and_source_required(tmp_path):
    with pytest.raises(ConfigError, match="repeated: reviews"):
        custom([review_task(tmp_path / "a.jsonl"), review_task(tmp_path / "b.jsonl")])
    with pytest.raises(ConfigError, match="use data.source=custom"):
        build_tasks(DataConfig(source="synthetic", custom_tasks=[review_task(tmp_path / "a.jsonl")]), seed=0)


# ---- hub converters (no network: in-memory rows) ---------------------------------------------------------

def test_boolq_matches_llm_adapters_format_without_passage():
    row = {"question": "do iran and afghanistan speak the same language", "answer": True,
           "passage": "Persian..."}
    instruction, label = hub.convert_boolq(row)
    assert instruction == ("Please answer the following question with true or false, question: do iran and "
                           "afghanistan speak the same language?\n\nAnswer format: true/false")
    assert label == "true" and "Persian" not in instruction


def test_multiple_choice_converters_match_llm_adapters_format():
    siqa = {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
            "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
            "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}
    assert hub.convert_social_i_qa(siqa) == (
        "Please choose the correct answer to the question: Tracy didn't go home that evening and resisted "
        "Riley's attacks. What does Tracy need to do before this?\n\nAnswer1: make a new plan Answer2: Go "
        "home and see Riley Answer3: Find somewhere to go\n\nAnswer format: answer1/answer2/answer3",
        "answer3")
    wino = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert hub.convert_winogrande(wino) == (
        "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a "
        "much better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria "
        "Answer format: option1/option2", "option2")
    piqa = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
    assert hub.convert_piqa(piqa) == (
        "Please choose the correct solution to the question: Open a jar\n\nSolution1: Twist the lid.\n\n"
        "Solution2: Eat the lid.\n\nAnswer format: solution1/solution2", "solution1")
    arc = {"question": "Which is a gas?",
           "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    assert hub.convert_arc(arc) == ("Please choose the correct answer to the question: Which is a gas?\n\n"
                                    "Answer1: ice Answer2: steam Answer3: rock\n\nAnswer format: "
                                    "answer1/answer2/answer3", "answer2")
    obqa = {"question_stem": "The sun is", "answerKey": "D",
            "choices": {"text": ["a", "b", "c", "a star"], "label": ["A", "B", "C", "D"]}}
    assert hub.convert_openbookqa(obqa)[1] == "answer4"
    swag = {"activity_label": "Removing ice from car", "ctx": "Then, the man writes over the snow. then",
            "endings": [" a", "b ", "c", "d"], "label": "1"}
    instruction, label = hub.convert_hellaswag(swag)
    assert label == "ending2" and instruction.startswith(
        "Please choose the correct ending to complete the given sentence: Removing ice from car: Then,")
    assert instruction.endswith("Ending1: a Ending2: b Ending3: c Ending4: d\n\nAnswer format: "
                                "ending1/ending2/ending3/ending4")


def test_converter_errors_name_the_row_and_field():
    rows = [{"question": "q", "answer": True}, {"question": "q", "answer": "yes"}]
    with pytest.raises(DataError, match=r"where row 1: field 'answer' = 'yes' is not true/false"):
        hub.convert_rows("boolq", rows, "where")
    arc = {"question": "q", "choices": {"text": list("abcdef"), "label": list("ABCDEF")}, "answerKey": "F"}
    with pytest.raises(DataError, match="row 0: answer 'answer6' is not one of the task's labels"):
        hub.convert_rows("ARC-Easy", [arc], "where")


def test_hub_loader_uses_train_and_eval_splits(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"question": f"{split} question {i}", "answer": i % 2 == 0} for i in range(3)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = build_tasks(DataConfig(source="hub", tasks=["boolq"]), seed=0)["boolq"]
    assert calls == [("google/boolq", None, "train"), ("google/boolq", None, "validation")]
    assert "validation question" in task.eval[0].prompt and len(task.train) == 3

    def offline(path, config, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load hub dataset google/boolq split train for task boolq"):
        build_tasks(DataConfig(source="hub", tasks=["boolq"]), seed=0)


# ---- scripts/fetch_bigbench.py ---------------------------------------------------------------------------

fetch_script = script_fixture("fetch_bigbench", "fetch_script")


def fake_sdist(path: Path) -> Path:
    files = {
        "bigbench-1.0.0/bigbench/benchmark_tasks/alpha/task.json": '{"examples": []}',
        "bigbench-1.0.0/bigbench/benchmark_tasks/alpha/README.md": "readme",
        "bigbench-1.0.0/bigbench/benchmark_tasks/beta/task.json": '{"name": "beta"}',
        "bigbench-1.0.0/bigbench/benchmark_tasks/beta/sub/task.json": '{"examples": [1]}',
        "bigbench-1.0.0/bigbench/benchmark_tasks/gamma/task.json": '{"examples": [2]}',
        "bigbench-1.0.0/bigbench/api/task.json": "not a task",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_fetch_extracts_only_the_chosen_tasks(tmp_path, fetch_script):
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    cache = tmp_path / "cache"
    fetch_script.main(["--sdist", str(sdist), "--tasks", "alpha", "beta", "--cache-dir", str(cache)])
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert written == ["alpha/task.json", "beta/sub/task.json", "beta/task.json"]
    assert (cache / "beta" / "sub" / "task.json").read_text() == '{"examples": [1]}'
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no staging folders left behind
    with pytest.raises(SystemExit, match="no task.json for delta"):
        fetch_script.extract_tasks(sdist, ["gamma", "delta"], cache)
    assert not (cache / "gamma").exists()  # nothing written when a task is missing


def fake_tree(root: Path) -> Path:
    """The source tree pip unpacks (and, since pip 24, refuses to save as an archive)."""
    tasks = root / "bigbench" / "benchmark_tasks"
    for name, text in {"alpha/task.json": '{"examples": [0]}', "beta/sub/task.json": '{"examples": [1]}',
                       "gamma/task.json": '{"examples": [2]}'}.items():
        (tasks / name).parent.mkdir(parents=True, exist_ok=True)
        (tasks / name).write_text(text)
    (root / "bigbench" / "api").mkdir()
    (root / "bigbench" / "api" / "task.json").write_text("not a task")
    return root


def test_fetch_reads_an_unpacked_tree_and_a_presets_task_list(tmp_path, fetch_script):
    tree = fake_tree(tmp_path / "bigbench_0123")
    preset = tmp_path / "probe.yaml"
    preset.write_text("# @package _global_\ndata:\n  tasks: [beta, gamma]\n")
    cache = tmp_path / "cache"
    fetch_script.main(["--sdist", str(tree), "--tasks-of", str(preset), "--cache-dir", str(cache)])
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert written == ["beta/sub/task.json", "gamma/task.json"]
    preset.write_text("data:\n  max_length: 3\n")
    with pytest.raises(SystemExit, match="no data.tasks"):
        fetch_script.main(["--sdist", str(tree), "--tasks-of", str(preset), "--cache-dir", str(cache)])


def test_download_uses_the_tree_pip_unpacked_when_it_saves_no_archive(tmp_path, fetch_script, monkeypatch):
    # recent pip: unpacks into $TMPDIR, then refuses the bleurt URL dependency
    def pip_refusing(command, env):
        assert "--no-clean" in command
        fake_tree(Path(env["TMPDIR"]) / "pip-download-x1" / "bigbench_abc")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(fetch_script.subprocess, "run", pip_refusing)
    source = fetch_script.download_sdist(tmp_path)
    assert source == tmp_path / "pip-download-x1" / "bigbench_abc"
    written = fetch_script.extract_tasks(source, ["alpha"], tmp_path / "cache")
    assert written == {"alpha": [tmp_path / "cache" / "alpha" / "task.json"]}
    monkeypatch.setattr(fetch_script.subprocess, "run",
                        lambda command, env: subprocess.CompletedProcess(command, 1))
    with pytest.raises(SystemExit, match="left neither"):
        fetch_script.download_sdist(tmp_path / "empty")


def test_relative_data_paths_are_saved_absolute_so_the_run_works_from_another_folder(tmp_path, monkeypatch,
                                                                                    train_cli, capsys):
    import yaml

    from malora_train.cli import eval_main

    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (home / "mydata").mkdir(parents=True)
    (home / "conf" / "data").mkdir(parents=True)
    elsewhere.mkdir()
    rows = [{"q": f"{a} plus {b}", "answer": "big" if a + b > 9 else "small"}
            for a in range(8) for b in range(8)]
    (home / "mydata" / "addsub.json").write_text(json.dumps(rows))
    (home / "conf" / "data" / "addsub.yaml").write_text(
        "defaults:\n  - custom_example\n  - _self_\nname: addsub\ncustom_tasks:\n"
        "  - {name: addsub, path: mydata/addsub.json, prompt_template: '{q}', answer_field: answer}\n")
    monkeypatch.chdir(home)
    run_dir = tmp_path / "run"
    status = train_cli("--config-dir", "conf", "model=tiny", "data=addsub", "trainer.max_steps=1",
                       "trainer.eval_before=false", "trainer.eval_after=false", "trainer.progress=false",
                       f"hydra.run.dir={run_dir}")
    assert status == 0, capsys.readouterr().err
    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert data["custom_tasks"][0]["path"] == str(home / "mydata" / "addsub.json")
    assert data["paths_as_written"] == {"data.custom_tasks[0].path": "mydata/addsub.json"}

    monkeypatch.chdir(elsewhere)  # the run's own config finds its data from any folder
    report = eval_main([str(run_dir), "eval.max_examples=2"])
    assert report["counts"]["addsub"]["total"] == 2
