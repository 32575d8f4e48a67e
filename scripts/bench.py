"""Training-step time of every adapter against the frozen model it adapts (the floor).

One base model with random weights serves every method: adapters are injected, timed and removed
again. A step is forward + backward + AdamW step + zero_grad on a random token batch, with the LM loss
on every token through ``AdaptedCausalLM`` (what training runs). The floor is the frozen model with
activation gradients only (no optimizer). On CUDA the model is bf16 and the forward runs under bf16
autocast with float32 adapter parameters, as in training; on the CPU everything is float32.

    python scripts/bench.py --model tiny --device cpu                       # `make bench`
    python scripts/bench.py --model llama2_7b --device cuda --json out.json \\
        --scenario name=seq4096,batch=1,seq=4096 --scenario name=checkpointing,checkpointing=1

Prints one table (step time, ratio to the floor, tokens/s, peak memory and its ratio, trainable
parameters, fast-vs-reference agreement) and writes the same rows as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from malora_train import load_adapter_config  # noqa: E402
from malora_train.adapters import (  # noqa: E402
    AdaptedCausalLM,
    RoutingContext,
    adapter_kinds,
    adapter_layers,
    remove_adapters,
)
from malora_train.config import AdapterConfig, ModelConfig  # noqa: E402
from malora_train.models import load_model  # noqa: E402

ADAPTER_METHODS = tuple(adapter_kinds())
ALL_METHODS = ("floor", "peft_lora", *ADAPTER_METHODS)
# fast-torch: the fast path's autograd Functions on plain torch ops, without the Triton kernels
IMPLS = ("fast", "reference", "fast-torch")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# what the targets compare: step-time and peak-memory ratios to the floor
TARGETS = {"step_ratio": 1.15, "memory_ratio": 1.25, "peft_speedup": 1.5}


@dataclass
class Scenario:
    name: str
    batch: int
    seq: int
    checkpointing: bool = False
    methods: tuple[str, ...] = ALL_METHODS
    impls: tuple[str, ...] = ("fast", "reference")
    check: bool = False  # run the fast-vs-reference agreement check (the main scenario only)
    steps: int | None = None  # None: --steps / --warmup
    warmup: int | None = None
    compile: bool = False  # torch.compile every decoder layer (the floor too: ratios compare like with like)

    def shape(self) -> tuple[int, int, bool, bool]:
        return self.batch, self.seq, self.checkpointing, self.compile


# --suite full: the extra rows (long sequences, checkpointing) and the fast path without Triton
SUITES = {
    "full": [
        "name=checkpointing,checkpointing=1,methods=floor+lora+molora+malora,impls=fast,steps=5,warmup=2",
        "name=seq4096,batch=1,seq=4096,methods=floor+lora+molora+malora,impls=fast,steps=5,warmup=2",
        "name=reference,methods=molora+malora,impls=reference,steps=3,warmup=1",
        "name=compiled,compile=1,methods=floor+lora+malora,impls=fast,steps=5,warmup=3",
    ],
}


@dataclass
class Row:
    scenario: str
    method: str
    impl: str
    step_s: float
    steps_s: list[float]
    tokens_per_s: float
    peak_bytes: int | None
    trainable: int
    loss: float
    ratio: float = math.nan
    memory_ratio: float = math.nan
    check: dict[str, float] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    error: str = ""


# -- model and methods ---------------------------------------------------------------------------------

def model_config(name: str, dtype: str) -> ModelConfig:
    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise SystemExit(f"--model {name}: no {path.relative_to(REPO)} (known: {known})")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    cfg.dtype = dtype
    return cfg


def adapter_config(kind: str) -> AdapterConfig:
    """The repository's preset for ``kind`` (conf/adapter/<kind>.yaml), e.g. LoRA r=64,
    MALoRA d=32 r-bar=12."""
    return load_adapter_config(kind)


def randomize_up_projections(module: nn.Module, seed: int) -> None:
    """B starts at zero; time and check on random values (zeros run faster and hide wrong indexing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            # ours: x.lora_B, PEFT: x.lora_B.default.weight
            if param.requires_grad and "lora_B" in name.split("."):
                values = torch.randn(param.shape, generator=gen) * 0.01
                param.copy_(values.to(param.device, param.dtype))


class Attached:
    """A method attached to the shared base model; ``detach`` restores the plain model."""

    def __init__(self, model: nn.Module, method: str, impl: str, seed: int):
        self.model = model
        self.method = method
        self.peft_model = None
        for param in model.parameters():
            param.requires_grad_(False)
        if method == "floor":
            self.wrapped = AdaptedCausalLM(model, AdapterConfig(), RoutingContext(), [])
        elif method == "peft_lora":
            import peft

            cfg = adapter_config("lora")
            lora = peft.LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=cfg.dropout,
                                   target_modules=list(cfg.target_modules), bias="none")
            self.peft_model = peft.get_peft_model(model, lora)
            self.wrapped = AdaptedCausalLM(model, cfg, RoutingContext(), [])
        else:
            cfg = adapter_config(method)
            cfg.impl = "reference" if impl == "reference" else "fast"
            torch.manual_seed(seed)
            self.wrapped = AdaptedCausalLM.from_base(model, cfg)
        randomize_up_projections(model, seed)
        self.wrapped.train()
        model.enable_input_require_grads()  # the floor's backward must reach every layer

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def detach(self) -> None:
        self.model.disable_input_require_grads()
        if self.peft_model is not None:
            self.peft_model.unload()
        remove_adapters(self.model)
        for param in self.model.parameters():
            param.requires_grad_(False)
            param.grad = None


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5 renamed the API)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def set_impl(model: nn.Module, impl: str) -> None:
    for _, layer in adapter_layers(model):
        layer.impl = impl


