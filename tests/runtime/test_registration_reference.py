"""The fixed side of a registration prepared once: same results, faster helpers that match scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime import registration_reference as reference_module
from d4m.runtime.registration import RegistrationSettings, register_to_reference
from d4m.runtime.registration_reference import body_mask, normalized_mutual_information, prepare_reference

FAST = RegistrationSettings(shrink_factors=(4, 2), smoothing_sigmas_mm=(4.0, 1.0), iterations=15)


def _body(shape: tuple[int, int, int], shift_mm: float, seed: int) -> Volume:
    """An elliptic body with a fat ring, an organ and an air hole (a bowel loop) in every slice."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    x, y = (i - shape[2] / 2) * 2.0 - shift_mm, (j - shape[1] / 2) * 2.0
    hu = np.full(shape, -1000.0)
    inside = (x / 50) ** 2 + (y / 35) ** 2 <= 1
    hu[inside] = 40.0
    hu[inside & ((x / 45) ** 2 + (y / 30) ** 2 > 1)] = -90.0
    hu[((x + 15) / 18) ** 2 + (y / 14) ** 2 + ((k - shape[0] / 2) / 6) ** 2 <= 1] = 120.0
    hu[((x - 20) / 6) ** 2 + ((y - 5) / 5) ** 2 <= 1] = -1000.0  # air inside the body: a hole to fill
    hu += rng.normal(0, 8, shape)
    return Volume(hu.astype(np.float32), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0))


def test_fill_holes_per_slice_matches_scipy_slice_by_slice() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        mask = ndimage.binary_opening(rng.random((4, 37, 29)) > 0.45)
        expected = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
        np.testing.assert_array_equal(reference_module._fill_holes_per_slice(mask), expected)
    body = body_mask(_body((6, 48, 64), 0.0, 1))
    assert body[3, 24, 42]  # the air hole inside the body is filled (x = 20 mm from the centre)


def test_center_of_mass_matches_scipy_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    for shape in ((5, 7, 9), (30, 64, 48)):
        mask = rng.random(shape) > 0.7
        np.testing.assert_array_equal(reference_module._center_of_mass(mask), np.asarray(ndimage.center_of_mass(mask)))


def test_prepared_reference_gives_bit_identical_registrations_and_quality() -> None:
    fixed = _body((12, 48, 64), 0.0, 2)
    prepared = prepare_reference(fixed, None, FAST)
    assert prepared.region is not None and prepared.mask is not None
    window = FAST.intensity_window
    assert prepared.quality(fixed) == normalized_mutual_information(fixed, fixed, prepared.region, window)
    for seed, shift in ((3, 4.0), (4, -6.0)):
        moving = _body((12, 48, 64), shift, seed)
        alone = register_to_reference(moving, fixed, None, FAST)
        shared = register_to_reference(moving, fixed, prepared=prepared)
        assert shared.to_dict()["transform"] == alone.to_dict()["transform"]
        assert (shared.quality_after, shared.metric_after) == (alone.quality_after, alone.metric_after)
        np.testing.assert_array_equal(shared.image.array, alone.image.array)


def test_a_reference_prepared_from_another_image_or_settings_is_refused() -> None:
    fixed = _body((8, 32, 48), 0.0, 5)
    prepared = prepare_reference(fixed, None, FAST)
    other = _body((8, 32, 48), 0.0, 6)
    with pytest.raises(InputError, match="prepared reference"):
        register_to_reference(other, other, prepared=prepared)
    with pytest.raises(InputError, match="prepared reference"):
        register_to_reference(other, fixed, None, RegistrationSettings(), prepared=prepared)
