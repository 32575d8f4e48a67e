"""Throughput of the real training loop: ``malora-train``'s own ``Trainer`` (config, data stream, packing,
adapters, optimizer, metrics window) run for N steps per adapter and compile mode, beside HF ``Trainer`` +
PEFT LoRA on the same examples (``--baseline hf-peft``), in one process.

    make bench-loop                               # = --targets: issue 24's targets table (bench_targets.py)
    python scripts/bench_loop.py                  # the default and eager rows beside both baselines
    python scripts/bench_loop.py --json out.json -- data.root=/path/to/commonsense   # data elsewhere

Defaults by device. GPU: SmolLM2-135M shapes on ``commonsense_intra`` (``data.root``:
../shared/data/commonsense or $MALORA_COMMONSENSE_ROOT), each adapter eager and with ``trainer.cuda_graphs``,
beside HF + PEFT. CPU: the tiny model on the synthetic mixture, eager, no baseline (a smoke run;
tests/test_bench_loop.py keeps it working).

Per run: tokens/s (real tokens, median over the measured steps of each step's tokens over its time),
the step-time spread (max and p90 over the median), peak memory, and a breakdown of a few profiled steps
into the loop's named phases (data, forward, backward, optimizer, bookkeeping; host and device
milliseconds). Step times come from CUDA events recorded at each step's start (no synchronisation in the
measured steps), or from the host clock on the CPU. Prints one table last and writes the rows as JSON, with
each measured step's device time, host time (the ``train_step`` call) and the CUDA graphs captured so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_targets import PART_NAMES, run  # noqa: E402

from malora_train.cli import compose  # noqa: E402
from malora_train.labels import IGNORE_INDEX  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer", "bookkeeping")
# default: no speed flag (what a bare malora-train runs); eager / graphs: trainer.cuda_graphs=false / true;
# compile: trainer.compile=true (mode default; the adapters as trainer.compile_adapters=auto runs them),
# "+graphs" with the captured step; compile-kernels / compile-traced: the adapters on their Triton kernels
# between the compiled pieces / traced into them, whatever the adapter; the rest: trainer.compile_mode
MODE_OVERRIDES = {
    "default": [],
    "eager": ["trainer.cuda_graphs=false"],
    "graphs": ["trainer.cuda_graphs=true"],
    "compile": ["trainer.compile=true", "trainer.cuda_graphs=false"],
    "compile+graphs": ["trainer.compile=true", "trainer.cuda_graphs=true"],
    "compile-kernels": ["trainer.compile=true", "trainer.compile_adapters=kernels",
                        "trainer.cuda_graphs=false"],
    "compile-kernels+graphs": ["trainer.compile=true", "trainer.compile_adapters=kernels",
                               "trainer.cuda_graphs=true"],
    "compile-traced": ["trainer.compile=true", "trainer.compile_adapters=traced",
                       "trainer.cuda_graphs=false"],
    "compile-traced+graphs": ["trainer.compile=true", "trainer.compile_adapters=traced",
                              "trainer.cuda_graphs=true"],
    **{mode: ["trainer.compile=true", f"trainer.compile_mode={mode}", "trainer.cuda_graphs=false"]
       for mode in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")},
}
MODES = tuple(MODE_OVERRIDES)
# HF + PEFT LoRA r64 as users run it: a plain loop over the same packed rows with torch.compile and fused
# AdamW (the strongest form), and HF Trainer with dynamic padding
BASELINES = ("peft-compiled", "hf-peft")
# the baselines run transformers' own modules, as a PEFT user's model does (not malora-train's fused norms)
HF_MODULES = ("model.fused_norms=false",)
# what a bare `make bench-loop` measures: the issue-9 table on a GPU, a smoke run on the CPU
DEVICE_DEFAULTS = {
    "cuda": {"model": "smollm2_135m_shape", "data": "commonsense_intra", "modes": "default,eager",
             "baseline": "peft-compiled,hf-peft"},
    "cpu": {"model": "tiny", "data": "synthetic", "modes": "eager", "baseline": "none"},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_loop.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="default: smollm2_135m_shape on a GPU, tiny on the CPU")
    parser.add_argument("--data", default=None,
                        help="default: commonsense_intra on a GPU, synthetic on the CPU")
    parser.add_argument("--adapters", default="lora,molora,malora")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated: {', '.join(MODES)} (default: default,eager on a GPU, "
                             "eager on the CPU)")
    parser.add_argument("--processes", type=int, default=1,
                        help="also run each adapter's first mode as N processes (on the visible GPUs, "
                             "sharing them over gloo where there are fewer GPUs than processes; gloo "
                             "processes on the CPU)")
    parser.add_argument("--checkpointing", nargs="?", const="true", default=None, metavar="SETTINGS",
                        help="also run every adapter and mode with trainer.gradient_checkpointing at each of "
                             "these comma-separated settings (true, selective; bare: true)")
    parser.add_argument("--rows", type=int, default=16, help="micro-batch rows (packed: of --length tokens)")
    parser.add_argument("--length", type=int, default=256, help="data.max_length (the packed row length)")
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3, help="steps of the phase breakdown")
    parser.add_argument("--kernels", type=int, default=0,
                        help="also list the N kernels with the most device time")
    parser.add_argument("--no-packing", action="store_true", help="padded rows (data.packing=false)")
    parser.add_argument("--baseline", default=None,
                        help=f"comma-separated: {', '.join(BASELINES)}, or none "
                             "(default: peft-compiled,hf-peft on a GPU, none on the CPU); the first is the "
                             "one the ratios divide by")
    parser.add_argument("--host-ops", type=int, default=0,
                        help="also list the N operators with the most host (CPU) time in the profiled steps")
    parser.add_argument("--also", action="append", default=[], metavar="OVERRIDES",
                        help="run every adapter and mode again with these space-separated overrides, in the "
                             "same process (repeatable): e.g. --also 'adapter.shared_input=false'")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--targets", action="store_true",
                        help="issue 24's targets table (what `make bench-loop` runs): this script at 135M "
                             "and 7B shapes and bench.py's 7B step, each one process (bench_targets.py)")
    parser.add_argument("--parts", default=None,
                        help=f"with --targets: run only these comma-separated parts "
                             f"({', '.join(PART_NAMES)}); the rest come from an earlier run's --json")
    parser.add_argument("overrides", nargs="*", help="more malora-train overrides (after --)")
    args = parser.parse_args(argv)
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad_baselines = [b for b in args.baseline.split(",") if b not in (*BASELINES, "none")]
    if bad_baselines:
        parser.error(f"--baseline: unknown {', '.join(bad_baselines)} "
                     f"(choose from {', '.join(BASELINES)}, none)")
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {', '.join(bad)} (choose from {', '.join(MODES)})")
    bad = [p for p in (args.parts or "").split(",") if p and p not in PART_NAMES]
    if bad or (args.parts and not args.targets):
        parser.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(PART_NAMES)})" if bad
                     else "--parts needs --targets")
    if args.steps < 2 or args.warmup < 1:
        parser.error("--steps must be >= 2 and --warmup >= 1")
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    bad = [s for s in (args.checkpointing or "true").split(",") if s not in ("true", "selective")]
    if bad:
        parser.error(f"--checkpointing: unknown {', '.join(bad)} (choose from true, selective)")
    return args


def overrides_for(args: argparse.Namespace, adapter: str, mode: str,
                  extra: tuple[str, ...] = ()) -> list[str]:
    total = args.warmup + args.steps + args.profile_steps
    out = [f"model={args.model}", f"data={args.data}", f"adapter={adapter}", f"trainer.max_steps={total}",
           f"trainer.micro_batch_size={args.rows}", f"data.max_length={args.length}",
           f"data.packing={'false' if args.no_packing else 'true'}", "trainer.eval_before=false",
           "trainer.progress=false", "trainer.save_every=0", f"trainer.log_every={total}",
           "data.eval_per_task=1"]
    return out + MODE_OVERRIDES[mode] + list(args.overrides) + list(extra)


def variants(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The override sets each adapter and mode runs with: none, then each ``--also``, then checkpointing."""
    extra = [tuple(also.split()) for also in args.also]
    for setting in args.checkpointing.split(",") if args.checkpointing else ():
        extra.append((f"trainer.gradient_checkpointing={setting}",))
    return [(), *extra]


