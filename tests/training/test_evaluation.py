"""Metrics against hand-computed values, empty-mask conventions, HD95 on known shapes, evaluate()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime.preprocess import Normalization
from d4m.runtime.segmentation import SegmentationSpec
from d4m.training.datasets import Case
from d4m.training.evaluation import (
    EvaluationConfig,
    case_metrics,
    dice,
    every_phase_subset,
    hd95,
    jaccard,
    lesion_detection,
    phase_set_name,
    precision,
    segment_volumes,
    sensitivity,
    shared_phases,
    summarize,
    write_results,
)


def _masks() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((1, 1, 10), bool)
    truth = np.zeros((1, 1, 10), bool)
    pred[0, 0, :6] = True    # 6 predicted
    truth[0, 0, 2:10] = True  # 8 true, overlap 4
    return pred, truth


def test_voxel_metrics_by_hand() -> None:
    pred, truth = _masks()
    assert dice(pred, truth) == pytest.approx(2 * 4 / (6 + 8))
    assert jaccard(pred, truth) == pytest.approx(4 / 10)
    assert sensitivity(pred, truth) == pytest.approx(4 / 8)
    assert precision(pred, truth) == pytest.approx(4 / 6)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((3, 3, 3), bool)
    full = np.ones((3, 3, 3), bool)
    assert dice(empty, empty) == 1.0 and jaccard(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert math.isnan(sensitivity(full, empty)) and math.isnan(precision(empty, full))
    assert sensitivity(empty, full) == 0.0 and precision(full, empty) == 0.0
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(hd95(full, empty, (1, 1, 1)))


def test_hd95_on_known_shapes() -> None:
    a = np.zeros((20, 20, 40), bool)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = True
    b[5:15, 5:15, 8:18] = True               # the same cube shifted 3 voxels along x
    assert hd95(a, a, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(a, b, (0.5, 2.0, 3.0)) == pytest.approx(1.5)    # x spacing 0.5 mm
    c = np.zeros_like(a)
    c[5:15, 5:15, 25:35] = True              # 20 voxels away along x
    assert hd95(a, c, (1.0, 1.0, 1.0)) == pytest.approx(20.0)
    # a single far outlier voxel moves the maximum but hardly the 95th percentile
    d = a.copy()
    d[0, 0, 39] = True
    assert hd95(a, d, (1.0, 1.0, 1.0)) < 2.0
    assert hd95(a, d, (1.0, 1.0, 1.0)) == hd95(d, a, (1.0, 1.0, 1.0))


def test_lesion_detection_by_overlap() -> None:
    truth = np.zeros((10, 10, 30), bool)
    pred = np.zeros_like(truth)
    truth[2:4, 2:4, 2:4] = True      # lesion A: found
    truth[2:4, 2:4, 10:12] = True    # lesion B: missed
    truth[6:8, 6:8, 20:22] = True    # lesion C: found by a prediction touching one voxel
    pred[2:4, 2:4, 3:5] = True
    pred[7:9, 7:9, 21:23] = True
    pred[0, 9, 29] = True            # false positive
    found = lesion_detection(pred, truth)
    counts = (found.true_lesions, found.predicted_lesions, found.detected, found.true_positive_predictions)
    assert counts == (3, 3, 2, 2)
    assert found.recall == pytest.approx(2 / 3) and found.precision == pytest.approx(2 / 3)
    assert found.f1 == pytest.approx(2 / 3)
    none = lesion_detection(np.zeros_like(pred), np.zeros_like(truth))
    assert none.f1 == 1.0 and math.isnan(none.recall) and math.isnan(none.precision)
    only_fp = lesion_detection(pred, np.zeros_like(truth))
    assert only_fp.f1 == 0.0 and only_fp.precision == 0.0 and math.isnan(only_fp.recall)
    assert math.isnan(found.measurable_recall), "8 voxels of 1 mm³: 2.5 mm, no measurable lesion"
    sized = lesion_detection(pred, truth, (4.0, 4.0, 5.0))  # 8 × 80 mm³: 10.7 mm each
    assert (sized.measurable_lesions, sized.measurable_detected) == (3, 2)
    truth[2:4, 2:4, 12] = True       # B grows to 12 voxels
    smaller = lesion_detection(pred, truth, (3.5, 3.5, 5.0))  # 61.25 mm³ voxels: A, C 9.8 mm, B 11.2 mm
    assert (smaller.measurable_lesions, smaller.measurable_detected) == (1, 0)


def test_case_metrics_on_label_maps() -> None:
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[:, 1:7, 1:7] = 1
    truth[1:3, 3:5, 3:5] = 2
    pred = truth.copy()
    pred[1:3, 3:5, 4] = 1            # half the tumour predicted as liver
    metrics = case_metrics(pred, truth, (1.0, 1.0, 2.0))
    assert metrics["liver_dice"] == 1.0
    assert metrics["tumor_dice"] == pytest.approx(2 * 4 / (4 + 8))
    assert metrics["tumor_sensitivity"] == pytest.approx(0.5) and metrics["tumor_precision"] == 1.0
    assert metrics["lesion_recall"] == 1.0 and metrics["true_lesions"] == 1.0


def test_summarize_skips_nan() -> None:
    rows = [{"tumor_dice": 0.5, "tumor_precision": math.nan}, {"tumor_dice": 1.0, "tumor_precision": 0.25}]
    summary = summarize(rows, ("tumor_dice", "tumor_precision"))
    assert summary == {"tumor_dice": 0.75, "tumor_precision": 0.25, "cases": 2.0}


def test_phase_subsets() -> None:
    subsets = every_phase_subset()
    assert len(subsets) == 15 and subsets[0] == PHASE_ORDER and len(set(subsets)) == 15
    assert phase_set_name([Phase.PVP, Phase.NC]) == "NC+PVP"
    assert EvaluationConfig(every_subset=True).chosen_phase_sets == subsets
    assert EvaluationConfig(phase_sets=(("PVP",),)).chosen_phase_sets == ((Phase.PVP,),)
    assert EvaluationConfig().chosen_phase_sets is None, "the default is evaluate_cases': the shared phases"
    # by default the phases every case has: the four, or PVP alone once a PVP-only case is in
    complete = Case("a", {p: Path(f"{p.value}.nii.gz") for p in PHASE_ORDER})
    pvp_only = Case("b", {Phase.PVP: Path("PVP.nii.gz")})
    assert shared_phases([complete]) == PHASE_ORDER
    assert shared_phases([complete, pvp_only]) == (Phase.PVP,)
    with pytest.raises(InputError, match="a phase that all 2 cases have"):
        shared_phases([pvp_only, Case("c", {Phase.NC: Path("NC.nii.gz")})])
    with pytest.raises(ValueError, match="split"):
        EvaluationConfig(split="holdout")


def test_segment_volumes_with_a_perfect_predictor_and_missing_phases() -> None:
    # a 'network' that thresholds the first channel: liver where z-scored intensity > -1,
    # tumour where > 1; with one phase given, every channel is that phase.
    truth = np.zeros((12, 20, 20), np.uint8)
    truth[2:10, 3:17, 3:17] = 1
    truth[4:7, 8:12, 8:12] = 2
    hu = np.where(truth == 2, 180.0, np.where(truth == 1, 100.0, -500.0)).astype(np.float32)
    volume = Volume(hu, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    norm = Normalization(mean=100.0, std=40.0)

    def predictor(batch: np.ndarray) -> np.ndarray:
        x = batch[:, 0]
        return np.stack([(x <= -1) * 1.0, ((x > -1) & (x <= 1)) * 1.0, (x > 1) * 1.0], axis=1).astype(np.float32)

    exact = SegmentationSpec(norm, (1.0, 1.0, 2.0), (8, 8, 8), 0.5)  # the input spacing: no resampling
    labels, duplicated = segment_volumes({Phase.PVP: volume}, predictor, exact)
    assert duplicated == {Phase.NC: Phase.PVP, Phase.ART: Phase.PVP, Phase.DEL: Phase.PVP}
    assert labels.same_grid(volume) and labels.array.dtype == np.uint8
    np.testing.assert_array_equal(labels.array, truth)
    coarse = SegmentationSpec(norm, (2.0, 2.0, 2.0), (8, 8, 8), 0.5)  # resampled there and back
    labels, _ = segment_volumes({Phase.PVP: volume, Phase.ART: volume}, predictor, coarse)
    assert labels.same_grid(volume) and dice(labels.array > 0, truth > 0) > 0.9


def test_write_results_files(tmp_path: Path) -> None:
    rows = [
        {"case": "a", "phases": "NC+ART+PVP+DEL", "duplicated": "", "seconds": 1.0, "tumor_counts": [4, 0, 4],
         **case_metrics(np.array([[[2, 2]]]), np.array([[[2, 2]]]), (1, 1, 1))},
        {"case": "a", "phases": "PVP", "duplicated": "NC<-PVP", "seconds": 1.0, "tumor_counts": [0, 0, 8],
         **case_metrics(np.array([[[0, 0]]]), np.array([[[2, 2]]]), (1, 1, 1))},
    ]
    result = write_results(tmp_path, rows, {"title": "T"})
    assert result["summary"]["NC+ART+PVP+DEL"]["tumor_dice"] == 1.0
    assert result["summary"]["PVP"]["tumor_dice"] == 0.0
    assert result["summary"]["PVP"]["tumor_hd95_mm"] is None, "NaN is written as null"
    assert result["summary"]["NC+ART+PVP+DEL"]["tumor_dice_global"] == pytest.approx(2 * 4 / (8 + 4))
    assert json.loads((tmp_path / "results.json").read_text())["schema_version"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "| PVP |" in table and "tumor_dice" in table
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("case,phases,duplicated,tumor_dice")
