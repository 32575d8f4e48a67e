"""A Hydra launcher for one machine with several GPUs: a sweep's jobs run in parallel, each on one GPU.

``hydra/launcher=gpu_pool`` runs each job in a fresh process (spawned: no CUDA state is inherited) that
sees one GPU of ``hydra.launcher.gpus`` (``CUDA_VISIBLE_DEVICES``; default: every GPU this process
sees). ``hydra.launcher.jobs_per_gpu`` jobs (default 1) run on a GPU at once: G GPUs give G x J slots,
and the next job starts as soon as a slot is free, on the GPU with the fewest jobs. A small model leaves
most of a large GPU idle, so several jobs on it train more tokens a second in all. Their kernels run side
by side when the CUDA MPS daemon runs (``nvidia-cuda-mps-control -d``; the jobs inherit
``CUDA_MPS_PIPE_DIRECTORY`` and connect to it by themselves), and take turns otherwise, which the launch
log says in one line. A job's GPU is recorded in its ``.hydra/hydra.yaml``
(``hydra.job.env_set.CUDA_VISIBLE_DEVICES``). A job whose process dies
(killed, out of host memory) comes back as a failed job; the other jobs still run. Ctrl-C reaches every
job (one process group): the launcher waits for them to stop, then stops the sweep. Without GPUs,
``gpus`` are just names of worker slots (the tests run ``gpus=[0,1]`` on the CPU).

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
    # CUDA_VISIBLE_DEVICES values, one per GPU; None: every GPU visible to the sweep
    gpus: Optional[list[str]] = None  # noqa: UP045  (OmegaConf reads the annotation: typing.Optional)
    # jobs at once on each GPU (side by side under CUDA MPS when its daemon runs)
    jobs_per_gpu: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf,
                             provider="malora_gpu_pool")


MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"  # the CUDA MPS daemon's default (CUDA_MPS_PIPE_DIRECTORY overrides it)


class GpuPoolError(CompactHydraException):
    """A launcher setting that cannot work, in one line."""


def check_settings(gpus: Sequence[str], jobs_per_gpu: Any) -> None:
    """One line for a GPU list or a jobs_per_gpu that cannot work."""
    if not gpus:
        raise GpuPoolError("hydra/launcher=gpu_pool: no GPU is visible; name them with "
                           "hydra.launcher.gpus=[0,1,...]")
    repeated = sorted({gpu for gpu in gpus if list(gpus).count(gpu) > 1})
    if repeated:
        raise GpuPoolError(f"hydra.launcher.gpus names GPU {','.join(repeated)} more than once: "
                           "set hydra.launcher.jobs_per_gpu for several jobs on one GPU")
    if not isinstance(jobs_per_gpu, int) or jobs_per_gpu < 1:
        raise GpuPoolError(f"hydra.launcher.jobs_per_gpu must be an integer >= 1, got {jobs_per_gpu!r}")


def mps_pipe_directory() -> Path:
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DIRECTORY)


def mps_is_running() -> bool:
    """Whether a CUDA MPS control daemon runs for this process's jobs: its ``control`` pipe exists."""
    return (mps_pipe_directory() / "control").exists()


def sharing_line(jobs_per_gpu: int) -> str | None:
    """The launch log's line on how the jobs on one GPU share it; None for one job a GPU."""
    if jobs_per_gpu == 1:
        return None
    pipes = mps_pipe_directory()
    if mps_is_running():
        return f"{jobs_per_gpu} jobs a GPU under CUDA MPS ({pipes}): their kernels run side by side"
    return (f"{jobs_per_gpu} jobs a GPU without CUDA MPS (no control pipe in {pipes}): they take turns on "
            "it; start the daemon with nvidia-cuda-mps-control -d to run them side by side")


class GpuSlots:
    """Which GPU each job gets: at most ``jobs_per_gpu`` jobs on a GPU at once, the GPU with the fewest
    running first (on a tie, the first in ``gpus``)."""

    def __init__(self, gpus: Sequence[str], jobs_per_gpu: int) -> None:
        self.running = dict.fromkeys(gpus, 0)
        self.jobs_per_gpu = jobs_per_gpu

    def free(self) -> bool:
        return any(count < self.jobs_per_gpu for count in self.running.values())

    def take(self) -> str:
        open_gpus = [gpu for gpu, count in self.running.items() if count < self.jobs_per_gpu]
        gpu = min(open_gpus, key=self.running.__getitem__)
        self.running[gpu] += 1
        return gpu

    def give_back(self, gpu: str) -> None:
        self.running[gpu] -= 1


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
    how = (f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0
           else f"exit code {exitcode}")
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
    def __init__(self, gpus: Sequence[Any] | None = None, jobs_per_gpu: int = 1) -> None:
        self.gpus = [str(gpu) for gpu in gpus] if gpus else None
        self.jobs_per_gpu = jobs_per_gpu
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
            raise GpuPoolError("hydra/launcher=gpu_pool needs cloudpickle: "
                               "pip install 'malora-train[cluster]'") from err
        assert self.config is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        gpus = self.gpus or visible_gpus()
        check_settings(gpus, self.jobs_per_gpu)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        each = "one GPU each" if self.jobs_per_gpu == 1 else f"up to {self.jobs_per_gpu} at once on each"
        log.info(f"Launching {len(job_overrides)} jobs on GPUs {','.join(gpus)}, {each}")
        sharing = sharing_line(self.jobs_per_gpu)
        if sharing:
            log.info(sharing)

        pending = deque((initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides))
        slots = GpuSlots(gpus, self.jobs_per_gpu)
        running: dict[Connection, RunningJob] = {}
        results: dict[int, JobReturn] = {}
        try:
            while pending or running:
                while pending and slots.free():
                    num, overrides = pending.popleft()
                    receiver, job = self.start(num, overrides, slots.take())
                    running[receiver] = job
                for receiver in wait(list(running)):
                    job = running.pop(receiver)
                    results[job.num] = job.result(receiver)
                    slots.give_back(job.gpu)
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
