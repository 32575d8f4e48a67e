"""The training recipe, top to bottom: set up (launch, model, adapters, data, optimizer, state), evaluate,
train with checkpoints, evaluate, summarise.

One optimiser step draws ``grad_accum`` global micro-batches of ``micro_batch_size x world`` rows from
the data stream (the same on every rank); each rank runs its block of ``micro_batch_size`` rows. The LM loss
is the sum of token losses divided by the step's global answer-token count, so a step's update does not
depend on how its rows are split over micro-batches and ranks (the router's auxiliary loss, a
per-forward statistic, is the one part that does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from malora_train.adapters import AdaptedCausalLM, AdaptedOutput, parameter_report
from malora_train.adapters.kernels.common import runs_as_kernels
from malora_train.config import Config
from malora_train.data import BatchStream, build_tasks
from malora_train.data.rendering import AUTO, choose_template
from malora_train.errors import MaloraError, launch_rank
from malora_train.eval import (
    EvalResult,
    evaluate,
    predictions_file,
    routing_report,
    scorer_notes,
    write_predictions,
    write_routing,
)
from malora_train.labels import IGNORE_INDEX, answer_slots, loss_targets, pad_loss_targets
from malora_train.models import (
    base_model_location,
    compile_model,
    load_model_and_tokenizer,
)
from malora_train.run_dir import (
    CONFIG_FILE,
    EVAL_DIR,
    LOSS_PLOT,
    RUN_OUTPUTS,
    SUMMARY_FILE,
    TRACKER_LOGS_DIR,
    UNSTARTED_FOLDERS,
    guard_run_dir,
    remove_unstarted_outputs,
    run_dir_lock,
    write_json_atomic,
    write_text_atomic,
)
from malora_train.train.checkpoint.checkpointer import CheckpointedParts, Checkpointer, TrainState
from malora_train.train.checkpoint.folders import complete_checkpoints, remove_partial, step_dir
from malora_train.train.checkpoint.resume import (
    check_extendable,
    finished_message,
    finished_run,
    last_good_hint,
    resolve_resume,
    resume_arguments,
)
from malora_train.train.distributed import (
    LaunchInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    build_accelerator,
    check_launch,
    configure_deepspeed,
    gather_objects,
    local_rows,
    model_init_context,
    to_device,
)
from malora_train.train.graphs import StepGraphs
from malora_train.train.metrics import (
    MetricsLogger,
    Progress,
    format_summary,
    hub_bars,
    installed_trackers,
    peak_memory_gb,
    plot_losses,
    progress_interval,
    progress_mode,
    run_name_from_overrides,
)
from malora_train.train.optim import build_optimizer, build_scheduler, total_steps
from malora_train.train.preflight import check_config
from malora_train.train.recompute import enable_activation_checkpointing
from malora_train.train.step_path import choose_step_path
from malora_train.train.step_stats import WindowStats

log = logging.getLogger(__name__)
phase = torch.profiler.record_function  # names a part of the step in profiler traces (nearly free otherwise)


class NonFiniteLoss(MaloraError):
    """The loss became NaN or infinite."""


class Stopped(BaseException):
    """A signal cut short work that can be dropped (start-up, an evaluation; ``StopRequest.interrupting``).
    A BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way swallows it."""


class StopRequest:
    """Turns SIGTERM/SIGINT (a preempted job, Ctrl-C) into a flag checked at each step boundary. A second
    signal changes nothing: it must not interrupt the checkpoint being saved (kill -9 stops at once, and
    the last complete checkpoint stays loadable). Inside ``interrupting()`` (work that saves nothing:
    start-up, an evaluation) a signal also raises ``Stopped``: the run stops at once, not at the end of it.

    The previous handlers come back on exit, unless ``hold`` and a stop was requested: then the signals are
    ignored from there on, so a repeated one cannot kill a process that is ending anyway (the command line's
    single run, after its save, while the lock is released and the interpreter shuts down; SIG_IGN, because
    the interpreter's shutdown puts the default action back in place of a Python handler)."""

    def __init__(self, hold: bool = False) -> None:
        self.requested = False
        self.hold = hold
        self.previous: dict[int, Any] = {}
        self._interruptible = False

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # a flag and nothing else, unless in interruptible work: a handler that prints or raises could break
        # a save under way
        first = not self.requested
        self.requested = True
        if self._interruptible and first:
            self._interruptible = False
            raise Stopped

    @contextlib.contextmanager
    def interrupting(self, enabled: bool = True) -> Any:
        """A block a signal may cut short with ``Stopped`` (at once if one came before it). ``enabled=False``
        (several processes: a rank leaving a collective the others are in would hang them) keeps the flag."""
        if not enabled:
            yield
            return
        if self.requested:
            raise Stopped
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __exit__(self, *exc) -> None:
        held = self.requested and self.hold
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if held else handler)


