"""scan_folder: what it indexes, what it skips and why, what it never keeps."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.reader import read_series_datasets
from d4m.dicom_io.seg_writer import write_seg
from d4m.dicom_io.series import FolderIndex, SeriesInfo, StudyInfo, parse_time, scan_folder


def _save_header(path: Path, sop_class: str, modality: str, **attrs: object) -> None:
    """A minimal non-CT object with file meta, enough for the header scan."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_scan_indexes_series_facts_in_seconds(ct_series: tuple[Path, list[Path], object]) -> None:
    root, files, volume = ct_series
    index = scan_folder(root)
    assert isinstance(index, FolderIndex) and index.skipped == ()
    study = index.only_study()
    assert isinstance(study, StudyInfo) and study.study_date == "20240101"
    (series,) = index.series
    assert series.series_number == 3 and series.description == "PVP 1.5mm" and series.label == "series 3 'PVP 1.5mm'"
    assert series.modality == "CT" and series.n_instances == 20 and set(series.files) == set(files)
    assert series.display_names[0] == "series3/003_0001.dcm"
    assert (series.rows, series.cols) == (64, 48)
    assert series.image_orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert series.contrast_agent == "Iomeprol 350" and series.contrast_route == "IV"
    assert series.contrast_start_time == 10 * 3600 + 14 * 60
    assert series.acquisition_time == pytest.approx(10 * 3600 + 15 * 60 + 30.25)
    assert series.series_time == pytest.approx(series.acquisition_time)
    assert series.image_type == ("ORIGINAL", "PRIMARY", "AXIAL") and series.body_part == "ABDOMEN"
    assert series.kvp == 120.0 and series.slice_thickness == 2.5 and series.manufacturer == "d4m phantom"
    assert index.get_series(series.series_uid) is series


def test_scan_keeps_no_patient_identifiers(ct_series: tuple[Path, list[Path], object]) -> None:
    root, _, _ = ct_series
    index = scan_folder(root)
    names = {f.name.lower() for cls in (SeriesInfo, StudyInfo, FolderIndex) for f in dataclasses.fields(cls)}
    assert not {n for n in names if "patient" in n or "birth" in n or "accession" in n}
    text = repr(index)
    assert "SECRETNAME" not in text and "PID-SECRET" not in text


def test_scan_finds_nested_files_without_extension_or_preamble(ct_series: tuple[Path, list[Path], object]) -> None:
    root, files, _ = ct_series
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    shutil.move(files[0], deep / "IM0001")
    raw = files[1].read_bytes()
    assert raw[128:132] == b"DICM"
    files[1].write_bytes(raw[132:])  # no preamble, no DICM prefix: a bare group-0002 stream
    index = scan_folder(root)
    (series,) = index.series
    assert series.n_instances == 20 and index.skipped == ()
    assert "a/b/c/IM0001" in series.display_names


def test_scan_skips_with_a_reason_per_file(ct_series: tuple[Path, list[Path], object], tmp_path: Path) -> None:
    root, files, _ = ct_series
    junk = root / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not dicom at all\n" * 20)
    (junk / "empty.dcm").write_bytes(b"")
    _save_header(junk / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.11", "SR")
    _save_header(junk / "mr.dcm", "1.2.840.10008.5.1.4.1.1.4", "MR")
    _save_header(junk / "enhanced.dcm", "1.2.840.10008.5.1.4.1.1.2.1", "CT")
    _save_header(junk / "DICOMDIR", "1.2.840.10008.1.3.10", "")
    scout = pydicom.dcmread(files[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.SeriesInstanceUID = generate_uid()
    scout.save_as(junk / "scout", enforce_file_format=True)
    no_pixels = pydicom.dcmread(files[0])
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.save_as(junk / "nopixels.dcm", enforce_file_format=True)
    shutil.copy(files[5], junk / "copy.dcm")
    source = read_series_datasets(scan_folder(root).series[0])
    write_seg(np.zeros((20, 64, 48), np.uint8), source, junk / "seg.dcm")

    index = scan_folder(root)
    reasons = {item.path.as_posix(): item.reason for item in index.skipped}
    assert reasons["junk/notes.txt"] == "not a DICOM file"
    assert reasons["junk/empty.dcm"] == "empty file"
    assert reasons["junk/sr.dcm"].startswith("non-image object") and "SR" in reasons["junk/sr.dcm"]
    assert reasons["junk/seg.dcm"] == "non-image object: Segmentation Storage"
    assert "modality MR" in reasons["junk/mr.dcm"]
    assert "Enhanced CT" in reasons["junk/enhanced.dcm"] and "multiframe" in reasons["junk/enhanced.dcm"]
    assert reasons["junk/DICOMDIR"] == "DICOMDIR index file"
    assert reasons["junk/scout"].startswith("localizer")
    assert reasons["junk/nopixels.dcm"] == "missing pixel data"
    # the walk is in sorted path order: junk/ comes first, so the original is the one reported
    assert reasons["series3/003_0006.dcm"] == "duplicate SOPInstanceUID of junk/copy.dcm"
    assert len(index.skipped) == 10
    assert index.skipped_reasons()["empty file"] == 1
    (series,) = index.series
    assert series.n_instances == 20


def test_scan_groups_studies_and_series(tmp_path: Path, make_volume) -> None:  # noqa: ANN001 - fixture
    small = make_volume(shape=(3, 8, 8))
    study_a = CTSeriesMeta(series_number=2)
    write_ct_series(small, tmp_path / "a2", study_a)
    write_ct_series(small, tmp_path / "a1", dataclasses.replace(study_a, series_uid=generate_uid(), series_number=1))
    write_ct_series(small, tmp_path / "b", CTSeriesMeta(series_number=7))
    index = scan_folder(tmp_path)
    assert len(index.studies) == 2 and len(index.series) == 3
    numbers = [s.series_number for s in index.studies[study_a.study_uid].series.values()]
    assert numbers == [1, 2]
    with pytest.raises(InputError, match="expected exactly one CT study, found 2 studies"):
        index.only_study()
    with pytest.raises(InputError, match="expected a CT series with UID 1.2.3"):
        index.get_series("1.2.3")


def test_scan_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a folder of DICOM files, found nothing"):
        scan_folder(tmp_path / "nope")
    assert scan_folder(tmp_path).studies == {}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("101530.25", 36930.25), ("1015", 36900.0), ("10:15:30", 36930.0), ("", None), ("25", None), ("ab", None)],
)
def test_parse_time(text: str, seconds: float | None) -> None:
    assert parse_time(text) == (pytest.approx(seconds) if seconds is not None else None)
