"""Scorers and per-task accuracy: label-logit scoring against a brute-force computation, an oracle and
a constant model, generation against an independent greedy decode, and rank sharding."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters import AdaptedCausalLM, adapter_layers
from malora_train.config import AdapterConfig, EvalConfig, RouterConfig
from malora_train.data.types import Example, TaskData
from malora_train.errors import ConfigError, DataError
from malora_train.eval import (
    EvalResult,
    TaskScore,
    evaluate,
    extract_label,
    format_accuracy_table,
    generate_texts,
    reduce_scores,
    score_label_logits,
)
from malora_train.eval.encoding import label_continuations

# One token (a byte) after the shared "...answer" tells answer1/2/3 apart.
ONE_TOKEN = dict(labels=["answer1", "answer2", "answer3"], answer_prefix="the correct answer is ",
                 label_pattern=r"answer[1-3]")
# "aa" and "ab" share their first byte after the prefix: only full-sequence scoring separates them.
FALLBACK = dict(labels=["aa", "ab", "ba"], answer_prefix="answer: ", label_pattern=r"\b(aa|ab|ba)\b")


def make_task(name: str, spec: dict, count: int, seed: int = 0) -> TaskData:
    """Prompts of varied length that name their gold label after ``gold=`` and end with ``###``."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        label = rng.choice(spec["labels"])
        filler = "".join(rng.choice("abcdefgh xyz") for _ in range(rng.randint(3, 40)))
        prompt = f"{name} q{i} {filler} gold={label}; ###"
        examples.append(Example(name, prompt, spec["answer_prefix"] + label, label))
    return TaskData(name, list(spec["labels"]), spec["answer_prefix"], spec["label_pattern"], eval=examples)


