"""``transformers.Trainer`` saving an ``AdaptedModel`` as a complete adapter folder.

``Trainer._save`` (behind ``save_model()`` and every checkpoint) calls ``save_pretrained`` only on a
``PreTrainedModel`` or a ``PeftModel``; any other model gets its ``state_dict()`` as ``model.safetensors``
alone, which no loader reads as an adapter. ``AdapterSaving`` adds the adapter folder beside it.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer


class AdapterSaving:
    """A mixin for ``transformers.Trainer`` or a subclass of it (``class MyTrainer(AdapterSaving,
    SFTTrainer)``): ``save_model()`` and each checkpoint of an ``AdaptedModel`` also write
    ``adapter_config.json`` and ``adapter_model.safetensors``, the folder ``load_adapted_model``,
    ``malora-eval eval.adapter_path=...`` and PEFT read. ``model.safetensors`` stays: it is what
    ``resume_from_checkpoint`` restores."""

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        from malora_train.api import AdaptedModel

        super()._save(output_dir, state_dict=state_dict)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(model, AdaptedModel):  # state_dict: gathered by save_model (ZeRO-3), else None
            model.save_pretrained(output_dir if output_dir is not None else self.args.output_dir,
                                  state_dict=state_dict, is_main_process=self.args.should_save)


class AdapterTrainer(AdapterSaving, Trainer):
    """``transformers.Trainer`` whose ``save_model()`` and checkpoints of an ``AdaptedModel`` hold a
    complete, loadable adapter folder (``AdapterSaving``)."""
