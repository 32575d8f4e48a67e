"""The packages of the wheel: ``malora_train``, Hydra's ``hydra_plugins`` namespace (the gpu_pool launcher),
and the repository's top-level ``conf/`` shipped inside the package as ``malora_train/conf``
(pyproject.toml's package discovery cannot map a folder from outside the package), so an installed
``malora-train`` finds its configs from any directory. Each config group folder (``conf/model``,
``conf/hydra/launcher``, ...) is declared as a data package of its own, holding its YAML/JSON files: Python
sees every folder as an importable namespace package, and setuptools warns at length about each one left
out. The metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

CONF_PACKAGES = ["malora_train.conf", *(f"malora_train.conf.{name}" for name in
                                         find_namespace_packages(where="conf", exclude=["*__pycache__*"]))]

setup(
    packages=[*find_packages(include=["malora_train", "malora_train.*"]),
              *find_namespace_packages(include=["hydra_plugins", "hydra_plugins.*"], exclude=["*.__pycache__"]),
              *CONF_PACKAGES],
    package_dir={"malora_train.conf": "conf"},
    package_data={name: ["*.yaml", "*.json"] for name in CONF_PACKAGES},
)