class StepClock:
    """Times of step starts: CUDA events (read after the run) or the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def summarise(times: list[float], tokens: list[int]) -> dict[str, float]:
    rates = [n / t for n, t in zip(tokens, times)]
    median = statistics.median(times)
    ordered = sorted(times)
    return {"tokens_per_s": statistics.median(rates), "step_s": median,
            "max_over_median": max(times) / median,
            "p90_over_median": ordered[int(0.9 * (len(ordered) - 1))] / median,
            "tokens_per_step": statistics.mean(tokens), "mean_tokens_per_s": sum(tokens) / sum(times)}


def phase_breakdown(step, steps: int, cuda: bool, kernels: int = 0,
                    host_ops: int = 0) -> tuple[dict[str, dict[str, float]], list, list]:
    """Host and device milliseconds per named phase (the spans of its annotation on the host timeline and,
    on a GPU, on the device timeline), averaged over ``steps`` profiled steps; the ``kernels`` kernels
    with the most device time and the ``host_ops`` operators with the most host time of their own, each as
    [name, ms per step, calls per step]."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    result = {name: {"host_ms": 0.0, "device_ms": 0.0} for name in PHASES}
    for event in prof.events():
        if event.name in result:
            side = "host_ms" if event.device_type == DeviceType.CPU else "device_ms"
            result[event.name][side] += event.time_range.elapsed_us() / 1000 / steps
    top = []
    if cuda and kernels:
        averages = [a for a in prof.key_averages() if a.device_type == DeviceType.CUDA]
        averages.sort(key=lambda a: a.self_device_time_total, reverse=True)
        top = [[a.key[:90], a.self_device_time_total / 1000 / steps, a.count / steps]
               for a in averages[:kernels]]
    host = []
    if host_ops:
        averages = [a for a in prof.key_averages() if a.device_type == DeviceType.CPU and a.key not in PHASES]
        averages.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
        host = [[a.key[:90], a.self_cpu_time_total / 1000 / steps, a.count / steps]
                for a in averages[:host_ops]]
    return result, top, host


