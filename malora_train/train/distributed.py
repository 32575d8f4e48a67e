"""Launch and sharding helpers shared by ``accelerate launch`` / ``torchrun`` runs: one run directory for
all ranks, the Accelerator (DDP or DeepSpeed, CPU or GPU), its DeepSpeed settings and the launch's facts
(``LaunchInfo``), each rank's rows of a global batch, the ZeRO-3 adapter gather, and small collective
helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from malora_train.adapters import AdaptedCausalLM, adapter_state_dict
from malora_train.config import CONF_DIR, TrainerConfig
from malora_train.errors import ConfigError
from malora_train.run_dir import run_stamp

RUN_DIR_KEY = "malora_run_stamp"
# how long a collective waits for the other processes before it fails (a rank that died or took another path):
# 30 minutes, or MALORA_DIST_TIMEOUT_S seconds (tests set a short one)
TIMEOUT = timedelta(seconds=float(os.environ.get("MALORA_DIST_TIMEOUT_S", 30 * 60)))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def shares_gpus() -> bool:
    """More processes on this node than GPUs (a test or benchmark on one GPU): the processes take the GPUs
    round-robin, as Accelerate places them, and talk over gloo (NCCL refuses two ranks on one GPU)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return local_world > torch.cuda.device_count()


def backend() -> str:
    """The process group's backend: NCCL between GPUs of their own, gloo on the CPU or shared GPUs."""
    return "gloo" if use_cpu() or shares_gpus() else "nccl"


def _init_process_group() -> None:
    if dist.is_initialized():
        return
    if not use_cpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend(), timeout=TIMEOUT)


def collective_failure(err: BaseException) -> str | None:
    """The one line for an error of the process group (a collective that timed out waiting for another rank,
    a peer that went away), naming this rank; None for any other error or a single process."""
    if world_size() <= 1:
        return None
    text = " ".join(str(err).split())
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in text.lower())):
        return None
    rank = os.environ.get("RANK", "0")
    return (f"rank {rank} of {world_size()}: waiting for the other processes failed ({text[:300]}); another "
            "rank stopped or took another path (see its message)")


def agree_on_run_dir() -> None:
    """Every rank must write into one Hydra run directory, but each evaluates ``${now:...}`` on its
    own clock. Rank 0 picks the time stamp and shares it through the process group's store."""
    if world_size() <= 1 or os.environ.get("MALORA_RUN_DIR"):
        return
    _init_process_group()
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(RUN_DIR_KEY, run_stamp())
    stamp = store.get(RUN_DIR_KEY).decode()
    os.environ["MALORA_RUN_DIR"] = f"outputs/{stamp}"
    os.environ.setdefault("MALORA_SWEEP_DIR", f"multirun/{stamp}")


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU (~60 s); gloo works without it.

    ``import deepspeed.comm.torch as m`` would bind the *torch* package (``deepspeed.comm`` re-exports
    the name ``torch``), so the module is taken from ``importlib`` instead."""
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def _find_deepspeed_config_file() -> None:
    """The launch configs name ``conf/deepspeed/<stage>.json`` relative to the installed package's folder;
    when that path is not there from the current directory, take the packaged file, so ``accelerate
    launch --config_file <conf>/accelerate/deepspeed_zero2.yaml`` works from any directory."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or os.path.isabs(path) or os.path.exists(path):
        return
    packaged = CONF_DIR.parent / path
    if packaged.is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(packaged)


def mixed_precision(trainer: TrainerConfig) -> str:
    choice = trainer.mixed_precision
    if choice not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(f"trainer.mixed_precision={choice!r} is not one of auto, no, bf16, fp16")
    if choice == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not use_cpu()
        return "bf16" if gpu_bf16 else "no"
    return choice


def ddp_settings(trainer: TrainerConfig) -> DistributedDataParallelKwargs:
    """How DDP wraps the model. No unused-parameter search: every adapter tensor gets a gradient in every
    forward (experts a token did not pick get zeros), so each bucket's all-reduce starts as soon as the
    bucket fills during backward; the loop's ``accumulate`` skips the all-reduce on all but the last
    micro-batch of a step."""
    bucket = {} if trainer.ddp_bucket_cap_mb is None else {"bucket_cap_mb": trainer.ddp_bucket_cap_mb}
    return DistributedDataParallelKwargs(find_unused_parameters=False, **bucket)


