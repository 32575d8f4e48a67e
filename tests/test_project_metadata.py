"""pyproject.toml: setuptools reads it without a deprecation warning (the licence is an SPDX string)."""

from __future__ import annotations

import warnings

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution


def test_pyproject_metadata_has_no_deprecated_forms(repo_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), repo_root / "pyproject.toml")
    deprecated = [str(w.message).splitlines()[0] for w in caught if "Deprecat" in w.category.__name__]
    assert deprecated == []
    assert dist.metadata.license_expression == "Apache-2.0"
