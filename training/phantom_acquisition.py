"""How a phantom study was "acquired": series wording, timing, contrast agent, anonymous identity.

Series descriptions vary the way they do between scanners and sites (English, German, French,
Italian, Spanish and Portuguese words, abbreviations, with or without kernel and slice
thickness), because the inference step assigns phases from them. Acquisition times follow a
real multiphase liver protocol: NC, then ART about 35 s, PVP about 70 s and DEL about 3 min
after the injection. UIDs are derived from the seed, so a cohort is reproducible.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.volume import Volume

logger = logging.getLogger(__name__)

#: Description templates per phase ({mm}: slice thickness, {s}: seconds, {min}: minutes after injection).
DESCRIPTIONS: dict[Phase, tuple[str, ...]] = {
    Phase.NC: (
        "NC",
        "Nativ",
        "Nativ {mm}mm B30f",
        "Non-contrast",
        "Unenhanced {mm}",
        "Sans injection",
        "Senza mdc",
        "Sin contraste",
        "Pre-contrast",
        "Abdomen nativ {mm}",
        "PLAIN",
        "Sem contraste",
    ),
    Phase.ART: (
        "ART {mm}mm",
        "Arterial phase",
        "Arteriell",
        "Arterielle Phase {mm}mm",
        "Art. {s}s",
        "Fase arterial",
        "Temps artériel",
        "Fase arteriosa",
        "Arterial {mm}",
        "ARTERIAL {s}s",
        "Leberarteriell",
    ),
    Phase.PVP: (
        "PV {mm}mm",
        "Venous",
        "Portal venous",
        "Portalvenös",
        "Pfortaderphase",
        "Fase portal",
        "Temps portal",
        "Fase portale",
        "PVP",
        "Venös {mm} Br40",
        "Portal {s}s",
        "Venosa portale {mm}mm",
    ),
    Phase.DEL: (
        "Delayed {min} min",
        "Spätphase",
        "Late phase",
        "Equilibrium",
        "Fase tardia",
        "Temps tardif",
        "DEL",
        "Delayed {s}s",
        "Spät {min}min",
        "Fase tardiva",
        "Equilibrium phase {mm}mm",
    ),
}
CONTRAST_AGENTS = (
    "Iomeprol 350",
    "IOMERON 400",
    "Iohexol (Omnipaque 350)",
    "Ultravist 370",
    "Visipaque 320",
    "Iopamidol 370",
    "Imeron 350 100ml",
)
#: Seconds after the start of the injection (range) per contrast phase.
DELAYS_S: dict[Phase, tuple[float, float]] = {
    Phase.ART: (30.0, 40.0),
    Phase.PVP: (65.0, 80.0),
    Phase.DEL: (170.0, 300.0),
}


@dataclass(frozen=True)
class PhaseAcquisition:
    """The DICOM-facing facts of one phase series."""

    phase: Phase
    series_number: int
    description: str
    contrast_agent: str | None
    acquisition_time: str  # HHMMSS.ffffff
    seconds_after_injection: float | None
    series_uid: str

    def meta(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "series_number": self.series_number,
            "description": self.description,
            "contrast_agent": self.contrast_agent,
            "acquisition_time": self.acquisition_time,
            "seconds_after_injection": self.seconds_after_injection,
        }


@dataclass(frozen=True)
class StudyIdentity:
    """The anonymous identity and study-level tags shared by the four series."""

    patient_name: str
    patient_id: str
    patient_sex: str
    patient_age: str
    accession_number: str
    study_id: str
    study_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time: str
    patient_position: str
    kvp: float


def phantom_uid(seed: int, index: int, what: str) -> str:
    """A reproducible UUID-derived UID (``2.25.<decimal>``) for the seed, case and purpose."""
    digest = hashlib.sha256(f"d4m-phantom:{seed}:{index}:{what}".encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def sample_acquisition(
    rng: np.random.Generator, seed: int, index: int, slice_mm: float
) -> tuple[StudyIdentity, dict[Phase, PhaseAcquisition]]:
    """Draw the study's identity, series numbering, wording, contrast agent and timing."""
    start = datetime.datetime(2019, 1, 1, 7, 30) + datetime.timedelta(
        days=int(rng.integers(0, 2000)), seconds=float(rng.uniform(0, 10 * 3600))
    )
    identity = StudyIdentity(
        patient_name=f"PHANTOM^CASE{index:03d}",
        patient_id=f"D4M-{index:03d}",
        patient_sex=str(rng.choice(["M", "F"])),
        patient_age=f"{int(rng.integers(35, 86)):03d}Y",
        accession_number=f"D4M{seed % 10000:04d}{index:05d}",
        study_id=str(index + 1),
        study_uid=phantom_uid(seed, index, "study"),
        frame_of_reference_uid=phantom_uid(seed, index, "frame"),
        study_date=start.strftime("%Y%m%d"),
        study_time=start.strftime("%H%M%S"),
        patient_position=str(rng.choice(["FFS", "HFS"], p=[0.7, 0.3])),
        kvp=float(rng.choice([100.0, 120.0])),
    )
    agent = str(rng.choice(CONTRAST_AGENTS))
    first = int(rng.choice([2, 3, 4, 101, 201]))
    step = int(rng.choice([1, 2])) if first < 100 else 100
    nc_time = start + datetime.timedelta(seconds=float(rng.uniform(60, 300)))
    injection = nc_time + datetime.timedelta(seconds=float(rng.uniform(60, 180)))
    out = {}
    for n, phase in enumerate(PHASE_ORDER):
        delay = None if phase == Phase.NC else float(rng.uniform(*DELAYS_S[phase]))
        when = nc_time if delay is None else injection + datetime.timedelta(seconds=delay)
        template = str(rng.choice(DESCRIPTIONS[phase]))
        description = template.format(mm=_mm(slice_mm), s=round(delay or 0), min=max(1, round((delay or 0) / 60)))
        out[phase] = PhaseAcquisition(
            phase=phase,
            series_number=first + n * step,
            description=description,
            contrast_agent=None if phase == Phase.NC else agent,
            acquisition_time=when.strftime("%H%M%S.%f"),
            seconds_after_injection=None if delay is None else round(delay, 1),
            series_uid=phantom_uid(seed, index, f"series-{phase.value}"),
        )
    return identity, out


