"""``malora-eval`` on the tiny model, with no shared data: it scores a saved mixture adapter as the model that
saved it scores (and not as the base model does), and ``eval.export=merged`` writes a LoRA run as a plain
Hugging Face model whose logits are the adapted model's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from malora_train.adapters import AdaptedCausalLM, adapter_layers, load_adapter, save_adapter
from malora_train.config import AdapterConfig, RouterConfig

TINY = ["model=tiny", "data.tasks=[sentiment,case]", "data.train_per_task=16", "data.eval_per_task=12",
        "data.max_length=256"]
TEXTS = ["Is 12 more than 7? ### Response: the correct answer is", "classify: THE LOUD DOG ###", "x"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A tiny LoRA run trained hard enough (lr 1e-2) that its adapter moves the logits."""
    from accelerate.state import AcceleratorState, GradientState
    from omegaconf import OmegaConf

    from malora_train.cli import compose
    from malora_train.train.loop import train

    run_dir = tmp_path_factory.mktemp("lora") / "run"
    cfg = compose([*TINY, "data.eval_per_task=2", "adapter=lora", "adapter.rank=4", "trainer.lr=1e-2",
                   "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.progress=false",
                   "trainer.eval_before=false"])
    try:
        # config.yaml as the CLI writes it
        train(cfg, run_dir, resolved_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return run_dir


def tiny_base():
    from malora_train.cli import compose
    from malora_train.models import load_model_and_tokenizer

    cfg = compose(TINY)
    model, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    return model.eval(), tokenizer, cfg


def test_export_merged_reloads_in_plain_transformers_with_the_adapted_models_logits(lora_run, tmp_path,
                                                                                   capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malora_train.cli import eval_main

    out = tmp_path / "merged"
    assert eval_main([f"eval.run_dir={lora_run}", "eval.export=merged", f"eval.output_dir={out}"]) == {
        "exported": str(out)}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, nothing of ours
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))

    base, our_tokenizer, _ = tiny_base()
    with torch.no_grad():
        plain = [base(input_ids=torch.tensor([our_tokenizer(t)["input_ids"]])).logits for t in TEXTS]
    adapted = load_adapter(base, lora_run / "adapter").eval()  # injects into ``base``
    for text, plain_logits in zip(TEXTS, plain):
        ids = tokenizer(text)["input_ids"]
        assert ids == our_tokenizer(text)["input_ids"]  # the exported tokenizer is the run's
        with torch.no_grad():
            expected = adapted.model(input_ids=torch.tensor([ids])).logits
            got = merged(input_ids=torch.tensor([ids])).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (expected - plain_logits).abs().max() > 1e-2  # the adapter matters: the check has teeth


def test_eval_scores_a_saved_adapter_as_the_model_that_saved_it(tmp_path, capsys):
    """A MALoRA adapter with random up-projections and routers (so it changes predictions), saved and
    scored by ``malora-eval eval.adapter_path=...`` with both scorers."""
    from malora_train.cli import eval_main
    from malora_train.data import build_tasks
    from malora_train.eval import evaluate

    # MALoRA's initialisation draws from the global generator: not from earlier tests' state
    torch.manual_seed(0)
    base, tokenizer, cfg = tiny_base()
    adapter_cfg = AdapterConfig(kind="malora", rank=4, num_experts=4, dropout=0.0,
                                router=RouterConfig(top_k=2))
    base_copy, _, _ = tiny_base()
    model = AdaptedCausalLM.from_base(base_copy, adapter_cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model.model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 2.0)
            layer.router.copy_(torch.randn(layer.router.shape, generator=gen))
    save_adapter(model, tmp_path / "adapter", "tiny")
    tasks = build_tasks(cfg.data, cfg.seed)
    plain = AdaptedCausalLM.from_base(base, AdapterConfig(kind="lora"))  # B = 0: the base model's scores

    for scorer, extra in (("label_logits", []), ("generate", ["eval.max_new_tokens=4"])):
        report = eval_main([*TINY, f"eval.adapter_path={tmp_path / 'adapter'}", f"eval.scorer={scorer}",
                            *extra])
        eval_cfg = dataclasses.replace(cfg.eval, scorer=scorer, max_new_tokens=4)
        expected = evaluate(model, tokenizer, tasks, eval_cfg).to_json()
        assert report["accuracy"] == pytest.approx(expected["accuracy"]), scorer
        assert report["counts"] == expected["counts"], scorer
        if scorer == "label_logits":  # the adapter changes the score: loading the base alone would fail here
            assert expected["counts"] != evaluate(plain, tokenizer, tasks, eval_cfg).to_json()["counts"]


def test_the_base_model_alone_is_evaluated_with_adapter_path_none(tmp_path, capsys):
    from malora_train.cli import eval_main

    out = tmp_path / "base-eval"
    report = eval_main([*TINY, "eval.adapter_path=none", f"eval.output_dir={out}"])
    assert report["adapter"] == "none" and set(report["accuracy"]) == {"sentiment", "case"}
    assert ((out / "eval_base_label_logits.json").is_file()
            and (out / "predictions_base_label_logits.jsonl").is_file())


def test_export_merged_of_a_mixture_adapter_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from malora_train.cli import eval_main
    from malora_train.commands import evaluate

    base, _, _ = tiny_base()
    save_adapter(AdaptedCausalLM.from_base(base, AdapterConfig(kind="molora", rank=2, num_experts=2)),
                 tmp_path / "adapter", base_model_name="tiny")
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as stop:
        eval_main([*TINY, f"eval.adapter_path={tmp_path / 'adapter'}", "eval.export=merged",
                   f"eval.output_dir={tmp_path / 'merged'}"])
    assert stop.value.code == 2
    assert "eval.export=merged needs adapter.kind=lora; this adapter is molora" in capsys.readouterr().err
