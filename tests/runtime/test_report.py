"""report.json: a pure function of the run record, measurements right, no patient data, no paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.series import SeriesInfo, SkippedFile, StudyInfo
from d4m.dicom_io.volume import Volume
from d4m.runtime.phases import assign_phases
from d4m.runtime.report import (
    REPORT_SCHEMA_VERSION,
    EngineInfo,
    RunRecord,
    StageTiming,
    build_report,
    measure_labels,
    runtime_versions,
)

ROOT = Path("/secret/hospital/archive/patient-folder")
CT = "1.2.840.10008.5.1.4.1.1.2"


def _series(number: int, description: str, agent: str | None, time_s: float) -> SeriesInfo:
    files = tuple(ROOT / f"S{number}" / f"{k:03d}.dcm" for k in range(20))
    return SeriesInfo("1.2.3", f"1.2.3.{number}", number, description, "CT", CT, files, ROOT,
                      contrast_agent=agent, acquisition_time=time_s, rows=64, cols=64,
                      image_orientation=(1, 0, 0, 0, 1, 0), slice_thickness=2.0)


def _labels() -> Volume:
    """A 2 mm isotropic liver block with two tumours: a 4×4×4 cube and a 2×2×2 cube."""
    array = np.zeros((20, 30, 30), np.uint8)
    array[2:18, 5:25, 5:25] = 1
    array[4:8, 8:12, 8:12] = 2
    array[12:14, 18:20, 18:20] = 2
    return Volume(array, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))


def _record(patient: dict[str, str] | None = None) -> RunRecord:
    """A record; the input folder's name only travels with the patient section (``--include-phi``)."""
    series = [_series(2, "native", None, 100.0), _series(4, "portal venous", "Iomeprol", 200.0)]
    study = StudyInfo("1.2.3", "20240101", "abdomen", {s.series_uid: s for s in series})
    phase_map = assign_phases(series)
    labels = _labels()
    return RunRecord(
        input_name="patient-folder" if patient is not None else None,
        study=study,
        skipped=(SkippedFile(Path("junk/notes.txt"), "not a DICOM file"), SkippedFile(Path("empty.dcm"), "empty file")),
        phase_map=phase_map,
        reference=Phase.PVP,
        used=(Phase.NC, Phase.PVP),
        duplicated={Phase.ART: Phase.PVP, Phase.DEL: Phase.PVP},
        dropped={},
        registration={Phase.NC: {"quality_before": 0.2, "quality_after": 0.4, "accepted": True, "used": True}},
        labels=labels,
        measurements=measure_labels(labels),
        reference_series_uid="1.2.3.4",
        bundle={"sha256": "ab" * 32, "phases": ["NC", "ART", "PVP", "DEL"]},
        engine=EngineInfo("cpu", "auto", "segmenter.onnx", "onnx", "fp32", ("CPUExecutionProvider",), 12, 2),
        options={"device": "auto", "include_phi": patient is not None},
        outputs={"seg": "seg.dcm", "report": "report.json", "qc": "qc.png", "nifti": None},
        timings=(StageTiming("scan", 0.5, 100.0), StageTiming("network", 2.25, 300.0),
                 StageTiming("write", 0.25, None)),
        warnings=("something to know",),
        versions={"python": "3.11", "numpy": "2"},
        patient=patient,
    )


def test_report_is_pure_json_with_schema_version() -> None:
    record = _record()
    report = build_report(record)
    assert report == build_report(record)
    assert next(iter(report)) == "schema_version" and report["schema_version"] == REPORT_SCHEMA_VERSION
    assert json.loads(json.dumps(report)) == report


def test_measurements_of_liver_and_tumours() -> None:
    seg = build_report(_record())["segmentation"]
    voxel_ml = 8.0 / 1000.0
    assert seg["liver_ml"] == pytest.approx(16 * 20 * 20 * voxel_ml)
    assert seg["liver_parenchyma_ml"] == pytest.approx((16 * 20 * 20 - 64 - 8) * voxel_ml)
    assert seg["tumor_count"] == 2
    big, small = seg["tumors"]
    assert big["volume_ml"] == pytest.approx(64 * voxel_ml) and small["volume_ml"] == pytest.approx(8 * voxel_ml)
    # longest diameter between voxel centres of a 4-voxel cube of 2 mm: sqrt(3) * 3 * 2 mm
    assert big["longest_diameter_mm"] == pytest.approx(np.sqrt(3) * 6, abs=0.01)
    assert seg["tumor_burden_ml"] == pytest.approx(72 * voxel_ml)
    assert seg["reference_series_uid"] == "1.2.3.4" and seg["grid"]["shape_kji"] == [20, 30, 30]


def test_phases_engine_timing_memory_and_warnings() -> None:
    report = build_report(_record())
    phases = report["phases"]
    assert phases["found"] == ["NC", "PVP"] and phases["used"] == ["NC", "PVP"]
    assert phases["duplicated"] == {"ART": "PVP", "DEL": "PVP"} and phases["reference"] == "PVP"
    assert phases["assignment"]["selected"]["PVP"]["series"] == "series 4 'portal venous'"
    assert report["engine"]["providers"] == ["CPUExecutionProvider"] and report["engine"]["windows"] == 12
    assert report["bundle"]["sha256"] == "ab" * 32
    assert [s["name"] for s in report["timing"]["stages"]] == ["scan", "network", "write"]
    assert report["timing"]["total_seconds"] == pytest.approx(3.0)
    assert report["memory"]["peak_rss_mib"] == 300.0
    assert report["warnings"] == ["something to know"]
    assert report["registration"]["NC"]["quality_after"] == 0.4
    assert report["input"]["skipped"]["reasons"] == {"not a DICOM file": 1, "empty file": 1}


def test_no_absolute_paths_and_no_patient_section_by_default() -> None:
    text = json.dumps(build_report(_record()))
    assert "/secret/hospital" not in text
    assert "patient" not in build_report(_record())
    assert build_report(_record())["input"]["folder"] is None
    assert '"junk/notes.txt"' in text


def test_patient_section_only_when_asked() -> None:
    report = build_report(_record({"name": "DOE^JANE", "id": "123"}))
    assert report["patient"] == {"name": "DOE^JANE", "id": "123"}
    assert report["input"]["folder"] == "patient-folder"


def test_empty_labels_measure_zero() -> None:
    measured = measure_labels(Volume(np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert measured == {"liver_ml": 0.0, "liver_parenchyma_ml": 0.0, "tumor_count": 0, "tumor_burden_ml": 0.0,
                        "tumors": []}


def test_runtime_versions_name_python_and_numpy() -> None:
    versions = runtime_versions()
    assert versions["numpy"] == np.__version__ and "python" in versions
