"""The synthetic multiphase liver-CT cohort: d4m's stand-in for patient data.

A case is an abdominal CT study in four contrast phases (NC, ART, PVP, DEL) of one synthetic
patient: body wall, spine and ribs, lung bases and heart, liver with lobes, an irregular surface
and portal and hepatic vein trees, aorta, IVC, spleen, kidneys, pancreas, gallbladder, stomach
and bowel with gas, plus 0-5 liver tumours (HCC-like, hypovascular metastasis, cyst) with their
phase behaviour. The phases are misaligned as in real studies (breathing shift, small rotation,
smooth deformation; each phase on its own grid), blurred and noisy. Labels (1 liver, 2 tumour)
are on the PVP grid, as the paper's annotations are; the true label map of every phase and the
same study without tumours are written too, for evaluation.

Usage::

    config = PhantomConfig(cases=4, seed=0, size="small")
    case = generate_case(0, config)            # in memory
    dataset = write_cohort(Path("out"), config) # DICOM + NIfTI + dataset.json
    render_preview(case, Path("preview.png"))
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.runtime.artifacts import atomic_dir
from d4m.training.config import StageConfig
from d4m.training.datasets import Case, Dataset
from d4m.training.phantom_acquisition import PhaseAcquisition, StudyIdentity, sample_acquisition, write_dicom_study
from d4m.training.phantom_anatomy import build_anatomy, sample_frame
from d4m.training.phantom_preview import render_preview
from d4m.training.phantom_render import (
    anatomy_grid,
    pack,
    render_phase,
    sample_phase,
    sample_phase_setups,
    texture_field,
)
from d4m.training.phantom_shapes import Grid
from d4m.training.phantom_tissues import sample_case_hu
from d4m.training.phantom_tumors import TumorKind, draw_tumor_kinds, paint_tumors, place_tumors, tumor_parts

__all__ = [
    "PhantomCase",
    "PhantomConfig",
    "PhantomSize",
    "TumorKind",
    "generate_case",
    "render_preview",
    "tumor_free_cases",
    "write_case",
    "write_cohort",
]

logger = logging.getLogger(__name__)


class PhantomSize(str, Enum):
    """Grid presets: ``small`` for tests, ``medium`` for the demo, ``full`` for benchmarks."""

    SMALL = "small"
    MEDIUM = "medium"
    FULL = "full"


#: size -> (in-plane matrix, in-plane spacing mm, slices, slice spacing mm) of the PVP grid.
SIZES: dict[PhantomSize, tuple[int, float, int, float]] = {
    PhantomSize.SMALL: (128, 2.8, 48, 5.0),
    PhantomSize.MEDIUM: (256, 1.4, 80, 3.0),
    PhantomSize.FULL: (512, 0.75, 120, 2.5),
}


@dataclass(frozen=True)
class PhantomConfig(StageConfig):
    """What cohort to generate.

    Attributes
    ----------
    cases
        Number of studies.
    seed
        Random seed; the same seed (and settings) gives byte-identical arrays.
    size
        Grid preset (:class:`PhantomSize` or its value).
    tumor_free_fraction
        Share of studies without any tumour (rounded to a whole number of cases).
    max_tumors
        At most this many tumours per study (1..20).
    write_dicom
        Also write each study as four DICOM CT series.
    min_tumor_mm, max_tumor_mm
        Tumour diameter range (mm).
    tumor_kinds
        Tumour kinds that may occur (:class:`TumorKind` values).
    noise_scale
        Factor on every phase's CT noise SD (1 = the phantom's scanners; e.g. 1.6 for a noisier site).
    """

    stage: ClassVar[str] = "phantom"

    cases: int = 4
    seed: int = 0
    size: PhantomSize = PhantomSize.SMALL
    tumor_free_fraction: float = 0.15
    max_tumors: int = 5
    write_dicom: bool = True
    min_tumor_mm: float = 5.0
    max_tumor_mm: float = 60.0
    tumor_kinds: tuple[TumorKind, ...] = (TumorKind.HCC, TumorKind.METASTASIS, TumorKind.CYST)
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "size", PhantomSize(self.size))
            object.__setattr__(self, "tumor_kinds", tuple(TumorKind(k) for k in self.tumor_kinds))
        except ValueError as exc:
            raise InputError(
                f"phantom config: expected size in {[s.value for s in PhantomSize]} and tumour kinds in "
                f"{[k.value for k in TumorKind]}, found {self.size!r} / {self.tumor_kinds!r}"
            ) from exc
        checks = [
            (self.cases >= 1, "cases >= 1", self.cases),
            (self.seed >= 0, "seed >= 0", self.seed),
            (0.0 <= self.tumor_free_fraction <= 1.0, "tumor_free_fraction in [0, 1]", self.tumor_free_fraction),
            (1 <= self.max_tumors <= 20, "max_tumors in 1..20", self.max_tumors),
            (
                3.0 <= self.min_tumor_mm <= self.max_tumor_mm <= 100.0,
                "3 <= min_tumor_mm <= max_tumor_mm <= 100",
                (self.min_tumor_mm, self.max_tumor_mm),
            ),
            (len(self.tumor_kinds) > 0, "at least one tumour kind", self.tumor_kinds),
            (0.0 < self.noise_scale <= 10.0, "noise_scale in (0, 10]", self.noise_scale),
        ]
        for ok, expected, found in checks:
            if not ok:
                raise InputError(f"phantom config: expected {expected}, found {found}")


@dataclass(frozen=True)
class PhantomCase:
    """One generated study in memory.

    Attributes
    ----------
    images, normal
        HU volumes (int16) per phase with tumours, and the same study without tumours.
    label
        PVP-grid label map (uint8: 0 background, 1 liver, 2 tumour).
    truth
        True label map of every phase on its own grid (evaluation only).
    meta
        JSON-ready facts: tumours (type, centre mm, diameter mm, volume ml, per-phase centres),
        per-phase misalignment and acquisition, HU draws, liver volume.
    identity, acquisitions
        The DICOM identity of the study and of each phase series.
    tissues
        Per-phase tissue-code maps (:class:`~d4m.training.phantom_tissues.Tissue`), only when
        asked for (``generate_case(..., with_tissues=True)``); empty otherwise.
    """

    index: int
    case_id: str
    images: dict[Phase, Volume]
    normal: dict[Phase, Volume]
    label: Volume
    truth: dict[Phase, Volume]
    meta: dict[str, Any]
    identity: StudyIdentity
    acquisitions: dict[Phase, PhaseAcquisition]
    tissues: dict[Phase, Volume] = dataclasses.field(default_factory=dict)


def tumor_free_cases(config: PhantomConfig) -> frozenset[int]:
    """Indices of the cohort's tumour-free studies (``round(cases * tumor_free_fraction)`` of them)."""
    count = int(math.floor(config.cases * config.tumor_free_fraction + 0.5))
    order = np.random.default_rng([config.seed, config.cases, 7919]).permutation(config.cases)
    return frozenset(int(i) for i in order[:count])


