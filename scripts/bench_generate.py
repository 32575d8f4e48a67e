"""KV-cached generation speed of every adapter kind against plain LoRA and the frozen model.

One base model with random weights serves every row: each adapter is injected through the Python API
(``get_adapted_model``), its up-projections made non-zero (zeros would hide work), and ``generate`` runs
greedy with the KV cache on a batch of random prompts, ``min_new_tokens = max_new_tokens`` so that every row
writes the same number of tokens. The figure is new tokens a second (median over repeats after one warm-up);
``x lora`` divides a row's time by LoRA's. On CUDA the model is bf16 and generation runs under bf16 autocast,
as evaluation does.

    python scripts/bench_generate.py --model smollm2_135m_shape --device cuda --json out.json
    python scripts/bench_generate.py --model tiny --device cpu     # the CPU smoke run the tests make
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DTYPES, adapter_config, model_config, randomize_up_projections  # noqa: E402

from malora_train import get_adapted_model  # noqa: E402
from malora_train.adapters import adapter_kinds, remove_adapters  # noqa: E402
from malora_train.models import load_model  # noqa: E402

ROWS = ("frozen", *adapter_kinds())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="conf/model/<name>.yaml (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--adapters", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls after one warm-up")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def time_generate(model, prompts: torch.Tensor, args: argparse.Namespace, autocast_dtype) -> list[float]:
    device = prompts.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    times = []
    for _ in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 use_cache=True, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.shape[1] == prompts.shape[1] + args.new_tokens
    return times[1:]  # the first call warms up (kernel builds, allocator)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    base = load_model(model_config(args.model, dtype), device=device, seed=0).eval()
    for param in base.parameters():
        param.requires_grad_(False)
    vocab = base.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_length), generator=gen).to(device)
    autocast_dtype = DTYPES[dtype] if device.type == "cuda" and dtype != "float32" else None
    rows = []
    for name in args.adapters.split(","):
        if name not in ROWS:
            raise SystemExit(f"--adapters: unknown {name!r} (known: {', '.join(ROWS)})")
        model = base
        if name != "frozen":
            torch.manual_seed(0)
            model = get_adapted_model(base, adapter_config(name)).eval()
            randomize_up_projections(base, seed=0)
        times = time_generate(model, prompts, args, autocast_dtype)
        if name != "frozen":
            remove_adapters(base)
        median = statistics.median(times)
        rows.append({"name": name, "median_s": median, "times_s": times,
                     "new_tokens_per_s": args.batch * args.new_tokens / median})
    lora = next((r for r in rows if r["name"] == "lora"), None)
    for row in rows:
        row["x_lora"] = row["median_s"] / lora["median_s"] if lora else None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}


def format_table(result: dict) -> str:
    lines = ["| adapter | generate s | new tokens/s | x lora |", "|---|---:|---:|---:|"]
    for row in result["rows"]:
        ratio = f"{row['x_lora']:.2f}" if row["x_lora"] is not None else "-"
        lines.append(f"| {row['name']} | {row['median_s']:.3f} | {row['new_tokens_per_s']:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(f"{result['device']}, torch {result['torch']}, {args.model}, batch {args.batch}, prompt "
          f"{args.prompt_length}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
