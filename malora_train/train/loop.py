"""The training recipe, top to bottom: set up (launch, model, adapters, data, optimizer, state), evaluate,
train with checkpoints, evaluate, summarise.

One optimiser step draws ``grad_accum`` global micro-batches of ``micro_batch_size x world`` rows from
the data stream (the same on every rank); each rank runs its rows ``rank::world``. The LM loss is the
sum of token losses divided by the step's global answer-token count, so a step's update does not
depend on how its rows are split over micro-batches and ranks (the router's auxiliary loss, a
per-forward statistic, is the one part that does).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, set_seed
from omegaconf import OmegaConf

from malora_train.adapters import AdaptedCausalLM, layer_kwargs, parameter_report
from malora_train.config import Config
from malora_train.data import BatchStream, build_tasks
from malora_train.errors import ConfigError, MaloraError
from malora_train.eval import EvalResult, evaluate, routing_report, write_routing
from malora_train.labels import IGNORE_INDEX
from malora_train.models import (
    compile_decoder_layers,
    enable_activation_checkpointing,
    load_model_and_tokenizer,
)
from malora_train.run_dir import (
    CONFIG_FILE,
    LOSS_PLOT,
    SUMMARY_FILE,
    guard_run_dir,
    write_json_atomic,
    write_text_atomic,
)
from malora_train.train import checkpoint as ckpt
from malora_train.train.checkpoint import Checkpointer, TrainState
from malora_train.train.distributed import (
    all_reduce_sum,
    any_rank,
    build_accelerator,
    check_launch,
    configure_deepspeed,
    local_rows,
    model_init_context,
)
from malora_train.train.metrics import (
    MetricsLogger,
    Progress,
    check_wandb_mode,
    format_summary,
    peak_memory_gb,
    plot_losses,
    run_name_from_overrides,
)
from malora_train.train.optim import build_optimizer, build_scheduler, total_steps
from malora_train.train.step_stats import StepStats

log = logging.getLogger(__name__)


class NonFiniteLoss(MaloraError):
    """The loss became NaN or infinite."""


class StopRequest:
    """Turns SIGTERM/SIGINT (a preempted job, Ctrl-C) into a flag checked at each step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def validate(cfg: Config) -> None:
    """Fail at start, before anything is written, on settings the schema's types let through."""
    trainer = cfg.trainer
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(trainer, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(trainer, key)} must be >= 1")
    for key in ("max_steps", "save_every", "eval_every", "max_grad_norm", "weight_decay"):
        if getattr(trainer, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(trainer, key)} must be >= 0")
    if trainer.save_every and trainer.keep_last < 1:
        raise ConfigError(f"trainer.keep_last={trainer.keep_last} must be >= 1 when trainer.save_every "
                          "is set")
    if not math.isfinite(trainer.lr):
        raise ConfigError(f"trainer.lr={trainer.lr} must be finite")
    check_wandb_mode(cfg.logger.wandb.mode)
    layer_kwargs(cfg.adapter)  # the adapter's keys, before a model is loaded


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())