def generate_case(index: int, config: PhantomConfig, *, with_tissues: bool = False) -> PhantomCase:
    """Generate study ``index`` of the cohort described by ``config``, in memory.

    The anatomy, tumours, misalignment, HU draws and noise come from separate random streams
    spawned from ``np.random.default_rng([seed, index])``, so the same seed gives byte-identical
    arrays and the tumour-free rendering shares the anatomy and the noise. ``with_tissues`` also
    keeps each phase's tissue-code map (for tests and evaluation).

    Raises
    ------
    InputError
        ``index`` is negative.
    """
    if index < 0:
        raise InputError(f"phantom case index: expected >= 0, found {index}")
    r_anat, r_tumor, r_phase, r_hu, r_noise, r_acq = np.random.default_rng([config.seed, index]).spawn(6)
    frame = sample_frame(r_anat)
    n, sx, nz, sz = SIZES[PhantomSize(config.size)]
    top = frame.dome_right + float(r_phase.uniform(15, 40))
    y0 = frame.body_y + float(r_phase.uniform(-8, 8))
    pvp = Grid((nz, n, n), (sx, sx, sz), (-(n - 1) / 2 * sx, y0 - (n - 1) / 2 * sx, top - (nz - 1) * sz))
    setups = sample_phase_setups(r_phase, pvp, frame.liver_centre, config.noise_scale)
    grid, offset = anatomy_grid(setups)
    anatomy = build_anatomy(frame, grid, r_anat)
    texture = texture_field(r_anat, grid)
    tumor_free = index in tumor_free_cases(config)
    tumors = []
    if not tumor_free:
        wanted = draw_tumor_kinds(
            r_tumor, config.tumor_kinds, config.max_tumors, (config.min_tumor_mm, config.max_tumor_mm)
        )
        z_range = (pvp.origin[2], pvp.origin[2] + (nz - 1) * sz)
        tumors = place_tumors(r_tumor, anatomy.canvas, wanted, z_range, config.min_tumor_mm)
    tumor_map = paint_tumors(r_tumor, anatomy.canvas, tumors)
    packed = pack(anatomy.codes, tumor_map, texture)
    del texture, tumor_map
    hu = sample_case_hu(r_hu)
    tables = hu.tumor_tables(tumor_parts(tumors))
    identity, acquisitions = sample_acquisition(r_acq, config.seed, index, sz)
    images, normal, truth, centres, counts, tissues = {}, {}, {}, {}, {}, {}
    for phase, noise_rng in zip(PHASE_ORDER, r_noise.spawn(4), strict=True):
        setup = setups[phase]
        sampled = sample_phase(setup, packed, grid, offset)
        rendered = render_phase(setup, sampled, hu, tables, noise_rng)
        if with_tissues:
            tissues[phase] = setup.grid.volume((sampled & 0xFF).astype(np.uint8))
        images[phase] = setup.grid.volume(rendered.image)
        normal[phase] = setup.grid.volume(rendered.normal)
        truth[phase] = setup.grid.volume(rendered.truth)
        centres[phase], counts[phase] = rendered.tumor_centres, rendered.tumor_voxels
    label = truth[Phase.PVP]
    meta: dict[str, Any] = {
        "generator": "d4m.training.phantom",
        "seed": config.seed,
        "index": index,
        "size": PhantomSize(config.size).value,
        "tumor_free": tumor_free,
        "tumors": [
            {
                "index": t.index,
                "type": t.kind.value,
                "centre_mm": [round(v, 2) for v in t.centre],
                "diameter_mm": round(t.diameter, 2),
                "volume_ml": round(counts[Phase.PVP].get(t.index, 0) * pvp.voxel_ml, 3),
                "placement": t.placement,
                "centre_mm_by_phase": {
                    p.value: [round(v, 2) for v in centres[p][t.index]] for p in PHASE_ORDER if t.index in centres[p]
                },
            }
            for t in tumors
        ],
        "liver_ml": round(float((label.array > 0).sum()) * pvp.voxel_ml, 1),
        "phases": {p.value: {**setups[p].meta(), **acquisitions[p].meta()} for p in PHASE_ORDER},
        "hu": {
            "bolus": round(hu.bolus, 3),
            "oral_contrast": hu.oral_contrast,
            "steatosis": hu.steatosis,
            "liver_hu": {p.value: round(v, 1) for p, v in zip(PHASE_ORDER, hu.liver, strict=True)},
        },
        "body": {
            k: round(float(v), 2) if isinstance(v, float) else [round(float(x), 2) for x in v]
            for k, v in dataclasses.asdict(frame).items()
        },
    }
    return PhantomCase(index, f"case_{index:03d}", images, normal, label, truth, meta, identity, acquisitions, tissues)


