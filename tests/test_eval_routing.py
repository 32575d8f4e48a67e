"""Routing diagnostics: counts recorded during evaluation against a manual count of the routers' top-k
on unpadded inputs, the report's arithmetic, and its files."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_specs import kind_config
from torch import nn

from malora_train.adapters import AdaptedCausalLM, MixtureAdapterLinear, adapter_layers
from malora_train.config import AdapterConfig, EvalConfig, RouterConfig
from malora_train.data.types import Example, TaskData
from malora_train.eval import evaluate, format_expert_shares, routing_report, write_routing

TOP_K, EXPERTS = 2, 4


def make_task(name: str, labels: list[str], answer_prefix: str, count: int) -> TaskData:
    examples = []
    for i in range(count):
        label = labels[i % len(labels)]
        prompt = f"{name} question {i}" + " filler" * (i % 4) + " ###"
        examples.append(Example(name, prompt, answer_prefix + label, label))
    return TaskData(name, labels, answer_prefix, "|".join(labels), eval=examples)


TASKS = {
    "one_token": make_task("one_token", ["answer1", "answer2"], "the correct answer is ", 5),
    "fallback": make_task("fallback", ["aa", "ab", "ba"], "answer: ", 6),  # scored by full sequences
}


def adapted(base: nn.Module, kind: str = "malora") -> AdaptedCausalLM:
    torch.manual_seed(0)  # every adapter tensor fixed: a random near-tie in top-k would make counts flaky
    spec = kind_config(kind, rank=4, num_experts=EXPERTS, dropout=0.0, router=RouterConfig(top_k=TOP_K))
    model = AdaptedCausalLM.from_base(base, spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model.model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
            if isinstance(layer, MixtureAdapterLinear):
                layer.router.copy_(torch.randn(layer.router.shape, generator=gen))
    return model.eval()


def manual_counts(model: AdaptedCausalLM, rows_by_task: list[list[list[int]]]) -> dict[str, torch.Tensor]:
    """(tasks, experts) top-k counts per mixture layer from one unpadded forward per row, with the
    router applied by hand to each layer's input."""
    layers = dict(model.mixture_layers())
    counts = {name: torch.zeros(len(rows_by_task), EXPERTS) for name in layers}
    current = {}

    def keep_input(module, args, out, name):
        current.setdefault(name, []).append(args[0].reshape(-1, module.in_features))

    hooks = [layer.register_forward_hook(lambda m, a, o, name=name: keep_input(m, a, o, name))
             for name, layer in layers.items()]
    try:
        for task, rows in enumerate(rows_by_task):
            for row in rows:
                current.clear()
                model.model(input_ids=torch.tensor([row]))
                for name, layer in layers.items():
                    (x,) = current[name]
                    top = (x.float() @ layer.router.t()).topk(TOP_K, dim=-1).indices
                    counts[name][task] += torch.bincount(top.reshape(-1), minlength=EXPERTS).float()
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def scored_rows(tokenizer, task: TaskData, scorer: str) -> list[list[int]]:
    """What each example contributes to routing: the prompt, plus for label_logits the tokens all
    labels' targets share, plus (full-sequence path) the first label's remaining target with EOS."""
    rows = []
    targets = [tokenizer(task.answer_prefix + label, add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for label in task.labels]
    shared = 0
    while len({t[shared] for t in targets}) == 1:
        shared += 1
    one_token = len({t[shared] for t in targets}) == len(targets)
    for ex in task.eval:
        prompt = tokenizer(ex.prompt)["input_ids"]
        if scorer == "generate":
            rows.append(prompt)
        else:
            rows.append(prompt + (targets[0][:shared] if one_token else targets[0]))
    return rows


@pytest.mark.parametrize("scorer", ["label_logits", "generate"])
def test_recorded_counts_match_a_manual_top_k_count(make_tiny_model, tiny_tokenizer, scorer):
    model = adapted(make_tiny_model())
    cfg = EvalConfig(scorer=scorer, batch_size=4, max_new_tokens=2)
    evaluate(model, tiny_tokenizer, TASKS, cfg, record_routing=True)
    assert model.record_routing is False
    recorded = model.routing_counts()
    expected = manual_counts(model, [scored_rows(tiny_tokenizer, t, scorer) for t in TASKS.values()])
    assert set(recorded) == set(expected) and len(expected) == 2 * 6  # 2 decoder layers x 6 targets
    for name in expected:  # padding (and the extra candidate rows) excluded: exact integer counts
        assert torch.equal(recorded[name][:2], expected[name]), name

    report = routing_report(model, list(TASKS))
    tokens = [sum(len(r) for r in scored_rows(tiny_tokenizer, t, scorer)) for t in TASKS.values()]
    assert report["tokens"] == dict(zip(TASKS, tokens))
    for name, shares in report["layers"].items():
        shares = torch.tensor(shares, dtype=torch.float64)
        assert torch.allclose(shares.sum(dim=1), torch.ones(2, dtype=torch.float64))
        assert torch.allclose(shares, expected[name].double() / expected[name].sum(dim=1, keepdim=True))
    average = torch.tensor(report["average"], dtype=torch.float64)
    assert torch.allclose(average, torch.tensor(list(report["layers"].values()), dtype=torch.float64).mean(0))


def test_sharded_routing_counts_add_up(make_tiny_model, tiny_tokenizer):
    model = adapted(make_tiny_model())
    cfg = EvalConfig(batch_size=2)
    evaluate(model, tiny_tokenizer, TASKS, cfg, record_routing=True)
    whole = routing_report(model, list(TASKS))
    local = []
    for rank in range(2):
        evaluate(model, tiny_tokenizer, TASKS, cfg, rank=rank, world_size=2, record_routing=True)
        local.append({n: c.clone() for n, c in model.routing_counts().items()})
    names = list(local[0])
    rank0 = torch.stack([local[0][n][:2] for n in names]).double()
    summed = routing_report(model, list(TASKS), all_reduce=lambda t: t + rank0)  # model holds rank 1's
    assert summed == whole


def test_report_arithmetic_on_set_counts(make_tiny_model):
    model = adapted(make_tiny_model())
    layers = model.mixture_layers()
    even = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    # the third row is the uncounted bucket: it must not show
    skewed = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    for i, (_, layer) in enumerate(layers):
        layer.task_expert_counts = even if i == 0 else skewed
    report = routing_report(model, ["a", "b"])
    first, second = layers[0][0], layers[1][0]
    assert report["layers"][first] == [[0.25] * 4, [0.25] * 4]
    assert report["layers"][second] == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert report["tokens"] == {"a": 4, "b": 2}  # 8 and 4 token-slots at top-2 in the first layer
    assert report["balance"][first]["cv"] == pytest.approx(0.0)
    assert report["balance"][first]["max_over_mean"] == pytest.approx(1.0)
    load = [0.75, 0.25, 0.0, 0.0]  # 6 and 2 of 8 assignments
    assert report["balance"][second]["load"] == pytest.approx(load)
    assert report["balance"][second]["max_over_mean"] == pytest.approx(3.0)
    expected_cv = torch.tensor(load).std(unbiased=False).item() / 0.25
    assert report["balance"][second]["cv"] == pytest.approx(expected_cv)
    assert report["average"][0][0] == pytest.approx((0.25 + (len(layers) - 1) * 1.0) / len(layers))


def test_write_routing_files_and_text_table(make_tiny_model, tiny_tokenizer, tmp_path):
    model = adapted(make_tiny_model())
    evaluate(model, tiny_tokenizer, TASKS, EvalConfig(batch_size=4), record_routing=True)
    report = routing_report(model, list(TASKS))
    paths = write_routing(report, tmp_path / "run")
    assert [p.name for p in paths] == ["routing.json", "routing_heatmap.png"]
    assert json.loads(paths[0].read_text()) == report
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["routing.json", "routing_heatmap.png"]

    lines = format_expert_shares(report).splitlines()
    assert lines[0].split() == ["task", "E0", "E1", "E2", "E3"]
    for line, task, row in zip(lines[1:3], TASKS, report["average"]):
        cells = line.split()
        assert cells[0] == task
        assert [float(c) for c in cells[1:]] == pytest.approx([100 * v for v in row], abs=0.051)


def test_plain_lora_has_no_routing(make_tiny_model, tiny_tokenizer, tmp_path):
    model = adapted(make_tiny_model(), kind="lora")
    evaluate(model, tiny_tokenizer, TASKS, EvalConfig(batch_size=4), record_routing=True)
    report = routing_report(model, list(TASKS))
    assert report is None
    assert write_routing(report, tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert format_expert_shares(report) == ""


def test_dense_routing_reports_router_probability_mass(make_tiny_model, tiny_tokenizer):
    """With K = N every token reaches every expert: the shares are the mean gate mass, not a flat 1/N."""
    torch.manual_seed(0)
    model = AdaptedCausalLM.from_base(make_tiny_model(), AdapterConfig(
        kind="hydralora", rank=4, num_experts=EXPERTS, dropout=0.0, router=RouterConfig(dense=True)))
    with torch.no_grad():
        for _, layer in adapter_layers(model.model):
            layer.router.normal_(std=1.0)
    evaluate(model.eval(), tiny_tokenizer, TASKS, EvalConfig(batch_size=4), record_routing=True)
    report = routing_report(model, list(TASKS))
    assert report["dense"] is True
    shares = torch.tensor(report["average"], dtype=torch.float64)
    assert torch.allclose(shares.sum(dim=1), torch.ones(len(TASKS), dtype=torch.float64))
    assert (shares - 1 / EXPERTS).abs().max() > 0.01, "gate mass, not uniform slot counts"
    rows = [sum(len(r) for r in scored_rows(tiny_tokenizer, t, "label_logits")) for t in TASKS.values()]
    assert report["tokens"] == dict(zip(TASKS, rows))
