"""The training loop, top to bottom: build, evaluate, train with checkpoints, evaluate, summarise.

One optimiser step draws ``grad_accum`` global micro-batches of ``micro_batch_size x world`` rows from
the data stream (the same on every rank); each rank runs its rows ``rank::world``. The LM loss is the
sum of token losses divided by the step's global answer-token count, so a step's update does not
depend on how its rows are split over micro-batches and ranks (the router's auxiliary loss, a
per-forward statistic, is the one part that does).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import OmegaConf

from malora_train.adapters import (
    AdaptedCausalLM,
    adapter_state_dict,
    load_adapter_weights,
    parameter_report,
    save_adapter,
)
from malora_train.config import Config, TrainerConfig
from malora_train.data import BatchStream, build_tasks
from malora_train.errors import ConfigError, MaloraError
from malora_train.eval import (
    EvalResult,
    TaskScore,
    evaluate,
    format_accuracy_table,
    format_expert_shares,
    routing_report,
    write_routing,
)
from malora_train.models import load_model_and_tokenizer
from malora_train.train import checkpoint as ckpt
from malora_train.train.distributed import (
    all_reduce_sum,
    any_rank,
    build_accelerator,
    is_zero3,
    model_init_context,
)
from malora_train.train.logging import (
    MetricsLogger,
    Progress,
    check_wandb_mode,
    plot_losses,
    run_name_from_overrides,
)
from malora_train.train.optim import build_optimizer, build_scheduler, total_steps
from malora_train.train.run_dir import guard_run_dir

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


@dataclasses.dataclass
class TrainState:
    """Everything about the run's progress that a checkpoint must carry besides tensors."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds inside optimiser steps
    wall_time: float = 0.0  # seconds of the whole run up to the last checkpoint or the end
    best_average: float | None = None
    best_step: int | None = None
    eval_before: dict[str, Any] | None = None


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


def check_launch(trainer: TrainerConfig, accelerator: Accelerator) -> None:
    if trainer.skip_nonfinite and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("trainer.skip_nonfinite=true is not supported under DeepSpeed (its engine applies "
                          "the accumulated gradients itself); run without it")


