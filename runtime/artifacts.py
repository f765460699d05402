"""Atomic writing of JSON artefacts and output folders: nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from d4m.dicom_io.errors import InputError


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` atomically: a temporary sibling renamed over ``path`` (removed if the write fails).

    ``durable`` also fsyncs the file before the rename and the folder after it, so the write
    survives a power cut (the listener's spool acknowledges instances only after that).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, data: Any, durable: bool = False) -> None:
    """Write JSON atomically (see :func:`write_bytes`)."""
    write_bytes(path, (json.dumps(data, indent=2) + "\n").encode(), durable)


def read_json(path: Path) -> Any:
    """Read JSON, or raise :class:`InputError` naming the file.

    Raises
    ------
    InputError
        The file is missing or not valid JSON.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path}: expected a JSON file, found nothing") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: expected valid JSON, found a parse error at line {exc.lineno}") from exc


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``target`` only if the block succeeds.

    On an exception the temporary folder is removed and ``target`` is untouched.

    Raises
    ------
    InputError
        ``target`` exists and ``overwrite`` is false.
    """
    if target.exists() and not overwrite:
        raise InputError(f"{target}: expected a new output folder, found an existing one (use --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
