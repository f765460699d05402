"""``report.json`` of a ``d4m-infer run``: built by a pure function from what the run recorded.

:func:`build_report` takes a :class:`RunRecord` (facts gathered by :mod:`d4m.runtime.infer`) and
returns a JSON-ready dict; it reads no file and no clock, so the same record gives the same
report. It holds: the bundle hash, the engine and the execution providers that really ran, the
phases found / used / duplicated / dropped with the evidence of the assignment, registration
figures per phase, liver volume, tumour count and per-tumour volume and longest diameter, timing
and peak memory per stage, package versions and warnings.

No patient identifiers: series are named by number and description, files relative to the
input folder, never an absolute path. The input folder's own name (sites often name export
folders after the patient) and the ``patient`` section (name, ID, birth date, sex, age,
accession number, study date) are filled only when the user asked for it (``--include-phi``).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from d4m.dicom_io.codes import LIVER, PHASE_ORDER, TUMOR, Phase
from d4m.dicom_io.series import SkippedFile, StudyInfo
from d4m.dicom_io.volume import Volume
from d4m.runtime.phases import PhaseMap
from d4m.runtime.postprocess import TumorComponent, tumor_components

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
#: Packages whose versions every report records.
_PACKAGES = ("d4m", "numpy", "scipy", "SimpleITK", "pydicom", "highdicom", "onnxruntime", "onnxruntime-gpu",
             "tensorrt")
#: DICOM attributes copied into ``patient`` with ``--include-phi`` (keyword → report key).
PHI_ATTRIBUTES: dict[str, str] = {
    "PatientName": "name", "PatientID": "id", "PatientBirthDate": "birth_date", "PatientSex": "sex",
    "PatientAge": "age", "AccessionNumber": "accession_number", "StudyDate": "study_date",
    "StudyTime": "study_time", "InstitutionName": "institution",
}  # fmt: skip


@dataclass(frozen=True)
class StageTiming:
    """Wall time and peak resident memory of one pipeline stage.

    Attributes
    ----------
    name
        Stage name (``bundle``, ``scan``, ``phases``, ``read``, ``register``, ``resample``,
        ``network``, ``postprocess``, ``write``).
    seconds
        Wall time.
    peak_rss_mib
        Peak resident set size of the process during the stage (MiB); ``None`` when the
        platform cannot tell.
    """

    name: str
    seconds: float
    peak_rss_mib: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        peak = None if self.peak_rss_mib is None else round(self.peak_rss_mib, 1)
        return {"name": self.name, "seconds": round(self.seconds, 3), "peak_rss_mib": peak}


@dataclass(frozen=True)
class EngineInfo:
    """The engine that ran the segmenter.

    Attributes
    ----------
    device
        The resolved device (``cpu``, ``cuda``, ``tensorrt``) and what was asked (``requested``).
    file, format, precision
        The bundle's engine entry.
    providers
        What the runner reports as actually running (e.g. ONNX Runtime's ``get_providers()``).
    windows, batch_size
        Sliding-window count and windows per engine call.
    """

    device: str
    requested: str
    file: str
    format: str
    precision: str
    providers: tuple[str, ...]
    windows: int = 0
    batch_size: int = 1


@dataclass(frozen=True)
class RunRecord:
    """Everything a run found and did, as :func:`build_report` needs it.

    Attributes
    ----------
    input_name
        The input folder's name (never its path); ``None`` to leave it out (the default without
        ``--include-phi``).
    study
        The study that was segmented (UIDs, series; no patient data).
    skipped
        Files of the input folder that were not used, with reasons (paths relative to it).
    phase_map
        The phase assignment with its evidence.
    reference
        The phase the others were registered to and the SEG references.
    used, duplicated, dropped
        Phases that entered the network from their own series; missing phase → the phase
        copied into it; phase → why it was not used (e.g. failed the registration gate).
    registration
        Phase → :meth:`~d4m.runtime.registration.RegistrationResult.to_dict` (plus ``used``).
    labels
        The label volume on the reference grid.
    measurements
        :func:`measure_labels` of ``labels`` (liver and tumour volumes, diameters).
    reference_series_uid
        SeriesInstanceUID of the series the SEG references.
    regridded
        Phase → what was resampled while reading (``--allow-resample``).
    bundle
        The bundle summary (``Bundle.describe()`` plus preprocessing and sliding window).
    engine
        What ran the network.
    options
        The run's options (no paths).
    outputs
        Output kind → file name inside the output folder (``None`` when not written).
    timings
        Per stage, in order.
    warnings
        Everything a reader of the result should know.
    versions
        Package → version (see :func:`runtime_versions`).
    patient
        Patient identifiers, only with ``--include-phi``; ``None`` otherwise.
    """

    input_name: str | None
    study: StudyInfo
    skipped: tuple[SkippedFile, ...]
    phase_map: PhaseMap
    reference: Phase
    used: tuple[Phase, ...]
    duplicated: Mapping[Phase, Phase]
    dropped: Mapping[Phase, str]
    registration: Mapping[Phase, dict[str, Any]]
    labels: Volume
    measurements: dict[str, Any]
    reference_series_uid: str
    bundle: dict[str, Any]
    engine: EngineInfo
    options: dict[str, Any]
    outputs: dict[str, str | None]
    timings: tuple[StageTiming, ...]
    warnings: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    regridded: Mapping[Phase, str] = field(default_factory=dict)
    patient: dict[str, str] | None = None


def runtime_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (absent ones left out), and Python's."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def measure_labels(labels: Volume) -> dict[str, Any]:
    """Liver and tumour measurements of a label volume (volumes in ml, diameters in mm).

    ``liver_ml`` is the whole organ (liver and tumour labels), ``liver_parenchyma_ml`` the liver
    label alone; tumours are connected components (26-connectivity), largest first.
    """
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    array = labels.array
    organ = int(np.count_nonzero((array == LIVER.value) | (array == TUMOR.value)))
    tumors = tumor_components(array, labels.spacing, labels.affine)
    return {
        "liver_ml": round(organ * voxel_ml, 3),
        "liver_parenchyma_ml": round(int(np.count_nonzero(array == LIVER.value)) * voxel_ml, 3),
        "tumor_count": len(tumors),
        "tumor_burden_ml": round(sum(t.volume_ml for t in tumors), 3),
        "tumors": [_tumor(t) for t in tumors],
    }


def _tumor(component: TumorComponent) -> dict[str, Any]:
    return component.to_dict()


def _series(record: RunRecord) -> list[dict[str, Any]]:
    assignments = record.phase_map.assignments
    chosen = {s.series_uid: p for p, s in record.phase_map.selected.items()}
    out = []
    for series in record.study.series.values():
        assignment = assignments.get(series.series_uid)
        out.append({
            "series_uid": series.series_uid,
            "series_number": series.series_number,
            "description": series.description,
            "instances": series.n_instances,
            "phase": None if assignment is None or assignment.phase is None else assignment.phase.value,
            "selected_for": chosen[series.series_uid].value if series.series_uid in chosen else None,
        })
    return out


def _skipped(skipped: tuple[SkippedFile, ...]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for item in skipped:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    return {"count": len(skipped), "reasons": counts,
            "files": [{"file": item.path.as_posix(), "reason": item.reason} for item in skipped]}


def build_report(record: RunRecord) -> dict[str, Any]:
    """The JSON-ready ``report.json`` of a run (pure: same record, same report).

    Parameters
    ----------
    record
        What the run found and did.

    Returns
    -------
    dict
        ``schema_version`` first; see the module docstring for the content.
    """
    timings = [t.to_dict() for t in record.timings]
    peaks = [t.peak_rss_mib for t in record.timings if t.peak_rss_mib is not None]
    found = [p for p in PHASE_ORDER if p in record.phase_map.selected]
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": {"name": "d4m-infer", "versions": dict(record.versions)},
        "status": "ok",
        "input": {
            "folder": record.input_name,
            "study_uid": record.study.study_uid,
            "study_description": record.study.description,
            "series": _series(record),
            "skipped": _skipped(record.skipped),
        },
        "options": dict(record.options),
        "bundle": dict(record.bundle),
        "engine": {
            "device": record.engine.device,
            "requested_device": record.engine.requested,
            "file": record.engine.file,
            "format": record.engine.format,
            "precision": record.engine.precision,
            "providers": list(record.engine.providers),
            "windows": record.engine.windows,
            "batch_size": record.engine.batch_size,
        },
        "phases": {
            "found": [p.value for p in found],
            "used": [p.value for p in PHASE_ORDER if p in record.used],
            "duplicated": {m.value: s.value for m, s in sorted(record.duplicated.items(), key=_phase_key)},
            "dropped": {p.value: why for p, why in sorted(record.dropped.items(), key=_phase_key)},
            "reference": record.reference.value,
            "regridded": {p.value: what for p, what in sorted(record.regridded.items(), key=_phase_key)},
            "assignment": record.phase_map.to_dict(),
        },
        "registration": {p.value: dict(r) for p, r in sorted(record.registration.items(), key=_phase_key)},
        "segmentation": {
            "reference_phase": record.reference.value,
            "reference_series_uid": record.reference_series_uid,
            "grid": {"shape_kji": list(record.labels.shape), "spacing_mm": list(record.labels.spacing)},
            **record.measurements,
        },
        "outputs": dict(record.outputs),
        "timing": {"stages": timings, "total_seconds": round(sum(t.seconds for t in record.timings), 3)},
        "memory": {"peak_rss_mib": round(max(peaks), 1) if peaks else None},
        "warnings": list(record.warnings),
    }
    if record.patient is not None:
        report["patient"] = dict(record.patient)
    return report


def _phase_key(item: tuple[Phase, Any]) -> int:
    return PHASE_ORDER.index(item[0])
