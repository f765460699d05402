"""d4m.runtime.infer.run: the whole pipeline on tiny DICOM studies with a random-weight DynUNet bundle.

Random weights say nothing about accuracy (see the slow test at the end for Dice with a trained
bundle); these tests check what the pipeline promises: which phases are used, duplicated,
dropped and referenced, that the SEG lies on the source slices and reads back, that the report
holds no patient data, that irregular series are refused with every reason or resampled on
request, and that a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import infer_testkit as kit
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import EngineError, InputError
from d4m.dicom_io.reader import read_series_datasets
from d4m.dicom_io.seg_writer import read_seg
from d4m.dicom_io.series import scan_folder
from d4m.dicom_io.volume import read_image
from d4m.runtime.bundle import load_bundle, write_manifest
from d4m.runtime.infer import (
    REFERENCE_PREFERENCE,
    InferConfig,
    InferResult,
    choose_reference,
    parse_phase_override,
    read_phases,
    register_phases,
    run,
    untrained_duplication,
)
from d4m.runtime.phases import assign_phases
from d4m.runtime.registration import RegistrationSettings, register_to_reference

#: Registration settings that keep the tiny studies quick (rigid only, two levels).
FAST = RegistrationSettings(affine=False, shrink_factors=(2, 1), smoothing_sigmas_mm=(4.0, 0.0), iterations=30,
                            samples=2000)
STAGES = ["bundle", "scan", "phases", "read", "register", "resample", "network", "postprocess", "write"]



@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study") / "study"
    kit.write_tiny_study(root)
    return root


def _config(study: Path, bundle: Path, out: Path, **changes: object) -> InferConfig:
    return InferConfig(input=study, bundle=bundle, out=out, registration=FAST, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def baseline(study: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> InferResult:
    return run(_config(study, bundle, tmp_path_factory.mktemp("baseline") / "out", nifti=True))


def _series_folder(study: Path, phase: Phase) -> Path:
    number = {Phase.NC: 2, Phase.ART: 3, Phase.PVP: 4, Phase.DEL: 5}[phase]
    return study / f"S{number}"


def _copy(study: Path, target: Path, phases: tuple[Phase, ...] = PHASE_ORDER) -> Path:
    for phase in phases:
        shutil.copytree(_series_folder(study, phase), _series_folder(target, phase))
    return target


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _nothing_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


# --------------------------------------------------------------------------- small pure parts


def test_reference_rule_prefers_pvp_then_del_art_nc() -> None:
    assert REFERENCE_PREFERENCE == (Phase.PVP, Phase.DEL, Phase.ART, Phase.NC)
    assert choose_reference(frozenset(PHASE_ORDER)) == Phase.PVP
    assert choose_reference(frozenset({Phase.NC, Phase.ART, Phase.DEL})) == Phase.DEL
    assert choose_reference(frozenset({Phase.NC, Phase.ART})) == Phase.ART
    assert choose_reference(frozenset({Phase.NC})) == Phase.NC
    with pytest.raises(InputError):
        choose_reference(frozenset())


def test_phase_overrides_and_options_are_validated(tmp_path: Path) -> None:
    assert parse_phase_override(" pvp = 7 ") == (Phase.PVP, "7")
    with pytest.raises(InputError, match="expected PHASE in"):
        parse_phase_override("XX=3")
    with pytest.raises(InputError, match="no '=SERIES'"):
        parse_phase_override("PVP")
    config = InferConfig(tmp_path, tmp_path, tmp_path / "o", phases=("PVP=4", "art=3"), device="CPU")
    assert config.phases == ((Phase.PVP, "4"), (Phase.ART, "3")) and config.device.value == "cpu"
    assert InferConfig(tmp_path, tmp_path, tmp_path / "o", phases={"NC": 2}).phases == ((Phase.NC, "2"),)
    for bad, message in (({"phases": ("PVP=4", "PVP=5")}, "each phase once"), ({"device": "gpu"}, "--device"),
                         ({"seg_format": "fractional"}, "--seg-format"), ({"threads": 0}, "--threads")):
        with pytest.raises(InputError, match=message):
            InferConfig(tmp_path, tmp_path, tmp_path / "o", **bad)  # type: ignore[arg-type]


def test_concurrent_registration_equals_one_after_the_other(study: Path) -> None:
    loaded = read_phases(assign_phases(scan_folder(study).series), allow_resample=False)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    registered = register_phases(loaded, Phase.PVP, FAST, [])
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads
    for phase in (Phase.NC, Phase.ART, Phase.DEL):
        alone = register_to_reference(loaded[phase].volume, loaded[Phase.PVP].volume, None, FAST)
        assert registered.figures[phase]["transform"] == alone.to_dict()["transform"]
        np.testing.assert_array_equal(registered.images[phase].array, alone.image.array)


# --------------------------------------------------------------------------- a full run


def test_run_writes_seg_report_qc_and_nifti(baseline: InferResult) -> None:
    names = sorted(p.name for p in baseline.out.iterdir())
    assert names == ["qc.png", "report.json", "seg.dcm", "seg.nii.gz"]
    assert not list(baseline.out.parent.glob(".*partial"))
    assert json.loads((baseline.out / "report.json").read_text()) == baseline.report
    assert (baseline.out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seg_holds_the_labels_on_the_source_slices(baseline: InferResult, study: Path) -> None:
    source = read_series_datasets(_files(_series_folder(study, Phase.PVP)))
    labels = read_seg(baseline.out / "seg.dcm", source)
    assert labels.shape == (len(source), source[0].Rows, source[0].Columns)
    np.testing.assert_array_equal(labels, baseline.labels.array)
    assert set(np.unique(labels)) <= {0, 1, 2}
    nifti = read_image(baseline.out / "seg.nii.gz")
    assert nifti.same_grid(baseline.labels)
    np.testing.assert_array_equal(nifti.array, baseline.labels.array)
    seg = pydicom.dcmread(baseline.out / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert int(seg.NumberOfFrames) == 2 * len(source)  # binary: every frame of both segments


def test_seg_passes_dciodvfy(baseline: InferResult, require_tool: Callable[[str], str]) -> None:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(baseline.out / "seg.dcm")], capture_output=True, text=True, timeout=60)
    assert [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")] == []


def test_report_names_bundle_engine_phases_timing(baseline: InferResult, bundle: Path) -> None:
    report = baseline.report
    with load_bundle(bundle) as loaded:
        assert report["bundle"]["sha256"] == loaded.sha256
    assert report["engine"]["providers"] == ["CPUExecutionProvider"] and report["engine"]["format"] == "onnx"
    assert report["phases"]["found"] == report["phases"]["used"] == ["NC", "ART", "PVP", "DEL"]
    assert report["phases"]["duplicated"] == {} and report["phases"]["reference"] == "PVP"
    assert set(report["registration"]) == {"NC", "ART", "DEL"}
    assert all(r["used"] and 0 <= r["quality_after"] <= 1 for r in report["registration"].values())
    assert [s["name"] for s in report["timing"]["stages"]] == STAGES
    assert report["memory"]["peak_rss_mib"] > 10
    assert report["segmentation"]["tumor_count"] == len(report["segmentation"]["tumors"])


def test_no_patient_identifier_in_report_or_logs_labelmap_reads_back(
    study: Path, bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = run(_config(study, bundle, tmp_path / "out", seg_format="labelmap"))
    text = (tmp_path / "out" / "report.json").read_text() + caplog.text
    for secret in (kit.PATIENT_NAME, kit.PATIENT_ID, kit.ACCESSION, "SECRET", "TINYPATIENT"):
        assert secret not in text
    assert str(study) not in (tmp_path / "out" / "report.json").read_text()
    assert result.report["input"]["folder"] is None and "patient" not in result.report
    source = read_series_datasets(_files(_series_folder(study, Phase.PVP)))
    np.testing.assert_array_equal(read_seg(tmp_path / "out" / "seg.dcm", source), result.labels.array)


def test_gate_drops_a_phase_and_phi_only_when_asked(study: Path, bundle: Path, tmp_path: Path) -> None:
    strict = RegistrationSettings(affine=False, shrink_factors=(2, 1), smoothing_sigmas_mm=(4.0, 0.0),
                                  iterations=30, samples=2000, min_quality=0.99)
    config = InferConfig(study, bundle, tmp_path / "out", registration=strict, include_phi=True, qc=False)
    report = run(config).report
    assert report["phases"]["used"] == ["PVP"]
    assert set(report["phases"]["dropped"]) == {"NC", "ART", "DEL"}
    assert report["phases"]["duplicated"] == {"NC": "PVP", "ART": "PVP", "DEL": "PVP"}
    assert any("not used" in w and "gate" in w for w in report["warnings"])
    assert report["patient"]["name"] == kit.PATIENT_NAME and report["patient"]["id"] == kit.PATIENT_ID
    assert report["input"]["folder"] == study.name
    assert report["outputs"]["qc"] is None and not (tmp_path / "out" / "qc.png").exists()


def test_duplication_for_a_model_trained_without_phase_dropout_is_a_warning(study: Path, bundle: Path,
                                                                              tmp_path: Path) -> None:
    manifest = load_bundle(bundle).manifest
    pvp_only = {Phase.NC: Phase.PVP, Phase.ART: Phase.PVP, Phase.DEL: Phase.PVP}
    trained = {dropout: replace(manifest, provenance={"training": {"phase_dropout": dropout}})
               for dropout in (0.0, 0.3)}
    warning = untrained_duplication(trained[0.0], pvp_only)
    assert warning is not None and warning.startswith("3 of 4 phases missing")
    assert "NC from PVP, ART from PVP, DEL from PVP" in warning
    assert untrained_duplication(trained[0.0], {}) is None  # every phase given
    assert untrained_duplication(trained[0.3], pvp_only) is None  # trained for it
    assert untrained_duplication(manifest, pvp_only) is None  # provenance silent: no claim
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    write_manifest(copy, trained[0.0])
    folder = _copy(study, tmp_path / "study", (Phase.ART, Phase.PVP))
    report = run(_config(folder, copy, tmp_path / "out", qc=False)).report
    duplicated = {Phase(m): Phase(source) for m, source in report["phases"]["duplicated"].items()}
    assert set(duplicated) == {Phase.NC, Phase.DEL}
    assert [w for w in report["warnings"] if "phases missing" in w] == [untrained_duplication(trained[0.0], duplicated)]


# --------------------------------------------------------------------------- phase combinations

FAST_SUBSETS = [(Phase.PVP,), (Phase.NC,), (Phase.ART, Phase.DEL), (Phase.NC, Phase.ART, Phase.PVP)]
ALL_SUBSETS = [tuple(p for i, p in enumerate(PHASE_ORDER) if m >> i & 1) for m in range(1, 16)]
SLOW_SUBSETS = [s for s in ALL_SUBSETS if s not in FAST_SUBSETS and s != PHASE_ORDER]


def _check_subset(study: Path, bundle: Path, tmp_path: Path, present: tuple[Phase, ...]) -> None:
    folder = _copy(study, tmp_path / "study", present)
    result = run(_config(folder, bundle, tmp_path / "out", qc=False))
    phases = result.report["phases"]
    reference = choose_reference(frozenset(present))
    assert phases["found"] == phases["used"] == [p.value for p in present]
    assert set(phases["duplicated"]) == {p.value for p in PHASE_ORDER if p not in present}
    assert phases["reference"] == reference.value
    source = read_series_datasets(_files(_series_folder(folder, reference)))
    np.testing.assert_array_equal(read_seg(tmp_path / "out" / "seg.dcm", source), result.labels.array)
    if reference != Phase.PVP:
        assert any(f"registered to {reference.value}" in w for w in result.report["warnings"])
        assert result.report["segmentation"]["reference_series_uid"] == source[0].SeriesInstanceUID


@pytest.mark.parametrize("present", FAST_SUBSETS, ids=lambda s: "+".join(p.value for p in s))
def test_phase_combination(study: Path, bundle: Path, tmp_path: Path, present: tuple[Phase, ...]) -> None:
    _check_subset(study, bundle, tmp_path, present)


@pytest.mark.slow
@pytest.mark.parametrize("present", SLOW_SUBSETS, ids=lambda s: "+".join(p.value for p in s))
def test_phase_combination_all_others(study: Path, bundle: Path, tmp_path: Path, present: tuple[Phase, ...]) -> None:
    _check_subset(study, bundle, tmp_path, present)


# --------------------------------------------------------------------------- input variants


def test_compressed_syntaxes_intercepts_and_shuffled_names_give_the_same_labels(
    baseline: InferResult, bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    kit.write_tiny_study(folder, encodings={Phase.NC: "rle", Phase.ART: "jpeg-ls", Phase.PVP: "jpeg2000"},
                         intercepts={Phase.NC: -1000.0, Phase.ART: -2048.0, Phase.PVP: 0.0})
    files = sorted(folder.rglob("*.dcm"))
    names = list(range(len(files)))
    random.Random(3).shuffle(names)
    for path, name in zip(files, names, strict=True):
        target = folder / "nested" / f"d{name % 3}" / f"IMG{name:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    result = run(_config(folder, bundle, tmp_path / "out", qc=False))
    assert result.report["phases"]["used"] == ["NC", "ART", "PVP", "DEL"]
    np.testing.assert_array_equal(result.labels.array, baseline.labels.array)


def _irregular_study(study: Path, folder: Path) -> Path:
    """PVP misses a slice, ART has an uneven step, DEL a gantry tilt."""
    _copy(study, folder)
    _files(_series_folder(folder, Phase.PVP))[5].unlink()
    for index, path in enumerate(_files(_series_folder(folder, Phase.ART))):
        if index >= 6:
            _edit(path, lambda ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2],
                                                                        ds.ImagePositionPatient[2] - 2.0]))
    for index, path in enumerate(_files(_series_folder(folder, Phase.DEL))):
        _edit(path, lambda ds, i=index: setattr(ds, "ImagePositionPatient", [
            ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + 1.5 * i, ds.ImagePositionPatient[2]]))
    return folder


def test_irregular_series_refused_with_every_reason(study: Path, bundle: Path, tmp_path: Path) -> None:
    folder = _irregular_study(study, tmp_path / "study")
    with pytest.raises(InputError) as caught:
        run(_config(folder, bundle, tmp_path / "out"))
    message = str(caught.value)
    assert "3 problem(s)" in message and "--allow-resample" in message
    assert "ART:" in message and "uniform slice spacing" in message
    assert "PVP:" in message and "gap of" in message and "missing slice" in message
    assert "DEL:" in message and "gantry tilt" in message
    assert _nothing_left(tmp_path / "out")


def test_irregular_series_resampled_on_request(study: Path, bundle: Path, tmp_path: Path,
                                               require_tool: Callable[[str], str]) -> None:
    folder = _irregular_study(study, tmp_path / "study")
    result = run(_config(folder, bundle, tmp_path / "out", allow_resample=True, qc=False))
    assert set(result.report["phases"]["regridded"]) == {"ART", "PVP", "DEL"}
    assert any("gap of" in w for w in result.report["warnings"])
    assert any("gantry tilt" in w for w in result.report["warnings"])
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in _files(_series_folder(folder, Phase.PVP))]
    source = sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))  # along the normal (+z)
    assert len(source) == 11
    seg_labels = read_seg(tmp_path / "out" / "seg.dcm", source)
    assert seg_labels.shape == (11, 40, 40)
    # the regular grid fills the missing slice: 12 slices, and the SEG slices are 11 of them
    assert result.labels.shape == (12, 40, 40)
    kept = [k for k in range(12) if k != 6]  # the grid runs along the normal (ascending z), files descend
    np.testing.assert_array_equal(seg_labels, result.labels.array[kept])
    tool = require_tool("dciodvfy")
    checked = subprocess.run([tool, str(tmp_path / "out" / "seg.dcm")], capture_output=True, text=True, timeout=60)
    assert [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")] == []


def test_corrupt_pixel_payload_refused(study: Path, bundle: Path, tmp_path: Path) -> None:
    folder = _copy(study, tmp_path / "study")
    _edit(_files(_series_folder(folder, Phase.ART))[4], lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))
    with pytest.raises(InputError, match=r"ART: .*expected pixel data that can be decoded"):
        run(_config(folder, bundle, tmp_path / "out"))
    assert _nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------- atomic output


def test_existing_output_refused_and_overwrite_replaces(baseline: InferResult, study: Path, bundle: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match="found an existing one"):
        run(_config(study, bundle, out))
    assert (out / "old.txt").exists()
    inside = study / "results"
    with pytest.raises(InputError, match="outside the input folder"):
        run(_config(study, bundle, inside))
    assert not inside.exists()

    def broken_qc(*args: object, **kwargs: object) -> None:
        raise InputError("QC: expected to fail for the test, found it failing")

    monkeypatch.setattr("d4m.runtime.infer.write_qc", broken_qc)
    with pytest.raises(InputError, match="QC: expected to fail"):
        run(_config(_copy(study, tmp_path / "pvp", (Phase.PVP,)), bundle, out, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert not list(tmp_path.glob(".out*"))


def test_engine_failure_leaves_nothing(study: Path, bundle: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise EngineError("segmenter.onnx: expected a successful run, found a failure")

    monkeypatch.setattr("d4m.runtime.segmentation.sliding_window_inference", failing)
    with pytest.raises(EngineError):
        run(_config(_copy(study, tmp_path / "study", (Phase.PVP,)), bundle, tmp_path / "out"))
    assert _nothing_left(tmp_path / "out")


def test_non_finite_scores_are_an_engine_failure(study: Path, bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_predictor(runner: object) -> object:
        def predict(batch: np.ndarray) -> np.ndarray:
            return np.full((batch.shape[0], 3, *batch.shape[2:]), np.nan, np.float32)
        return predict

    monkeypatch.setattr("d4m.runtime.infer.as_predictor", nan_predictor)
    with pytest.raises(EngineError, match="expected finite scores, found NaN or infinity"):
        run(_config(_copy(study, tmp_path / "study", (Phase.PVP,)), bundle, tmp_path / "out"))
    assert _nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------- trained bundle (slow)


@pytest.mark.slow
def test_trained_bundle_dice_for_every_phase_combination(tmp_path: Path) -> None:
    """Train the tiny segmenter on phantom studies, export it, segment a held-out study per phase subset."""
    pytest.importorskip("torch")
    results = kit.trained_bundle_dice(tmp_path)
    print(json.dumps(results, indent=1))
    assert len(results) == 15
    assert results["NC+ART+PVP+DEL"]["liver_dice"] > 0.8 and results["PVP"]["liver_dice"] > 0.7
    assert all(r["liver_dice"] > 0.5 for r in results.values())
