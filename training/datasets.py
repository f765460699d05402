"""The d4m dataset format: ``dataset.json`` listing multiphase cases, their images and labels.

Every stage that writes data (the phantom, registration, normalisation, synthesis) writes a
dataset in this format, so the next stage reads one thing. Paths inside are relative to the
folder holding ``dataset.json``.

``dataset.json``::

    {"schema_version": 1, "kind": "d4m-dataset", "phases": ["NC", "ART", "PVP", "DEL"],
     "source": {...free provenance...},
     "cases": [{"id": "case_000",
                "dicom": "cases/case_000/dicom",            # optional: the study as DICOM
                "images": {"NC": "...nii.gz", ...},          # any subset of the phases
                "label": "cases/case_000/label.nii.gz",      # PVP grid: 0 bg, 1 liver, 2 tumor
                "truth": {"NC": "...nii.gz", ...},           # optional, per-phase true labels (evaluation only)
                "normal": {"NC": "...nii.gz", ...},          # optional, tumor-free images
                "meta": {...}}]}                             # free per-case facts (tumour list, ...)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image, write_image
from d4m.runtime.artifacts import read_json, write_json

DATASET_SCHEMA_VERSION = 1
DATASET_FILE = "dataset.json"


@dataclass(frozen=True)
class Case:
    """One multiphase study of a dataset, with absolute paths."""

    id: str
    images: dict[Phase, Path]
    label: Path | None = None
    dicom: Path | None = None
    truth: dict[Phase, Path] = field(default_factory=dict)
    normal: dict[Phase, Path] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def image(self, phase: Phase | str) -> Volume:
        """Read one phase's image."""
        phase = Phase(phase)
        if phase not in self.images:
            raise InputError(f"case {self.id}: expected a {phase.value} image, found only {_names(self.images)}")
        return read_image(self.images[phase])

    def read_label(self) -> Volume:
        """Read the label map (PVP grid)."""
        if self.label is None:
            raise InputError(f"case {self.id}: expected a label, found none")
        return read_image(self.label)


@dataclass(frozen=True)
class Dataset:
    """A folder of cases described by ``dataset.json``."""

    root: Path
    cases: tuple[Case, ...]
    phases: tuple[Phase, ...] = PHASE_ORDER
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, case_id: str) -> Case:
        """The case with this id."""
        for case in self.cases:
            if case.id == case_id:
                return case
        raise InputError(f"{self.root / DATASET_FILE}: expected a case '{case_id}', found none")

    def save(self) -> Path:
        """Write ``dataset.json`` (paths made relative to ``root``) atomically."""
        path = self.root / DATASET_FILE
        write_json(path, {
            "schema_version": DATASET_SCHEMA_VERSION,
            "kind": "d4m-dataset",
            "phases": [p.value for p in self.phases],
            "source": self.source,
            "cases": [_case_to_json(c, self.root) for c in self.cases],
        })
        return path


def load_dataset(path: Path) -> Dataset:
    """Read a dataset from its folder or its ``dataset.json``, checking every listed file exists.

    Raises
    ------
    InputError
        Wrong schema version or kind, missing keys, unknown phases or missing files.
    """
    path = path / DATASET_FILE if path.is_dir() else path
    data = read_json(path)
    root = path.parent
    if not isinstance(data, dict) or data.get("kind") != "d4m-dataset":
        raise InputError(f"{path}: expected a d4m dataset (kind 'd4m-dataset'), found {type(data).__name__}")
    if data.get("schema_version") != DATASET_SCHEMA_VERSION:
        raise InputError(
            f"{path}: expected schema_version {DATASET_SCHEMA_VERSION}, found {data.get('schema_version')}"
        )
    try:
        phases = tuple(Phase(p) for p in data.get("phases", [p.value for p in PHASE_ORDER]))
        cases = tuple(_case_from_json(c, root) for c in data["cases"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(
            f"{path}: expected cases with 'id' and 'images' of phases NC/ART/PVP/DEL, found {exc!r}"
        ) from exc
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: expected unique case ids, found duplicates")
    for case in cases:
        for file in [*case.images.values(), *case.truth.values(), *case.normal.values(), case.label]:
            if file is not None and not file.exists():
                raise InputError(f"{path}: case {case.id}: expected the file {file.relative_to(root)}, found nothing")
    return Dataset(root, cases, phases, dict(data.get("source", {})))


def copy_image(source: Path, folder: Path, relative: str) -> str:
    """Copy an image to ``folder/relative`` (NIfTI byte for byte, other formats rewritten); return ``relative``."""
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(".nii.gz"):
        shutil.copyfile(source, target)
    else:
        write_image(read_image(source), target)
    return relative


def _names(paths: dict[Phase, Path]) -> list[str]:
    return [p.value for p in paths]


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the dataset folder (with ``..`` for files beside it, e.g. a view of another dataset)."""
    return Path(os.path.relpath(path.absolute(), root.absolute())).as_posix()


def _case_to_json(case: Case, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"id": case.id, "images": {p.value: _rel(f, root) for p, f in case.images.items()}}
    if case.label is not None:
        out["label"] = _rel(case.label, root)
    if case.dicom is not None:
        out["dicom"] = _rel(case.dicom, root)
    for key in ("truth", "normal"):
        files = getattr(case, key)
        if files:
            out[key] = {p.value: _rel(f, root) for p, f in files.items()}
    if case.meta:
        out["meta"] = case.meta
    return out


def _case_from_json(data: dict[str, Any], root: Path) -> Case:
    def phase_map(key: str) -> dict[Phase, Path]:
        return {Phase(p): root / f for p, f in data.get(key, {}).items()}

    return Case(
        id=str(data["id"]),
        images=phase_map("images") or _missing("images"),
        label=root / data["label"] if data.get("label") else None,
        dicom=root / data["dicom"] if data.get("dicom") else None,
        truth=phase_map("truth"),
        normal=phase_map("normal"),
        meta=dict(data.get("meta", {})),
    )


def _missing(key: str) -> dict[Phase, Path]:
    raise KeyError(key)