def write_case(case: PhantomCase, folder: Path, write_dicom: bool = True) -> Case:
    """Write one study atomically into ``folder`` (replaced if it exists).

    Layout: ``dicom/S<series>/`` (when ``write_dicom``), ``images/<PHASE>.nii.gz``,
    ``normal/<PHASE>.nii.gz``, ``truth/<PHASE>.nii.gz`` and ``label.nii.gz`` (PVP grid).

    Returns
    -------
    Case
        The dataset entry, with paths at their final place.
    """
    with atomic_dir(folder, overwrite=True) as tmp:
        for phase in PHASE_ORDER:
            write_image(case.images[phase], tmp / "images" / f"{phase.value}.nii.gz")
            write_image(case.normal[phase], tmp / "normal" / f"{phase.value}.nii.gz")
            write_image(case.truth[phase], tmp / "truth" / f"{phase.value}.nii.gz")
        write_image(case.label, tmp / "label.nii.gz")
        if write_dicom:
            write_dicom_study(case.images, case.identity, case.acquisitions, tmp / "dicom")
    return Case(
        id=case.case_id,
        images={p: folder / "images" / f"{p.value}.nii.gz" for p in PHASE_ORDER},
        label=folder / "label.nii.gz",
        dicom=folder / "dicom" if write_dicom else None,
        truth={p: folder / "truth" / f"{p.value}.nii.gz" for p in PHASE_ORDER},
        normal={p: folder / "normal" / f"{p.value}.nii.gz" for p in PHASE_ORDER},
        meta=case.meta,
    )


def write_cohort(out: Path, config: PhantomConfig, progress: Callable[[int], None] | None = None) -> Dataset:
    """Generate and write the whole cohort under ``out``; ``dataset.json`` is written last.

    Each study goes to ``out/cases/<case_id>/`` atomically (an existing case folder is
    replaced); ``progress(1)`` is called after each study.

    Returns
    -------
    Dataset
        The saved dataset (``out/dataset.json``).
    """
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(config.cases):
        case = generate_case(index, config)
        cases.append(write_case(case, out / "cases" / case.case_id, config.write_dicom))
        logger.info("phantom %s: %d tumour(s)", case.case_id, len(case.meta["tumors"]))
        if progress is not None:
            progress(1)
    dataset = Dataset(out, tuple(cases), PHASE_ORDER, {"generator": "d4m.training.phantom", "config": config.to_dict()})
    dataset.save()
    return dataset
