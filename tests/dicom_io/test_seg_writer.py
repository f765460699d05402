"""write_seg / read_seg: valid DICOM-SEG on the source grid, binary and labelmap, read back by two readers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.reader import read_series, read_series_datasets
from d4m.dicom_io.seg_writer import package_version, read_seg, write_seg
from d4m.dicom_io.series import scan_folder
from d4m.dicom_io.volume import Volume

Series = tuple[Path, list[Path], Volume]


@pytest.fixture
def source(ct_series: Series) -> list[pydicom.Dataset]:
    (series,) = scan_folder(ct_series[0]).series
    return read_series_datasets(series)


@pytest.fixture
def labels() -> np.ndarray:
    """Liver block with a tumor inside; the tumor touches only a few slices, slice 0 is empty."""
    out = np.zeros((20, 64, 48), dtype=np.uint8)
    out[3:16, 10:50, 8:40] = 1
    out[6:9, 20:28, 15:25] = 2
    return out


def test_binary_seg_keeps_every_frame_and_references_the_series(
    tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset], phantom_meta: CTSeriesMeta
) -> None:
    given = labels.copy()
    path = write_seg(labels, source, tmp_path / "out" / "seg.dcm", series_number=901, description="d4m test")
    np.testing.assert_array_equal(labels, given)  # input untouched
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames == 20 * 2
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert seg.SeriesNumber == 901 and seg.SeriesDescription == "d4m test"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom_meta.series_uid
    assert seg.FrameOfReferenceUID == phantom_meta.frame_of_reference_uid
    assert seg.StudyInstanceUID == phantom_meta.study_uid
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["liver", "liver tumor"]
    assert segments[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert len(segments[1].RecommendedDisplayCIELabValue) == 3
    algorithm = segments[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "d4m" and algorithm.AlgorithmVersion == package_version()
    assert [p.name for p in path.parent.iterdir()] == ["seg.dcm"]  # no temporary file left


def test_binary_seg_passes_dciodvfy(
    tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset], require_tool: Callable[[str], str]
) -> None:
    tool = require_tool("dciodvfy")
    path = write_seg(labels, source, tmp_path / "seg.dcm")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_seg_reads_back_identically_with_read_seg_and_highdicom(
    tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset], seg_type: str
) -> None:
    path = write_seg(labels, source, tmp_path / "seg.dcm", seg_type=seg_type)
    np.testing.assert_array_equal(read_seg(path, source), labels)
    seg = hd.seg.segread(path)
    theirs = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(theirs, labels)


def test_labelmap_stores_one_frame_per_slice(tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset]) -> None:
    seg = pydicom.dcmread(write_seg(labels, source, tmp_path / "seg.dcm", seg_type="labelmap"))
    assert seg.SegmentationType == "LABELMAP" and seg.NumberOfFrames == 20


def test_read_seg_follows_referenced_instances_not_frame_order(
    tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset]
) -> None:
    path = write_seg(labels, source, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_seg(path, source[::-1]), labels[::-1])
    order = np.random.default_rng(1).permutation(len(source))
    np.testing.assert_array_equal(read_seg(path, [source[i] for i in order]), labels[order])


def test_seg_lies_on_the_read_series_grid(
    tmp_path: Path, ct_series: Series, labels: np.ndarray, source: list[pydicom.Dataset]
) -> None:
    """highdicom's geometry of the SEG equals the affine of read_series (voxel for voxel)."""
    path = write_seg(labels, source, tmp_path / "seg.dcm")
    volume = read_series(scan_folder(ct_series[0]).series[0])
    seg_volume = hd.seg.segread(path).get_volume(combine_segments=True)
    ijk = np.argwhere(labels == 2)[:, ::-1]  # (i, j, k) of the tumor voxels
    ours = (volume.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    theirs_index = np.round(np.linalg.solve(seg_volume.affine, np.c_[ours, np.ones(len(ours))].T).T[:, :3]).astype(int)
    values = seg_volume.array[tuple(theirs_index.T)]  # highdicom volumes are indexed in its own axis order
    assert np.all(values == 2)


def test_empty_tumor_still_has_two_segments(tmp_path: Path, source: list[pydicom.Dataset]) -> None:
    liver_only = np.zeros((20, 64, 48), dtype=np.uint8)
    liver_only[5:10, 5:10, 5:10] = 1
    path = write_seg(liver_only, source, tmp_path / "seg.dcm")
    assert pydicom.dcmread(path).NumberOfFrames == 40
    np.testing.assert_array_equal(read_seg(path, source), liver_only)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda a: a[:, :32], r"expected shape \(20, 64, 48\) \(slices, rows, columns\), found \(20, 32, 48\)"),
        (lambda a: np.where(a == 2, 7, a).astype(np.uint8), r"expected values in \[0, 1, 2\], found \[7\]"),
        (lambda a: a.astype(np.float32), "expected an integer label volume, found dtype float32"),
    ],
)
def test_bad_labels_are_refused(
    tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset], change: Callable, pattern: str
) -> None:
    with pytest.raises(InputError, match=pattern):
        write_seg(change(labels), source, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_bad_seg_type_is_refused(tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset]) -> None:
    with pytest.raises(InputError, match="expected one of binary, labelmap, found 'fractional'"):
        write_seg(labels, source, tmp_path / "seg.dcm", seg_type="fractional")


def test_read_seg_refuses_other_series_and_non_seg(
    tmp_path: Path, labels: np.ndarray, source: list[pydicom.Dataset], volume: Volume, ct_series: Series
) -> None:
    path = write_seg(labels, source, tmp_path / "seg.dcm")
    other_files = write_ct_series(volume, tmp_path / "other", CTSeriesMeta())
    other = read_series_datasets(other_files)
    with pytest.raises(InputError, match="seg.dcm: expected a SEG referencing the given series, found none of its 20"):
        read_seg(path, other)
    with pytest.raises(InputError, match="003_0001.dcm: expected a DICOM-SEG"):
        read_seg(ct_series[1][0], source)
