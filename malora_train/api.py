"""The Python API: put adapters into your own Hugging Face causal LM and train it with your own loop,
``transformers.Trainer`` or Accelerate, in the spirit of PEFT's ``get_peft_model``.

``AdaptedModel`` wraps the model (adapters injected in place, everything else frozen). Its forward is the
HF model's own forward (its LM loss, logits, ``num_items_in_batch`` handling) with the routers'
auxiliary loss, weighted by ``adapter.router.balance_coef`` / ``z_loss_coef`` as in the CLI, added to
``outputs.loss``. The adapter maths, the files and the routing report are the CLI's own
(``adapters``, ``eval.routing``); this module only connects them to the HF conventions.

Public names are re-exported by ``malora_train/__init__.py``; the rest of the package is internal.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from malora_train.adapters import (
    AdaptedCausalLM,
    adapter_class,
    adapter_layers,
    adapter_state_dict,
    load_adapter_weights,
    merge_lora,
    parameter_report,
    read_adapter_config,
    save_adapter,
)
from malora_train.config import CONF_DIR, DEFAULT_ADAPTER_KIND, AdapterConfig, adapter_config_class
from malora_train.errors import ConfigError
from malora_train.eval.routing import routing_report, start_recording, stop_recording
from malora_train.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

_PRESETS = CONF_DIR / "adapter"
_ALL_TOKENS = "all"  # the one routing row when tokens are counted without task ids


@dataclass
class AdaptedModelOutput(CausalLMOutputWithPast):
    """The HF causal-LM output plus the loss's parts: ``loss = lm_loss + aux_loss`` (when labels are given).

    ``lm_loss`` is the HF model's own loss; ``aux_loss`` the routers' ``balance_coef * balance_loss +
    z_loss_coef * z_loss`` (0 for plain LoRA), scaled by this batch's share of ``num_items_in_batch`` when
    that is given. ``balance_loss`` and ``z_loss`` are the unweighted means over the mixture layers
    (detached; None without a router): a balance of 1 is a perfectly even router.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class AdaptedModel(nn.Module):
    """A Hugging Face causal LM with LoRA, MoLoRA, MALoRA or HydraLoRA adapters; make one with
    ``get_adapted_model`` or ``load_adapted_model``.

    ``base_model`` is the wrapped HF model itself (adapters injected in place, its own weights frozen).
    ``state_dict()`` holds the adapter tensors only, so ``Trainer`` checkpoints stay adapter-sized and
    ``resume_from_checkpoint`` restores them; the base weights are the base model's.
    """

    accepts_loss_kwargs = True  # transformers.Trainer passes num_items_in_batch (gradient accumulation)

    def __init__(self, base_model: PreTrainedModel, config: AdapterConfig) -> None:
        super().__init__()
        if any(True for _ in adapter_layers(base_model)):
            raise ConfigError("base_model already holds malora-train adapters: pass a fresh model")
        self.base_model = base_model
        # the same modules as base_model, kept out of the module tree (nn.Module's __setattr__ would
        # register them) so that their names appear once
        object.__setattr__(self, "_adapted_lm", AdaptedCausalLM.from_base(base_model, _checked(config)))
        self._routing_tasks: list[str] | None = None
        self._per_task = False
        self.training = base_model.training  # the wrapper starts in the mode of the model it wraps

    @property
    def adapted_lm(self) -> AdaptedCausalLM:
        """The package's own wrapper of ``base_model`` (the one the CLI trains and evaluates), for the
        package's functions that take an ``AdaptedCausalLM``."""
        return self._adapted_lm

    # -- what Trainer and users read from a HF model ---------------------------------------------
    @property
    def adapter_config(self) -> AdapterConfig:
        """The adapter's configuration (the dataclass the CLI's ``adapter.*`` keys fill)."""
        return self.adapted_lm.adapter_cfg

    @property
    def config(self) -> Any:
        """The base model's ``PretrainedConfig``."""
        return self.base_model.config

    @property
    def generation_config(self) -> Any:
        """The base model's generation config (None when it has none)."""
        return getattr(self.base_model, "generation_config", None)

    @property
    def loss_type(self) -> str | None:
        """The base model's loss type: it tells ``Trainer`` to count tokens over the shifted labels."""
        return getattr(self.base_model, "loss_type", None)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, **kwargs: Any) -> AdaptedModelOutput:
        """The base model's forward (labels at -100 carry no loss) plus the routers' auxiliary loss.

        ``task_ids`` (B,): each row's task index, needed only inside ``recording_routing(task_names)``.
        ``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation): the answer tokens
        of the whole optimiser step; the LM loss is then summed over this batch's tokens and divided by
        it, and the auxiliary loss is weighted by this batch's share of those tokens, so that a step's
        micro-batches add up to its LM loss plus the token-weighted mean of their auxiliary losses (the
        CLI's mean over micro-batches, when they hold equally many answer tokens). Other keyword
        arguments go to the base model. A loss computed from the logits instead (``Trainer``'s label
        smoothing or ``compute_loss_func``) must add ``outputs.aux_loss`` itself.
        """
        adapted = self.adapted_lm
        embeds = kwargs.get("inputs_embeds")
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        shape = input_ids if input_ids is not None else embeds[..., 0]
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        kwargs.setdefault("use_cache", False)
        kwargs["return_dict"] = True
        # the routing context and the auxiliary losses are AdaptedCausalLM's, as in the CLI's forward
        with adapted.routing_forward(shape, attention_mask, self._routing_task_ids(task_ids, shape)):
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        router = adapted.router_losses(out.loss if out.loss is not None else out.logits)
        aux_loss = router.aux
        loss = lm_loss = None
        if labels is not None:
            lm_loss = out.loss
            if num_items_in_batch is not None:
                answered = (labels[..., 1:] != IGNORE_INDEX).sum()
                aux_loss = aux_loss * (answered / _at_least_one(num_items_in_batch))
            loss = lm_loss + aux_loss
        hf_fields = {f.name: getattr(out, f.name, None) for f in fields(CausalLMOutputWithPast)}
        return AdaptedModelOutput(**{**hf_fields, "loss": loss}, lm_loss=lm_loss, aux_loss=aux_loss,
                                  balance_loss=_detached(router.balance), z_loss=_detached(router.z))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the adapters active (routing is not recorded)."""
        context = self.adapted_lm.context
        context.collect, context.token_mask, context.token_task = False, None, None
        return self.base_model.generate(*args, **kwargs)

    # -- parameters, files ------------------------------------------------------------------------
    def parameter_report(self) -> dict[str, Any]:
        """Trainable and total parameter counts with breakdowns by module and tensor kind, as
        ``malora-inspect`` prints them (``percent`` is of the base model's parameters)."""
        return parameter_report(self.base_model)

    def print_trainable_parameters(self) -> None:
        """Print the trainable parameters the way PEFT does (``trainable%`` of all parameters)."""
        report = self.parameter_report()
        trainable, total = report["trainable"], report["total"]
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def save_adapter(self, directory: str | PathLike[str]) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``directory`` (replacing an
        adapter there); ``load_adapted_model`` and ``malora-eval eval.adapter_path=...`` read it, and PEFT
        loads a plain LoRA one. Call it on one process."""
        name = getattr(self.config, "name_or_path", "") or ""
        return save_adapter(self.adapted_lm, directory, base_model_name=name)

    def save_pretrained(self, save_directory: str | PathLike[str], state_dict: dict[str, Any] | None = None,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Hugging Face's name for ``save_adapter``: the complete adapter folder (``adapter_config.json``,
        ``adapter_model.safetensors``), which PEFT loads too. ``state_dict``: this model's ``state_dict()``
        gathered elsewhere (ZeRO-3); ``is_main_process``: False writes nothing; other keyword arguments
        (``safe_serialization``, ...) are accepted and ignored: the file is always safetensors."""
        if not is_main_process:
            return
        gathered = None
        if state_dict is not None:
            gathered = {f"model.{key.removeprefix('base_model.')}": value
                        for key, value in state_dict.items()}
        name = getattr(self.config, "name_or_path", "") or ""
        save_adapter(self.adapted_lm, save_directory, base_model_name=name, state_dict=gathered)

    def merge_and_unload(self) -> PreTrainedModel:
        """Plain LoRA only: fold each ``(alpha/r) B A`` into its base weight and return the base model
        without adapters (this wrapper is spent)."""
        kind = self.adapter_config.kind
        if not adapter_class(kind).mergeable:
            raise ConfigError(f"merge_and_unload needs adapter kind lora; {kind} routes each token to its "
                              "own experts and cannot be merged into the base weights")
        return merge_lora(self.adapted_lm)

    def _adapter_keys(self, prefix: str = "") -> set[str]:
        return {f"{prefix}base_model.{key}" for key in adapter_state_dict(self.base_model)}

    def state_dict(self, *, destination: dict[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The adapter tensors only (frozen ablation tensors included), keyed by module path."""
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        keep = self._adapter_keys(prefix)
        out = destination if destination is not None else OrderedDict()
        out.update((key, value) for key, value in full.items() if key in keep)
        if destination is None:
            out._metadata = full._metadata
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """Load adapter tensors as ``state_dict()`` gives them; ``strict``: every one must be there and
        nothing else (base-model keys are loaded when present and never required)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        adapter_keys = self._adapter_keys()
        missing = [key for key in result.missing_keys if key in adapter_keys]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"AdaptedModel.load_state_dict: missing adapter tensors {missing[:3]}, "
                               f"unexpected keys {unexpected[:3]}")
        return result._replace(missing_keys=missing, unexpected_keys=unexpected)

    # -- routing statistics ------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording_routing(self, task_names: Sequence[str] | None = None) -> Iterator[None]:
        """Count which experts the tokens of the forwards inside the block go to, per mixture layer;
        read the counts with ``routing_stats()`` (they stay until the next recording).

        With ``task_names`` every forward needs ``task_ids`` (indices into ``task_names``) and the
        counts are per task; without, all tokens count as one task named "all". Padding (attention
        mask 0) is not counted.
        """
        names = [_ALL_TOKENS] if task_names is None else [str(name) for name in task_names]
        if not names:
            raise ValueError("recording_routing: task_names is empty")
        self._routing_tasks, self._per_task = names, task_names is not None
        start_recording(self.adapted_lm, len(names))
        try:
            yield
        finally:
            stop_recording(self.adapted_lm)

    def routing_stats(self) -> dict[str, Any] | None:
        """What the CLI writes to ``routing.json``, from the last ``recording_routing`` block: per
        mixture layer (``layers``) and averaged over them (``average``), the share of each task's
        token-slot assignments each expert got (dense routing: of its router probability mass), the
        tokens counted per task and each layer's load balance. None for plain LoRA or before recording."""
        if self._routing_tasks is None:
            return None
        return routing_report(self.adapted_lm, self._routing_tasks)

    def _routing_task_ids(self, task_ids: torch.Tensor | None, shape: torch.Tensor) -> torch.Tensor | None:
        if not self.adapted_lm.record_routing:
            return None
        if not self._per_task:
            return torch.zeros(shape.shape[0], dtype=torch.long, device=shape.device)
        if task_ids is None:
            raise ValueError("recording_routing(task_names) needs task_ids in every forward")
        if (task_ids.shape != shape.shape[:1] or task_ids.min() < 0
                or task_ids.max() >= len(self._routing_tasks)):
            raise ValueError(f"task_ids must hold one index in [0, {len(self._routing_tasks)}) per row; "
                             f"got shape {tuple(task_ids.shape)} for {shape.shape[0]} rows")
        return task_ids

    # -- activation checkpointing (Trainer's activation_checkpointing=True calls this) ----------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        **kwargs: Any) -> None:
        """Recompute each decoder layer in the backward; non-reentrant by default. The reentrant variant
        would run the forward without grad and drop the routers' auxiliary loss, so it is refused for
        mixture adapters."""
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if options["use_reentrant"] and self.adapted_lm.mixture_layers():
            raise ConfigError("activation checkpointing with use_reentrant=True would drop the routers' "
                              f"auxiliary loss of {self.adapter_config.kind}: use use_reentrant=False")
        base = self.base_model
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable(options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      **kwargs: Any) -> None:
        """The name transformers 4.x's ``Trainer`` calls: ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


def get_adapted_model(base_model: PreTrainedModel, config: AdapterConfig) -> AdaptedModel:
    """Inject ``config``'s adapters into ``base_model`` (in place: its target linear layers are replaced,
    all its own parameters frozen) and wrap it. Adapter tensors are float32 on the base weights' device."""
    return AdaptedModel(base_model, config)


def load_adapted_model(base_model: PreTrainedModel, adapter_dir: str | PathLike[str],
                       is_trainable: bool = False) -> AdaptedModel:
    """``base_model`` with the adapter saved in ``adapter_dir`` (by ``save_adapter`` or ``malora-train``).
    Like PEFT, the adapter is frozen and the model in eval mode unless ``is_trainable``."""
    config, _ = read_adapter_config(adapter_dir)
    model = AdaptedModel(base_model, config)
    load_adapter_weights(model.adapted_lm, adapter_dir)
    if not is_trainable:
        for param in adapter_state_dict(base_model).values():
            param.requires_grad_(False)
        model.eval()
    return model


def load_adapter_config(source: str | PathLike[str] = "malora", **overrides: Any) -> AdapterConfig:
    """An ``AdapterConfig`` from a preset of ``conf/adapter`` (``"malora"``, ``"molora"``, ``"lora"``,
    ``"hydralora"``) or a YAML file of the same keys, with ``overrides`` on top, e.g.
    ``load_adapter_config("malora", rank=4, router={"top_k": 1})``. The result is the config class of its
    ``kind``; keys that kind does not read and wrong types raise ``ConfigError`` naming the key."""
    preset = _PRESETS / f"{source}.yaml"
    path = preset if isinstance(source, str) and preset.is_file() else Path(source)
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in _PRESETS.glob("*.yaml")))
        raise ConfigError(f"adapter config {str(source)!r} is neither a preset ({presets}) nor a YAML file")
    try:
        data = OmegaConf.load(path)
        data.pop("defaults", None)  # a preset's Hydra defaults list, which names the kind's class taken here
        kind = overrides.get("kind", data.get("kind", DEFAULT_ADAPTER_KIND))
        schema = OmegaConf.structured(adapter_config_class(kind))
        return OmegaConf.to_object(OmegaConf.merge(schema, data, overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: adapter.{err.full_key}: {err.msg}") from err


def _checked(config: AdapterConfig) -> AdapterConfig:
    """``config`` through the CLI's schema: a wrong type fails here, naming the key."""
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"expected an AdapterConfig, got {type(config).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(type(config)), config))
    except OmegaConfBaseException as err:
        raise ConfigError(f"adapter.{err.full_key}: {err.msg}") from err


def _at_least_one(count: torch.Tensor | int) -> torch.Tensor | int:
    return count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    return value.detach() if value is not None else None
