"""The packages of the wheel: ``malora_train``, Hydra's ``hydra_plugins`` namespace (the gpu_pool launcher),
and the repository's top-level ``conf/`` shipped inside the package as ``malora_train/conf``
(pyproject.toml's package discovery cannot map a folder from outside the package), so an installed
``malora-train`` finds its configs from any directory. The metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[*find_packages(include=["malora_train", "malora_train.*"]),
              *find_namespace_packages(include=["hydra_plugins", "hydra_plugins.*"], exclude=["*.__pycache__"]),
              "malora_train.conf"],
    package_dir={"malora_train.conf": "conf"},
    package_data={"malora_train.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml", "*/*.json"]},
)