def _mm(value: float) -> str:
    return f"{value:.1f}" if value != round(value) or value < 10 else f"{value:.0f}"


def write_dicom_study(
    images: dict[Phase, Volume], identity: StudyIdentity, acquisitions: dict[Phase, PhaseAcquisition], out_dir: Path
) -> dict[Phase, Path]:
    """Write the four phase images as CT series (one sub-folder ``S<number>`` each) under ``out_dir``.

    Folder and file names never name the phase: the headers are the only evidence, as at a site.

    Returns
    -------
    dict[Phase, Path]
        The series folder of each phase.
    """
    from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series

    folders = {}
    for phase, volume in images.items():
        acq = acquisitions[phase]
        meta = CTSeriesMeta(
            study_uid=identity.study_uid,
            series_uid=acq.series_uid,
            frame_of_reference_uid=identity.frame_of_reference_uid,
            series_number=acq.series_number,
            description=acq.description,
            contrast_agent=acq.contrast_agent,
            acquisition_time=acq.acquisition_time,
            study_date=identity.study_date,
            study_time=identity.study_time,
            patient_name=identity.patient_name,
            patient_id=identity.patient_id,
            patient_sex=identity.patient_sex,
            patient_age=identity.patient_age,
            accession_number=identity.accession_number,
            study_id=identity.study_id,
            patient_position=identity.patient_position,
            kvp=identity.kvp,
            body_part="ABDOMEN",
        )
        folder = out_dir / f"S{acq.series_number:04d}"
        write_ct_series(volume, folder, meta)
        folders[phase] = folder
    return folders