def interrupted_message(step: int, checkpoint: Path | None, run_dir: Path, saved: bool) -> str:
    """The line a run stopped by a signal prints: where its training is and the command that continues it."""
    if checkpoint is None:
        where = "before its first step (nothing trained to save)"
    elif saved:
        where = f"at step {step}; saved {checkpoint}"
    else:
        where = f"at step {step}, nothing trained since {checkpoint}"
    return f"stopped by signal {where}; continue with {resume_arguments(run_dir)}"


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions with a loss in a host batch."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding in a host batch."""
    return int(batch["attention_mask"].sum())


class Trainer:
    """A recipe: ``__init__`` runs the ``_setup_*`` steps in order; ``run()`` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path, resolved_yaml: str, overrides: list[str],
                 hold_signals: bool = False, stop: StopRequest | None = None) -> None:
        began = time.perf_counter()
        self.cfg = cfg
        self.run_dir = run_dir
        self.hold_signals = hold_signals  # StopRequest(hold=...): the process ends with this run
        self.stop = stop  # the caller's, installed over the set-up too; else run() installs its own
        self.progress_mode = progress_mode(cfg.trainer.progress)  # bar | lines | off (on rank 0)
        self._setup_launch()
        self._setup_model()
        self._setup_adapters()
        self._setup_data()
        self._setup_optimizer()
        self._setup_state(resolved_yaml, overrides)
        self.startup_s = time.perf_counter() - began  # model, adapters, data, optimizer: ready to train

    # -- set-up ----------------------------------------------------------------------------------------------
    def _setup_launch(self) -> None:
        """Validate, start the processes, claim the run directory, find the checkpoint to resume."""
        trainer = self.cfg.trainer
        check_config(self.cfg)
        self.accelerator = acc = build_accelerator(trainer, installed_trackers(self.cfg.logger),
                                                   self.run_dir / TRACKER_LOGS_DIR)
        check_launch(trainer, acc)
        self.launch = LaunchInfo.from_accelerator(acc)
        self.step_path = choose_step_path(self.cfg, acc.device.type, self.launch.deepspeed)
        guard_run_dir(self.run_dir, trainer.resume)
        barrier()  # every rank has looked at the run directory before rank 0 changes it
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.run_dir)
        barrier()
        self.resume_from = resolve_resume(self.run_dir, trainer.resume)
        check_extendable(self.run_dir, self.resume_from)

    def _setup_model(self) -> None:
        """The base model and tokenizer: the same seed on every rank, so the adapters built next start
        identical (DDP/DeepSpeed check it)."""
        set_seed(self.cfg.seed)
        with model_init_context(self.accelerator), hub_bars(self.progress_mode == "bar"):
            self.base_model, self.tokenizer = load_model_and_tokenizer(
                self.cfg.model, device=self.accelerator.device, seed=self.cfg.seed)

    def _setup_adapters(self) -> None:
        trainer = self.cfg.trainer
        self.model = AdaptedCausalLM.from_base(self.base_model, self.cfg.adapter)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if trainer.gradient_checkpointing:
            # captured: the recompute draws the forward's dropout masks again from the device seed, and a
            # capture cannot save and restore RNG states
            selective = trainer.gradient_checkpointing == "selective"
            enable_activation_checkpointing(self.base_model, preserve_rng_state=not self.step_path.captured,
                                            keeps=trainer.checkpointing_keeps if selective else None)
        if trainer.compile:
            self.model.kernel_state.compiled_as_kernels = runs_as_kernels(
                trainer.compile_adapters, routed=bool(self.model.mixture_layers()))
            compile_model(self.base_model, trainer.compile_mode, trainer.compile_scope)
        self.params = parameter_report(self.model)

    def _setup_data(self) -> None:
        """Tasks and the batch stream: every rank draws the same global micro-batches, keeps its rows.
        ``data.packing`` unset: packed rows when training on a GPU."""
        trainer, data = self.cfg.trainer, self.cfg.data
        on_gpu = self.accelerator.device.type == "cuda"
        self.packing = data.packing if data.packing is not None else on_gpu
        data = dataclasses.replace(data, packing=self.packing)
        self.tasks = build_tasks(data, self.cfg.seed, self.tokenizer)
        self.prompt_template = choose_template(data.prompt_template, data.prompt_template_fallback,
                                               self.tokenizer)
        self.task_names = list(self.tasks)
        global_micro_batch = trainer.micro_batch_size * self.world
        self.stream = BatchStream(self.tasks, self.tokenizer, data, batch_size=global_micro_batch,
                                  seed=self.cfg.seed, blocks=self.world)
        self.total_steps = total_steps(trainer, self.stream.batches_for_epochs)
        self.log_every = trainer.log_every or (10 if on_gpu else 1)
        # on a GPU the LM head's answer slots only grow, rounded to this multiple (``labels.answer_slots``):
        # the run settles on one K in its first step or two. Trainer state only: after a resume the first step
        # grows it again. The CPU (1) takes exactly the answer positions.
        self._loss_multiple = 256 if self.step_path.captured else 64 if on_gpu else 1
        self._answer_slots = 0

    def _setup_optimizer(self) -> None:
        """AdamW (fused on a GPU; DeepSpeed's ZeRO wraps the optimizer itself and keeps the default), the
        schedule, and what runs the step: the engine Accelerate wraps the model into (eager), or the model
        itself replayed as CUDA graphs that sum their gradients over processes themselves (captured)."""
        trainer, acc = self.cfg.trainer, self.accelerator
        fused = acc.device.type == "cuda" and not self.deepspeed
        captured = self.step_path.captured
        optimizer = build_optimizer(self.model, trainer, fused=fused, capturable=captured)
        self.scheduler = build_scheduler(optimizer, trainer, self.total_steps)
        configure_deepspeed(acc, trainer)
        self.graphs = None
        if captured:  # no DDP wrapper: its hooks cannot live inside a capture
            self.engine, self.optimizer = self.model, acc.prepare(optimizer)
            self.graphs = StepGraphs(self._forward_backward, self._update, self.trainable, acc.device,
                                     self.model.kernel_state,
                                     all_reduce=all_reduce_sum if self.world > 1 else None)
        else:
            self.engine, self.optimizer = acc.prepare(self.model, optimizer)
        # dropout: rank 0 as one process would, others their own
        set_seed(self.cfg.seed, device_specific=True)

    def _setup_state(self, resolved_yaml: str, overrides: list[str]) -> None:
        """Restore a checkpoint (or start fresh), record the config, open the metrics log."""
        trainer = self.cfg.trainer
        parts = CheckpointedParts(model=self.model, engine=self.engine, optimizer=self.optimizer,
                                  scheduler=self.scheduler, stream=self.stream,
                                  base_model_name=self.base_model_name)
        self.checkpointer = Checkpointer(self.run_dir, self.launch, parts,
                                         seed=self.cfg.seed)
        self.state = TrainState()
        if self.resume_from is not None:
            self.state = self.checkpointer.restore(self.resume_from)
        elif trainer.resume and self.is_main:
            log.info("trainer.resume=%s: no checkpoint in %s, starting fresh", trainer.resume, self.run_dir)
        if self.is_main:
            name = f"config.resumed_step_{self.state.step}.yaml" if self.resume_from else CONFIG_FILE
            write_text_atomic(self.run_dir / name, resolved_yaml)
        resume_step = self.state.step if self.resume_from else (-1 if trainer.resume else None)
        self.metrics = MetricsLogger(self.run_dir, self.is_main, self.cfg.logger,
                                     run_name_from_overrides(overrides),
                                     OmegaConf.to_container(OmegaConf.structured(self.cfg)), resume_step,
                                     accelerator=self.accelerator)
        self.window = WindowStats(self.task_names, self.model.balance_layer_names, self.accelerator.device)
        self._window_start = self.state.step  # the last step of the previous logging window
        self._last_lr = self.scheduler.get_last_lr()[0]
        self._skipped = 0  # steps skipped for a non-finite loss in this window
        self._clock = time.perf_counter()

    @property
    def base_model_name(self) -> str:
        return base_model_location(self.cfg.model)

    # the launch's facts, as the recipe reads them (``self.launch`` holds them)
    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    @property
    def process_index(self) -> int:
        return self.launch.process_index

    @property
    def world(self) -> int:
        return self.launch.world

    @property
    def deepspeed(self) -> bool:
        return self.launch.deepspeed

    def _tick(self) -> None:
        """Add the time since the last tick to the run's wall time (kept across resumes)."""
        now = time.perf_counter()
        self.state.wall_time += now - self._clock
        self._clock = now

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Evaluate, train, evaluate. A signal at any moment ends the run with what it trained saved as a
        checkpoint (none when it trained nothing) and the printed command that continues it."""
        if self.stop is not None:
            return self._run(self.stop)
        with StopRequest(hold=self.hold_signals) as stop:
            self.stop = stop
            try:
                return self._run(stop)
            finally:
                self.stop = None

    def _run(self, stop: StopRequest) -> dict[str, Any]:
        trainer, state = self.cfg.trainer, self.state
        self._announce()
        if self._stop_agreed():  # a signal during the set-up of several processes
            return self._interrupted(self.resume_from)
        if trainer.eval_before and state.step == 0 and state.eval_before is None:
            before = self._evaluate_or_stop()
            if before is None:  # nothing trained yet: nothing to save
                return self._interrupted(self.resume_from)
            state.eval_before = before.to_json()
            self._log_eval(before, 0)
        self.engine.train()
        every = progress_interval(self.total_steps, self.log_every, trainer.progress_every)
        progress = Progress(self.total_steps, state.step, self.progress_mode, self.is_main, every)
        saved_step = state.step if self.resume_from else None
        if state.eval_pending:  # the evaluation of this step, which a signal cut short, comes first
            best = self._periodic_eval(progress)
            if state.eval_pending:  # cut short again: the checkpoint of this step is there
                progress.close()
                return self._interrupted(self.resume_from)
            if best:
                self.save_checkpoint()
        self.window.restart_clock()
        while state.step < self.total_steps:
            self.train_step()
            state.step += 1
            eval_due = self._eval_due()
            save_due = bool(trainer.save_every) and state.step % trainer.save_every == 0
            boundary = (state.step % self.log_every == 0 or state.step == self.total_steps
                        or eval_due or save_due)
            metrics = self._close_window() if boundary else None
            progress.update(metrics)
            best = self._periodic_eval(progress) if eval_due else False
            if self.world == 1:  # the signal flag itself
                stopping = stop.requested
            else:  # several processes agree at window boundaries (a collective)
                stopping = boundary and any_rank(stop.requested, self.accelerator.device)
            if stopping and not boundary:
                self._close_window()
            if stopping or save_due or best:
                path, saved_step = self.save_checkpoint(), state.step
            if stopping:
                progress.close()
                return self._interrupted(path)
            if eval_due or save_due or best:
                self.window.restart_clock()
        progress.close()
        if trainer.save_every and saved_step != state.step:  # the final evaluation must not risk the steps
            self.save_checkpoint()
            saved_step = state.step
        return self.finish(saved_step)

    def _announce(self) -> None:
        if self.is_main:
            log.info("training step: %s", self.step_path.describe())
            log.info("run directory: %s (set up in %.1f s)", self.run_dir, self.startup_s)
            log.info("%s + %s: %s trainable parameters (%.2f%% of the base model), %d steps%s",
                     self.cfg.model.name, self.cfg.adapter.kind, f"{self.params['trainable']:,}",
                     self.params["percent"], self.total_steps,
                     f", packed rows of {self.cfg.data.max_length} tokens" if self.packing else "")
            log.info("prompt template: %s", self._template_choice())
            if self._evaluates():  # once a run, and only when something is scored
                for note in scorer_notes(self.tasks, self.cfg.eval):
                    log.warning(note)

    def _template_choice(self) -> str:
        setting = self.cfg.data.prompt_template
        if setting != AUTO:
            return f"{self.prompt_template} (data.prompt_template={setting})"
        has = "has a" if self.prompt_template == "chat" else "has no"
        return f"{self.prompt_template} (data.prompt_template=auto: the tokenizer {has} chat template)"

    def _evaluates(self) -> bool:
        """Whether this run (from where it starts) evaluates at all."""
        trainer, state = self.cfg.trainer, self.state
        before = trainer.eval_before and state.step == 0 and state.eval_before is None
        return bool(before or trainer.eval_after or trainer.eval_every or state.eval_pending)

    def _eval_due(self) -> bool:
        """An in-training evaluation is due (the last step has the final evaluation instead)."""
        every = self.cfg.trainer.eval_every
        return bool(every) and self.state.step % every == 0 and self.state.step < self.total_steps

    def _close_window(self) -> dict[str, Any] | None:
        """Read the logging window's metrics (the loop's one synchronisation), log them, and stop the run
        if a loss in it was not finite."""
        if self.window.empty:
            return None
        first = self._window_start + 1
        metrics, nonfinite, elapsed = self.window.read(all_reduce_sum, self.world,
                                                       bool(self.model.mixture_layers()))
        self._window_start = self.state.step
        self.state.train_time += elapsed
        if nonfinite and not self.cfg.trainer.skip_nonfinite:
            where = (f"at step {first}" if first == self.state.step
                     else f"between steps {first} and {self.state.step} (one logging window; "
                          "trainer.log_every=1 names the step)")
            raise NonFiniteLoss(f"non-finite loss {where}; {last_good_hint(self.run_dir)} (resume with "
                                "trainer.resume=auto and a lower trainer.lr, "
                                "or set trainer.skip_nonfinite=true)")
        metrics["lr"] = float(self._last_lr)  # a device tensor on the captured path
        metrics.update({f"epoch/{task}": e for task, e in self.stream.mixture.epochs.items()})
        if self._skipped:
            metrics["skipped"] = self._skipped
            self._skipped = 0
        self.metrics.log(self.state.step, metrics)
        return metrics

    # -- one optimiser step ----------------------------------------------------------------------------------
    def _graphed_step(self) -> None:
        """``train_step`` on the captured path: the same maths, its device work replayed as CUDA graphs
        (``graphs.StepGraphs``); the step's global answer-token count (known on every rank's host) goes in as
        a tensor, and the graphs sum the processes' gradients before the update."""
        batches, answers, tokens = self._start_step()
        normalizer = torch.tensor(float(max(1, answers)))
        for batch in batches:
            with phase("data"):
                host = self._local_batch(batch)
                inputs = {k: v for k, v in host.items() if k != "labels"}
            with phase("forward"):  # and backward: one graph
                out = self.graphs.micro_step({**inputs, "loss_normalizer": normalizer})
            with phase("bookkeeping"):
                self.window.add_forward(out, host)
        with phase("optimizer"):
            grad_norm = self.graphs.update()
        self._end_step(tokens, answers, grad_norm, finite=True)

    def _start_step(self) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        """The step's global micro-batches, answer tokens and real tokens (host counts); notes the step's
        lr."""
        with phase("data"):
            batches = [self.stream.next_batch() for _ in range(self.cfg.trainer.grad_accum)]
            answers = sum(answer_tokens(b) for b in batches)
            tokens = sum(real_tokens(b) for b in batches)
        self._last_lr = self.scheduler.get_last_lr()[0]
        return batches, answers, tokens

    def _end_step(self, tokens: int, answers: int, grad_norm: torch.Tensor | float | None,
                  finite: bool) -> None:
        """Advance the schedule and count the step in the logging window and the run's state."""
        with phase("bookkeeping"):
            self.scheduler.step()
            self.window.add_step(tokens, answers, grad_norm)
            self._skipped += not finite
            self.state.tokens += tokens

    def _forward_backward(self, inputs: dict[str, torch.Tensor]) -> AdaptedOutput:
        """One micro-batch's forward and backward as ``train_step`` runs them (graphs call it): the LM loss
        over the step's global answer tokens, the aux loss (a per-forward mean) as a share of the step's
        forwards on every process, so the summed gradients are one process's with ``grad_accum`` x world
        micro-batches. The output comes back detached: an autograd graph of an eager run still alive during a
        capture would tie the capture to the default stream."""
        with self.accelerator.autocast():
            out = self.model(**inputs)
        (out.lm_loss + out.aux_loss / (self.cfg.trainer.grad_accum * self.world)).backward()
        return out.detached()

    def _update(self) -> torch.Tensor | None:
        """Clip, step, zero the gradients in place (graphs call it; they keep the gradient tensors)."""
        max_norm = self.cfg.trainer.max_grad_norm
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.trainable, max_norm, foreach=True) if max_norm > 0
                     else None)
        self.optimizer.optimizer.step()
        self.optimizer.optimizer.zero_grad(set_to_none=False)
        return grad_norm

    def train_step(self) -> None:
        """Queue one optimiser step on the device. Nothing here waits for the device (with
        ``trainer.skip_nonfinite`` the finite check does): its metrics wait in ``self.window``. The phases
        are named for the profiler (``scripts/bench_loop.py`` reports them)."""
        if self.graphs is not None:
            return self._graphed_step()
        trainer, acc = self.cfg.trainer, self.accelerator
        batches, answers, tokens = self._start_step()
        normalizer = max(1, answers)  # the step's global answer tokens
        finite, grad_norm = True, None
        for batch in batches:
            with phase("data"):
                host = self._local_batch(batch)
                inputs = to_device({k: v for k, v in host.items() if k != "labels"}, acc.device)
            with acc.accumulate(self.engine):
                if trainer.compile:  # a new iteration for compiled CUDA graphs (a no-op otherwise)
                    torch.compiler.cudagraph_mark_step_begin()
                with phase("forward"):  # the LM loss as a share of the step's loss (its global answer tokens)
                    out = self.engine(**inputs, loss_normalizer=normalizer / self.world)
                    if trainer.skip_nonfinite:
                        finite = self._loss_is_finite(out.loss) and finite
                with phase("backward"):  # Accelerate divides each micro-batch's loss by grad_accum, which
                    # only the aux loss (a per-forward mean) wants
                    acc.backward(out.lm_loss * trainer.grad_accum + out.aux_loss)
                with phase("optimizer"):  # applied by Accelerate once the step's micro-batches are in
                    if acc.sync_gradients and not self.deepspeed and trainer.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.trainable, trainer.max_grad_norm)
                    if finite:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            with phase("bookkeeping"):
                self.window.add_forward(out, host)
        if self.deepspeed:
            grad_norm = self.engine.get_global_grad_norm()
        self._end_step(tokens, answers, grad_norm, finite)

    def _local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch and where their loss is, on the host."""
        local = local_rows(batch, self.process_index, self.world)
        found = loss_targets(local["labels"], local["task_ids"])
        # a GPU: K padded to slots that only grow, with headroom; the CPU (multiple 1): exactly the answers
        self._answer_slots = answer_slots(found["loss_index"].numel(), self._answer_slots,
                                          self._loss_multiple)
        local.update(pad_loss_targets(found, self._answer_slots))
        return local

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        """``trainer.skip_nonfinite``: whether every rank's loss is finite (a synchronisation a step)."""
        return not any_rank(not bool(torch.isfinite(loss).item()), self.accelerator.device)

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, record_routing: bool = False) -> EvalResult:
        """Each rank scores its shard (padded so every rank runs as many forwards, as ZeRO-3 needs). A
        compiled model evaluates eagerly: evaluation batches change shape, the compiled graphs do not."""
        with torch.compiler.set_stance("force_eager"):
            return evaluate(
                self.model, self.tokenizer, self.tasks, self.cfg.eval, rank=self.process_index,
                world_size=self.world, all_reduce=all_reduce_sum, record_routing=record_routing,
                max_length=self.cfg.data.max_length, progress=self.is_main and self.progress_mode == "bar",
            )

    def _log_eval(self, result: EvalResult, step: int) -> None:
        """The eval line of metrics.jsonl and eval/step_<N>/predictions_<scorer>.jsonl (every rank's)."""
        metrics = {f"eval/{task}": score.accuracy for task, score in result.scores.items()}
        metrics["eval/average"] = result.average
        self.metrics.log(step, metrics)
        predictions = gather_objects([p for task in result.predictions.values() for p in task])
        if self.is_main and predictions:
            folder = self.run_dir / EVAL_DIR / f"step_{step}"
            write_predictions(predictions_file(folder, self.cfg.eval.scorer), predictions, self.task_names)

    def _stop_agreed(self) -> bool:
        """Whether a signal asked the run to stop: the flag, or with several processes whether any rank's is
        set (a collective: every rank calls it at the same point)."""
        if self.world == 1:
            return self.stop.requested
        return any_rank(self.stop.requested, self.accelerator.device)

    def _evaluate_or_stop(self, record_routing: bool = False) -> EvalResult | None:
        """``evaluate``, or None when a signal asked the run to stop: one process drops the evaluation at
        once; several finish it (a rank leaving its collectives would hang the others), then agree."""
        try:
            with self.stop.interrupting(self.world == 1):
                result = self.evaluate(record_routing=record_routing)
        except Stopped:
            return None
        return None if self._stop_agreed() else result

    def _periodic_eval(self, progress: Progress) -> bool:
        """Evaluate during training; True when this is the best evaluation so far (False when a signal cut it
        short: the loop then saves and stops)."""
        result = self._evaluate_or_stop()
        self.state.eval_pending = result is None
        if result is None:
            return False
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

    def _interrupted(self, checkpoint: Path | None, saved: bool = True) -> dict[str, Any]:
        """Stopped by a signal: ``checkpoint`` holds the trained steps (saved now, or the one the run resumed
        from, ``saved=False``; None before any was)."""
        summary = {"status": "interrupted", "step": self.state.step,
                   "checkpoint": str(checkpoint) if checkpoint is not None else None}
        if self.is_main:
            print(interrupted_message(self.state.step, checkpoint, self.run_dir,
                                      saved and checkpoint != self.resume_from), flush=True)
        self.metrics.finish(summary)
        return summary

    def finish(self, saved_step: int | None = None) -> dict[str, Any]:
        """Adapter, final evaluation (unless trainer.eval_after=false), routing report, summary.json and
        loss plot; prints the summary. The adapter is saved first, and a signal during the evaluation saves
        a checkpoint (unless ``saved_step`` is this step) and stops: resuming it runs the evaluation."""
        state = self.state
        adapter_dir = self.checkpointer.save_final_adapter()
        after, routing = None, None
        if self.cfg.trainer.eval_after:
            after = self._evaluate_or_stop(record_routing=True)
            if after is None:
                done = saved_step == state.step
                path = step_dir(self.run_dir, state.step) if done else self.save_checkpoint()
                return self._interrupted(path, saved=not done)
            self._log_eval(after, state.step)
            if self.model.mixture_layers():
                routing = routing_report(self.model, self.task_names, all_reduce=all_reduce_sum)
        if after is not None and (state.best_average is None or after.average >= state.best_average):
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

    def _summary(self, after: EvalResult | None, adapter_dir: Path) -> dict[str, Any]:
        state = self.state
        before = state.eval_before or {}
        return {
            "status": "completed",
            "model": self.cfg.model.name,
            "adapter": self.cfg.adapter.kind,
            "prompt_template": self.prompt_template,  # what data.prompt_template gave (auto: chosen)
            "steps": state.step,
            "tokens": state.tokens,
            "wall_time_s": state.wall_time,
            # this (last) start's set-up: model, adapters, data (imports excluded)
            "startup_s": self.startup_s,
            "train_time_s": state.train_time,
            "tokens_per_s": state.tokens / state.train_time if state.train_time else 0.0,
            "peak_memory_gb": peak_memory_gb(self.accelerator.device),
            "trainable_params": self.params["trainable"],
            "total_params": self.params["total"],
            "trainable_percent": self.params["percent"],
            "eval_before": before.get("accuracy"),
            "eval_before_average": before.get("average"),
            "eval_after": after.to_json()["accuracy"] if after is not None else None,
            "eval_after_average": after.average if after is not None else None,
            "best_eval_average": state.best_average,
            "best_step": state.best_step,
            "adapter_dir": str(adapter_dir),
            "world_size": self.world,
            "mixed_precision": self.accelerator.mixed_precision,
            "max_steps": self.cfg.trainer.max_steps,  # what was asked: a resume asking for more continues
            "epochs": self.cfg.trainer.epochs,
        }


