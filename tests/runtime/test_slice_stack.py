"""--allow-resample: irregular series onto a regular grid, and labels back onto the original slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.series import scan_folder
from d4m.dicom_io.volume import Volume
from d4m.runtime.slice_stack import labels_on_slices, read_regridded

SHAPE = (10, 24, 20)
SPACING = (2.0, 2.0, 4.0)


def _write(folder: Path, array: np.ndarray) -> list[Path]:
    volume = Volume(array.astype(np.float32), SPACING, (0.0, 0.0, 0.0), np.eye(3))
    return write_ct_series(volume, folder, CTSeriesMeta(description="test"))


def _series(folder: Path):  # noqa: ANN202 - SeriesInfo
    return scan_folder(folder).series[0]


def test_missing_slice_is_interpolated(tmp_path: Path) -> None:
    array = np.broadcast_to((np.arange(SHAPE[0]) * 10.0)[:, None, None], SHAPE).copy()
    files = _write(tmp_path / "s", array)
    files[4].unlink()
    stack = read_regridded(_series(tmp_path / "s"))
    assert stack.volume.shape == SHAPE and stack.volume.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(stack.volume.array, array, atol=1e-3)
    assert len(stack.datasets) == SHAPE[0] - 1
    assert any("gap of 8 mm" in note for note in stack.notes)


def test_tilt_is_undone_and_labels_go_back_to_the_tilted_slices(tmp_path: Path) -> None:
    array = np.full(SHAPE, -1000.0)
    array[:, 10:14, 6:12] = 200.0  # a straight column in patient space
    files = _write(tmp_path / "s", array)
    for k, path in enumerate(files):  # slice k moved by k pixels along y, its content by -k rows
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 2.0 * k, z]
        pixels = np.full_like(ds.pixel_array, ds.pixel_array.min())
        pixels[: SHAPE[1] - k] = ds.pixel_array[k:]
        ds.PixelData = pixels.tobytes()
        ds.save_as(path, enforce_file_format=True)
    stack = read_regridded(_series(tmp_path / "s"))
    assert any("gantry tilt" in note for note in stack.notes)
    # stored row s of slice k holds patient row s + k: rows 9.. are present in every slice
    np.testing.assert_allclose(stack.volume.array[:, 9:], array[:, 9:], atol=1e-3)
    labels = stack.volume.with_array((stack.volume.array > 0).astype(np.uint8))
    back = labels_on_slices(labels, stack.datasets)
    for k, ds in enumerate(stack.datasets):
        expected = (ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)) > 0
        np.testing.assert_array_equal(back[k][9:15], expected[9:15])
    assert back.any()


def test_other_size_slices_are_resampled_and_mixed_sizes_refused_for_a_seg(tmp_path: Path) -> None:
    array = np.full(SHAPE, 50.0)
    files = _write(tmp_path / "s", array)
    ds = pydicom.dcmread(files[3])
    ds.PixelData = ds.pixel_array[:20].tobytes()
    ds.Rows = 20
    ds.save_as(files[3], enforce_file_format=True)
    stack = read_regridded(_series(tmp_path / "s"))
    assert stack.volume.shape == SHAPE
    assert any("another size" in note for note in stack.notes)
    with pytest.raises(InputError, match="expected slices of one size for a DICOM-SEG"):
        labels_on_slices(stack.volume.with_array(np.zeros(SHAPE, np.uint8)), stack.datasets)


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    files = _write(tmp_path / "s", np.zeros(SHAPE))
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    ds.save_as(files[2], enforce_file_format=True)
    with pytest.raises(InputError, match="mixed orientations are not resampled"):
        read_regridded(_series(tmp_path / "s"))
