"""A Hydra launcher for one machine with several GPUs: a sweep's jobs run in parallel, one GPU each.

``hydra/launcher=gpu_pool`` runs each job in a fresh process (spawned: no CUDA state is inherited) that
sees one GPU of ``hydra.launcher.gpus`` (``CUDA_VISIBLE_DEVICES``; default: every GPU this process
sees), one job per GPU at a time; the next job starts as soon as a GPU is free. A job's GPU is recorded
in its ``.hydra/hydra.yaml`` (``hydra.job.env_set.CUDA_VISIBLE_DEVICES``). A job whose process dies
(killed, out of host memory) comes back as a failed job; the other jobs still run. Ctrl-C reaches every
job (one process group): the launcher waits for them to stop, then stops the sweep. Without GPUs,
``gpus`` are just worker slots (the tests run ``gpus=[0,1]`` on the CPU).

Jobs are passed to their process with cloudpickle, as Hydra's joblib and submitit launchers do (Hydra's
global state holds closures the standard pickler refuses). No ``from __future__ import annotations``:
Hydra's plugin scan runs this module before registering it, and a dataclass cannot resolve string
annotations then.
"""

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class GpuPoolLauncherConf:
    _target_: str = "hydra_plugins.malora_gpu_pool.gpu_pool_launcher.GpuPoolLauncher"
    # CUDA_VISIBLE_DEVICES values, one job on each at a time; None: every GPU visible to the sweep
    gpus: Optional[list[str]] = None  # noqa: UP045  (OmegaConf reads the annotation: typing.Optional)


ConfigStore.instance().store(group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf,
                             provider="malora_gpu_pool")


class GpuPoolError(CompactHydraException):
    """A launcher setting that cannot work, in one line."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES, else every GPU torch finds."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def run_one(payload: bytes, sender: Connection) -> None:
    """In the job's process: compose the job's config, run it on its GPU, send back its JobReturn."""
    import cloudpickle

    hydra_context, config, task_function, overrides, num, gpu, singleton_state = cloudpickle.loads(payload)
    Singleton.set_state(singleton_state)
    setup_globals()
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num
        sweep_config.hydra.job.num = num
        sweep_config.hydra.job.env_set.CUDA_VISIBLE_DEVICES = gpu
    result = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                     job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    try:
        message = cloudpickle.dumps(result)
    except Exception as err:  # an exception the job raised that cannot cross processes: send its text
        result.return_value = RuntimeError(f"{type(result._return_value).__name__}: {result._return_value} "
                                           f"(not picklable: {err})")
        message = cloudpickle.dumps(result)
    sender.send_bytes(message)
    sender.close()


def died(num: int, overrides: Sequence[str], exitcode: int | None) -> JobReturn:
    """The JobReturn of a job whose process ended without sending one."""
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    result = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    result.return_value = RuntimeError(f"job #{num} ({' '.join(overrides)}) ended without a result ({how})")
    return result


@dataclass
class RunningJob:
    num: int
    overrides: list[str]
    gpu: str
    process: Any  # multiprocessing's SpawnProcess

    def result(self, receiver: Connection) -> JobReturn:
        """The job's JobReturn once ``receiver`` is ready (its message, or end-of-file if it died)."""
        import cloudpickle

        try:
            result = cloudpickle.loads(receiver.recv_bytes())
        except EOFError:
            self.process.join()
            log.error(f"\t#{self.num} ended without a result (exit code {self.process.exitcode})")
            result = died(self.num, self.overrides, self.process.exitcode)
        self.process.join()
        receiver.close()
        return result

    def stop(self, receiver: Connection) -> None:
        """Wait for the process to end, reading what it sends so that it never blocks on a full pipe."""
        while self.process.is_alive():
            if receiver.poll(0.2):
                try:
                    receiver.recv_bytes()
                except EOFError:
                    break
        self.process.join()


class GpuPoolLauncher(Launcher):
    def __init__(self, gpus: Sequence[Any] | None = None) -> None:
        self.gpus = [str(gpu) for gpu in gpus] if gpus else None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            import cloudpickle  # noqa: F401  (checked here, used by each job)
        except ImportError as err:
            raise GpuPoolError("hydra/launcher=gpu_pool needs cloudpickle: pip install 'malora-train[cluster]'") \
                from err
        assert self.config is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        gpus = self.gpus or visible_gpus()
        if not gpus:
            raise GpuPoolError("hydra/launcher=gpu_pool: no GPU is visible; name them with "
                               "hydra.launcher.gpus=[0,1,...]")
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs on GPUs {','.join(gpus)}, one GPU each")

        pending = deque((initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides))
        free = deque(gpus)
        running: dict[Connection, RunningJob] = {}
        results: dict[int, JobReturn] = {}
        try:
            while pending or running:
                while pending and free:
                    num, overrides = pending.popleft()
                    receiver, job = self.start(num, overrides, free.popleft())
                    running[receiver] = job
                for receiver in wait(list(running)):
                    job = running.pop(receiver)
                    results[job.num] = job.result(receiver)
                    free.append(job.gpu)
        finally:  # Ctrl-C reached the jobs too (one process group): let them save a checkpoint and stop
            for receiver, job in running.items():
                job.stop(receiver)
        return [results[initial_job_idx + i] for i in range(len(job_overrides))]

    def start(self, num: int, overrides: list[str], gpu: str) -> tuple[Connection, RunningJob]:
        import cloudpickle

        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))} (GPU {gpu})")
        payload = cloudpickle.dumps((self.hydra_context, self.config, self.task_function, overrides, num, gpu,
                                     Singleton.get_state()))
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=run_one, args=(payload, sender), name=f"sweep-job-{num}")
        process.start()
        sender.close()  # the job's process holds the only sending end: its exit reads as end-of-file
        return receiver, RunningJob(num, overrides, gpu, process)
