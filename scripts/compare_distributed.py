r"""Train one config in one process and under DDP, DeepSpeed ZeRO-2 and ZeRO-3 with the same global batch,
then compare their loss curves, step times and peak memory.

    python scripts/compare_distributed.py --nproc 2 --out runs/compare -- \
        model=qwen2_5_1_5b trainer.max_steps=10

Run from the repository root (the DeepSpeed JSON paths in conf/accelerate/ are relative to it). The one
process gets ``micro_batch * nproc`` examples per step; each of the ``nproc`` processes gets ``micro_batch``.
Prints a markdown table and writes ``<out>/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = ("single", "ddp", "deepspeed_zero2", "deepspeed_zero3")


def command(config: str, nproc: int, micro_batch: int, run_dir: Path, overrides: list[str]) -> list[str]:
    common = [*overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false"]
    if config == "single":
        return [sys.executable, "-m", "malora_train.cli", *common,
                f"trainer.micro_batch_size={micro_batch * nproc}"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            f"conf/accelerate/{config}.yaml", "--num_processes", str(nproc), "-m", "malora_train.cli",
            *common, f"trainer.micro_batch_size={micro_batch}"]


def read_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "lm_loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [r["step_time_s"] for r in train[2:]] or [r["step_time_s"] for r in train]
    return {"loss": {r["step"]: r["loss"] for r in train}, "step_time_s": statistics.median(times),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "peak_memory_gb": summary.get("peak_memory_gb"),
            "eval_average": summary.get("eval_after_average")}


def markdown(results: dict) -> str:
    base = results.get("single", {}).get("loss", {})
    names = [n for n in CONFIGS if n in results]
    lines = ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in sorted(base)[:5]:
        cells = [f"{results[n]['loss'].get(step, float('nan')):.6f}" if "loss" in results[n] else "–"
                 for n in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    diff = ["–"] + [f"{max(abs(results[n]['loss'][s] - base[s]) for s in base):.1e}"
                    if "loss" in results[n] and set(results[n]["loss"]) == set(base) else "–"
                    for n in names[1:]]
    lines.append("| max abs diff vs single | " + " | ".join(diff) + " |")
    for key, fmt in (("step_time_s", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("peak_memory_gb", "{:.2f}")):
        cells = [fmt.format(results[n][key]) if results[n].get(key) is not None
                 else results[n].get("error", "–") for n in names]
        lines.append(f"| median {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4,
                        help="per process (the single run gets nproc x)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("overrides", nargs="*", help="malora-train overrides (after --)")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    for config in args.configs.split(","):
        run_dir = args.out / config
        cmd = command(config, args.nproc, args.micro_batch, run_dir, args.overrides)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=os.environ.copy())
        (args.out / f"{config}.log").parent.mkdir(parents=True, exist_ok=True)
        (args.out / f"{config}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            results[config] = {"error": f"exit {proc.returncode}"}
            print(f"{config}: failed (exit {proc.returncode}); see {args.out / (config + '.log')}",
                  file=sys.stderr)
            continue
        results[config] = read_run(run_dir)
        print(f"{config}: done, median step {results[config]['step_time_s']:.3f} s", file=sys.stderr)
    table = markdown(results)
    (args.out / "compare.json").write_text(json.dumps({"overrides": args.overrides, "nproc": args.nproc,
                                                       "micro_batch": args.micro_batch, "results": results},
                                                      indent=1))
    print(table)


if __name__ == "__main__":
    main()
