"""The folder name of a sweep job, from its overrides: readable, deterministic, and without ``+``, ``=`` or
``,`` (which Hydra's ``override_dirname`` keeps, and which URLs, shells and some tools treat specially).

The rule: the overrides whose key is excluded are left out; the others, sorted by their text as Hydra sorts
``override_dirname``, are written ``key-value`` without the ``+``/``~`` prefix, every run of characters other
than letters, digits, ``.``, ``_`` and ``-`` becoming one ``_``, and joined by ``__``:

    +experiment=paper_bigbench +variant=lora seed=0 trainer.lr=0.001
    -> experiment-paper_bigbench__variant-lora__seed-0__trainer.lr-0.001

No overrides give ``default``; a name longer than ``MAX_NAME`` characters is cut and ends with a hash of the
overrides. The name is for reading: the job's ``.hydra/overrides.yaml`` is the record that the report reads.
``scripts/study.py`` names its jobs with the resolver ``malora.run_folder`` (``RUN_FOLDER_SUBDIR``), which
importing this module registers (``malora_train.sweep`` imports it, so a launcher's job process has it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from omegaconf import OmegaConf

RESOLVER = "malora.run_folder"
RUN_FOLDER_SUBDIR = (f"${{{RESOLVER}:${{hydra.overrides.task}},"
                     "${hydra.job.config.override_dirname.exclude_keys}}")
MAX_NAME = 200  # file systems allow 255 bytes
KEY_VALUE, ITEMS = "-", "__"
OUTSIDE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
PREFIX = re.compile(r"^[+~]+")


def override_key(override: str) -> str:
    """The key Hydra compares with ``exclude_keys``: without the prefix and the ``@package``."""
    return PREFIX.sub("", override.split("=", 1)[0]).split("@", 1)[0]


def name_part(text: str) -> str:
    return OUTSIDE_NAME.sub("_", text).strip("_")


def run_folder_name(overrides: Sequence[str], excluded_keys: Sequence[str] = ()) -> str:
    """The folder name of a job with these overrides (see the module's docstring)."""
    excluded = {str(key) for key in excluded_keys}
    kept = sorted(str(o) for o in overrides if override_key(str(o)) not in excluded)
    items = []
    for override in kept:
        key, _, value = PREFIX.sub("", override).partition("=")
        items.append(name_part(key) + (KEY_VALUE + name_part(value) if value else ""))
    name = ITEMS.join(items) or "default"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]
    return f"{name[:MAX_NAME - len(digest) - 1]}-{digest}"


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, run_folder_name)
