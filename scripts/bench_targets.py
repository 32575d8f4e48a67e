"""Issue 24's targets from one command: ``make bench-loop`` (= ``python scripts/bench_loop.py --targets``).

Three parts, each a process of its own, then one table (each target, what was measured, met or missed):

- the real loop at SmolLM2-135M shapes (``bench_loop.py``): every adapter with no speed flag (what a bare
  ``malora-train`` runs: the captured step on one GPU), eager (the path of DeepSpeed, fp16 and anything
  that cannot be captured) and captured with ``trainer.compile=true`` (the mixtures on their kernels between
  the compiled pieces, ``trainer.compile_adapters=auto``), each
  adapter again as 2 processes, beside HF + PEFT LoRA r64 in its strongest form (plain loop,
  ``torch.compile``, packed rows, fused AdamW) and HF ``Trainer`` with dynamic padding;
- the real loop at LLaMA-2-7B shapes, packed 4 x 1024: MoLoRA and MALoRA with no speed flag, with and
  without ``trainer.gradient_checkpointing=selective``, with the peak memory;
- one 7B training step of each adapter against the frozen model's (``bench.py``, eager: DeepSpeed's path).

    make bench-loop
    python scripts/bench_loop.py --targets --steps 12 --warmup 5 --json out.json -- \\
        data.root=<commonsense folder> model.tokenizer=<SmolLM2 tokenizer>

Overrides after ``--`` go to the 135M runs; the ``data.*`` ones also to the 7B runs (that model brings its
own byte tokenizer). Each part writes its JSON beside ``--json`` (``<stem>.<part>.json``), and ``--json``
gets the parts, their commands and the targets. ``--parts loop_7b,step_7b`` runs only those and reads the
others from an earlier run with the same ``--json``: a suite longer than one time limit is finished in pieces.
On the CPU the same parts run with the tiny model in place of
both sizes: a smoke run of the table, whose verdicts are left out (the targets are GPU figures). The loss
agreement of the 2-process captured step with one process at ``grad_accum=2`` is not timed here: it is
``tests/test_gpu.py::test_two_processes_sharing_the_gpu_capture_as_one_process_with_grad_accum_two``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PART_NAMES = ("loop_135m", "loop_7b", "step_7b")
CAPTURED = "captured"  # how a row's step_path begins when its step was replayed as CUDA graphs
TWO_PROCESS_TEST = ("tests/test_gpu.py::test_two_processes_sharing_the_gpu_capture_as_one_process_with_"
                    "grad_accum_two")


@dataclass
class Part:
    """One process of the suite and the JSON it writes."""

    name: str
    command: list[str]
    json: Path


@dataclass
class Target:
    """One line of the table: ``verdict`` is met, missed, or why there is none."""

    row: str
    measured: str
    target: str
    verdict: str


def parts(device: str, steps: int, warmup: int, overrides: list[str], out: Path) -> list[Part]:
    """The suite's three processes on ``device``, their JSON files named after ``out``."""
    gpu = device == "cuda"
    big = ["--model", "llama2_7b", "--rows", "4", "--length", "1024"] if gpu else ["--model", "tiny"]
    data = [o for o in overrides if o.lstrip("+~").startswith("data.")]
    timing = ["--steps", str(steps), "--warmup", str(warmup)]
    modes = "default,eager,compile+graphs" if gpu else "default,eager"  # a CPU cannot capture

    def path(name: str) -> Path:
        return out.with_name(f"{out.stem}.{name}.json")

    loop = [sys.executable, str(SCRIPTS / "bench_loop.py"), "--device", device, *timing]
    return [
        Part("loop_135m", [*loop, "--modes", modes, "--adapters", "lora,molora,malora",
                           "--processes", "2", "--baseline", "peft-compiled,hf-peft", "--profile-steps", "1",
                           "--json", str(path("loop_135m")), "--", *overrides], path("loop_135m")),
        Part("loop_7b", [*loop, *big, "--modes", "default", "--adapters", "molora,malora",
                         "--checkpointing", "selective", "--baseline", "none", "--profile-steps", "0",
                         "--json", str(path("loop_7b")), "--", *data], path("loop_7b")),
        Part("step_7b", [sys.executable, str(SCRIPTS / "bench.py"), "--device", device, *big[:2],
                         "--methods", "floor,lora,molora,malora", "--impl", "fast", "--no-check", *timing,
                         "--json", str(path("step_7b"))], path("step_7b")),
    ]


