"""Data and a ``transformers.Trainer`` run for the Python API tests (tests/test_api_trainer.py).

Run as a script (``accelerate launch ... tests/api_trainer_run.py OUT_DIR BATCH_SIZE``) it trains the tiny
model with MALoRA for a few steps under whatever launcher started it, then the main process writes the
adapter to ``OUT_DIR/adapter`` and the logged losses to ``OUT_DIR/losses.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

TASKS = ["lower", "upper"]
DISTRIBUTED_STEPS = 3


def two_task_rows(tokenizer) -> list[dict]:
    """64 examples of two tasks (copy a word in lower or upper case; answers of 4 to 9 tokens), the
    prompt masked from the loss."""
    examples = []
    for i in range(64):
        task, word = i % 2, ["go", "text", "upper", "copying"][i // 2 % 4]
        prompt = tokenizer(f"{TASKS[task]} {i}: {word} ->")["input_ids"]
        answer = tokenizer(f" {word.upper() if task else word}")["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                         "task_ids": task})
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding (id 0, label -100) and each row's task id."""
    width = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples])

    return {"input_ids": padded("input_ids", 0), "labels": padded("labels", -100),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                            for e in examples]),
            "task_ids": torch.tensor([e["task_ids"] for e in examples])}


def train_malora(out_dir: Path, batch_size: int) -> None:
    """DISTRIBUTED_STEPS steps of MALoRA on the tiny model, batch_size rows per process; no dropout and no
    balance loss (both depend on how a step's rows are split over processes by design)."""
    from conftest import model_config

    import malora_train
    from malora_train.models import load_model, load_tokenizer

    torch.manual_seed(0)
    config = malora_train.load_adapter_config("malora", rank=4, dropout=0.0, router={"balance_coef": 0.0})
    model = malora_train.get_adapted_model(load_model(model_config("tiny")), config)
    args = TrainingArguments(str(out_dir), max_steps=DISTRIBUTED_STEPS,
                             per_device_train_batch_size=batch_size,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args,
                      train_dataset=two_task_rows(load_tokenizer(model_config("tiny"))),
                      data_collator=collate)
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_adapter(Path(out_dir) / "adapter")
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (Path(out_dir) / "losses.json").write_text(json.dumps({"losses": losses, "world": args.world_size}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    train_malora(Path(sys.argv[1]), int(sys.argv[2]))
    if torch.distributed.is_initialized():
        # Leave together, then skip interpreter finalisation: the Trainer's DDP wrapper keeps the gloo group
        # alive past destroy_process_group, and its worker threads freeing tensors during finalisation
        # aborted rank 1 twice in CI ("terminate called without an active exception") after the run was done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
