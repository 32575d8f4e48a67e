"""README, "Use from Python": its code blocks run as written (offline, on the CPU: the hub id they name
resolves to the tiny random model saved into a temporary hub cache under that id); the loss falls, the
auxiliary loss is in ``outputs.loss``, the saved adapter loads in ``malora-eval`` and the routing
statistics add up."""

from __future__ import annotations

import json
import re

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F

from malora_train.cli import eval_main
from malora_train.models import load_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SNAPSHOT = "0" * 40


def section_blocks(readme: str, heading: str) -> list[str]:
    """The ```python blocks of the README section ``heading``."""
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def readme_blocks(repo_root) -> list[str]:
    blocks = section_blocks((repo_root / "README.md").read_text(), "Use from Python")
    assert len(blocks) == 2
    return blocks


@pytest.fixture
def hub_model(readme_blocks, tmp_path, monkeypatch, tiny_model_cfg, tiny_tokenizer) -> str:
    """The README's model id, served from a temporary offline hub cache holding the tiny model."""
    repo_id = re.search(r'^name = "([^"]+)"', readme_blocks[0], flags=re.M).group(1)
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    load_model(tiny_model_cfg, seed=0).save_pretrained(repo / "snapshots" / SNAPSHOT)
    tiny_tokenizer.save_pretrained(repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return repo_id


def test_the_readme_trainer_example_runs_as_written(readme_blocks, hub_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_blocks[0], "README.md (Use from Python)", "exec"), namespace)
    model, tokenizer, texts = namespace["model"], namespace["tokenizer"], namespace["texts"]
    assert capsys.readouterr().out.startswith("trainable params: ")
    assert namespace["trainer"].state.global_step == 30

    # the loss fell: the untrained adapted model is the base model (its up-projections start at zero)
    collate = namespace["DataCollatorForLanguageModeling"](tokenizer, mlm=False)
    batch = collate([tokenizer(text) for text in texts[::7]])
    base = namespace["AutoModelForCausalLM"].from_pretrained(hub_model)
    model.eval()
    with torch.no_grad():
        before = base(**batch).loss
        out = model(**batch)
    assert out.lm_loss < before - 0.25, (before, out.lm_loss)  # well inside the example's fall

    # outputs.loss is the LM loss plus the router loss, balance_coef x balance
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    torch.testing.assert_close(out.lm_loss,
                               F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    torch.testing.assert_close(out.aux_loss, 0.01 * out.balance_loss)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)

    # the saved adapter loads in malora-eval
    eval_main([f"model.name_or_path={hub_model}", "data.eval_per_task=4", "eval.adapter_path=out/adapter",
               "eval.output_dir=evaluated"])
    report = json.loads((tmp_path / "evaluated" / "eval_label_logits.json").read_text())
    assert report["adapter"] == "out/adapter"
    assert sorted(report["counts"]) == ["arithmetic", "case", "category", "compare", "sentiment"]
    assert all(counts["total"] == 4 for counts in report["counts"].values())

    # the routing statistics of the second block
    exec(compile(readme_blocks[1], "README.md (Use from Python, routing)", "exec"), namespace)
    stats, task_ids = namespace["stats"], namespace["task_ids"]
    real = namespace["batch"]["attention_mask"].sum(1)  # tokens per row, padding excluded
    assert stats["tasks"] == ["yes", "no"] and 0 < int(task_ids.sum()) < 64
    assert stats["tokens"] == {"yes": int(real[task_ids == 0].sum()), "no": int(real[task_ids == 1].sum())}
    assert len(stats["layers"]) == 2 * 6 and len(stats["average"][0]) == 8  # 2 decoder layers x 6 targets
