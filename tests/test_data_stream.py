"""BatchStream: deterministic global batches, exact resume, tokens consistent with tasks, length grouping."""

import json

import pytest

from malora_train.config import DataConfig
from malora_train.data import IGNORE_INDEX, BatchStream, build_tasks
from malora_train.data.stream import POOL_BATCHES
from malora_train.models import builtin_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(DataConfig(source="synthetic", train_per_task=60, eval_per_task=4,
                                  prompt_template="plain"), seed=0)


def make_stream(tasks, tokenizer, seed=0, batch_size=4, **options):
    return BatchStream(tasks, tokenizer, DataConfig(**options), batch_size=batch_size, seed=seed)


def same(batch_a, batch_b) -> bool:
    return batch_a.keys() == batch_b.keys() and all(batch_a[k].equal(batch_b[k]) for k in batch_a)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_same_seed_same_batches(tasks, tokenizer, group_by_length):
    a = make_stream(tasks, tokenizer, group_by_length=group_by_length)
    b = make_stream(tasks, tokenizer, group_by_length=group_by_length)
    c = make_stream(tasks, tokenizer, seed=1, group_by_length=group_by_length)
    batches_a = [a.next_batch() for _ in range(20)]
    assert all(same(x, b.next_batch()) for x in batches_a)
    assert not all(same(x, c.next_batch()) for x in batches_a)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_continues_exactly(tasks, tokenizer, group_by_length):
    reference = make_stream(tasks, tokenizer, group_by_length=group_by_length)
    expected = [reference.next_batch() for _ in range(40)]
    first = make_stream(tasks, tokenizer, group_by_length=group_by_length)
    for _ in range(21):  # mid-way through the second length-grouping pool
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_stream(tasks, tokenizer, group_by_length=group_by_length)
    resumed.load_state_dict(state)
    assert all(same(expected[21 + i], resumed.next_batch()) for i in range(19))
    assert resumed.batches == 40 and resumed.mixture.epochs == reference.mixture.epochs


def test_rows_are_examples_of_the_task_they_name(tasks, tokenizer):
    stream = make_stream(tasks, tokenizer, batch_size=8)
    names = stream.task_names
    seen_tasks = set()
    for _ in range(10):
        batch = stream.next_batch()
        for row in range(8):
            task = tasks[names[batch["task_ids"][row].item()]]
            length = batch["attention_mask"][row].sum().item()
            ids = batch["input_ids"][row, :length].tolist()
            labels = batch["labels"][row, :length].tolist()
            prompt_length = labels.count(IGNORE_INDEX)
            assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
            assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
            assert ids[-1] == tokenizer.eos_token_id
            pair = (tokenizer.decode(ids[:prompt_length]), tokenizer.decode(ids[prompt_length:-1]))
            assert pair in {(example.prompt, example.target) for example in task.train}
            seen_tasks.add(task.name)
    assert seen_tasks == set(names)


def test_length_grouping_cuts_sorted_pools(tasks, tokenizer):
    stream = make_stream(tasks, tokenizer, batch_size=4, group_by_length=True)
    pool = [stream.next_batch()["attention_mask"].sum(dim=1).tolist() for _ in range(POOL_BATCHES)]
    spans = sorted((min(lengths), max(lengths)) for lengths in pool)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))  # no two batches interleave
    assert [min(lengths) for lengths in pool] != sorted(min(lengths) for lengths in pool)  # emitted shuffled


def test_truncation_counts(tasks, tokenizer):
    stream = make_stream(tasks, tokenizer, batch_size=8, max_length=60)
    totals = stream.truncated_in_train
    assert stream.truncated_total == sum(totals.values()) > 0
    assert totals == {name: sum(len(e.prompt.encode()) + len(e.target.encode()) + 1 > 60 for e in task.train)
                      for name, task in tasks.items()}
    emitted = 0
    for _ in range(5):
        batch = stream.next_batch()
        lengths = batch["attention_mask"].sum(dim=1)
        assert lengths.max().item() <= 60
        emitted += sum(1 for row in range(8) if lengths[row] == 60)  # every truncated row fills max_length
    assert stream.truncated == emitted > 0


def test_truncation_is_one_warning_line_for_the_whole_mixture(tasks, tokenizer, caplog):
    with caplog.at_level("WARNING", logger="malora_train.data.stream"):
        stream = make_stream(tasks, tokenizer, batch_size=8, max_length=60)
    counts = {name: count for name, count in stream.truncated_in_train.items() if count}
    assert len(counts) >= 2  # several tasks truncate, and still one line
    [record] = caplog.records
    per_task = ", ".join(f"{name} {count}" for name, count in counts.items())
    assert record.getMessage() == (f"data.max_length=60: {stream.truncated_total} of {stream.train_size} "
                                   f"training examples lose prompt tokens from the left ({per_task})")
    caplog.clear()
    with caplog.at_level("WARNING", logger="malora_train.data.stream"):
        make_stream(tasks, tokenizer, batch_size=8, max_length=256)
    assert caplog.records == []


def test_resume_refuses_another_batch_size(tasks, tokenizer):
    state = make_stream(tasks, tokenizer, batch_size=4).state_dict()
    with pytest.raises(Exception, match="cannot resume the data stream"):
        make_stream(tasks, tokenizer, batch_size=8).load_state_dict(state)


def test_a_read_only_cache_dir_is_skipped_with_one_warning_naming_the_key(tasks, tokenizer, caplog,
                                                                          read_only_dir):
    cache_dir = read_only_dir / "tokenized"
    with caplog.at_level("WARNING", logger="malora_train.data.stream"):
        stream = make_stream(tasks, tokenizer, cache_dir=str(cache_dir))
    [record] = caplog.records
    assert record.getMessage().startswith(f"data.cache_dir={cache_dir}: cannot write the tokenised-data "
                                          "cache there (")
    assert "training without the cache" in record.getMessage()
    uncached = make_stream(tasks, tokenizer, cache=False)
    assert all(same(stream.next_batch(), uncached.next_batch()) for _ in range(3))
