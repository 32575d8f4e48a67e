"""The repository's scripts (``scripts/*.py``, not a package) imported as modules for the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@contextlib.contextmanager
def script_module(name: str) -> Iterator[ModuleType]:
    """``scripts/<name>.py`` as the module ``name``, registered in ``sys.modules`` while in use (dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def script_fixture(script: str, name: str | None = None):
    """A module-scoped fixture, named ``name`` (default: the script's name), that yields
    ``script_module(script)``."""

    def fixture() -> Iterator[ModuleType]:
        with script_module(script) as module:
            yield module

    return pytest.fixture(scope="module", name=name or script)(fixture)
