"""``hydra/launcher=gpu_pool``: a sweep's jobs in parallel on one machine, one GPU each (see
``gpu_pool_launcher``). A Hydra plugin: Hydra finds launchers only in the ``hydra_plugins`` namespace."""