def adapted(base: nn.Module, kind: str = "malora", seed: int = 0) -> AdaptedCausalLM:
    """The tiny model with adapters whose up-projections and routers are random (so they matter); the same
    whatever ran before (the adapters' own initialisation draws from the global generator)."""
    torch.manual_seed(seed)
    model = AdaptedCausalLM.from_base(base, AdapterConfig(kind=kind, rank=4, num_experts=4, dropout=0.0,
                                                          router=RouterConfig(top_k=2)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model.model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
            if hasattr(layer, "router"):
                layer.router.copy_(torch.randn(layer.router.shape, generator=gen))
    return model.eval()


# -- brute force -------------------------------------------------------------------------------------

def brute_force_label(model: AdaptedCausalLM, tokenizer, task: TaskData, example: Example, first_only: bool):
    """(best label, margin to the runner-up) from one unpadded full forward per label of the HF model:
    log p of the label-distinguishing token (``first_only``) or of everything from it to EOS."""
    prompt = tokenizer(example.prompt)["input_ids"]
    targets = [tokenizer(task.answer_prefix + label, add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for label in task.labels]
    split = next(k for k in range(min(map(len, targets))) if len({t[k] for t in targets}) > 1)
    scores = []
    for target in targets:
        ids = torch.tensor([prompt + target])
        logp = F.log_softmax(model.model(input_ids=ids).logits[0].float(), dim=-1)
        positions = range(len(prompt) + split, ids.shape[1])
        if first_only:
            positions = positions[:1]
        scores.append(sum(logp[p - 1, ids[0, p]].item() for p in positions))
    ranked = sorted(scores, reverse=True)
    return task.labels[scores.index(ranked[0])], ranked[0] - ranked[1]


@pytest.mark.parametrize("spec, first_only", [(ONE_TOKEN, True), (FALLBACK, False)],
                         ids=["one_token", "fallback"])
def test_label_logits_match_brute_force(make_tiny_model, tiny_tokenizer, spec, first_only):
    model = adapted(make_tiny_model())
    task = make_task("t", spec, 24, seed=1)
    assert label_continuations(tiny_tokenizer, task).one_token_decides is first_only
    predicted = score_label_logits(model, tiny_tokenizer, task, task.eval, batch_size=5)
    expected = [brute_force_label(model, tiny_tokenizer, task, ex, first_only) for ex in task.eval]
    compared = [(p, e) for p, (e, margin) in zip(predicted, expected) if margin > 1e-4]
    assert len(compared) >= 20
    assert [p for p, _ in compared] == [e for _, e in compared]
    # the comparison means something only if the model does not always pick the same label
    assert len({e for _, e in compared}) >= 2
    if not first_only:  # the two labels sharing their first token must both occur
        assert {"aa", "ab"} <= {e for _, e in compared}


def test_max_length_truncates_prompts_from_the_left_as_training_does(make_tiny_model, tiny_tokenizer):
    model = adapted(make_tiny_model())
    task = make_task("t", ONE_TOKEN, 12, seed=7)
    max_length = 40
    room = max_length - len("the correct answer is answer1") - 1  # byte tokens; the answer and EOS stay whole
    assert sum(len(ex.prompt) > room for ex in task.eval) >= 6
    cut = [Example(ex.task, ex.prompt[-room:], ex.target, ex.label) for ex in task.eval]
    whole = score_label_logits(model, tiny_tokenizer, task, task.eval, batch_size=4)
    truncated = score_label_logits(model, tiny_tokenizer, task, task.eval, batch_size=4,
                                   max_length=max_length)
    assert truncated == score_label_logits(model, tiny_tokenizer, task, cut, batch_size=4)
    assert truncated != whole  # the cut matters for this random model, so the check above has teeth
    with pytest.raises(ConfigError, match="data.max_length=20 is too short"):
        score_label_logits(model, tiny_tokenizer, task, task.eval, batch_size=4, max_length=20)


# -- an oracle and a constant model --------------------------------------------------------------------

class ScriptedLM(nn.Module):
    """A stand-in for AdaptedCausalLM whose next-token logits spell out ``prompt + answer_prefix +
    label + EOS``, with the label read from the prompt (``gold=...;``) or fixed (a constant model)."""

    def __init__(self, tokenizer, answer_prefix: str, fixed_label: str | None = None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answer_prefix = answer_prefix
        self.fixed_label = fixed_label
        self.record_routing = False
        self.calls = 0

    def _logits(self, row: list[int]) -> torch.Tensor:
        text = self.tokenizer.decode(row)
        prompt_end = text.index("###") + 3  # byte tokenizer: characters are tokens
        label = self.fixed_label or re.search(r"gold=(\w+);", text).group(1)
        script = row[:prompt_end] + self.tokenizer(self.answer_prefix + label, add_special_tokens=False)[
            "input_ids"] + [self.tokenizer.eos_token_id]
        logits = torch.zeros(len(row), len(self.tokenizer))
        for pos in range(len(row)):
            if pos + 1 < len(script):
                logits[pos, script[pos + 1]] = 10.0
        return logits

    def logits_at_positions(self, input_ids, attention_mask, positions, task_ids=None):
        self.calls += 1
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        return torch.stack([self._logits(row)[p] for row, p in zip(rows, positions.tolist())])

    def forward(self, input_ids, attention_mask=None, labels=None, task_ids=None):
        self.calls += 1
        sums = []
        for ids, mask, target in zip(input_ids, attention_mask, labels):
            logp = F.log_softmax(self._logits(ids[mask.bool()].tolist()), dim=-1)
            keep = (target[1:] != -100).nonzero(as_tuple=True)[0]
            sums.append(-logp[keep, target[1:][keep]].sum())
        return SimpleNamespace(seq_loss_sum=torch.stack(sums))


@pytest.mark.parametrize("spec", [ONE_TOKEN, FALLBACK], ids=["one_token", "fallback"])
def test_oracle_scores_100_and_constant_model_scores_its_label_share(tiny_tokenizer, spec):
    task = make_task("t", spec, 13, seed=2)
    cfg = EvalConfig(batch_size=4)
    oracle = evaluate(ScriptedLM(tiny_tokenizer, spec["answer_prefix"]), tiny_tokenizer, {"t": task}, cfg)
    assert oracle.scores["t"] == TaskScore(13, 13) and oracle.average == 100.0
    for fixed in spec["labels"]:
        constant = ScriptedLM(tiny_tokenizer, spec["answer_prefix"], fixed_label=fixed)
        result = evaluate(constant, tiny_tokenizer, {"t": task}, cfg)
        assert [p.extracted for p in result.predictions["t"]] == [fixed] * 13
        assert [p.correct for p in result.predictions["t"]] == [ex.label == fixed for ex in task.eval]
        assert result.scores["t"].correct == sum(ex.label == fixed for ex in task.eval)


def test_evaluate_restores_training_mode_and_respects_max_examples(make_tiny_model, tiny_tokenizer):
    model = adapted(make_tiny_model()).train()
    tasks = {"a": make_task("a", ONE_TOKEN, 6), "b": make_task("b", FALLBACK, 5)}
    result = evaluate(model, tiny_tokenizer, tasks, EvalConfig(batch_size=4, max_examples=3))
    assert model.training
    assert {n: s.total for n, s in result.scores.items()} == {"a": 3, "b": 3}
    assert result.to_json()["counts"]["a"]["total"] == 3


# -- sharding over ranks ---------------------------------------------------------------------------------

def count_forwards(model: AdaptedCausalLM, run):
    """(run(), how many scoring forwards it made through ``model``)."""
    calls = []
    originals = {"logits_at_positions": model.logits_at_positions, "forward": model.forward}
    for attr, original in originals.items():
        setattr(model, attr, lambda *a, _original=original, **k: calls.append(1) or _original(*a, **k))
    try:
        return run(), len(calls)
    finally:
        for attr in originals:
            delattr(model, attr)


def summing_stub(local: list[EvalResult], rank: int):
    """An all-reduce for rank ``rank`` run sequentially: its counts plus every other rank's."""
    others = [torch.tensor([[s.correct, s.total] for s in r.scores.values()]) for i, r in enumerate(local)
              if i != rank]
    return lambda tensor: tensor + sum(others)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_ranks_sum_to_the_single_process_counts(make_tiny_model, tiny_tokenizer, world_size):
    model = adapted(make_tiny_model())
    tasks = {"a": make_task("a", ONE_TOKEN, 7, seed=3), "b": make_task("b", FALLBACK, 8, seed=4)}
    cfg = EvalConfig(batch_size=2)
    whole = evaluate(model, tiny_tokenizer, tasks, cfg)
    assert 0 < sum(s.correct for s in whole.scores.values()) < 15  # not trivially all right or wrong

    local, forwards = zip(*[
        count_forwards(model, lambda rank=rank: evaluate(model, tiny_tokenizer, tasks, cfg, rank=rank,
                                                         world_size=world_size))
        for rank in range(world_size)])
    assert len(set(forwards)) == 1  # every rank runs the same number of forwards (ZeRO-3 safe)
    for rank, result in enumerate(local):
        for name in tasks:
            assert result.predictions[name] == whole.predictions[name][rank::world_size]
        assert reduce_scores(result, summing_stub(list(local), rank)).scores == whole.scores
    reduced = evaluate(model, tiny_tokenizer, tasks, cfg, rank=1, world_size=world_size,
                       all_reduce=summing_stub(list(local), 1))
    assert reduced.scores == whole.scores


# -- generation ----------------------------------------------------------------------------------------

def test_extract_label_takes_the_first_match():
    pattern = re.compile(r"answer[1-5]")
    assert extract_label(pattern, "the correct answer is answer3. answer1") == "answer3"
    assert extract_label(pattern, "I think answer9") == ""
    assert extract_label(pattern, "") == ""
    grouped = re.compile(r"\b(true|false)\b")
    assert extract_label(grouped, "the correct answer is untrue, false, true") == "false"


def greedy_reference(model: AdaptedCausalLM, tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding with a full, unpadded, cache-free forward per step."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(steps):
        token = model.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
        new.append(token)
        if token == tokenizer.eos_token_id:
            break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_matches_an_independent_greedy_decode(make_tiny_model, tiny_tokenizer):
    model = adapted(make_tiny_model())
    task = make_task("t", ONE_TOKEN, 6, seed=5)
    model.context.token_mask = torch.ones(3, dtype=torch.bool)  # a stale mask must not break anything
    generated = generate_texts(model, tiny_tokenizer, task, task.eval, batch_size=4, max_new_tokens=6)
    expected = [greedy_reference(model, tiny_tokenizer, ex.prompt, 6) for ex in task.eval]
    assert generated == expected
    assert all(expected)


def beam_search_alone(model: AdaptedCausalLM, tokenizer, prompt: str, beams: int, steps: int) -> str:
    """The text Hugging Face's own beam search writes after one prompt, unpadded, alone in its batch."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               num_beams=beams, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_scorer_end_to_end_scores_what_beam_search_writes(make_tiny_model, tiny_tokenizer):
    """Batched, left-padded beam search through ``evaluate``: the predictions are what each prompt alone
    makes the model write, and an example is right exactly when that is its gold label."""
    model = adapted(make_tiny_model())
    prompts = [ex.prompt for ex in make_task("t", ONE_TOKEN, 5, seed=6).eval]
    pattern = r"\S{1,3}"  # whatever the random model writes: a non-trivial extraction
    written = [extract_label(re.compile(pattern), beam_search_alone(model, tiny_tokenizer, p, 2, 4))
               for p in prompts]
    assert all(written)
    # the gold label is the model's own answer for examples 0, 2 and 4, one it never writes for 1 and 3
    gold = [answer if i % 2 == 0 else "never" for i, answer in enumerate(written)]
    prefix = ONE_TOKEN["answer_prefix"]
    task = TaskData("t", sorted({*written, "never"}), prefix, pattern,
                    eval=[Example("t", p, prefix + label, label) for p, label in zip(prompts, gold)])
    cfg = EvalConfig(scorer="generate", batch_size=3, num_beams=2, max_new_tokens=4)
    result = evaluate(model, tiny_tokenizer, {"t": task}, cfg)
    assert [p.extracted for p in result.predictions["t"]] == written
    assert result.scores["t"] == TaskScore(3, 5)


# -- bad input and reports -------------------------------------------------------------------------------

def test_bad_config_and_bad_examples_fail_with_clear_errors(tiny_tokenizer):
    model = ScriptedLM(tiny_tokenizer, ONE_TOKEN["answer_prefix"])
    task = make_task("t", ONE_TOKEN, 3)
    with pytest.raises(ConfigError, match="eval.scorer='vote'"):
        evaluate(model, tiny_tokenizer, {"t": task}, EvalConfig(scorer="vote"))
    with pytest.raises(ConfigError, match="eval.batch_size=0"):
        evaluate(model, tiny_tokenizer, {"t": task}, EvalConfig(batch_size=0))
    task.eval[1] = Example("t", "p ###", "the answer is answer1", "answer1")
    with pytest.raises(DataError, match="task t, eval example 1: target"):
        evaluate(model, tiny_tokenizer, {"t": task}, EvalConfig())
    task.eval[1] = Example("t", "p ###", "the correct answer is answer7", "answer7")
    with pytest.raises(DataError, match="label 'answer7' is not one of"):
        evaluate(model, tiny_tokenizer, {"t": task}, EvalConfig())


def test_accuracy_table_and_json():
    before = EvalResult({"boolq": TaskScore(5, 10), "piqa": TaskScore(1, 4)})
    after = EvalResult({"boolq": TaskScore(7, 10), "piqa": TaskScore(3, 4)})
    assert before.average == pytest.approx(37.5) and after.average == pytest.approx(72.5)
    assert after.to_json() == {"accuracy": {"boolq": 70.0, "piqa": 75.0}, "average": 72.5,
                               "counts": {"boolq": {"correct": 7, "total": 10},
                                          "piqa": {"correct": 3, "total": 4}}}
    lines = format_accuracy_table(before, after).splitlines()
    assert lines[0].split() == ["task", "n", "before", "after", "delta"]
    assert lines[1].split() == ["boolq", "10", "50.00", "70.00", "+20.00"]
    assert lines[2].split() == ["piqa", "4", "25.00", "75.00", "+50.00"]
    assert lines[3].split() == ["average", "37.50", "72.50", "+35.00"]
    assert len({len(line) for line in lines}) == 1  # fixed width
    alone = format_accuracy_table(None, after).splitlines()
    assert alone[1].split() == ["boolq", "10", "70.00"] and alone[-1].split() == ["average", "72.50"]
