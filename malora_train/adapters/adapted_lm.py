"""The adapted model: a Hugging Face causal LM with adapters, whose forward returns the LM loss on
answer tokens and the routers' auxiliary loss separately."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.base import MixtureAdapterLinear, RoutingContext
from malora_train.adapters.inject import adapter_layers, inject_adapters
from malora_train.config import AdapterConfig
from malora_train.labels import IGNORE_INDEX


@dataclass
class AdaptedOutput:
    loss: torch.Tensor  # lm_loss + aux_loss, what the optimiser sees
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor  # balance_coef * mean(balance) + z_coef * mean(z) over mixture layers
    balance_loss: torch.Tensor | None  # mean over layers, unweighted (1 = perfectly balanced)
    z_loss: torch.Tensor | None
    router_entropy: torch.Tensor | None
    seq_loss_sum: torch.Tensor  # (B,) summed token losses per sequence, detached
    seq_tokens: torch.Tensor  # (B,) answer tokens per sequence


class AdaptedCausalLM(nn.Module):
    """Wraps ``model`` (adapters already injected) and owns the routing context of its layers."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig, context: RoutingContext, targets: list[str]):
        super().__init__()
        self.model = model
        self.adapter_cfg = cfg
        self.context = context
        self.targets = targets
        self.record_routing = False
        self.num_tasks = 0

    @classmethod
    def from_base(cls, model: nn.Module, cfg: AdapterConfig) -> AdaptedCausalLM:
        context = RoutingContext()
        targets = inject_adapters(model, cfg, context)
        return cls(model, cfg, context, targets)

    def mixture_layers(self) -> list[tuple[str, MixtureAdapterLinear]]:
        return [(n, m) for n, m in adapter_layers(self.model) if isinstance(m, MixtureAdapterLinear)]

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                loss_normalizer: torch.Tensor | float | None = None) -> AdaptedOutput:
        """``loss_normalizer`` divides the summed token losses (default: this batch's answer-token
        count); the trainer passes the global count so that sharded batches add up exactly."""
        if labels is None:
            labels = input_ids
        self._set_context(input_ids, attention_mask, task_ids)
        try:
            hidden = self._hidden_states(input_ids, attention_mask)
            lm_sum, seq_loss, seq_tokens = self._answer_loss(hidden, labels)
        finally:
            self.context.collect = False
        normalizer = loss_normalizer if loss_normalizer is not None else seq_tokens.sum().clamp_min(1)
        lm_loss = lm_sum / normalizer
        aux_loss, balance, z, ent = self._aux_losses(lm_loss)
        return AdaptedOutput(lm_loss + aux_loss, lm_loss, aux_loss, balance, z, ent, seq_loss, seq_tokens)

    def _set_context(self, input_ids, attention_mask, task_ids) -> None:
        ctx = self.context
        ctx.collect = True
        ctx.token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        if self.record_routing and task_ids is not None:
            ctx.token_task = task_ids.view(-1, 1).expand_as(input_ids).reshape(-1)
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
        hidden = self._hidden_states(input_ids, attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
        return self.logits_at(picked)

    def _hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        body = self.model.get_decoder()
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

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

    def _answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor):
        """Cross-entropy on answer tokens only: the head runs just where a label exists."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        rows = keep.nonzero(as_tuple=True)[0]
        token_loss = F.cross_entropy(self.logits_at(hidden[:, :-1][keep]), targets[keep], reduction="none")
        batch = labels.shape[0]
        seq_loss = torch.zeros(batch, device=hidden.device).index_add_(0, rows, token_loss.detach())
        seq_tokens = keep.sum(dim=1)
        return token_loss.sum(), seq_loss, seq_tokens

    def _aux_losses(self, like: torch.Tensor):
        layers = [m for _, m in self.mixture_layers() if m.aux]
        zero = like.new_zeros(())
        if not layers:
            return zero, None, None, None
        balance = torch.stack([m.aux["balance"] for m in layers]).mean()
        z = torch.stack([m.aux["z"] for m in layers]).mean()
        ent = torch.stack([m.aux["entropy"] for m in layers]).mean()
        for m in layers:  # keep only detached copies: the next forward must not hold this graph
            m.aux = {k: v.detach() for k, v in m.aux.items()}
        router = self.adapter_cfg.router
        aux = zero
        if router.balance_coef:
            aux = aux + router.balance_coef * balance
        if router.z_loss_coef:
            aux = aux + router.z_loss_coef * z
        return aux, balance, z, ent

    # -- diagnostics ---------------------------------------------------------------------------------
    def layer_balance(self) -> dict[str, float]:
        """Last forward's balance loss per decoder layer (mean over its adapted modules)."""
        per_layer: dict[str, list[torch.Tensor]] = {}
        for name, layer in self.mixture_layers():
            if "balance" in layer.aux:
                key = _decoder_layer_key(name)
                per_layer.setdefault(key, []).append(layer.aux["balance"].detach())
        return {k: torch.stack(v).mean().item() for k, v in per_layer.items()}

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