def reset_process_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_name(adapter: str, extra: tuple[str, ...], processes: int = 1) -> str:
    name = f"malora-train {adapter}" + (f" x{processes} processes" if processes > 1 else "")
    return name + (f" [{' '.join(extra)}]" if extra else "")


def bench_malora(args: argparse.Namespace, adapter: str, mode: str, run_dir: Path,
                 extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from malora_train.train.loop import Trainer

    overrides = overrides_for(args, adapter, mode, extra)
    cfg = compose(overrides)
    if torch.cuda.is_available():  # the peak over the whole run: a captured step allocates while it captures
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = Trainer(cfg, run_dir, "", overrides)
    device = trainer.accelerator.device
    trainer.engine.train()

    tokens: list[int] = []
    host_times: list[float] = []  # host seconds of each train_step call (what the device may wait for)
    graph_counts: list[int] = []  # CUDA graphs captured so far, after each step (a capture shows as a rise)

    def step() -> None:
        before, host_start = trainer.state.tokens, time.perf_counter()
        trainer.train_step()
        trainer.state.step += 1
        host_times.append(time.perf_counter() - host_start)
        tokens.append(trainer.state.tokens - before)
        graph_counts.append(trainer.graphs.graph_count if trainer.graphs is not None else 0)

    clock = StepClock(device)
    first_step = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter()
    for _ in range(args.steps):
        clock.mark()
        step()
    clock.mark()
    times = clock.durations()
    wall = time.perf_counter() - warm
    row = {"name": run_name(adapter, extra, trainer.world), "adapter": adapter, "mode": mode,
           "overrides": list(extra), "processes": trainer.world, "step_path": trainer.step_path.describe(),
           **summarise(times, tokens[-args.steps:]),
           "wall_tokens_per_s": sum(tokens[-args.steps:]) / wall, "setup_s": first_step - started,
           "warmup_s": warm - first_step, "step_times_s": times,
           "host_step_times_s": host_times[-args.steps:], "graphs_after_step": graph_counts[-args.steps:],
           "trainable_params": trainer.params["trainable"],
           "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                              else None)}
    if args.profile_steps:
        row["phases"], row["kernels"], row["host_ops"] = phase_breakdown(
            step, args.profile_steps, device.type == "cuda", args.kernels, args.host_ops)
    metrics, _, _ = trainer.window.read(lambda t: t, 1, bool(trainer.model.mixture_layers()))
    row["final_lm_loss"] = metrics["lm_loss"]
    return row


def _process_worker(rank: int, world: int, port: int, args: argparse.Namespace, adapter: str, mode: str,
                    run_dir: Path, extra: tuple[str, ...], rows: Any) -> None:
    """One of ``bench_processes``' processes: the environment a launcher gives, then ``bench_malora``."""
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "MALORA_RUN_DIR": str(run_dir)})
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    row = bench_malora(args, adapter, mode, run_dir, extra)
    if rank == 0:
        rows.put(row)