# -- reading the parts' reports ----------------------------------------------------------------------------

def loop_row(report: dict | None, adapter: str, mode: str, processes: int = 1,
             overrides: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The ``bench_loop.py`` row of ``adapter`` in ``mode`` (None: not in the report, or it failed)."""
    for row in (report or {}).get("rows", []):
        if (row["adapter"], row["mode"], row.get("processes", 1), tuple(row["overrides"])) == (
                adapter, mode, processes, overrides):
            return None if "error" in row else row
    return None


def baseline_row(report: dict | None, mode: str) -> dict[str, Any] | None:
    rows = [b for b in (report or {}).get("baselines", []) if b.get("mode") == mode and "error" not in b]
    return rows[0] if rows else None


def step_row(report: dict | None, method: str) -> dict[str, Any] | None:
    """``bench.py``'s main-scenario row of ``method`` (the fast implementation; the floor has none)."""
    for row in (report or {}).get("rows", []):
        if row["scenario"] == "main" and row["method"] == method and not row["error"]:
            return row
    return None


def verdict(value: float | None, at_least: float | None = None, at_most: float | None = None) -> str:
    if value is None:
        return "not measured"
    ok = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return "met" if ok else "missed"


def tokens_per_s(row: dict | None) -> float | None:
    return row["tokens_per_s"] if row else None


def rate(row: dict | None) -> str:
    return f"{row['tokens_per_s']:,.0f} tok/s" if row else "not measured"


def path_of(row: dict | None) -> str:
    return row["step_path"].split(" (")[0] if row else "-"


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return a[key] / b[key] if a and b else None


def fmt(value: float | None, unit: str = "x") -> str:
    return "not measured" if value is None else f"{value:.2f}{unit}"


def targets(loop: dict | None, big: dict | None, step: dict | None, small: str = "135M",
            large: str = "7B") -> list[Target]:
    """Issue 24's targets from the three parts' reports (a part that did not run gives "not measured");
    ``small`` and ``large`` name the two model sizes in the rows."""
    default = {a: loop_row(loop, a, "default") for a in ("lora", "molora", "malora")}
    eager = {a: loop_row(loop, a, "eager") for a in ("lora", "molora", "malora")}
    peft = baseline_row(loop, "peft-compiled")
    compiled = {a: loop_row(loop, a, "compile+graphs") for a in ("molora", "malora")}
    malora = default["malora"]
    # the fastest captured MALoRA a user can run: no speed flag, or trainer.compile=true
    captured_rows = [r for r in (malora, compiled["malora"]) if path_of(r) == CAPTURED]
    captured = max(captured_rows, key=lambda r: r["tokens_per_s"]) if captured_rows else None
    two = loop_row(loop, "malora", "default", processes=2)
    selective = ("trainer.gradient_checkpointing=selective",)
    big_plain = loop_row(big, "malora", "default")
    big_selective = loop_row(big, "malora", "default", 1, selective)
    floor, step_malora, step_molora = (step_row(step, m) for m in ("floor", "malora", "molora"))
    memory = (f"; peak {big_plain['peak_memory_gb']:.1f} -> {big_selective['peak_memory_gb']:.1f} GB"
              if big_plain and big_selective and big_plain.get("peak_memory_gb") is not None else "")
    eager_targets = {"malora": 40_000, "molora": 45_000, "lora": 60_000}
    speed_ratio = ratio(big_selective, big_plain, "tokens_per_s")
    step_ratio = ratio(step_malora, floor, "step_s")
    vs_peft = ratio(captured or malora, peft, "tokens_per_s")
    with_compile = captured is not None and captured is compiled["malora"]
    how = " with trainer.compile" if with_compile else ""
    rows = [
        Target(f"no speed flag, {small}, MALoRA", f"{rate(malora)} ({path_of(malora)})", ">= 85,000",
               verdict(tokens_per_s(malora), at_least=85_000)),
        *(Target(f"eager {a}, {small}", rate(eager[a]), f">= {t:,}",
                 verdict(tokens_per_s(eager[a]), at_least=t))
          for a, t in eager_targets.items()),
        Target(f"captured MALoRA, {small}",
               rate(captured) + how if captured else f"not captured ({path_of(malora)})", ">= 120,000",
               verdict(tokens_per_s(captured), at_least=120_000)),
        Target("MALoRA / compiled HF + PEFT LoRA r64", fmt(vs_peft) + how, ">= 2.5x",
               verdict(vs_peft, at_least=2.5)),
        Target(f"2 processes, MALoRA, {small}", f"{rate(two)} ({path_of(two)})",
               f"runs captured; losses: {TWO_PROCESS_TEST}",
               "not measured" if two is None else "met" if path_of(two) == CAPTURED else "missed"),
        Target(f"{large} MALoRA, selective checkpointing / none", fmt(speed_ratio) + memory, ">= 0.75x",
               verdict(speed_ratio, at_least=0.75)),
        Target(f"{large} eager MALoRA step / frozen floor (bench.py)", fmt(step_ratio), "<= 1.20x",
               verdict(step_ratio, at_most=1.20)),
    ]
    pairs = [(f"{small} no speed flag", ratio(default["malora"], default["molora"], "step_s")),
             (f"{small} eager", ratio(eager["malora"], eager["molora"], "step_s")),
             (f"{small} with trainer.compile",
              ratio(compiled["malora"], compiled["molora"], "step_s")),
             (f"{large} no speed flag", ratio(big_plain, loop_row(big, "molora", "default"), "step_s")),
             (f"{large} eager (bench.py)", ratio(step_malora, step_molora, "step_s"))]
    rows += [Target(f"MALoRA / MoLoRA step, {where}", fmt(value), "<= 1.00x", verdict(value, at_most=1.0))
             for where, value in pairs]
    return rows


def markdown(rows: list[Target], with_verdicts: bool) -> str:
    lines = ["| row | measured | target | verdict |", "|---|---|---|---|"]
    for t in rows:
        lines.append(f"| {t.row} | {t.measured} | {t.target} | "
                     f"{t.verdict if with_verdicts else '- (CPU smoke run)'} |")
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------------

def read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(device: str, steps: int, warmup: int, overrides: list[str], out: Path | None,
        only: list[str] | None = None) -> list[Target]:
    """Run the parts one after another (a failing part leaves its targets "not measured"), print the table,
    and write ``out`` (the parts, their exit status and the targets) when given. ``only``: run just these
    parts and read the others' reports from an earlier run beside ``out`` (a suite cut short by a time limit
    is finished so)."""
    with tempfile.TemporaryDirectory(prefix="bench_targets.") as tmp:
        base = out if out is not None else Path(tmp) / "targets.json"
        suite = parts(device, steps, warmup, overrides, base)
        status: dict[str, int | None] = {}
        for part in suite:
            if only is not None and part.name not in only:
                status[part.name] = None
                print(f"\n== {part.name}: not run; its report from an earlier run: "
                      f"{part.json if part.json.is_file() else 'none'}", flush=True)
                continue
            print(f"\n== {part.name}: {' '.join(part.command)}", flush=True)
            status[part.name] = subprocess.run(part.command, cwd=REPO).returncode
        reports = {part.name: read_report(part.json) for part in suite}
    sizes = ("135M", "7B") if device == "cuda" else ("tiny (135M part)", "tiny (7B part)")
    rows = targets(reports["loop_135m"], reports["loop_7b"], reports["step_7b"], *sizes)
    failed = [f"{name} (exit status {code})" for name, code in status.items() if code]
    print(f"\nIssue 24's targets on {device}{': ' + ', '.join(failed) + ' failed' if failed else ''}\n")
    print(markdown(rows, with_verdicts=device == "cuda"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device, "parts": [
            {**asdict(part), "json": str(part.json), "exit_status": status[part.name]} for part in suite],
            "targets": [asdict(t) for t in rows]}, indent=1) + "\n")
    return rows
