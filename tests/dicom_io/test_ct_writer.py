"""write_ct_series: valid CT Image IOD, the tags the pipeline relies on, rounding, atomic writing."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

from d4m.dicom_io.ct_writer import CTSeriesMeta, PixelEncoding, write_ct_series
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume

Series = tuple[Path, list[Path], Volume]


def _dciodvfy_errors(tool: str, path: Path) -> list[str]:
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


@pytest.mark.parametrize("encoding", [PixelEncoding.EXPLICIT, PixelEncoding.RLE])
def test_dciodvfy_reports_nothing(
    tmp_path: Path, volume: Volume, phantom_meta: CTSeriesMeta, encoding: PixelEncoding, require_tool: Callable
) -> None:
    tool = require_tool("dciodvfy")
    meta = dataclasses.replace(phantom_meta, encoding=encoding)
    files = write_ct_series(volume, tmp_path / "s", meta)
    assert _dciodvfy_errors(tool, files[0]) == []
    assert _dciodvfy_errors(tool, files[-1]) == []
    no_contrast = write_ct_series(volume, tmp_path / "nc", CTSeriesMeta(encoding=encoding))
    assert _dciodvfy_errors(tool, no_contrast[0]) == []


def test_tags_describe_the_series(ct_series: Series, phantom_meta: CTSeriesMeta) -> None:
    _, files, volume = ct_series
    assert [f.name for f in files] == [f"003_{k:04d}.dcm" for k in range(1, 21)]
    datasets = [pydicom.dcmread(f) for f in files]
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and first.SOPClassUID == CTImageStorage
    assert first.Modality == "CT" and first.BodyPartExamined == "ABDOMEN" and first.PatientPosition == "FFS"
    assert first.ContrastBolusAgent == "Iomeprol 350" and first.AcquisitionTime == "101530.250000"
    assert first.SeriesDescription == "PVP 1.5mm" and first.SeriesNumber == 3
    assert first.PatientName == phantom_meta.patient_name and first.PatientID == phantom_meta.patient_id
    assert first.Manufacturer == "d4m phantom" and first.ReferringPhysicianName == ""
    assert "Laterality" not in first and first.PositionReferenceIndicator == ""
    assert first.StudyInstanceUID == phantom_meta.study_uid and first.SeriesInstanceUID == phantom_meta.series_uid
    assert first.FrameOfReferenceUID == phantom_meta.frame_of_reference_uid
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.7]  # [row spacing (j), column spacing (i)]
    assert float(first.SliceThickness) == 2.5 and float(first.SpacingBetweenSlices) == 2.5
    assert len({ds.SOPInstanceUID for ds in datasets}) == 20
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 21))
    for k, ds in enumerate(datasets):
        expected = volume.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected[:3], atol=1e-9)
    assert first.pixel_array.dtype == np.int16 and float(first.RescaleIntercept) == -1024.0
    np.testing.assert_array_equal(first.pixel_array.astype(np.float32) - 1024, volume.array[0])


def test_no_contrast_module_without_agent(tmp_path: Path, volume: Volume) -> None:
    files = write_ct_series(volume, tmp_path / "s", CTSeriesMeta(contrast_agent=None, patient_position="HFS"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "ContrastBolusAgent" not in ds and ds.PatientPosition == "HFS"


def test_values_are_rounded_and_clipped_with_a_count(
    tmp_path: Path, make_volume: Callable[..., Volume], caplog: pytest.LogCaptureFixture
) -> None:
    volume = make_volume(shape=(2, 4, 4))
    array = volume.array.copy()
    array[0, 0, :3] = [10.4, -10.6, 40000.0]
    array[1, 0, 0] = -40000.0
    meta = CTSeriesMeta(rescale_intercept=-2048.0, encoding="rle")
    with caplog.at_level(logging.WARNING, logger="d4m.dicom_io.ct_writer"):
        files = write_ct_series(volume.with_array(array), tmp_path / "s", meta)
    assert "2 voxel(s) outside the int16 range" in caplog.text
    first = pydicom.dcmread(files[0])
    assert first.file_meta.TransferSyntaxUID == RLELossless and float(first.RescaleIntercept) == -2048.0
    hu = first.pixel_array.astype(np.float64) - 2048
    assert hu[0, :3].tolist() == [10.0, -11.0, 32767.0 - 2048]
    assert pydicom.dcmread(files[1]).pixel_array[0, 0] == -32768


def test_existing_folder_is_refused(ct_series: Series, volume: Volume) -> None:
    root, files, _ = ct_series
    with pytest.raises(InputError, match="expected a new or empty folder"):
        write_ct_series(volume, files[0].parent, CTSeriesMeta())
    empty = root / "empty"
    empty.mkdir()
    assert len(write_ct_series(volume, empty, CTSeriesMeta())) == 20


def test_a_crash_leaves_no_half_series(tmp_path: Path, volume: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = pydicom.Dataset.save_as

    def failing_save(self: pydicom.Dataset, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        original(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_ct_series(volume, tmp_path / "s", CTSeriesMeta())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"encoding": "jpeg-lossy"}, "expected one of explicit, rle, jpeg-ls, jpeg2000, found 'jpeg-lossy'"),
        ({"acquisition_time": "25:00"}, r"expected HHMMSS\[\.ffffff\], found '25:00' / '115500' / '000000'"),
        ({"study_date": "2024-01-01"}, "expected YYYYMMDD, found '2024-01-01'"),
        ({"rescale_slope": 0.0}, "expected a positive number, found 0.0"),
    ],
)
def test_meta_is_validated(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        CTSeriesMeta(**changes)  # type: ignore[arg-type]


def test_file_pattern_must_name_each_slice(tmp_path: Path, volume: Volume) -> None:
    with pytest.raises(InputError, match="expected one plain file name per slice"):
        write_ct_series(volume, tmp_path / "s", CTSeriesMeta(file_pattern="same.dcm"))
    assert not (tmp_path / "s").exists()