def bench_processes(args: argparse.Namespace, adapter: str, mode: str, run_dir: Path,
                    extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``bench_malora`` as ``--processes`` processes (rank 0's row: the step's global tokens over its
    time)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    context = mp.get_context("spawn")
    rows = context.SimpleQueue()
    mp.start_processes(_process_worker,
                       args=(args.processes, port, args, adapter, mode, run_dir, extra, rows),
                       nprocs=args.processes, start_method="spawn")
    return rows.get()


def bench_hf_peft(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """HF Trainer + PEFT LoRA r64 as users run it: bf16 on a GPU, batch ``--rows``, dynamic padding, the
    same examples in the same order as malora-train's (unpacked) stream draws them."""
    import peft
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from malora_train.data import BatchStream, build_tasks
    from malora_train.models import load_model_and_tokenizer

    cfg = compose([f"model={args.model}", f"data={args.data}", "adapter=lora",
                   f"data.max_length={args.length}", *args.overrides, *HF_MODULES])
    device = torch.device(args.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, seed=cfg.seed)
    lora = peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                           target_modules=list(cfg.adapter.target_modules), bias="none",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    total = args.warmup + args.steps
    stream = BatchStream(build_tasks(cfg.data, cfg.seed, tokenizer), tokenizer,
                         type(cfg.data)(**{**cfg.data.__dict__, "packing": False}), batch_size=args.rows,
                         seed=cfg.seed)
    examples = []
    for _ in range(total):
        batch = stream.next_batch()
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            examples.append({"input_ids": batch["input_ids"][row, :length].tolist(),
                             "labels": batch["labels"][row, :length].tolist()})

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"]))
                                           for r in rows]),
                "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"]))
                                        for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"])
                                                + [0] * (width - len(r["input_ids"])) for r in rows])}

    class InOrder(Trainer):  # the same order as our stream drew them (HF shuffles by default)
        def _get_train_sampler(self, *unused):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    clock = StepClock(device)

    class Marks(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            clock.mark()

    training = TrainingArguments(output_dir=str(workdir / "hf"), per_device_train_batch_size=args.rows,
                                 max_steps=total, bf16=device.type == "cuda", logging_steps=10**9,
                                 save_strategy="no", report_to=[], dataloader_num_workers=0,
                                 use_cpu=device.type == "cpu", learning_rate=1e-4)
    trainer = InOrder(model=model, args=training, train_dataset=examples, data_collator=collate,
                      callbacks=[Marks()])
    trainer.train()
    clock.mark()
    times = clock.durations()[args.warmup:]
    tokens = [sum(len(e["input_ids"]) for e in examples[i * args.rows:(i + 1) * args.rows])
              for i in range(total)]
    row = {"name": "HF Trainer + PEFT LoRA r64", "adapter": "peft-lora", "mode": "hf",
           **summarise(times, tokens[args.warmup:]),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                              else None)}
    del trainer, model
    return row


