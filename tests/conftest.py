"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

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


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread: small 3-D convolutions are dominated by OpenMP overhead on a shared 2-core machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; torch is imported only then.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
