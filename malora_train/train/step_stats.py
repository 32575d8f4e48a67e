"""The per-step metric bookkeeping of the training loop: sums over a step's micro-batches (per-task LM
loss, answer tokens and tokens; the router's auxiliary statistics), reduced over ranks once per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from malora_train.adapters import AdaptedOutput


class StepStats:
    def __init__(self, task_names: list[str], device: torch.device) -> None:
        self.task_names = task_names
        self.device = device
        self.task_sums = torch.zeros(3, len(task_names), device=device)  # loss sum, answer tokens, tokens
        self.router_sums = torch.zeros(3, device=device)  # aux loss, balance loss, router entropy
        self.forwards = 0

    def add(self, out: AdaptedOutput, batch: dict[str, torch.Tensor]) -> None:
        """One micro-batch's forward (this rank's rows)."""
        task_ids = batch["task_ids"]
        self.task_sums[0].index_add_(0, task_ids, out.seq_loss_sum)
        self.task_sums[1].index_add_(0, task_ids, out.seq_tokens.float())
        self.task_sums[2].index_add_(0, task_ids, batch["attention_mask"].sum(1).float())
        zero = torch.zeros((), device=self.device)
        self.router_sums += torch.stack([
            out.aux_loss.detach().float(),
            *(value.detach().float() if value is not None else zero
              for value in (out.balance_loss, out.router_entropy)),
        ])
        self.forwards += 1

    def metrics(self, normalizer: int, all_reduce: Callable[[torch.Tensor], torch.Tensor],
                world: int, has_router: bool) -> dict[str, Any]:
        """Sum over ranks and turn into metrics: the LM loss over the step's ``normalizer`` global answer
        tokens, the auxiliary statistics averaged over every forward of every rank, per-task losses."""
        task_sums = all_reduce(self.task_sums)
        aux, balance, entropy = (all_reduce(self.router_sums) / (self.forwards * world)).tolist()
        lm_loss = float(task_sums[0].sum() / normalizer)
        metrics: dict[str, Any] = {"loss": lm_loss + aux, "lm_loss": lm_loss, "aux_loss": aux}
        if has_router:
            metrics["balance_loss"] = balance
            metrics["router_entropy"] = entropy
        for i, task in enumerate(self.task_names):
            if task_sums[1, i] > 0:
                metrics[f"loss/{task}"] = float(task_sums[0, i] / task_sums[1, i])
            metrics[f"tokens/{task}"] = int(task_sums[2, i])
        return metrics