class Trainer:
    """A recipe: ``__init__`` runs the ``_setup_*`` steps in order; ``run()`` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path, resolved_yaml: str, overrides: list[str]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self._setup_launch()
        self._setup_model()
        self._setup_adapters()
        self._setup_data()
        self._setup_optimizer()
        self._setup_state(resolved_yaml, overrides)

    # -- set-up ----------------------------------------------------------------------------------------------
    def _setup_launch(self) -> None:
        """Validate, start the processes, claim the run directory, find the checkpoint to resume."""
        trainer = self.cfg.trainer
        validate(self.cfg)
        self.accelerator = acc = build_accelerator(trainer)
        check_launch(trainer, acc)
        self.is_main = acc.is_main_process
        self.process_index, self.world = acc.process_index, acc.num_processes
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        guard_run_dir(self.run_dir, trainer.resume)
        acc.wait_for_everyone()  # every rank has looked at the run directory before rank 0 changes it
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.run_dir)
        acc.wait_for_everyone()
        self.resume_from = ckpt.resolve_resume(self.run_dir, trainer.resume)

    def _setup_model(self) -> None:
        """The base model and tokenizer: the same seed on every rank, so the adapters built next start
        identical (DDP/DeepSpeed check it)."""
        set_seed(self.cfg.seed)
        with model_init_context(self.accelerator):
            self.base_model, self.tokenizer = load_model_and_tokenizer(
                self.cfg.model, device=self.accelerator.device, seed=self.cfg.seed)

    def _setup_adapters(self) -> None:
        trainer = self.cfg.trainer
        self.model = AdaptedCausalLM.from_base(self.base_model, self.cfg.adapter)
        if trainer.gradient_checkpointing:
            enable_activation_checkpointing(self.base_model)
        if trainer.compile:
            compile_decoder_layers(self.base_model)
        self.params = parameter_report(self.model)

    def _setup_data(self) -> None:
        """Tasks and the batch stream: every rank draws the same global micro-batches, keeps its rows."""
        trainer = self.cfg.trainer
        self.tasks = build_tasks(self.cfg.data, self.cfg.seed)
        self.task_names = list(self.tasks)
        global_micro_batch = trainer.micro_batch_size * self.world
        self.stream = BatchStream(self.tasks, self.tokenizer, self.cfg.data, batch_size=global_micro_batch,
                                  seed=self.cfg.seed)
        train_examples = sum(len(t.train) for t in self.tasks.values())
        self.total_steps = total_steps(trainer, train_examples, global_micro_batch * trainer.grad_accum)

    def _setup_optimizer(self) -> None:
        """AdamW (fused on a GPU; DeepSpeed's ZeRO wraps the optimizer itself and keeps the default), the
        schedule, and the engine Accelerate wraps the model into."""
        trainer, acc = self.cfg.trainer, self.accelerator
        fused = acc.device.type == "cuda" and not self.deepspeed
        optimizer = build_optimizer(self.model, trainer, fused=fused)
        self.scheduler = build_scheduler(optimizer, trainer, self.total_steps)
        configure_deepspeed(acc, trainer)
        self.engine, self.optimizer = acc.prepare(self.model, optimizer)
        set_seed(self.cfg.seed, device_specific=True)  # dropout: rank 0 as one process would, others their own

    def _setup_state(self, resolved_yaml: str, overrides: list[str]) -> None:
        """Restore a checkpoint (or start fresh), record the config, open the metrics log."""
        trainer = self.cfg.trainer
        self.checkpointer = Checkpointer(self.run_dir, self.accelerator, self.model, self.engine,
                                         self.optimizer, self.scheduler, self.stream, self.base_model_name,
                                         self.cfg.seed, self.deepspeed)
        self.state = TrainState()
        if self.resume_from is not None:
            self.state = self.checkpointer.restore(self.resume_from)
        elif trainer.resume and self.is_main:
            log.info("trainer.resume=%s: no checkpoint in %s, starting fresh", trainer.resume, self.run_dir)
        if self.is_main:
            name = f"config.resumed_step_{self.state.step}.yaml" if self.resume_from else CONFIG_FILE
            write_text_atomic(self.run_dir / name, resolved_yaml)
        resume_step = self.state.step if self.resume_from else (-1 if trainer.resume else None)
        self.metrics = MetricsLogger(self.run_dir, self.is_main, self.cfg.logger.wandb,
                                     run_name_from_overrides(overrides),
                                     OmegaConf.to_container(OmegaConf.structured(self.cfg)), resume_step)
        self._clock = time.perf_counter()

    @property
    def base_model_name(self) -> str:
        return self.cfg.model.name_or_path or self.cfg.model.name

    def _tick(self) -> None:
        """Add the time since the last tick to the run's wall time (kept across resumes)."""
        now = time.perf_counter()
        self.state.wall_time += now - self._clock
        self._clock = now

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        trainer, state = self.cfg.trainer, self.state
        self._announce()
        if trainer.eval_before and state.step == 0 and state.eval_before is None:
            before = self.evaluate()
            state.eval_before = before.to_json()
            self._log_eval(before, 0)
        self.engine.train()
        progress = Progress(self.total_steps, state.step, trainer.progress, self.is_main)
        saved_step = state.step if self.resume_from else None
        with StopRequest() as stop:
            while state.step < self.total_steps:
                metrics = self.train_step()
                state.step += 1
                if state.step % trainer.log_every == 0 or state.step == self.total_steps:
                    self.metrics.log(state.step, metrics)
                progress.update(metrics)
                best = self._periodic_eval(progress) if self._eval_due() else False
                stopping = any_rank(stop.requested, self.accelerator.device)
                if stopping or (trainer.save_every and (state.step % trainer.save_every == 0 or best)):
                    path, saved_step = self.save_checkpoint(), state.step
                if stopping:
                    progress.close()
                    return self._interrupted(path)
        progress.close()
        if trainer.save_every and saved_step != state.step:  # the final evaluation must not risk the steps
            self.save_checkpoint()
        return self.finish()

    def _announce(self) -> None:
        if self.is_main:
            log.info("run directory: %s", self.run_dir)
            log.info("%s + %s: %s trainable parameters (%.2f%% of the base model), %d steps",
                     self.cfg.model.name, self.cfg.adapter.kind, f"{self.params['trainable']:,}",
                     self.params["percent"], self.total_steps)

    def _eval_due(self) -> bool:
        """An in-training evaluation is due (the last step has the final evaluation instead)."""
        every = self.cfg.trainer.eval_every
        return bool(every) and self.state.step % every == 0 and self.state.step < self.total_steps

    # -- one optimiser step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        trainer, acc = self.cfg.trainer, self.accelerator
        started = time.perf_counter()
        batches = [self.stream.next_batch() for _ in range(trainer.grad_accum)]
        normalizer = max(1, sum(answer_tokens(b) for b in batches))  # the step's global answer tokens
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        stats = StepStats(self.task_names, acc.device)
        lr = self.scheduler.get_last_lr()[0]
        finite, grad_norm = True, None
        for batch in batches:
            local = local_rows(batch, self.process_index, self.world, acc.device)
            with acc.accumulate(self.engine):
                # forward: the LM loss as a share of the whole step's loss (its global answer tokens)
                out = self.engine(local["input_ids"], local["attention_mask"], local["labels"],
                                  local["task_ids"], loss_normalizer=normalizer / self.world)
                finite = self._check_finite(out.loss) and finite
                # backward: Accelerate divides every micro-batch's loss by grad_accum, which only the aux
                # loss (a per-forward mean) wants
                acc.backward(out.lm_loss * trainer.grad_accum + out.aux_loss)
                if acc.sync_gradients and not self.deepspeed and trainer.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), trainer.max_grad_norm)
                # optimizer step (applied by Accelerate once the micro-batches of the step are in)
                if finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            stats.add(out, local)
        if self.deepspeed:
            grad_norm = self.engine.get_global_grad_norm()
        self.scheduler.step()
        elapsed = time.perf_counter() - started
        metrics = stats.metrics(normalizer, all_reduce_sum, self.world, bool(self.model.mixture_layers()))
        metrics.update(lr=lr, tokens_per_s=tokens / elapsed, step_time_s=elapsed)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.model.mixture_layers():
            metrics.update({f"balance/{k}": v for k, v in self.model.layer_balance().items()})
        metrics.update({f"epoch/{task}": e for task, e in self.stream.mixture.epochs.items()})
        if not finite:
            metrics["skipped"] = 1
        self.state.tokens += tokens
        self.state.train_time += elapsed
        return metrics

    def _check_finite(self, loss: torch.Tensor) -> bool:
        """False when the loss is not finite on some rank and ``trainer.skip_nonfinite`` is on; else
        raises NonFiniteLoss naming the step and the checkpoint to resume from."""
        if not any_rank(not bool(torch.isfinite(loss).item()), self.accelerator.device):
            return True
        if not self.cfg.trainer.skip_nonfinite:
            raise NonFiniteLoss(f"non-finite loss at step {self.state.step + 1}; "
                                f"{self.checkpointer.last_good_hint()} (resume with trainer.resume=auto "
                                "and a lower trainer.lr, or set trainer.skip_nonfinite=true)")
        return False

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, record_routing: bool = False) -> EvalResult:
        """Each rank scores its shard (padded so every rank runs as many forwards, as ZeRO-3 needs)."""
        return evaluate(
            self.model, self.tokenizer, self.tasks, self.cfg.eval, rank=self.process_index,
            world_size=self.world, all_reduce=all_reduce_sum, record_routing=record_routing,
            max_length=self.cfg.data.max_length, progress=self.is_main and self.cfg.trainer.progress,
        )

    def _log_eval(self, result: EvalResult, step: int) -> None:
        metrics = {f"eval/{task}": score.accuracy for task, score in result.scores.items()}
        metrics["eval/average"] = result.average
        self.metrics.log(step, metrics)

    def _periodic_eval(self, progress: Progress) -> bool:
        """Evaluate during training; True when this is the best evaluation so far."""
        result = self.evaluate()
        self._log_eval(result, self.state.step)
        progress.write(f"step {self.state.step}: eval average {result.average:.2f}")
        self.engine.train()
        if self.state.best_average is None or result.average > self.state.best_average:
            self.state.best_average, self.state.best_step = result.average, self.state.step
            return True
        return False

    # -- checkpoints and the end -----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self._tick()
        return self.checkpointer.save(self.state, self.cfg.trainer.keep_last)

    def _interrupted(self, checkpoint: Path) -> dict[str, Any]:
        summary = {"status": "interrupted", "step": self.state.step, "checkpoint": str(checkpoint)}
        if self.is_main:
            print(f"stopped by signal at step {self.state.step}; saved {checkpoint}; continue with "
                  f"trainer.resume=auto hydra.run.dir={self.run_dir}", flush=True)
        self.metrics.finish(summary)
        return summary

    def finish(self) -> dict[str, Any]:
        """Final evaluation, adapter, routing report, summary.json and loss plot; prints the summary."""
        state = self.state
        after = self.evaluate(record_routing=True)
        self._log_eval(after, state.step)
        routing = (routing_report(self.model, self.task_names, all_reduce=all_reduce_sum)
                   if self.model.mixture_layers() else None)
        adapter_dir = self.checkpointer.save_final_adapter()
        if state.best_average is None or after.average >= state.best_average:
            state.best_average, state.best_step = after.average, state.step
        self._tick()
        summary = self._summary(after, adapter_dir)
        if self.is_main:
            if routing:
                write_routing(routing, self.run_dir)
                summary["expert_share"] = routing.get("average")
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            plot_losses(self.metrics.path, self.run_dir / LOSS_PLOT)
            before = EvalResult.from_json(state.eval_before)
            print(format_summary(summary, before, after, routing, self.run_dir), flush=True)
        self.metrics.finish(summary)
        return summary

    def _summary(self, after: EvalResult, adapter_dir: Path) -> dict[str, Any]:
        state = self.state
        before = state.eval_before or {}
        return {
            "status": "completed",
            "model": self.cfg.model.name,
            "adapter": self.cfg.adapter.kind,
            "steps": state.step,
            "tokens": state.tokens,
            "wall_time_s": state.wall_time,
            "train_time_s": state.train_time,
            "tokens_per_s": state.tokens / state.train_time if state.train_time else 0.0,
            "peak_memory_gb": peak_memory_gb(self.accelerator.device),
            "trainable_params": self.params["trainable"],
            "total_params": self.params["total"],
            "trainable_percent": self.params["percent"],
            "eval_before": before.get("accuracy"),
            "eval_before_average": before.get("average"),
            "eval_after": after.to_json()["accuracy"],
            "eval_after_average": after.average,
            "best_eval_average": state.best_average,
            "best_step": state.best_step,
            "adapter_dir": str(adapter_dir),
            "world_size": self.world,
            "mixed_precision": self.accelerator.mixed_precision,
        }


def train(cfg: Config, run_dir: Path, resolved_yaml: str = "", overrides: list[str] | None = None) -> dict:
    """Run one training job into ``run_dir`` and return its summary (``status`` completed or interrupted)."""
    return Trainer(cfg, run_dir, resolved_yaml, overrides or []).run()
