"""The mixture kinds as PEFT methods: after ``import malora_train``, PEFT's own calls (``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM.from_pretrained``, ``save_pretrained``) build, load
and save MoLoRA, MALoRA and HydraLoRA adapters with the same tensors and logits as ``load_adapted_model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import malora_train
from malora_train.adapters import save_adapter

peft = pytest.importorskip("peft")

KINDS = ["molora", "malora", "hydralora"]
TOLERANCE = 1e-6


def _perturbed(model) -> None:
    """Adapter tensors away from their initialisation (lora_B starts at 0), the same for equal seeds."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.state_dict().values() if isinstance(model, malora_train.AdaptedModel) else []:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _ids() -> torch.Tensor:
    return torch.randint(3, 260, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


@pytest.fixture
def base_dir(tmp_path, make_tiny_model, tiny_tokenizer) -> Path:
    folder = tmp_path / "tiny-base"
    make_tiny_model(0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _saved_by_us(kind: str, make_tiny_model, base_dir: Path, out: Path) -> malora_train.AdaptedModel:
    config = malora_train.load_adapter_config(kind, rank=4, num_experts=4, dropout=0.0)
    ours = malora_train.get_adapted_model(make_tiny_model(0), config)
    _perturbed(ours)
    save_adapter(ours.adapted_lm, out, base_model_name=str(base_dir))
    return ours.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_and_saves_a_mixture_adapter_as_our_loader_does(kind, tmp_path, make_tiny_model, base_dir):
    ours_dir = tmp_path / "ours"
    _saved_by_us(kind, make_tiny_model, base_dir, ours_dir)
    config = json.loads((ours_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == kind.upper() and "malora-train" in config["malora_train"]["read_with"]
    expected = _logits(malora_train.load_adapted_model(make_tiny_model(0), ours_dir))

    loaded = peft.PeftModel.from_pretrained(make_tiny_model(0), ours_dir)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert (_logits(loaded) - expected).abs().max() <= TOLERANCE
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(ours_dir)
    assert (_logits(auto) - expected).abs().max() <= TOLERANCE

    peft_dir = tmp_path / "by-peft"
    loaded.save_pretrained(peft_dir)
    saved, written = (load_file(ours_dir / "adapter_model.safetensors"),
                      load_file(peft_dir / "adapter_model.safetensors"))
    assert set(written) == set(saved)
    for key in saved:
        torch.testing.assert_close(written[key], saved[key], rtol=0, atol=0)
    again = malora_train.load_adapted_model(make_tiny_model(0), peft_dir)
    assert again.adapter_config == \
        malora_train.load_adapted_model(make_tiny_model(0), ours_dir).adapter_config
    assert (_logits(again) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_get_peft_model_builds_a_mixture_adapter_our_loader_reads(kind, tmp_path, make_tiny_model, base_dir):
    config_cls = {"molora": malora_train.MoLoRAPeftConfig, "malora": malora_train.MALoRAPeftConfig,
                  "hydralora": malora_train.HydraLoRAPeftConfig}[kind]
    model = peft.get_peft_model(make_tiny_model(0), config_cls(rank=4, num_experts=4, dropout=0.0))
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.rsplit(".", 1)[-1] in {"router", "lora_A", "lora_B", "shared_A", "coeff_P"}
                             for name in trainable)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in trainable:
            model.get_parameter(name).add_(0.05 * torch.randn(model.get_parameter(name).shape,
                                                              generator=generator))
    out = model(input_ids=_ids(), labels=_ids())
    assert out.aux_loss is not None and out.loss.item() == pytest.approx((out.lm_loss + out.aux_loss).item())
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ours = malora_train.load_adapted_model(make_tiny_model(0), tmp_path / "adapter")
    assert (_logits(model) - _logits(ours)).abs().max() <= TOLERANCE
    with pytest.raises(malora_train.ConfigError, match=r"adapter\.rank"):
        config_cls(rank="four")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_trainer_save_model_and_save_pretrained_write_a_loadable_adapter_folder(tmp_path, make_tiny_model):
    from transformers import Trainer, TrainingArguments

    peft_model = peft.get_peft_model(make_tiny_model(0), malora_train.MALoRAPeftConfig(rank=4, num_experts=4))
    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to=[])
    Trainer(model=peft_model, args=args).save_model(str(tmp_path / "trainer"))
    adapted = malora_train.get_adapted_model(make_tiny_model(0),
                                             malora_train.load_adapter_config("molora", rank=4))
    adapted.save_pretrained(tmp_path / "api")
    for folder, model in ((tmp_path / "trainer", peft_model), (tmp_path / "api", adapted)):
        model.eval()
        loaded = malora_train.load_adapted_model(make_tiny_model(0), folder)
        assert (_logits(loaded) - _logits(model)).abs().max() <= TOLERANCE
        assert (_logits(peft.PeftModel.from_pretrained(make_tiny_model(0), folder))
                - _logits(model)).abs().max() <= TOLERANCE


def test_the_kinds_are_registered_when_peft_is_imported_after_a_look_up() -> None:
    """transformers asks ``importlib.util.find_spec("peft")`` before anything imports peft: that look-up must
    not use up the hook that registers the kinds at the real import."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import importlib.util, malora_train; importlib.util.find_spec('peft'); import peft; "
            "from peft.utils.peft_types import PeftType; print(sorted(n for n in PeftType._value2member_map_ "
            "if n in ('MOLORA', 'MALORA', 'HYDRALORA')))")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['HYDRALORA', 'MALORA', 'MOLORA']"