def train(cfg: Config, run_dir: Path, resolved_yaml: str = "", overrides: list[str] | None = None,
          hold_signals: bool = False) -> dict:
    """Run one training job into ``run_dir`` and return its summary (``status`` completed or interrupted).

    The run directory is locked for the whole run (by rank 0). ``trainer.resume`` on a run that already
    completed what is asked returns its summary and touches nothing. A fresh run that fails before its
    first step removes what it wrote, so the directory can be used again. ``hold_signals``: the process ends
    with this run (``StopRequest``), so signals after a requested stop are ignored until it exits."""
    run_dir = Path(run_dir)
    main = launch_rank() == 0
    finished = finished_run(run_dir, cfg.trainer)
    if finished is not None:
        if main:
            print(finished_message(run_dir, finished), flush=True)
        return finished
    with run_dir_lock(run_dir, enabled=main) as note:
        if note:
            log.warning(note)
        fresh = not any((run_dir / name).exists() for name in RUN_OUTPUTS)
        created = [name for name in UNSTARTED_FOLDERS if not (run_dir / name).exists()]
        trainer = None
        try:
            with StopRequest(hold=hold_signals) as stop:
                try:  # one process: a signal during the set-up stops it at once (several finish it first)
                    with stop.interrupting(int(os.environ.get("WORLD_SIZE", "1")) == 1):
                        trainer = Trainer(cfg, run_dir, resolved_yaml, overrides or [],
                                          hold_signals=hold_signals, stop=stop)
                except Stopped:
                    return _stopped_in_set_up(run_dir, main, fresh, created)
                summary = trainer.run()
            if main and fresh and summary["status"] == "interrupted" and summary["checkpoint"] is None:
                remove_unstarted_outputs(run_dir, created)  # stopped before its first step: reusable
            return summary
        except Exception:
            if main and fresh and (trainer is None or trainer.state.step == 0):
                remove_unstarted_outputs(run_dir, created)
            raise


def _stopped_in_set_up(run_dir: Path, main: bool, fresh: bool, created: list[str]) -> dict[str, Any]:
    """A signal during the set-up: nothing was trained; a fresh run's files are removed (the directory can
    be used again), a resumed run keeps its checkpoints."""
    if main and fresh:
        remove_unstarted_outputs(run_dir, created)
    found = complete_checkpoints(run_dir)
    step, checkpoint = found[-1] if found else (0, None)
    if main:
        print(interrupted_message(step, checkpoint, run_dir, saved=False), flush=True)
    return {"status": "interrupted", "step": step, "checkpoint": str(checkpoint) if checkpoint else None}