def bench_peft_compiled(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """HF + PEFT LoRA r64 in its strongest form: a plain PyTorch loop over the packed rows malora-train
    trains on (the same batches; HF's attention keeps each example to itself, told by the restarting
    ``position_ids``), the model under ``torch.compile``, bf16 autocast, fused AdamW. The loss is HF's own
    (the mean over the answer tokens)."""
    import peft

    from malora_train.data import BatchStream, build_tasks
    from malora_train.models import load_model_and_tokenizer

    cfg = compose([f"model={args.model}", f"data={args.data}", "adapter=lora",
                   f"data.max_length={args.length}", "data.packing=true", *args.overrides, *HF_MODULES])
    device = torch.device(args.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, seed=cfg.seed)
    lora = peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                           target_modules=list(cfg.adapter.target_modules), bias="none",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    compiled = torch.compile(model)
    stream = BatchStream(build_tasks(cfg.data, cfg.seed, tokenizer), tokenizer, cfg.data,
                         batch_size=args.rows, seed=cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens: list[int] = []
    clock = StepClock(device)

    def step() -> None:
        batch = stream.next_batch()
        tokens.append(int(batch["attention_mask"].sum()))
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "labels")}
        with autocast:
            loss = compiled(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        clock.mark()
        step()
    clock.mark()
    row = {"name": "PEFT LoRA r64, plain loop, torch.compile, packed", "adapter": "peft-lora",
           "mode": "peft-compiled", **summarise(clock.durations(), tokens[-args.steps:]),
           "trainable_params": sum(p.numel() for p in trainable),
           "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                              else None)}
    return row


def table(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    head = (f"{'run':<56} {'mode':<16} {'tokens/s':>10} {'step ms':>8} {'max/med':>8} {'p90/med':>8} "
            f"{'tok/step':>8} {'mem GB':>7} {'x base':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<56} {r['mode']:<16} ERROR {r['error']}")
            continue
        ratio = (r["tokens_per_s"] / baseline["tokens_per_s"] if baseline and "error" not in baseline
                 else math.nan)
        memory = f"{r['peak_memory_gb']:.2f}" if r.get("peak_memory_gb") is not None else "-"
        lines.append(f"{r['name']:<56} {r['mode']:<16} {r['tokens_per_s']:>10.0f} "
                     f"{1000 * r['step_s']:>8.1f} {r['max_over_median']:>8.2f} {r['p90_over_median']:>8.2f} "
                     f"{r['tokens_per_step']:>8.0f} {memory:>7} {ratio:>6.2f}")
    for r in rows:
        if r.get("phases"):
            parts = ", ".join(f"{k} {v['host_ms']:.1f}/{v['device_ms']:.1f}" for k, v in r["phases"].items())
            lines.append(f"  {r['name']} {r['mode']} phases (host/device ms per step): {parts}")
        for name, ms, count in r.get("kernels") or []:
            lines.append(f"    {ms:7.2f} ms {count:6.0f}x  {name}")
        if r.get("host_ops"):
            lines.append(f"  {r['name']} {r['mode']} host ms per step, by operator (self time):")
        for name, ms, count in r.get("host_ops") or []:
            lines.append(f"    {ms:7.2f} ms {count:6.0f}x  {name}")
    return "\n".join(lines)


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> None:
    """The report so far (written after every run, so a run cut short by a time limit keeps what it had)."""
    if not args.json:
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"device": device, "torch": torch.__version__,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "baselines": baselines}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_loop.py: error: --device cuda but no GPU is visible", file=sys.stderr)
        sys.exit(2)
    if args.targets:
        run(args.device, args.steps, args.warmup, list(args.overrides), args.json,
            args.parts.split(",") if args.parts else None)
        return
    rows: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_loop.") as tmp:
        workdir = Path(tmp)
        first_mode = args.modes.split(",")[0]
        runs = [(bench_malora, mode, extra, adapter, 1) for mode in args.modes.split(",")
                for extra in variants(args) for adapter in args.adapters.split(",")]
        if args.processes > 1:
            runs += [(bench_processes, first_mode, (), adapter, args.processes)
                     for adapter in args.adapters.split(",")]
        for bench, mode, extra, adapter, processes in runs:
            try:
                rows.append(bench(args, adapter, mode, workdir / f"run{len(rows)}", extra))
            except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
                traceback.print_exc()
                rows.append({"name": run_name(adapter, extra, processes), "adapter": adapter, "mode": mode,
                             "overrides": list(extra), "error": f"{type(err).__name__}: {err}"[:300]})
            reset_process_state()
            print(json.dumps(rows[-1]), flush=True)
            write_json(args, rows, baselines)
        runners = {"peft-compiled": bench_peft_compiled, "hf-peft": bench_hf_peft}
        for name in [b for b in args.baseline.split(",") if b != "none"]:
            try:
                result = runners[name](args, workdir)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                result = {"name": name, "mode": name, "error": f"{type(err).__name__}: {err}"[:300]}
            reset_process_state()
            print(json.dumps(result), flush=True)
            baselines.append(result)
            write_json(args, rows, baselines)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"\n{device}, torch {torch.__version__}, {args.model} on {args.data}, "
          f"{'padded' if args.no_packing else 'packed'} {args.rows}x{args.length}, {args.steps} steps after "
          f"{args.warmup} warm-up")
    print(table(rows + baselines, baselines[0] if baselines else None))


if __name__ == "__main__":
    main()