@contextlib.contextmanager
def no_dropout(model: nn.Module):
    layers = [layer for _, layer in adapter_layers(model)]
    saved = [layer.dropout_p for layer in layers]
    for layer in layers:
        layer.dropout_p = 0.0
    try:
        yield
    finally:
        for layer, p in zip(layers, saved):
            layer.dropout_p = p


# -- timing --------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, args: argparse.Namespace, model: nn.Module, vocab: int):
        self.args = args
        self.model = model
        self.vocab = vocab
        self.device = torch.device(args.device)
        self.autocast_dtype = (DTYPES[args.dtype] if self.device.type == "cuda" and args.dtype != "float32"
                               else None)

    def batch(self, scenario: Scenario, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, self.vocab, (scenario.batch, scenario.seq), generator=gen).to(self.device)
        return ids, torch.ones_like(ids)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def loss(self, wrapped: AdaptedCausalLM, ids, mask) -> torch.Tensor:
        with self.autocast():
            return wrapped(ids, attention_mask=mask, labels=ids).loss

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """AdamW, fused on CUDA (one kernel for all tensors), as training uses it."""
        return torch.optim.AdamW(params, lr=1e-5, fused=self.device.type == "cuda") if params else None

    def time_steps(self, attached: Attached, scenario: Scenario) -> tuple[list[float], float, int | None]:
        optimizer = self.optimizer(attached.trainable())
        ids, mask = self.batch(scenario, seed=1)
        times, first_loss = [], math.nan
        self.release()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warmup = self.args.warmup if scenario.warmup is None else scenario.warmup
        steps = self.args.steps if scenario.steps is None else scenario.steps
        for i in range(warmup + steps):
            self.sync()
            start = time.perf_counter()
            loss = self.loss(attached.wrapped, ids, mask)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if i == 0:
                first_loss = float(loss.detach())
            del loss
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        del optimizer
        return times, first_loss, peak

    def agreement(self, attached: Attached, scenario: Scenario) -> dict[str, Any]:
        """Loss and gradients of impl=fast against impl=reference, dropout off, same weights and batch;
        ``grad_noise`` is fast against fast again (nondeterministic kernels: the floor of grad_rel)."""
        ids, mask = self.batch(scenario, seed=2)
        params = attached.trainable()

        def loss_and_grads(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
            # (a function, so that an out-of-memory error frees this pass's graph with its frame)
            set_impl(self.model, impl)
            loss = self.loss(attached.wrapped, ids, mask)
            grads = torch.autograd.grad(loss, params)
            return loss.detach().double(), torch.cat([g.double().flatten() for g in grads])

        results = {}
        with no_dropout(self.model):
            results["fast"] = loss_and_grads("fast")
            results["again"] = loss_and_grads("fast")
            try:
                results["reference"] = loss_and_grads("reference")
            except torch.OutOfMemoryError:
                pass  # e.g. HydraLoRA's dense reference keeps every expert's output at 7B
        set_impl(self.model, attached.wrapped.adapter_cfg.impl)
        self.release()
        (loss_f, grad_f), (_, grad_a) = results["fast"], results["again"]
        check: dict[str, Any] = {"grad_noise": float((grad_f - grad_a).norm() / grad_a.norm())}
        if "reference" not in results:
            return check | {"error": "the reference path ran out of memory"}
        loss_r, grad_r = results["reference"]
        return check | {"loss_rel": float((loss_f - loss_r).abs() / loss_r.abs()),
                        "grad_rel": float((grad_f - grad_r).norm() / grad_r.norm())}

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def profile(self, attached: Attached, scenario: Scenario) -> dict[str, Any]:
        """One profiled step: device-kernel count and busy time against the step's wall time."""
        from torch.profiler import ProfilerActivity, profile

        optimizer = self.optimizer(attached.trainable())
        ids, mask = self.batch(scenario, seed=1)
        self.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            self.loss(attached.wrapped, ids, mask).backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.sync()
            wall = time.perf_counter() - start
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
        return {"kernels": len(kernels), "device_busy_s": busy, "wall_s": wall, "top": table}

    def run(self, scenario: Scenario, method: str, impl: str) -> Row:
        attached = Attached(self.model, method, impl, seed=self.args.seed)
        attached.wrapped.kernel_state.force_torch = impl == "fast-torch"
        try:
            if scenario.checkpointing:
                set_checkpointing(self.model, True)
            if self.args.compile or scenario.compile:
                torch._dynamo.config.cache_size_limit = 64  # one entry per decoder layer at most
                for layer in self.model.get_decoder().layers:
                    layer.compile()
            check = {}
            if self.args.check and scenario.check and method in ADAPTER_METHODS and impl == "fast":
                check = self.agreement(attached, scenario)
            times, loss, peak = self.time_steps(attached, scenario)
            trainable = sum(p.numel() for p in attached.trainable())
            profiled = self.profile(attached, scenario) if self.args.profile else {}
        finally:
            if scenario.checkpointing:
                set_checkpointing(self.model, False)
            if self.args.compile or scenario.compile:
                for layer in self.model.get_decoder().layers:
                    layer._compiled_call_impl = None
            attached.detach()
            self.release()
        median = statistics.median(times)
        return Row(scenario.name, method, impl if method in ADAPTER_METHODS else "-", median, times,
                   scenario.batch * scenario.seq / median, peak, trainable, loss, check=check,
                   profile=profiled)

    def run_or_record(self, scenario: Scenario, method: str, impl: str) -> Row:
        """A failing row is reported in the table and the run goes on with the next one."""
        try:
            return self.run(scenario, method, impl)
        except Exception as err:  # noqa: BLE001 - the benchmark reports any failure as a row
            traceback.print_exc()
            self.release()
            return Row(scenario.name, method, impl, math.nan, [], math.nan, None, 0, math.nan,
                       error=f"{type(err).__name__}: {err}".splitlines()[0][:200])


# -- output --------------------------------------------------------------------------------------------

def fill_ratios(rows: list[Row], scenarios: list[Scenario]) -> None:
    """Ratios to the floor measured at the same batch, sequence length and checkpointing."""
    shape = {s.name: s.shape() for s in scenarios}
    floors = {shape[r.scenario]: r for r in rows if r.method == "floor" and not r.error}
    for row in rows:
        floor = floors.get(shape[row.scenario])
        if floor is None:
            continue
        row.ratio = row.step_s / floor.step_s
        if row.peak_bytes is not None and floor.peak_bytes:
            row.memory_ratio = row.peak_bytes / floor.peak_bytes


def format_table(rows: list[Row]) -> str:
    header = ("| scenario | method | impl | step (s) | x floor | tokens/s | peak (GiB) | mem x floor | "
              "trainable | fast vs ref (loss / grad) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.scenario} | {r.method} | {r.impl} | error: {r.error} |")
            continue
        peak = f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes is not None else "-"
        mem = f"{r.memory_ratio:.3f}" if not math.isnan(r.memory_ratio) else "-"
        check = "-"
        if "loss_rel" in r.check:
            check = (f"{r.check['loss_rel']:.1e} / {r.check['grad_rel']:.1e} "
                     f"(noise {r.check['grad_noise']:.1e})")
        elif r.check:
            check = r.check.get("error", "-")
        lines.append(f"| {r.scenario} | {r.method} | {r.impl} | {r.step_s:.4f} | {r.ratio:.3f} | "
                     f"{r.tokens_per_s:,.0f} | {peak} | {mem} | {r.trainable:,} | {check} |")
    return "\n".join(lines)


def target_report(rows: list[Row]) -> list[str]:
    """The issue's targets, per scenario, for the fast implementations."""
    lines = []
    for scenario in dict.fromkeys(r.scenario for r in rows):
        by = {(r.method, r.impl): r for r in rows if r.scenario == scenario}
        for method in ("lora", "molora", "malora"):
            r = by.get((method, "fast"))
            if r is None or r.error or math.isnan(r.ratio):
                continue
            ok = r.ratio <= TARGETS["step_ratio"] and (math.isnan(r.memory_ratio)
                                                      or r.memory_ratio <= TARGETS["memory_ratio"])
            lines.append(f"{scenario}: {method} fast {r.ratio:.3f}x floor time, "
                         f"{r.memory_ratio:.3f}x floor memory: {'met' if ok else 'MISSED'}")
        mo, ma, peft, lora = (by.get((m, i)) for m, i in
                              (("molora", "fast"), ("malora", "fast"), ("peft_lora", "-"), ("lora", "fast")))
        if mo and ma and not (mo.error or ma.error):
            ok = ma.step_s <= mo.step_s
            lines.append(f"{scenario}: malora {ma.step_s:.4f} s vs molora {mo.step_s:.4f} s: "
                         f"{'met' if ok else 'MISSED'}")
        if peft and lora and not (peft.error or lora.error):
            speedup = peft.step_s / lora.step_s
            lines.append(f"{scenario}: peft lora / our lora = {speedup:.2f}x: "
                         f"{'met' if speedup >= TARGETS['peft_speedup'] else 'MISSED'}")
    return lines


# -- command line --------------------------------------------------------------------------------------

def parse_scenario(text: str, default: Scenario) -> Scenario:
    """``name=gc,checkpointing=1,batch=4,seq=1024,methods=floor+lora,impls=fast``"""
    fields: dict[str, Any] = {"name": text, "batch": default.batch, "seq": default.seq,
                              "checkpointing": default.checkpointing,
                              "methods": default.methods, "impls": default.impls}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--scenario {text!r}: expected key=value pairs, got {part!r}")
        if key in ("batch", "seq", "steps", "warmup"):
            fields[key] = int(value)
        elif key in ("checkpointing", "compile"):
            fields[key] = value.lower() in ("1", "true", "yes", "on")
        elif key in ("methods", "impls"):
            fields[key] = tuple(value.split("+"))
        elif key == "name":
            fields[key] = value
        else:
            raise SystemExit(f"--scenario {text!r}: unknown key {key!r} (name, batch, seq, checkpointing, "
                             "methods, impls, steps, warmup, compile)")
    return Scenario(**fields)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="conf/model/<name>.yaml (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 4")
    parser.add_argument("--seq", type=int, default=None, help="default: 1024 on CUDA, 128 on the CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="model and autocast dtype; default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--impl", default="fast,reference", help=f"some of {', '.join(IMPLS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--scenario", action="append", default=[],
                        help="extra rows after the main ones, e.g. name=seq4096,batch=1,seq=4096 "
                             "or name=checkpointing,checkpointing=1,methods=floor+lora,impls=fast")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="add a preset list of scenarios; full: " + " | ".join(SUITES["full"]))
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the fast-vs-reference agreement check (dropout off)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per row: kernel count, device-busy time, top kernels")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on the CPU: stable numbers on shared machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows and settings here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    methods = tuple(m for m in args.methods.split(",") if m)
    impls = tuple(i for i in args.impl.split(",") if i)
    main_scenario = Scenario("main", args.batch or 4, args.seq or (1024 if device.type == "cuda" else 128),
                             args.gradient_checkpointing, methods, impls, check=True)
    extra = (SUITES[args.suite] if args.suite else []) + args.scenario
    scenarios = [main_scenario] + [parse_scenario(s, main_scenario) for s in extra]
    for scenario in scenarios:
        unknown = [m for m in scenario.methods if m not in ALL_METHODS]
        unknown += [i for i in scenario.impls if i not in IMPLS]
        if unknown:
            raise SystemExit(f"unknown method or impl: {', '.join(unknown)} "
                             f"(methods: {', '.join(ALL_METHODS)}; impls: {', '.join(IMPLS)})")
    notes = []
    if importlib.util.find_spec("peft") is None and any("peft_lora" in s.methods for s in scenarios):
        notes.append("peft is not installed: no peft_lora rows")
        for scenario in scenarios:
            scenario.methods = tuple(m for m in scenario.methods if m != "peft_lora")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    model = load_model(model_config(args.model, args.dtype), device=device, seed=args.seed)
    runner = Runner(args, model, model.config.vocab_size)
    rows: list[Row] = []
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__,
        "model": args.model, "dtype": args.dtype,
        "precision": "bf16 autocast, float32 adapter parameters" if runner.autocast_dtype else args.dtype,
        "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
        "scenarios": [vars(s) for s in scenarios],
        "notes": notes,
    }
    for scenario in scenarios:
        for method in scenario.methods:
            for impl in (scenario.impls if method in ADAPTER_METHODS else ("-",)):
                row = runner.run_or_record(scenario, method, impl)
                rows.append(row)
                print(f"  {scenario.name} {method} {impl}: {row.step_s:.4f} s {row.error}", file=sys.stderr,
                      flush=True)
                fill_ratios(rows, scenarios)
                report["rows"] = [vars(r) for r in rows]
                report["targets"] = target_report(rows) if device.type == "cuda" else []
                if args.json:  # after every row: a run cut short still leaves its rows
                    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    for row in rows:
        if row.profile:
            print(f"\n== profile {row.scenario} {row.method} {row.impl}: {row.profile['kernels']} kernels, "
                  f"device busy {row.profile['device_busy_s']:.4f} s of {row.profile['wall_s']:.4f} s\n"
                  f"{row.profile['top']}", file=sys.stderr)
    print(format_table(rows))
    for line in report["targets"] + notes:
        print(line)
    return report


if __name__ == "__main__":
    main()
