"""Volume geometry: affine, SimpleITK round trip, NIfTI round trip with an oblique, feet-first grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image, write_image


def _oblique() -> Volume:
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rot @ np.diag([1.0, 1.0, -1.0])  # feet-first: slices go towards the feet
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    return Volume(array, (0.7, 0.8, 2.5), (-120.5, 33.25, 410.0), direction)


def test_affine_maps_indices_to_lps() -> None:
    vol = _oblique()
    image = vol.to_sitk()
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        expected = image.TransformIndexToPhysicalPoint(index)
        got = vol.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(got[:3], expected, atol=1e-9)


def test_sitk_and_nifti_round_trips_keep_geometry(tmp_path: Path) -> None:
    vol = _oblique()
    back = Volume.from_sitk(vol.to_sitk())
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine)
    write_image(vol, tmp_path / "v.nii.gz")
    nifti = read_image(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(nifti.array, vol.array)
    np.testing.assert_allclose(nifti.affine, vol.affine, atol=1e-4)
    # an independent reader of the NIfTI header agrees (SimpleITK's own image, not our conversion)
    image = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    expected = (vol.affine @ [6, 5, 4, 1])[:3]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((6, 5, 4)), expected, atol=1e-3)
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(InputError, match="expected a 3D array"):
        Volume(np.zeros((2, 2)), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputError, match="three positive spacings"):
        Volume(np.zeros((2, 2, 2)), (1, 0, 1), (0, 0, 0))
    with pytest.raises(InputError, match="orthonormal"):
        Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), np.ones((3, 3)))
    with pytest.raises(InputError, match="expected an image file"):
        read_image(Path("/nonexistent/x.nii.gz"))
