"""What DDP does inside the real training loop, recorded for tests/test_ddp_settings.py.

Run as a script (``accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 2
tests/ddp_probe_run.py OUT_DIR STEPS OVERRIDE...``) it builds ``malora_train``'s ``Trainer`` from the
overrides, runs STEPS optimiser steps, and each rank writes ``OUT_DIR/rank<r>.json``: how Accelerate
wrapped the model (class, ``find_unused_parameters``, bucket size in bytes), the trainable parameter
names, and the ordered events of the steps: ``["step"]`` where a step starts, ``["forward"]`` at each
micro-batch's forward, ``["grad", name]`` when a parameter's gradient has been accumulated in backward,
``["allreduce", n]`` when DDP hands a bucket of n tensors to its communication hook.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from malora_train.cli import compose
from malora_train.train.loop import Trainer


def main(out_dir: Path, steps: int, overrides: list[str]) -> None:
    trainer = Trainer(compose(overrides), out_dir / "run", "", overrides)
    engine = trainer.engine
    events: list[list] = []
    trainable = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    for name, param in trainable:
        param.register_post_accumulate_grad_hook(lambda _, name=name: events.append(["grad", name]))
    engine.register_forward_pre_hook(lambda *_: events.append(["forward"]))

    def counting_allreduce(state, bucket):
        events.append(["allreduce", len(bucket.gradients())])
        return default_hooks.allreduce_hook(state, bucket)

    engine.register_comm_hook(None, counting_allreduce)
    engine.train()
    for _ in range(steps):
        events.append(["step"])
        trainer.train_step()
        trainer.state.step += 1
    report = {"engine": type(engine).__name__,
              "find_unused_parameters": getattr(engine, "find_unused_parameters", None),
              "bucket_bytes_cap": getattr(engine, "bucket_bytes_cap", None),
              "trainable": [name for name, _ in trainable], "events": events}
    (out_dir / f"rank{trainer.process_index}.json").write_text(json.dumps(report))
    # leave together: rank 0 (which hosts the group's store) waited forever in destroy_process_group when
    # rank 1 had already exited (seen in full-suite runs on a loaded machine)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
