"""Fixtures of the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained-shape ONNX bundle of ``infer_testkit``, built once and kept in pytest's cache."""
    import infer_testkit

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("d4m-infer") if cache is not None else tmp_path_factory.mktemp("bundle")
    return infer_testkit.cached_tiny_bundle(root)
