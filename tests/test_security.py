"""Files a run directory holds are data, never code: a crafted DeepSpeed ``*.pt`` file is refused instead of
unpickled, a run's ``config.yaml`` cannot switch on a model folder's own code, ``${...}`` in an adapter
config stays text, and every file a run writes has the permissions the umask gives a normal file."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml

from malora_train.adapters import AdaptedCausalLM, read_adapter_config, save_adapter
from malora_train.config import AdapterConfig
from malora_train.errors import ConfigError, DataError
from malora_train.train.checkpoint.deepspeed_engine import _WeightsOnlyCheckpointEngine, weights_only_loads


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class FakeDeepSpeedEngine:
    """The two things ``weights_only_loads`` touches on DeepSpeed's engine."""

    def __init__(self) -> None:
        self.checkpoint_engine = object()

    def load_universal_checkpoint(self) -> bool:
        return False


def test_deepspeed_checkpoint_files_load_without_unpickling_code(tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": None, "payload": RunsCode(marker)}, crafted)
    honest = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "exp_avg": torch.ones(3)}},
               honest)
    engine = FakeDeepSpeedEngine()
    with weights_only_loads(engine):
        assert torch.equal(engine.checkpoint_engine.load(str(honest))["optimizer_state_dict"]["exp_avg"],
                           torch.ones(3))
        with pytest.raises(DataError, match=rf"^{crafted}: refused to load it: it holds objects other than "
                                            "tensors and plain data, which could run code"):
            engine.checkpoint_engine.load(str(crafted))
    assert not marker.exists()
    assert not isinstance(engine.checkpoint_engine, _WeightsOnlyCheckpointEngine)  # put back


def test_adapter_config_is_plain_data(make_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MALORA_TEST_SECRET", "hunter2")
    model = AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind="lora", rank=2))
    save_adapter(model, tmp_path, base_model_name="tiny")
    path = tmp_path / "malora_adapter.json"
    meta = json.loads(path.read_text())
    meta["malora_train"]["adapter"]["target_modules"] = "${oc.env:MALORA_TEST_SECRET}"
    path.write_text(json.dumps(meta))
    adapter_cfg, _ = read_adapter_config(tmp_path)
    assert adapter_cfg.target_modules == "${oc.env:MALORA_TEST_SECRET}"
    meta["malora_train"]["adapter"]["rank"] = "${oc.env:MALORA_TEST_SECRET}"
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as error:
        read_adapter_config(tmp_path)
    assert "hunter2" not in str(error.value) and str(path) in str(error.value)


CUSTOM_CODE = '''
from pathlib import Path
Path({marker!r}).mkdir()
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def test_a_run_directory_cannot_run_a_model_folders_code(make_tiny_model, tmp_path, monkeypatch, capsys):
    """``malora-eval eval.run_dir=D`` with ``trust_remote_code: true`` in D/config.yaml: refused, nothing
    ran."""
    from malora_train.cli import eval_main

    marker = tmp_path / "code-ran"
    model_dir = tmp_path / "model-with-code"
    model_dir.mkdir()
    (model_dir / "evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 260,
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    run_dir = tmp_path / "run"
    save_adapter(AdaptedCausalLM.from_base(make_tiny_model(0), AdapterConfig(kind="lora", rank=2)),
                 run_dir / "adapter", base_model_name=str(model_dir))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {
        "name": "evil", "source": "pretrained", "name_or_path": str(model_dir), "tokenizer": "builtin",
        "trust_remote_code": True}}))
    with pytest.raises(SystemExit) as stop:
        eval_main([str(run_dir)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"malora-eval: error: model.name_or_path={str(model_dir)!r}: ") and "\n" not in err
    assert "trust_remote_code" in err
    assert not marker.exists()
    assert "evil" not in sys.modules


def test_every_file_a_run_writes_respects_the_umask(tmp_path, run_training):
    previous = os.umask(0o027)
    try:
        run_training(tmp_path / "run", "adapter=malora", "trainer.max_steps=2", "trainer.save_every=1")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"summary.json", "routing.json", "adapter_model.safetensors", "optimizer.safetensors",
            "manifest.json", "config.yaml", "metrics.jsonl", "loss.png"} <= {p.name for p in files}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o640)}, modes
