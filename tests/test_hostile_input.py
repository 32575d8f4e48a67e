"""Bad input a user can hand the tools (issue 26): each is refused in one line naming what is wrong, with
exit status 2 and no traceback, before anything runs that could crash or run code."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_at_start_up(tmp_path, train_cli, capsys,
                                                                              tiny_training_overrides):
    # the builtin byte tokenizer has 259 tokens; this model's table has 200 rows
    status = train_cli(*tiny_training_overrides, "model.architecture.vocab_size=200", "trainer.max_steps=2",
                       f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert status == 2, err
    [line] = stderr_lines(err)
    assert "largest token id is 258" in line and "200 rows" in line and "Traceback" not in err


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_model_folder_holding_a_pickle_payload_is_refused_in_one_line(tmp_path, train_cli, capsys,
                                                                        tiny_training_overrides):
    from transformers import AutoConfig

    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    AutoConfig.for_model(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=260).save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    status = train_cli(*tiny_training_overrides, f"model.name_or_path={folder}", "trainer.max_steps=2",
                       f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert status == 2, err
    [line] = stderr_lines(err)
    assert str(folder) in line and "refused to load" in line and "Traceback" not in err
    assert not marker.exists()


def test_the_printed_resume_hint_is_shell_quoted(tmp_path, run_training, capsys, monkeypatch):
    import signal
    import subprocess

    from malora_train.train.loop import Trainer

    marker = tmp_path / "pasted-code-ran"
    run_dir = tmp_path / f"a run $(touch {marker})"
    original = Trainer.train_step

    def train_step(self):
        original(self)
        if self.state.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert run_training(run_dir, "trainer.max_steps=5")["status"] == "interrupted"
    out = capsys.readouterr().out
    hint = out.split("continue with ", 1)[1].splitlines()[0]
    echoed = subprocess.run(["bash", "-c", f"printf '%s\\n' {hint}"], capture_output=True, text=True, check=True)
    assert echoed.stdout.splitlines() == ["trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    assert not marker.exists()
