"""Sweeps (``malora-train -m``): what a job does when it fails, and what the sweep does around its jobs.

- ``jobs``: a job that raises is recorded in its folder (``failure.json``, which ``malora-report`` lists)
  and returns a line instead of an accuracy, so the sweep runs its other jobs (Hydra's sweepers stop at a
  job's exception; Optuna records the trial as failed).
- ``callbacks`` (Hydra callbacks, registered in ``conf/config.yaml``): the sweep's exit status names
  the jobs that failed; a job that a launcher started as several tasks (submitit: one per GPU, on one or
  more nodes) runs as one multi-process training, its ranks taken from the launcher's environment.
- ``run_names``: the job folder names of ``scripts/study.py`` (without ``+``, ``=`` or ``,``), through the
  resolver ``malora.run_folder``, registered on import of this package: every process that runs a sweep
  job imports it before naming the job's folder (Hydra instantiates the callbacks above, or a launcher
  unpickles them into the job's process).

The launchers themselves are Hydra plugins: ``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``,
over hydra-submitit-launcher) and ``hydra/launcher=gpu_pool`` (``hydra_plugins/malora_gpu_pool``).
"""

from malora_train.sweep import run_names  # noqa: F401  (registers the resolver)
