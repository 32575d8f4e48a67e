"""Bad input a user can hand the tools (issue 26): each is refused in one line naming what is wrong, with
exit status 2 and no traceback, before anything runs that could crash or run code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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
    echoed = subprocess.run(["bash", "-c", f"printf '%s\\n' {hint}"], capture_output=True, text=True,
                            check=True)
    assert echoed.stdout.splitlines() == ["trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    assert not marker.exists()


def test_a_manifest_or_adapter_config_from_a_later_version_is_refused(tmp_path, make_tiny_model):
    import json

    from malora_train.adapters import AdaptedCausalLM, read_adapter_config, save_adapter
    from malora_train.adapters.io import FORMAT_VERSION
    from malora_train.config import AdapterConfig
    from malora_train.errors import MaloraError
    from malora_train.run_dir import write_manifest
    from malora_train.train.checkpoint.resume import resolve_resume

    step = tmp_path / "run" / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    write_manifest(step)
    manifest = json.loads((step / "manifest.json").read_text())
    for key, value in (("format", 2), ("format", "2")):
        (step / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        for resume in ("auto", str(step)):
            with pytest.raises(MaloraError, match="manifest.json") as error:
                resolve_resume(tmp_path / "run", resume)
            assert "format" in str(error.value) and "\n" not in str(error.value)

    model = AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind="molora", rank=2))
    save_adapter(model, tmp_path / "adapter", base_model_name="tiny")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    later = FORMAT_VERSION + 1
    config["malora_train"]["format_version"] = later
    path.write_text(json.dumps(config))
    with pytest.raises(MaloraError, match=rf"format_version {later} .*up to {FORMAT_VERSION}"):
        read_adapter_config(tmp_path / "adapter")


def test_the_final_adapter_has_a_manifest_and_zeroed_bytes_in_it_are_an_error(tmp_path, run_training,
                                                                              monkeypatch, capsys):
    from cli_runner import run_program

    run_dir = tmp_path / "run"
    assert run_training(run_dir, "trainer.max_steps=2", "trainer.eval_after=false")["status"] == "completed"
    assert (run_dir / "adapter" / "manifest.json").is_file()
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the end of the last tensor's data: still a well-formed file
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    status = run_program(monkeypatch, "malora-eval", [str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2, err
    expected = f"malora-eval: error: {weights}: content differs from the manifest (corrupted)"
    assert stderr_lines(err)[-1] == expected
    assert "Traceback" not in err