def configure_deepspeed(accelerator: Accelerator, trainer: TrainerConfig) -> None:
    """Fill the DeepSpeed config's batch and clipping entries from trainer.* (the JSON says "auto")."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = trainer.micro_batch_size
    ds["gradient_accumulation_steps"] = trainer.grad_accum
    ds["train_batch_size"] = trainer.micro_batch_size * trainer.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = trainer.max_grad_norm
    ds["zero_allow_untested_optimizer"] = True


def shard(batch: dict[str, torch.Tensor], rank: int, world: int,
          device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's rows of a global micro-batch, with padding columns nobody in the shard needs cut off."""
    rows = {k: v[rank::world] for k, v in batch.items()}
    width = int(rows["attention_mask"].sum(dim=1).max().item())
    return {k: (v[:, :width] if v.dim() == 2 else v).to(device) for k, v in rows.items()}


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum().item())


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (``trainer.gradient_checkpointing``)."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """``trainer.compile``: torch.compile each decoder layer (one compiled graph serves them all); the
    adapters then run their composite plain-torch path, which the compiler fuses with the frozen layer."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError("trainer.compile=true needs a model whose decoder keeps its blocks in .layers")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Trainer:
    """Holds the run's objects; ``run()`` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path, resolved_yaml: str, overrides: list[str]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        trainer = cfg.trainer
        validate(cfg)
        self.accelerator = acc = build_accelerator(trainer)
        check_launch(trainer, acc)
        self.is_main = acc.is_main_process
        self.rank, self.world = acc.process_index, acc.num_processes
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        guard_run_dir(run_dir, trainer.resume)
        acc.wait_for_everyone()  # every rank has looked at the run directory before rank 0 changes it
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(run_dir)
        acc.wait_for_everyone()
        self.resume_from = ckpt.resolve_resume(run_dir, trainer.resume)

        # the model: the same seed on every rank, so adapters start identical (DDP/DeepSpeed check it)
        set_seed(cfg.seed)
        with model_init_context(acc):
            model, self.tokenizer = load_model_and_tokenizer(cfg.model, device=acc.device, seed=cfg.seed)
        self.model = AdaptedCausalLM.from_base(model, cfg.adapter)
        if trainer.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if trainer.compile:
            compile_decoder_layers(model)
        self.params = parameter_report(self.model)

        # the data: every rank draws the same global micro-batches and keeps its rows of each
        self.tasks = build_tasks(cfg.data, cfg.seed)
        self.task_names = list(self.tasks)
        global_micro_batch = trainer.micro_batch_size * self.world
        self.stream = BatchStream(self.tasks, self.tokenizer, cfg.data, batch_size=global_micro_batch,
                                  seed=cfg.seed)
        train_examples = sum(len(t.train) for t in self.tasks.values())
        self.total_steps = total_steps(trainer, train_examples, global_micro_batch * trainer.grad_accum)

        # fused AdamW on a GPU; DeepSpeed's ZeRO wraps the optimizer itself and is left on the default
        optimizer = build_optimizer(self.model, trainer, fused=acc.device.type == "cuda" and not self.deepspeed)
        self.scheduler = build_scheduler(optimizer, trainer, self.total_steps)
        configure_deepspeed(acc, trainer)
        self.engine, self.optimizer = acc.prepare(self.model, optimizer)
        set_seed(cfg.seed, device_specific=True)  # dropout: rank 0 as one process would, others their own

        self.state = TrainState()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif trainer.resume and self.is_main:
            log.info("trainer.resume=%s: no checkpoint in %s, starting fresh", trainer.resume, run_dir)
        if self.is_main:
            name = f"config.resumed_step_{self.state.step}.yaml" if self.resume_from else "config.yaml"
            ckpt.write_text_atomic(run_dir / name, resolved_yaml)
        resume_step = self.state.step if self.resume_from else (-1 if trainer.resume else None)
        self.metrics = MetricsLogger(run_dir, self.is_main, cfg.logger.wandb,
                                     run_name_from_overrides(overrides),
                                     OmegaConf.to_container(OmegaConf.structured(cfg)), resume_step)
        self._clock = time.perf_counter()

    @property
    def base_model_name(self) -> str:
        return self.cfg.model.name_or_path or self.cfg.model.name

    def _tick(self) -> None:
        """Add the time since the last tick to the run's wall time (kept across resumes)."""
        now = time.perf_counter()
        self.state.wall_time += now - self._clock
        self._clock = now

    # -- checkpoints ------------------------------------------------------------------------------------
    def _adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3, the full adapter tensors gathered from their shards (every rank must call this);
        otherwise None: each rank holds them whole."""
        if not is_zero3(self.accelerator):
            return None
        import deepspeed

        params = {f"model.{key}": param for key, param in adapter_state_dict(self.model.model).items()}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {key: param.detach().clone().cpu() for key, param in params.items()}

    def save_final_adapter(self) -> Path:
        state = self._adapter_state()
        out = self.run_dir / "adapter"
        if self.is_main:
            tmp = self.run_dir / ".adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(self.model, tmp, self.base_model_name, state_dict=state)
            ckpt.replace_dir(tmp, out)
        self.accelerator.wait_for_everyone()
        return out

    def save_checkpoint(self) -> Path:
        """checkpoints/step_<N>: written into .tmp-step_<N> by every rank, renamed by rank 0 when complete."""
        step = self.state.step
        tmp = ckpt.temporary_dir(self.run_dir, step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        adapter_state = self._adapter_state()
        if self.deepspeed:
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        ckpt.save_rng(tmp, self.rank)
        if self.is_main:
            save_adapter(self.model, tmp / "adapter", self.base_model_name, state_dict=adapter_state)
            if not self.deepspeed:
                ckpt.save_optimizer(self.optimizer.optimizer, tmp)
            self._tick()
            ckpt.write_json(tmp / ckpt.STATE_FILE, {  # written last: its presence marks a whole checkpoint
                "train": dataclasses.asdict(self.state),
                "scheduler": self.scheduler.state_dict(),
                "stream": self.stream.state_dict(),
                "world_size": self.world,
                "deepspeed": self.deepspeed,
            })
        self.accelerator.wait_for_everyone()
        final = ckpt.checkpoint_root(self.run_dir) / f"step_{step}"
        if self.is_main:
            ckpt.publish(tmp, self.run_dir, step)
            keep = {self.state.best_step} if self.state.best_step is not None else set()
            ckpt.prune(self.run_dir, self.cfg.trainer.keep_last, keep)
        self.accelerator.wait_for_everyone()
        return final

    def _restore(self, path: Path) -> None:
        saved = ckpt.read_json(path / ckpt.STATE_FILE)
        if saved.get("deepspeed", False) != self.deepspeed:
            made, now = ("with", "without") if saved.get("deepspeed") else ("without", "with")
            raise ConfigError(f"trainer.resume: {path} was written {made} DeepSpeed and this run is {now} "
                              "it; resume with the launcher config it was made with")
        self.state = TrainState(**saved["train"])
        if self.deepspeed:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            load_adapter_weights(self.model, path / "adapter")
            ckpt.load_optimizer(self.optimizer.optimizer, path)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.stream.load_state_dict(saved["stream"])
        if saved["world_size"] != self.world or not ckpt.load_rng(path, self.rank):
            log.warning("resuming on %d processes from a %d-process checkpoint: RNG streams are reseeded",
                        self.world, saved["world_size"])
            set_seed(self.cfg.seed + self.state.step, device_specific=True)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.state.step)

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, record_routing: bool = False) -> EvalResult:
        """Each rank scores its shard (padded so every rank runs as many forwards, as ZeRO-3 needs)."""
        return evaluate(
            self.model, self.tokenizer, self.tasks, self.cfg.eval, rank=self.rank, world_size=self.world,
            all_reduce=all_reduce_sum, record_routing=record_routing, max_length=self.cfg.data.max_length,
            progress=self.is_main and self.cfg.trainer.progress,
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

    # -- one optimiser step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        trainer, acc = self.cfg.trainer, self.accelerator
        started = time.perf_counter()
        batches = [self.stream.next_batch() for _ in range(trainer.grad_accum)]
        normalizer = max(1, sum(answer_tokens(b) for b in batches))  # the step's global answer tokens
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        task_sums = torch.zeros(3, len(self.task_names), device=acc.device)  # loss sum, answer tokens, tokens
        router_sums = torch.zeros(3, device=acc.device)  # aux loss, balance loss, router entropy
        lr = self.scheduler.get_last_lr()[0]
        finite, grad_norm = True, None
        for batch in batches:
            local = shard(batch, self.rank, self.world, acc.device)
            with acc.accumulate(self.engine):
                out = self.engine(local["input_ids"], local["attention_mask"], local["labels"],
                                  local["task_ids"], loss_normalizer=normalizer / self.world)
                if any_rank(not bool(torch.isfinite(out.loss).item()), acc.device):
                    if not trainer.skip_nonfinite:
                        raise NonFiniteLoss(self._non_finite_message())
                    finite = False
                # the LM loss is already a share of the whole step's loss; the backward divides every
                # micro-batch's loss by grad_accum, which only the aux loss (a per-forward mean) wants
                acc.backward(out.lm_loss * trainer.grad_accum + out.aux_loss)
                if acc.sync_gradients and not self.deepspeed and trainer.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), trainer.max_grad_norm)
                if finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            task_sums[0].index_add_(0, local["task_ids"], out.seq_loss_sum)
            task_sums[1].index_add_(0, local["task_ids"], out.seq_tokens.float())
            task_sums[2].index_add_(0, local["task_ids"], local["attention_mask"].sum(1).float())
            router_sums += torch.stack([
                out.aux_loss.detach().float(),
                *(value.detach().float() if value is not None else torch.zeros((), device=acc.device)
                  for value in (out.balance_loss, out.router_entropy)),
            ])
        if self.deepspeed:
            grad_norm = self.engine.get_global_grad_norm()
        self.scheduler.step()
        all_reduce_sum(task_sums)
        aux, balance, entropy = (all_reduce_sum(router_sums) / (trainer.grad_accum * self.world)).tolist()
        elapsed = time.perf_counter() - started
        lm_loss = float(task_sums[0].sum() / normalizer)
        metrics: dict[str, Any] = {
            "loss": lm_loss + aux,
            "lm_loss": lm_loss,
            "aux_loss": aux,
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.model.mixture_layers():
            metrics["balance_loss"] = balance
            metrics["router_entropy"] = entropy
            metrics.update({f"balance/{k}": v for k, v in self.model.layer_balance().items()})
        for i, task in enumerate(self.task_names):
            if task_sums[1, i] > 0:
                metrics[f"loss/{task}"] = float(task_sums[0, i] / task_sums[1, i])
            metrics[f"tokens/{task}"] = int(task_sums[2, i])
        metrics.update({f"epoch/{task}": e for task, e in self.stream.mixture.epochs.items()})
        if not finite:
            metrics["skipped"] = 1
        self.state.tokens += tokens
        self.state.train_time += elapsed
        return metrics

    def _non_finite_message(self) -> str:
        last = ckpt.complete_checkpoints(self.run_dir)
        where = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was saved yet"
        return (f"non-finite loss at step {self.state.step + 1}; {where} (resume with trainer.resume=auto "
                "and a lower trainer.lr, or set trainer.skip_nonfinite=true)")

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        trainer, state = self.cfg.trainer, self.state
        if self.is_main:
            log.info("run directory: %s", self.run_dir)
            log.info("%s + %s: %s trainable parameters (%.2f%% of the base model), %d steps",
                     self.cfg.model.name, self.cfg.adapter.kind, f"{self.params['trainable']:,}",
                     self.params["percent"], self.total_steps)
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
                best = False
                eval_due = trainer.eval_every and state.step % trainer.eval_every == 0
                if eval_due and state.step < self.total_steps:  # the last step has the final evaluation
                    best = self._periodic_eval(progress)
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

    def _interrupted(self, checkpoint: Path) -> dict[str, Any]:
        summary = {"status": "interrupted", "step": self.state.step, "checkpoint": str(checkpoint)}
        if self.is_main:
            print(f"stopped by signal at step {self.state.step}; saved {checkpoint}; continue with "
                  f"trainer.resume=auto hydra.run.dir={self.run_dir}", flush=True)
        self.metrics.finish(summary)
        return summary

    def finish(self) -> dict[str, Any]:
        state = self.state
        after = self.evaluate(record_routing=True)
        self._log_eval(after, state.step)
        routing = (routing_report(self.model, self.task_names, all_reduce=all_reduce_sum)
                   if self.model.mixture_layers() else None)
        adapter_dir = self.save_final_adapter()
        if state.best_average is None or after.average >= state.best_average:
            state.best_average, state.best_step = after.average, state.step
        self._tick()
        summary = {
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
            "eval_before": (state.eval_before or {}).get("accuracy"),
            "eval_before_average": (state.eval_before or {}).get("average"),
            "eval_after": after.to_json()["accuracy"],
            "eval_after_average": after.average,
            "best_eval_average": state.best_average,
            "best_step": state.best_step,
            "adapter_dir": str(adapter_dir),
            "world_size": self.world,
            "mixed_precision": self.accelerator.mixed_precision,
        }
        if self.is_main:
            if routing:
                write_routing(routing, self.run_dir)
                summary["expert_share"] = routing.get("average")
            ckpt.write_json(self.run_dir / "summary.json", summary)
            plot_losses(self.metrics.path, self.run_dir / "loss.png")
            print(self._summary_text(summary, after, routing), flush=True)
        self.metrics.finish(summary)
        return summary

    def _summary_text(self, summary: dict[str, Any], after: EvalResult, routing: dict | None) -> str:
        before = _result_from_json(self.state.eval_before)
        best = summary["best_eval_average"]
        lines = ["", f"== {summary['model']} + {summary['adapter']}: {summary['steps']} steps, "
                     f"{summary['tokens']:,} tokens in {summary['wall_time_s']:.0f} s "
                     f"({summary['tokens_per_s']:.0f} tokens/s while training), "
                     f"peak memory {summary['peak_memory_gb']:.1f} GB",
                 f"   trainable parameters {summary['trainable_params']:,} "
                 f"({summary['trainable_percent']:.2f}% of the base model); "
                 f"best eval average {best:.2f} at step {summary['best_step']}", "",
                 format_accuracy_table(before, after)]
        if routing:
            lines += ["", "share of each task's tokens routed to each expert (%, average over layers):",
                      format_expert_shares(routing)]
        lines += ["", f"outputs: {self.run_dir} (metrics.jsonl, summary.json, loss.png, adapter/"
                      + (", routing.json, routing_heatmap.png" if routing else "") + ")"]
        return "\n".join(lines)


def _result_from_json(saved: dict[str, Any] | None) -> EvalResult | None:
    """An EvalResult back from its JSON form (kept in the trainer state across resumes)."""
    if not saved:
        return None
    return EvalResult(scores={t: TaskScore(c["correct"], c["total"]) for t, c in saved["counts"].items()})


def train(cfg: Config, run_dir: Path, resolved_yaml: str = "", overrides: list[str] | None = None) -> dict:
    """Run one training job into ``run_dir`` and return its summary (``status`` completed or interrupted)."""
    return Trainer(cfg, run_dir, resolved_yaml, overrides or []).run()
