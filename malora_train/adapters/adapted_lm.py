"""The adapted model: a Hugging Face causal LM with adapters, whose forward returns the LM loss on
answer tokens and the routers' auxiliary loss separately."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import MixtureAdapterLinear, RoutingContext
from malora_train.adapters.inject import adapter_layers, inject_adapters
from malora_train.adapters.kernels.common import KernelState
from malora_train.adapters.working_copies import WorkingCopies
from malora_train.attention import document_causal_dense_mask, packed_attention_mask
from malora_train.config import AdapterConfig
from malora_train.labels import IGNORE_INDEX, loss_targets

HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class AdaptedOutput:
    loss: torch.Tensor  # lm_loss + aux_loss, what the optimiser sees
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor  # balance_coef * mean(balance) + z_coef * mean(z) over mixture layers
    balance_loss: torch.Tensor | None  # mean over layers, unweighted (1 = perfectly balanced)
    z_loss: torch.Tensor | None
    router_entropy: torch.Tensor | None
    seq_loss_sum: torch.Tensor  # (B,) summed token losses per row, detached
    seq_tokens: torch.Tensor  # (B,) answer tokens per row
    token_loss: torch.Tensor  # (K,) each answer position's loss (0 on padding slots), detached
    loss_task: torch.Tensor  # (K,) the task of each answer position
    layer_balance: torch.Tensor | None  # (decoder layers,) balance loss per decoder layer, detached

    def detached(self) -> AdaptedOutput:
        """The same values cut from the autograd graph (what bookkeeping keeps after the backward)."""
        return AdaptedOutput(**{f.name: (v.detach() if isinstance(v := getattr(self, f.name), torch.Tensor)
                                         else v)
                                for f in fields(self)})


class RouterLosses(NamedTuple):
    """The routers' losses of one forward, over the mixture layers that reported (plain LoRA: ``aux`` is 0,
    the rest None)."""

    aux: torch.Tensor  # balance_coef * balance + z_loss_coef * z: what the optimiser adds to the LM loss
    balance: torch.Tensor | None  # mean over layers, unweighted (1 = perfectly balanced)
    z: torch.Tensor | None  # mean over layers, unweighted
    entropy: torch.Tensor | None  # the routers' mean entropy, detached
    layer_balance: torch.Tensor | None  # (decoder layers,) detached; None unless every layer reported


class AdaptedCausalLM(nn.Module):
    """Wraps ``model`` (adapters already injected) and owns its layers' routing context and kernel state.

    Its forward returns the LM loss on answer tokens and the routers' auxiliary loss separately. Rows
    are either padded examples (``attention_mask``) or packed ones (``document_ids`` and restarting
    ``position_ids``: several examples a row, each attending only to itself; see ``attention``).
    """

    def __init__(self, model: nn.Module, cfg: AdapterConfig, context: RoutingContext, targets: list[str]):
        super().__init__()
        self.model = model
        self.adapter_cfg = cfg
        self.context = context
        self.targets = targets
        self.record_routing = False
        self.num_tasks = 0
        self._mixture = [(n, m) for n, m in adapter_layers(model) if isinstance(m, MixtureAdapterLinear)]
        self.kernel_state = KernelState()  # how every adapted layer's fast path runs (kernels or torch)
        for _, layer in adapter_layers(model):
            layer.kernel_state = self.kernel_state
        self.working_copies = WorkingCopies([m for _, m in adapter_layers(model) if m.impl == "fast"])
        keys = [_decoder_layer_key(name) for name, _ in self._mixture]
        self.balance_layer_names = list(dict.fromkeys(keys))
        group = torch.tensor([self.balance_layer_names.index(k) for k in keys], dtype=torch.long)
        # (module -> decoder layer, modules per decoder layer), moved to the device once: no copy a forward
        self._balance_groups = {torch.device("cpu"): (group, torch.bincount(group).float())}

    @classmethod
    def from_base(cls, model: nn.Module, cfg: AdapterConfig) -> AdaptedCausalLM:
        context = RoutingContext()
        targets = inject_adapters(model, cfg, context)
        return cls(model, cfg, context, targets)

    def mixture_layers(self) -> list[tuple[str, MixtureAdapterLinear]]:
        return list(self._mixture)


    # -- forward -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                loss_normalizer: torch.Tensor | float | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, **targets: torch.Tensor) -> AdaptedOutput:
        """``loss_normalizer`` divides the summed token losses (default: this batch's answer-token
        count); the trainer passes the global count so that sharded batches add up exactly.
        ``targets`` (``labels.LOSS_KEYS``, computed on the host by the trainer) say where the loss is;
        without them they are found from ``labels`` (default: the input ids) here.
        Packed rows: ``document_ids`` (B, L) and ``position_ids``; ``attention_mask`` then only marks
        real tokens (for the routers' statistics) and ``task_ids`` may be given per token."""
        if not targets:
            targets = loss_targets(labels if labels is not None else input_ids, task_ids)
        with self.routing_forward(input_ids, attention_mask, task_ids):
            hidden = self._hidden_states(input_ids, attention_mask, position_ids, document_ids)
            token_loss = self._token_losses(hidden, targets["loss_index"], targets["loss_target"])
        rows, batch = targets["loss_row"], input_ids.shape[0]
        answered = (targets["loss_target"] != IGNORE_INDEX).long()
        seq_loss = torch.zeros(batch, device=hidden.device).index_add_(0, rows, token_loss.detach().float())
        seq_tokens = torch.zeros(batch, dtype=torch.long, device=hidden.device).index_add_(0, rows, answered)
        normalizer = loss_normalizer if loss_normalizer is not None else seq_tokens.sum().clamp_min(1)
        lm_loss = token_loss.sum() / normalizer
        router = self.router_losses(lm_loss)
        return AdaptedOutput(lm_loss + router.aux, lm_loss, router.aux, router.balance, router.z,
                             router.entropy, seq_loss, seq_tokens, token_loss.detach(), targets["loss_task"],
                             router.layer_balance)

    @contextlib.contextmanager
    def routing_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        task_ids: torch.Tensor | None = None) -> Iterator[None]:
        """The routing context of one forward through the adapted layers (``input_ids``: any (B, L) tensor of
        the batch's shape): inside the block the mixture layers keep their auxiliary losses for
        ``router_losses`` (padding masked out) and, while ``record_routing`` is on with ``task_ids``, count
        routing per task. Afterwards neither happens, so a backward that recomputes the forward (activation
        checkpointing) counts nothing again."""
        self._set_context(input_ids, attention_mask, task_ids)
        try:
            yield
        finally:
            self.context.collect = False
            self.context.token_task = None

    def _set_context(self, input_ids, attention_mask, task_ids) -> None:
        ctx = self.context
        ctx.collect = True
        ctx.token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        if self.record_routing and task_ids is not None:
            per_token = task_ids if task_ids.dim() == 2 else task_ids.view(-1, 1).expand_as(input_ids)
            ctx.token_task = per_token.reshape(-1)
            ctx.num_tasks = self.num_tasks
        else:
            ctx.token_task = None

    @torch.no_grad()
    def logits_at_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            positions: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) float32 next-token logits at ``positions[b]`` of each row (scoring, no loss).
        Routing counts per task accumulate when ``record_routing`` is on and ``task_ids`` given."""
        self._set_context(input_ids, attention_mask, task_ids)
        self.context.collect = False
        hidden = self._hidden_states(input_ids, attention_mask, None, None)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
        return self.logits_at(picked)

    def _hidden_states(self, input_ids, attention_mask, position_ids, document_ids) -> torch.Tensor:
        self._refresh_working_copies(input_ids.device.type)
        body = self.model.get_decoder()
        if document_ids is not None:  # packed rows: a document-causal mask instead of the padding mask
            attention_mask = packed_attention_mask(document_ids, self.model.config._attn_implementation)
        elif self.training and attention_mask is not None and attention_mask.dim() == 2:
            # padded training rows: the real tokens one document, the padding another, as a ready 4-D mask
            # (transformers' own would read on the host whether the batch has padding at all)
            attention_mask = document_causal_dense_mask(1 - attention_mask.long())
        return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state

    def _refresh_working_copies(self, device_type: str) -> None:
        """Under a half-precision autocast, cast every adapter weight for this forward in one go."""
        if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in HALF_DTYPES:
            self.working_copies.refresh(torch.get_autocast_dtype(device_type))
        else:
            self.working_copies.release()

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on selected hidden states, in float32, honouring a model's logit scaling."""
        logits = self.model.get_output_embeddings()(hidden).float()
        config = self.model.config
        scale = getattr(config, "logit_scale", None)
        if scale:
            logits = logits * scale
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    def _token_losses(self, hidden: torch.Tensor, index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at the answer positions only: the head runs just where a label exists."""
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        return F.cross_entropy(self.logits_at(picked), target, ignore_index=IGNORE_INDEX, reduction="none")

    def router_losses(self, like: torch.Tensor) -> RouterLosses:
        """The losses the routers kept in the last ``routing_forward`` (``like``: a tensor of the loss's
        device and dtype). The layers keep only detached copies afterwards, so the next forward holds no
        part of this one's autograd graph."""
        layers = [m for _, m in self._mixture if m.aux]
        zero = like.new_zeros(())
        if not layers:
            return RouterLosses(zero, None, None, None, None)
        balances = torch.stack([m.aux["balance"] for m in layers])
        balance = balances.mean()
        z = torch.stack([m.aux["z"] for m in layers]).mean()
        ent = torch.stack([m.aux["entropy"] for m in layers]).mean()
        per_layer = None
        if len(layers) == len(self._mixture):  # every layer reported: the per-decoder-layer means
            group, count = self._balance_group_on(balances.device)
            sums = balances.new_zeros(len(self.balance_layer_names)).index_add_(0, group, balances.detach())
            per_layer = sums / count
        for m in layers:  # keep only detached copies: the next forward must not hold this graph
            m.aux = {k: v.detach() for k, v in m.aux.items()}
        router = self.adapter_cfg.router
        aux = zero
        if router.balance_coef:
            aux = aux + router.balance_coef * balance
        if router.z_loss_coef:
            aux = aux + router.z_loss_coef * z
        return RouterLosses(aux, balance, z, ent, per_layer)

    def _balance_group_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._balance_groups:
            group, count = self._balance_groups[torch.device("cpu")]
            self._balance_groups[device] = (group.to(device), count.to(device))
        return self._balance_groups[device]

    # -- diagnostics ---------------------------------------------------------------------------------
    def routing_counts(self) -> dict[str, torch.Tensor]:
        """Accumulated (num_tasks, N) token-slot counts per mixture layer since the last reset."""
        return {n: m.task_expert_counts.detach().cpu() for n, m in self.mixture_layers()
                if m.task_expert_counts is not None}

    def reset_routing_counts(self) -> None:
        for _, layer in self.mixture_layers():
            layer.task_expert_counts = None


def _decoder_layer_key(module_name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``layer_3``; names without a layer index stay whole."""
    parts = module_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return f"layer_{parts[i + 1]}"
    return module_name
