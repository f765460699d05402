"""Preprocessing shared by training and inference: window + z-score, resampling, stacking."""

from __future__ import annotations

import numpy as np
import pytest

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime.preprocess import (
    Normalization,
    compute_normalization,
    normalize,
    prepare_input,
    resample_like,
    resample_to_spacing,
    stack_phases,
)


def test_compute_normalization_uses_clipped_foreground_only() -> None:
    volume = np.full((4, 4, 4), -1000.0)
    volume[1:3, 1:3, 1:3] = [[[0, 100], [300, 50]], [[10, 20], [30, -500]]]
    mask = np.zeros_like(volume, dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    norm = compute_normalization([volume], [mask], (-21.0, 189.0))
    expected = np.clip([0, 100, 300, 50, 10, 20, 30, -500], -21, 189)
    assert norm.mean == pytest.approx(expected.mean())
    assert norm.std == pytest.approx(expected.std())
    assert norm.hu_window == (-21.0, 189.0)


def test_compute_normalization_pools_several_volumes() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(60, 20, (5, 6, 7)), rng.normal(120, 10, (3, 4, 5))
    ma, mb = a > 50, b > 0
    norm = compute_normalization([a, b], [ma, mb], (-1000.0, 1000.0))
    pooled = np.concatenate([a[ma], b[mb]])
    assert norm.mean == pytest.approx(pooled.mean()) and norm.std == pytest.approx(pooled.std())


def test_compute_normalization_refuses_empty_and_mismatched() -> None:
    with pytest.raises(InputError, match="found none"):
        compute_normalization([np.zeros((2, 2, 2))], [np.zeros((2, 2, 2))])
    with pytest.raises(InputError, match="mask of shape"):
        compute_normalization([np.zeros((2, 2, 2))], [np.ones((2, 2, 3))])


def test_normalize_clips_then_zscores_in_float32() -> None:
    norm = Normalization((-21.0, 189.0), mean=100.0, std=50.0)
    out = normalize(np.array([-1000, -21, 100, 189, 3000], dtype=np.int16), norm)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-2.42, -2.42, 0.0, 1.78, 1.78], atol=1e-6)
    assert norm.background == pytest.approx(-2.42)


def test_normalization_round_trip_and_validation() -> None:
    norm = Normalization((-21, 189), 87.5, 41.25)
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(InputError, match="positive std"):
        Normalization(std=0.0)
    with pytest.raises(InputError, match="low < high"):
        Normalization((10.0, 10.0))
    with pytest.raises(InputError, match="hu_window, mean and std"):
        Normalization.from_dict({"mean": 1.0})


def _volume(shape=(10, 20, 30), spacing=(0.8, 0.8, 2.5)) -> Volume:
    direction = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)  # a rotated grid
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Volume(array, spacing, (-12.0, 30.5, 100.0), direction)


def test_resample_keeps_origin_direction_and_extent() -> None:
    volume = _volume()
    out = resample_to_spacing(volume, (1.6, 1.6, 5.0))
    assert out.shape == (5, 10, 15)
    assert out.spacing == (1.6, 1.6, 5.0)
    assert out.origin == volume.origin
    np.testing.assert_allclose(out.direction, volume.direction)
    assert out.array.dtype == np.float32
    # linear interpolation of a linear ramp is exact at interior grid points
    k, j, i = 2, 3, 4
    source = np.array([i * 2, j * 2, k * 2])  # index in the input grid
    expected = volume.array[source[2], source[1], source[0]]
    assert out.array[k, j, i] == pytest.approx(expected, rel=1e-5)


def test_resample_labels_with_nearest_keeps_values_and_type() -> None:
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[2:6, 4:12, 4:12] = 1
    labels[3:5, 6:10, 6:10] = 2
    volume = Volume(labels, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    fine = resample_to_spacing(volume, (0.5, 0.5, 1.0), "nearest")
    assert fine.array.dtype == np.uint8 and set(np.unique(fine.array)) == {0, 1, 2}
    assert fine.shape == (16, 32, 32)
    back = resample_like(fine, volume, "nearest")
    assert back.same_grid(volume)
    np.testing.assert_array_equal(back.array, labels)


def test_resample_same_spacing_is_identity_and_bad_spacing_refused() -> None:
    volume = _volume()
    assert resample_to_spacing(volume, volume.spacing) is volume
    with pytest.raises(InputError, match="three positive spacings"):
        resample_to_spacing(volume, (1.0, 0.0, 1.0))


def test_stack_phases_orders_channels_and_checks_grid() -> None:
    base = _volume((4, 5, 6))
    volumes = {p: base.with_array(np.full(base.shape, n, np.int16)) for n, p in enumerate(PHASE_ORDER)}
    stacked = stack_phases(volumes)
    assert stacked.shape == (4, 4, 5, 6) and stacked.dtype == np.float32
    assert [float(stacked[c, 0, 0, 0]) for c in range(4)] == [0, 1, 2, 3]
    reordered = stack_phases(volumes, (Phase.PVP, Phase.NC))
    assert reordered.shape[0] == 2 and reordered[0, 0, 0, 0] == 2
    shifted = Volume(base.array, base.spacing, (0.0, 0.0, 0.0), base.direction)
    with pytest.raises(InputError, match="DEL: expected the grid of NC"):
        stack_phases({**volumes, Phase.DEL: shifted})
    with pytest.raises(InputError, match=r"\['ART'\] missing"):
        stack_phases({p: v for p, v in volumes.items() if p is not Phase.ART})


def test_prepare_input_fills_resamples_and_normalizes() -> None:
    base = Volume(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 2.0), (5.0, 6.0, 7.0))
    pvp = base.with_array(np.full(base.shape, 150.0, np.float32))
    nc = base.with_array(np.full(base.shape, 50.0, np.float32))
    norm = Normalization((-21.0, 189.0), mean=100.0, std=50.0)
    prepared = prepare_input({Phase.PVP: pvp, Phase.NC: nc}, norm, (2.0, 2.0, 2.0))
    assert prepared.image.shape == (4, 4, 4, 4) and prepared.image.dtype == np.float32
    assert prepared.duplicated == {Phase.ART: Phase.PVP, Phase.DEL: Phase.PVP}
    np.testing.assert_allclose(prepared.image[:, 1, 1, 1], [-1.0, 1.0, 1.0, 1.0], atol=1e-6)
    assert prepared.grid.spacing == (2.0, 2.0, 2.0) and prepared.grid.origin == base.origin
    same = prepare_input({Phase.PVP: pvp}, norm, None)
    assert same.image.shape == (4, 4, 8, 8) and same.grid.same_grid(base)
