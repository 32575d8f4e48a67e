"""The training loop's metric bookkeeping, kept on the device: sums over the optimiser steps of one
logging window (per-task LM loss, the routers' statistics, per-layer balance, gradient norm, a
non-finite count), read with one synchronisation when the window closes.

Counts that the host already knows (tokens and answer tokens per task) are summed on the host from the
batches before they are copied, so a step itself never waits for the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from malora_train.adapters import AdaptedOutput
from malora_train.labels import IGNORE_INDEX


class WindowStats:
    """Accumulates steps between two reads; ``read`` returns their metrics and starts a new window."""

    def __init__(self, task_names: list[str], layer_names: list[str], device: torch.device) -> None:
        self.task_names = task_names
        self.layer_names = layer_names
        self.device = device
        self._reset()

    def _reset(self) -> None:
        tasks = len(self.task_names)
        self.task_loss = torch.zeros(tasks, device=self.device)
        # aux loss, balance loss, router entropy, grad norm, non-finite losses
        self.scalars = torch.zeros(5, device=self.device)
        self.layer_balance = torch.zeros(len(self.layer_names), device=self.device)
        self.task_answers = torch.zeros(tasks, dtype=torch.float64)  # host: answer tokens per task
        self.task_tokens = torch.zeros(tasks, dtype=torch.float64)  # host: tokens per task
        self.forwards = self.steps = self.tokens = self.answers = self.clipped = 0
        self.started = time.perf_counter()

    def add_forward(self, out: AdaptedOutput, host_batch: dict[str, torch.Tensor]) -> None:
        """One micro-batch's forward; ``host_batch`` is the same rows as they were on the host."""
        self.task_loss.index_add_(0, out.loss_task, out.token_loss.float())
        stats = [out.aux_loss.detach().float()]
        for value in (out.balance_loss, out.router_entropy):
            stats.append(value.detach().float() if value is not None else torch.zeros((), device=self.device))
        self.scalars[:3] += torch.stack(stats)
        if out.layer_balance is not None:
            self.layer_balance += out.layer_balance.float()
        self.scalars[4] += (~torch.isfinite(out.loss.detach())).float()
        answered = (host_batch["loss_target"] != IGNORE_INDEX).double()
        self.task_answers.index_add_(0, host_batch["loss_task"], answered)
        tasks, real = host_batch["task_ids"], host_batch["attention_mask"]
        if tasks.dim() == 1:  # one task a row
            self.task_tokens.index_add_(0, tasks, real.sum(1).double())
        else:  # packed rows: a task per token
            self.task_tokens.index_add_(0, tasks.reshape(-1), real.reshape(-1).double())
        self.forwards += 1

    def add_step(self, tokens: int, answers: int, grad_norm: torch.Tensor | float | None) -> None:
        """One optimiser step: its global tokens and answer tokens (all ranks), the clipped gradient norm."""
        self.steps += 1
        self.tokens += tokens
        self.answers += answers
        if grad_norm is not None:
            self.scalars[3] += torch.as_tensor(grad_norm, device=self.device, dtype=torch.float32)
            self.clipped += 1

    @property
    def empty(self) -> bool:
        return self.steps == 0

    def restart_clock(self) -> None:
        """Time spent outside training steps (evaluation, checkpoints) does not count."""
        self.started = time.perf_counter()

    def read(self, all_reduce: Callable[[torch.Tensor], torch.Tensor], world: int,
             has_router: bool) -> tuple[dict[str, Any], int, float]:
        """(metrics, non-finite forwards, seconds) of the window, summed over ranks: the LM loss over the
        window's global answer tokens, the auxiliary statistics averaged over every forward of every rank,
        per-task losses and tokens, tokens/s over the window's wall time. One synchronisation."""
        device_sums = all_reduce(torch.cat([self.task_loss, self.scalars, self.layer_balance]))
        host_sums = torch.cat([self.task_answers, self.task_tokens]).to(self.device)
        host_sums = all_reduce(host_sums) if world > 1 else host_sums
        values = torch.cat([device_sums.double(), host_sums.double()]).tolist()  # the one read
        tasks, layers = len(self.task_names), len(self.layer_names)
        task_loss, scalars = values[:tasks], values[tasks:tasks + 5]
        layer_balance = values[tasks + 5:tasks + 5 + layers]
        task_answers, task_tokens = (values[tasks + 5 + layers:2 * tasks + 5 + layers],
                                     values[2 * tasks + 5 + layers:])
        elapsed = time.perf_counter() - self.started
        forwards = max(1, self.forwards * world)
        aux, balance, entropy = (v / forwards for v in scalars[:3])
        lm_loss = sum(task_loss) / max(1.0, sum(task_answers))
        metrics: dict[str, Any] = {"loss": lm_loss + aux, "lm_loss": lm_loss, "aux_loss": aux,
                                   "tokens_per_s": self.tokens / elapsed if elapsed else 0.0,
                                   "step_time_s": elapsed / max(1, self.steps)}
        if self.clipped:  # every rank holds the same (synchronised) norm: the sum over ranks is world of it
            metrics["grad_norm"] = scalars[3] / (self.clipped * world)
        if has_router:
            metrics["balance_loss"] = balance
            metrics["router_entropy"] = entropy
            metrics.update({f"balance/{name}": value / forwards
                            for name, value in zip(self.layer_names, layer_balance)})
        for name, loss, answers, tokens in zip(self.task_names, task_loss, task_answers, task_tokens):
            if answers > 0:
                metrics[f"loss/{name}"] = loss / answers
            metrics[f"tokens/{name}"] = int(tokens)
        nonfinite = int(scalars[4])
        self._reset()
        return metrics, nonfinite, elapsed
