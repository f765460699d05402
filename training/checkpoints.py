"""Checkpoints shared by every training stage: weights, resume state and a metrics log.

Three kinds of file, each with one job:

* ``model.safetensors`` — the weights that leave training (no pickle, loadable anywhere);
  :func:`save_weights` / :func:`load_weights`.
* ``resume.pt`` — optimizer state, step and RNG states, so that a killed run continues where it
  stopped. It is written atomically with :func:`torch.save`, read back with
  ``torch.load(weights_only=True)`` (no code runs on load) and never shipped in a bundle;
  :func:`save_resume` / :func:`load_resume`.
* ``metrics.csv`` — one row per logged step; :class:`MetricsLog`.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)

#: At most this many key names are listed in an error message.
_SHOWN_KEYS = 8


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` matched, for a non-strict load.

    Attributes
    ----------
    missing
        Keys the model has and the file lacks (left at their current values).
    unexpected
        Keys the file has and the model lacks (ignored).
    mismatched
        Keys present in both with another shape (left at their current values).
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """Whether every tensor matched."""
        return not (self.missing or self.unexpected or self.mismatched)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def save_weights(model: nn.Module, path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write a model's ``state_dict`` as safetensors, atomically (temporary file, then rename).

    Parameters
    ----------
    model
        The network; parameters and persistent buffers are written.
    path
        Target file, usually ``OUT/model.safetensors``.
    metadata
        Optional string metadata stored in the file header.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (views, tied weights)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = _temp_sibling(path)
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors.

    Raises
    ------
    InputError
        The file is missing or not a safetensors file.
    """
    if not path.is_file():
        raise InputError(f"{path}: expected a safetensors weights file, found nothing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: expected a safetensors weights file, found an unreadable one ({exc})") from exc


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"[{shown}{', ...' if len(keys) > _SHOWN_KEYS else ''}] ({len(keys)})"


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> LoadReport:
    """Load safetensors weights into ``model``.

    Parameters
    ----------
    model
        The network, already built with the architecture the weights were saved from.
    path
        A file written by :func:`save_weights`.
    strict
        Refuse any missing, unexpected or differently shaped tensor. Without it, the tensors
        that match by name and shape are loaded and the rest is reported.

    Returns
    -------
    LoadReport
        What did not match (empty for a strict load).

    Raises
    ------
    InputError
        The file is missing or unreadable, or (strict) its tensors do not match the model;
        the message names the file and the first differing keys.
    """
    tensors = read_weights(path)
    own = model.state_dict()
    missing = tuple(k for k in own if k not in tensors)
    unexpected = tuple(k for k in tensors if k not in own)
    mismatched = tuple(
        k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
    )
    report = LoadReport(missing, unexpected, mismatched)
    if strict and not report.clean:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listed(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"shape mismatch {_listed(shapes)}")
        raise InputError(
            f"{path}: expected the {len(own)} tensors of a {type(model).__name__}, found " + "; ".join(parts)
        )
    usable = {k: v for k, v in tensors.items() if k in own and k not in mismatched}
    model.load_state_dict(usable, strict=False)
    if not report.clean:
        logger.warning(
            "%s: loaded %d of %d tensors (missing %d, unexpected %d, shape mismatch %d)",
            path, len(usable), len(own), len(missing), len(unexpected), len(mismatched),
        )
    return report


def save_resume(path: Path, state: Mapping[str, Any]) -> None:
    """Write the resume state (optimizer, step, RNG states) atomically with :func:`torch.save`.

    Only plain containers, numbers, strings and tensors belong in ``state``: anything else
    could not be read back by :func:`load_resume`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_resume(path: Path) -> dict[str, Any]:
    """Read a resume file with ``torch.load(weights_only=True)``: no code runs while loading.

    Raises
    ------
    InputError
        The file is missing, truncated or holds something other than plain data.
    """
    if not path.is_file():
        raise InputError(f"{path}: expected a resume file, found nothing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: expected a resume file readable with weights_only, found {_reason(exc)}") from exc
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict of resume state, found {type(state).__name__}")
    return state


def _reason(exc: BaseException) -> str:
    """The informative part of torch's long weights-only error."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    first = " ".join(text.strip().split("\n\n")[0].split()).split(". ")[0]
    return first or type(exc).__name__


class MetricsLog:
    """A CSV file of training metrics, one row per logged step, appended as training runs.

    Parameters
    ----------
    path
        The CSV file; created with a header row on first use.
    fields
        Column names; the first is the step column used by :meth:`truncate`.
    """

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        if not fields:
            raise InputError(f"{path}: expected at least one metrics column, found none")
        self.path = path
        self.fields = tuple(fields)
        if path.exists():
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), None)
            if header is not None and tuple(header) != self.fields:
                raise InputError(f"{path}: expected the columns {list(self.fields)}, found {header}")

    def append(self, row: Mapping[str, float | int | str]) -> None:
        """Append one row (missing columns stay empty; unknown keys are refused)."""
        unknown = sorted(set(row) - set(self.fields))
        if unknown:
            raise InputError(f"{self.path}: expected only the columns {list(self.fields)}, found {unknown}")
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow({k: _cell(v) for k, v in row.items()})

    def rows(self) -> list[dict[str, str]]:
        """All rows as dicts of strings (empty when the file does not exist)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate(self, last_step: int) -> None:
        """Drop rows logged after ``last_step`` (a resumed run repeats those steps)."""
        rows = [r for r in self.rows() if int(float(r[self.fields[0]])) <= last_step]
        tmp = _temp_sibling(self.path)
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


def _cell(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
