"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """Return the path of an external validator; skip without it, but fail in CI where it must exist."""

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            if os.environ.get("CI"):
                pytest.fail(f"{name} is required in CI (.ci/run installs it) but is not on PATH")
            pytest.skip(f"{name} is not installed (make tools, or the apt packages in .ci/run)")
        return path

    return find