def build_accelerator(trainer: TrainerConfig, trackers: list[str] | None = None,
                      logging_dir: Path | None = None) -> Accelerator:
    """``trackers``: Accelerate tracker names (``log_with``); those that write files write below
    ``logging_dir``."""
    cpu = use_cpu()
    handlers: list = [ddp_settings(trainer)]
    if world_size() > 1 and backend() == "gloo":
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=TIMEOUT))
    if uses_deepspeed():
        _find_deepspeed_config_file()
    if cpu and uses_deepspeed():
        _skip_deepspeed_shm_build()
    # DeepSpeed on CPU goes through Accelerate's GPU-style path with a gloo backend
    return Accelerator(
        cpu=cpu and not uses_deepspeed(),
        mixed_precision=mixed_precision(trainer),
        gradient_accumulation_steps=trainer.grad_accum,
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_config=ProjectConfiguration(logging_dir=str(logging_dir)) if logging_dir else None,
    )


def check_launch(trainer: TrainerConfig, accelerator: Accelerator) -> None:
    """Refuse settings the launcher's backend cannot honour."""
    if trainer.skip_nonfinite and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("trainer.skip_nonfinite=true is not supported under DeepSpeed (its engine applies "
                          "the accumulated gradients itself); run without it")
    if trainer.ddp_bucket_cap_mb is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("trainer.ddp_bucket_cap_mb applies to DDP; under DeepSpeed the bucket sizes are "
                          "reduce_bucket_size and allgather_bucket_size in conf/deepspeed/*.json")


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


def local_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's block of rows of a global micro-batch (on the host): rank r of W takes rows
    [r B/W, (r+1) B/W), so W processes see exactly the micro-batches one process sees with
    ``grad_accum=W`` (the routers' per-forward statistics included). Padded rows lose the padding
    columns nobody in the shard needs; packed rows (``document_ids``) keep their fixed length."""
    size = batch["input_ids"].shape[0] // world
    rows = {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}
    if "document_ids" in rows:
        return rows
    width = int(rows["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in rows.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy host tensors to ``device`` without waiting: from pinned memory, asynchronously, on a GPU."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def is_zero3(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """What the launch made of this process, taken once from the Accelerator; the trainer and the
    checkpointer read it."""

    process_index: int  # this process's rank
    world: int  # processes in the run
    is_main: bool  # rank 0: the process that writes the run's shared files
    deepspeed: bool  # DeepSpeed's engine holds the optimizer (and checkpoints it in its own files)
    zero3: bool  # ZeRO stage 3: each rank holds a shard of the adapter tensors

    @classmethod
    def from_accelerator(cls, accelerator: Accelerator) -> LaunchInfo:
        return cls(process_index=accelerator.process_index, world=accelerator.num_processes,
                   is_main=accelerator.is_main_process,
                   deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED,
                   zero3=is_zero3(accelerator))


@contextlib.contextmanager
def model_init_context(accelerator: Accelerator) -> Iterator[None]:
    """Where the base model is built. Accelerate makes Transformers build every model inside
    ``deepspeed.zero.Init`` under a ZeRO-3 config, whatever ``zero3_init_flag`` says; this honours the
    flag: false (our configs) builds the full model on each rank (identical to a one-process run) and
    ZeRO-3 partitions it in ``prepare``; true partitions while loading (for models a rank cannot hold)."""
    if not is_zero3(accelerator) or accelerator.state.deepspeed_plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def gather_adapter_state(launch: LaunchInfo, model: AdaptedCausalLM) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3, the full adapter tensors gathered from their shards (every rank must call this);
    otherwise None: each rank holds them whole."""
    if not launch.zero3:
        return None
    import deepspeed

    params = {f"model.{key}": param for key, param in adapter_state_dict(model.model).items()}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {key: param.detach().clone().cpu() for key, param in params.items()}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Every process reaches this point before any goes on (a no-op in one process). A plain ``dist.barrier``:
    Accelerate's names the process's GPU by its local rank, which processes sharing a GPU do not have."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """The ranks leave the process group together when a command has succeeded: a rank that exits while
    the group lives can abort a peer's gloo threads ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_objects(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order, on every rank (``items`` itself in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]
    return items


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (so every rank stops at the same step)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)
