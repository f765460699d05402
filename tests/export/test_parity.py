"""Parity measurements: statistics, gates, randomised weights, and the study-level sliding-window agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.errors import EngineError
from d4m.export.parity import (
    TOLERANCES,
    Comparison,
    Statistic,
    Tolerance,
    compare,
    label_dice,
    predictor_agreement,
    randomize_weights,
)
from d4m.runtime.manifest import Precision


def test_label_dice_counts_each_label_and_absent_labels_agree() -> None:
    a = np.array([0, 1, 1, 2, 2, 0])
    b = np.array([0, 1, 2, 2, 2, 0])
    assert label_dice(a, b, (1, 2, 3)) == {1: pytest.approx(2 / 3), 2: pytest.approx(0.8), 3: 1.0}


def test_compare_statistics_and_argmax_dice() -> None:
    reference = np.zeros((1, 3, 2, 2, 2), np.float32)
    reference[0, 1] = 2.0  # argmax: liver everywhere
    actual = reference.copy()
    actual[0, 2, 0, 0, 0] = 3.0  # one voxel flips to tumour
    result = compare("logits", reference, actual, class_axis=1)
    assert result.max_abs == 3.0 and result.mean_abs == pytest.approx(3.0 / 24) and result.median_abs == 0.0
    assert result.reference_max == 2.0
    assert result.dice == {1: pytest.approx(14 / 15), 2: 0.0}
    assert not result.passes(TOLERANCES[Precision.FP32])


def test_compare_refuses_other_shapes_and_nan() -> None:
    with pytest.raises(EngineError, match=r"output 'x': expected shape \(2,\) as in the reference, found \(3,\)"):
        compare("x", np.zeros(2), np.zeros(3))
    with pytest.raises(EngineError, match=r"output 'x': expected finite values, found 1 NaN"):
        compare("x", np.zeros(2), np.array([0.0, np.nan]))


def test_tolerance_bound_is_absolute_plus_relative_on_the_chosen_statistic() -> None:
    gate = Tolerance(atol=1e-3, rtol=1e-2, statistic=Statistic.MEDIAN, min_dice=0.5)
    assert gate.bound(10.0) == pytest.approx(0.101)
    inside = Comparison("y", max_abs=5.0, mean_abs=0.2, median_abs=0.1, reference_max=10.0)
    assert inside.passes(gate)  # a large max does not matter for a median gate
    assert not Comparison("y", 5.0, 0.2, 0.102, 10.0).passes(gate)
    assert not Comparison("y", 0.0, 0.0, 0.0, 10.0, {1: 0.4}).passes(gate)


def test_randomize_weights_replaces_zero_initialised_layers_reproducibly() -> None:
    from monai.networks.nets import DiffusionModelUNet

    def fresh() -> DiffusionModelUNet:
        return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
                                  attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)

    net = fresh()
    zero = [n for n, p in net.named_parameters() if float(p.detach().abs().max()) == 0.0]
    assert zero  # MONAI zero-initialises the output convolution
    a, b = randomize_weights(fresh(), seed=4), randomize_weights(fresh(), seed=4)
    assert all(float(p.detach().abs().max()) > 0 for p in a.parameters())
    assert all(bool((p == q).all()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = randomize_weights(fresh(), seed=5)
    assert any(not bool((p == q).all()) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_predictor_agreement_runs_the_runtime_sliding_window() -> None:
    image = np.random.default_rng(0).standard_normal((4, 20, 24, 24)).astype(np.float32)

    def reference(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([batch[:, :1] * 0, batch[:, 1:2], batch[:, 2:3]], axis=1)

    def shifted(batch: np.ndarray) -> np.ndarray:
        return reference(batch) + 1e-6

    same = predictor_agreement(image, reference, shifted, (16, 16, 16), overlap=0.5)
    assert same["dice"] == {"1": 1.0, "2": 1.0} and 0 < same["max_abs"] <= 1e-5
    assert same["shape"] == [4, 20, 24, 24] and sum(same["voxels"]["1"]) > 0

    def swapped(batch: np.ndarray) -> np.ndarray:
        out = reference(batch)
        return out[:, [0, 2, 1]]

    assert predictor_agreement(image, reference, swapped, (16, 16, 16))["dice"]["1"] < 0.1


@pytest.mark.slow
def test_sliding_window_segmentation_of_a_phantom_study_onnx_vs_torch(segmenter_run: Path, tmp_path: Path) -> None:
    """The issue's study gate: the same runtime sliding window, torch vs ONNX Runtime, Dice >= 0.999 per label."""
    from d4m.export.bundle_writer import load_segmenter_run, phantom_study
    from d4m.export.onnx_export import export_segmenter
    from d4m.runtime.runners import OnnxRuntimeRunner, as_predictor
    from d4m.training.segmenter import torch_predictor

    run = load_segmenter_run(segmenter_run)
    config = run.config
    study = phantom_study(config)
    model = export_segmenter(run.network, 4, config.patch_size, tmp_path / "seg.onnx")
    with OnnxRuntimeRunner(model.path, threads=2) as runner:
        result = predictor_agreement(study.image, torch_predictor(run.network, "cpu"), as_predictor(runner),
                                     config.patch_size, config.overlap, config.normalization.background)
    assert result["shape"] == [4, 48, 128, 128]
    assert all(v[0] > 1000 for v in result["voxels"].values())  # both labels really present
    assert min(result["dice"].values()) >= 0.999, result
