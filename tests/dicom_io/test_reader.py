"""read_series: exact round trips, geometry agreeing with independent readers, precise refusals."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import get_encoder
from pydicom.uid import MPEG2MPML, ImplicitVRLittleEndian, RLELossless, generate_uid

from d4m.dicom_io import series as series_module
from d4m.dicom_io.ct_writer import CTSeriesMeta, PixelEncoding, write_ct_series
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.reader import read_series, read_series_datasets
from d4m.dicom_io.series import scan_folder
from d4m.dicom_io.volume import Volume

Series = tuple[Path, list[Path], Volume]
SECRETS = ("SECRETNAME", "PHANTOM", "PID-SECRET-4711")


def _read_folder(root: Path, **kwargs: bool) -> Volume:
    (series,) = scan_folder(root).series
    return read_series(series, **kwargs)


def _assert_same(read: Volume, written: Volume) -> None:
    assert read.array.dtype == np.float32
    np.testing.assert_array_equal(read.array, written.array)
    np.testing.assert_allclose(read.affine, written.affine, atol=1e-6)


def _oblique() -> np.ndarray:
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.mark.parametrize(
    "direction",
    [np.diag([-1.0, 1.0, -1.0]), np.eye(3), np.diag([1.0, -1.0, -1.0]), _oblique()],
    ids=["feet-first", "head-first", "prone-like", "oblique"],
)
def test_round_trip_is_exact(tmp_path: Path, make_volume: Callable[..., Volume], direction: np.ndarray) -> None:
    volume = make_volume(direction=direction)
    write_ct_series(volume, tmp_path / "s", CTSeriesMeta())
    _assert_same(_read_folder(tmp_path), volume)


def test_feet_first_and_head_first_place_the_block_at_the_same_patient_position(
    tmp_path: Path, make_volume: Callable[..., Volume]
) -> None:
    """Two acquisitions of one object: the bright block must land at the same LPS point."""
    ffs = make_volume(direction=np.diag([-1.0, 1.0, -1.0]), spacing=(1.0, 1.0, 2.0), origin=(10.0, -5.0, 40.0))
    flipped = ffs.array[::-1, :, ::-1].copy()  # the same object seen with k and i reversed
    far_corner = ffs.affine @ np.array([ffs.shape[2] - 1, 0, ffs.shape[0] - 1, 1.0])
    hfs = Volume(flipped, (1.0, 1.0, 2.0), tuple(far_corner[:3]), np.eye(3))
    write_ct_series(ffs, tmp_path / "ffs" / "s", CTSeriesMeta(patient_position="FFS"))
    write_ct_series(hfs, tmp_path / "hfs" / "s", CTSeriesMeta(patient_position="HFS"))
    read_ffs, read_hfs = _read_folder(tmp_path / "ffs"), _read_folder(tmp_path / "hfs")

    def block_centre(v: Volume) -> np.ndarray:
        k, j, i = np.nonzero(v.array == 1500.0)
        return (v.affine @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]

    assert read_ffs.direction[2, 2] == pytest.approx(-1.0) and read_hfs.direction[2, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(block_centre(read_ffs), block_centre(read_hfs), atol=1e-6)
    np.testing.assert_allclose(block_centre(read_ffs), block_centre(ffs), atol=1e-6)


def test_left_handed_volume_reads_back_as_the_same_image_with_k_reversed(
    tmp_path: Path, make_volume: Callable[..., Volume]
) -> None:
    volume = make_volume(direction=np.diag([1.0, 1.0, -1.0]))
    write_ct_series(volume, tmp_path / "s", CTSeriesMeta())
    read = _read_folder(tmp_path)
    np.testing.assert_array_equal(read.array, volume.array[::-1])
    np.testing.assert_allclose(read.direction, np.eye(3), atol=1e-9)
    last = volume.affine @ np.array([0, 0, volume.shape[0] - 1, 1.0])
    np.testing.assert_allclose(read.origin, last[:3], atol=1e-6)


def test_file_names_folders_and_instance_numbers_do_not_change_the_order(ct_series: Series, tmp_path: Path) -> None:
    _, files, volume = ct_series
    messy = tmp_path / "messy"
    shuffled = list(files)
    random.Random(3).shuffle(shuffled)
    for n, path in enumerate(shuffled):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = (n * 7) % 20 + 1
        target = messy / f"d{n % 3}" / f"x{n % 2}" / f"{generate_uid()[-8:]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    _assert_same(_read_folder(messy), volume)
    _assert_same(read_series(sorted((p for p in messy.rglob("*") if p.is_file()), reverse=True)), volume)


def test_read_series_datasets_follow_the_volume_order(ct_series: Series) -> None:
    root, files, _ = ct_series
    (series,) = scan_folder(root).series
    datasets = read_series_datasets(series)
    assert [ds.SOPInstanceUID for ds in datasets] == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    assert "PixelData" not in datasets[0]
    assert "PixelData" in read_series_datasets(series, with_pixels=True)[0]


def test_matches_simpleitk_series_reader(ct_series: Series) -> None:
    root, files, volume = ct_series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files[0].parent)))
    theirs = Volume.from_sitk(reader.Execute())
    ours = _read_folder(root)
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    np.testing.assert_array_equal(ours.array, theirs.array.astype(np.float32))


def test_matches_dcm2niix(ct_series: Series, tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    dcm2niix = require_tool("dcm2niix")
    root, files, _ = ct_series
    out = tmp_path / "nifti"
    out.mkdir()
    subprocess.run(
        [dcm2niix, "-z", "n", "-b", "n", "-f", "vol", "-o", str(out), str(files[0].parent)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    (nifti,) = out.glob("*.nii")
    theirs = sitk.DICOMOrient(sitk.ReadImage(str(nifti)), "LPS")  # ITK reads NIfTI into LPS
    ours = sitk.DICOMOrient(_read_folder(root).to_sitk(), "LPS")
    np.testing.assert_allclose(theirs.GetOrigin(), ours.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(theirs.GetSpacing(), ours.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(theirs.GetDirection(), ours.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(theirs).astype(np.float32), sitk.GetArrayFromImage(ours))


@pytest.mark.parametrize("encoding", [PixelEncoding.RLE, PixelEncoding.JPEG_LS, PixelEncoding.JPEG2000])
def test_compressed_series_read_identically(tmp_path: Path, volume: Volume, encoding: PixelEncoding) -> None:
    if not get_encoder(encoding.transfer_syntax).is_available:
        pytest.skip(f"no {encoding.transfer_syntax.name} encoder installed (pyjpegls / pylibjpeg-openjpeg)")
    files = write_ct_series(volume, tmp_path / "s", CTSeriesMeta(encoding=encoding))
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == encoding.transfer_syntax
    _assert_same(_read_folder(tmp_path), volume)


def test_identical_duplicate_slice_is_dropped(ct_series: Series, edit_file: Callable[..., None]) -> None:
    root, files, volume = ct_series
    copy = root / "extra" / "dup.dcm"
    copy.parent.mkdir()
    shutil.copy(files[4], copy)
    edit_file(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    _assert_same(_read_folder(root), volume)


def _shift_position(ds: pydicom.Dataset, delta: np.ndarray) -> None:
    ds.ImagePositionPatient = [float(v) + float(d) for v, d in zip(ds.ImagePositionPatient, delta, strict=True)]


def _move(index: int, by: Callable[[Volume], np.ndarray]) -> Callable[[Series, Callable[..., None]], None]:
    def change(series: Series, edit: Callable[..., None]) -> None:
        _, files, volume = series
        delta = by(volume)
        edit(files[index], lambda ds: _shift_position(ds, delta))

    return change


def _delete(index: int) -> Callable[[Series, Callable[..., None]], None]:
    return lambda series, edit: series[1][index].unlink()


def _set(index: int, **attrs: object) -> Callable[[Series, Callable[..., None]], None]:
    def change(series: Series, edit: Callable[..., None]) -> None:
        def apply(ds: pydicom.Dataset) -> None:
            for key, value in attrs.items():
                setattr(ds, key, value)

        edit(series[1][index], apply)

    return change


def _tilt(series: Series, edit: Callable[..., None]) -> None:
    _, files, volume = series
    for k, path in enumerate(files):
        shift = k * 0.8 * volume.direction[:, 1]
        edit(path, lambda ds, s=shift: _shift_position(ds, s))


def _crop(series: Series, edit: Callable[..., None]) -> None:
    def apply(ds: pydicom.Dataset) -> None:
        ds.PixelData = ds.pixel_array[:32].tobytes()
        ds.Rows = 32

    edit(series[1][9], apply)


def _duplicate_different(series: Series, edit: Callable[..., None]) -> None:
    root, files, _ = series
    copy = root / "dup.dcm"
    shutil.copy(files[4], copy)

    def apply(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.PixelData = (ds.pixel_array + 1).tobytes()

    edit(copy, apply)


def _undecodable(series: Series, edit: Callable[..., None]) -> None:
    def apply(ds: pydicom.Dataset) -> None:
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = MPEG2MPML

    edit(series[1][3], apply)


_ROTATED = [-np.cos(0.1), -np.sin(0.1), 0.0, -np.sin(0.1), np.cos(0.1), 0.0]
REFUSALS = {
    "missing slice": (
        _delete(7),
        r"series 3 'PVP 1\.5mm': expected slices every 2\.5 mm, found a gap of 5 mm between "
        r"series3/003_0007\.dcm and series3/003_0009\.dcm \(about 1 missing",
    ),
    "non-uniform spacing": (
        _move(10, lambda v: 0.75 * v.direction[:, 2]),
        r"series 3 'PVP 1\.5mm': expected uniform slice spacing of 2\.5 mm, found steps from 1\.75 to 3\.25 mm",
    ),
    "gantry tilt": (
        _tilt,
        r"expected slice positions along the slice normal, found a gantry tilt of 17\.74 degrees .*"
        r"allow_gantry_tilt_resample",
    ),
    "mixed orientation": (
        _set(5, ImageOrientationPatient=_ROTATED),
        r"expected one ImageOrientationPatient, found \[-1, 0, 0, 0, 1, 0\] in 19 file\(s\).*"
        r"in 1 file\(s\) \(series3/003_0006\.dcm\)",
    ),
    "mixed sizes": (_crop, r"expected one image size \(rows x columns\), found 64x48 in 19 .* 32x48 in 1 file"),
    "mixed pixel spacing": (
        _set(2, PixelSpacing=[0.9, 0.7]),
        r"expected one PixelSpacing, found 0\.8\\0\.7 in 19 .* 0\.9\\0\.7 in 1 file\(s\) \(series3/003_0003\.dcm\)",
    ),
    "duplicate position": (
        _duplicate_different,
        r"expected one slice per position, found .*dup\.dcm.* with different pixel data",
    ),
    "missing position": (
        _set(0, ImagePositionPatient=None),
        r"series3/003_0001\.dcm: expected ImagePositionPatient with 3 numbers, found None",
    ),
    "undecodable": (
        _undecodable,
        r"series3/003_0004\.dcm: expected pixel data that can be decoded, found MPEG2 .*failed to decode",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem_and_never_the_patient(
    case: str, ct_series: Series, edit_file: Callable[..., None]
) -> None:
    change, pattern = REFUSALS[case]
    change(ct_series, edit_file)
    with pytest.raises(InputError, match=pattern) as info:
        _read_folder(ct_series[0])
    assert not any(secret in str(info.value) for secret in SECRETS)


def test_single_slice_is_refused(ct_series: Series) -> None:
    with pytest.raises(InputError, match=r"series 3 'PVP 1\.5mm': expected at least 2 slices, found 1 \(003_0001"):
        read_series([ct_series[1][0]])


def test_files_of_several_series_are_refused(ct_series: Series, tmp_path: Path, volume: Volume) -> None:
    other = write_ct_series(volume, tmp_path / "other", CTSeriesMeta(series_number=4))
    with pytest.raises(InputError, match="expected files of one series, found 2 SeriesInstanceUIDs"):
        read_series([*ct_series[1], *other])


def test_non_dicom_file_is_named(ct_series: Series) -> None:
    junk = ct_series[0] / "series3" / "notes.txt"
    junk.write_text("hello\n" * 40)
    with pytest.raises(InputError, match=r"^notes\.txt: expected a DICOM file, found no DICOM header"):
        read_series([*ct_series[1], junk])


def test_gantry_tilt_can_be_resampled(ct_series: Series, edit_file: Callable[..., None]) -> None:
    """Slice k is the same image shifted by k rows, its origin shifted back: resampling realigns it."""
    root, files, volume = ct_series
    base = volume.array[0]
    for k, path in enumerate(files):

        def apply(ds: pydicom.Dataset, k: int = k) -> None:
            ds.PixelData = (np.roll(base, -k, axis=0) + 1024).astype(np.int16).tobytes()
            _shift_position(ds, k * 0.8 * volume.direction[:, 1])

        edit_file(path, apply)
    read = _read_folder(root, allow_gantry_tilt_resample=True)
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-6)
    for k in range(read.shape[0]):
        np.testing.assert_allclose(read.array[k, k:], base[k:], atol=1e-3)
        assert np.all(read.array[k, :k] == base.min())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_files_give_input_errors_not_tracebacks(tmp_path: Path, make_volume: Callable[..., Volume]) -> None:
    """Truncated and byte-flipped files: the scan skips them, the reader names them; no secrets leak."""
    meta = CTSeriesMeta(patient_name="SECRETNAME^PHANTOM", patient_id="PID-SECRET-4711")
    files = write_ct_series(make_volume(shape=(3, 16, 16)), tmp_path / "s", meta)
    raw = files[1].read_bytes()
    rng = np.random.default_rng(7)
    for trial in range(30):
        data = bytearray(raw[: int(rng.integers(1, len(raw)))] if trial % 2 else raw)
        if trial % 2 == 0:
            for at in rng.integers(132, len(data), size=6):
                data[at] = int(rng.integers(0, 256))
        files[1].write_bytes(bytes(data))
        index = scan_folder(tmp_path)
        assert sum(s.n_instances for s in index.series) + len(index.skipped) == 3
        try:
            read_series(files)
        except InputError as exc:
            assert not any(secret in str(exc) for secret in SECRETS)


# --------------------------------------------------------------------------- parsed once


def _to_implicit(files: list[Path]) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle"])
def test_a_scanned_series_is_read_without_parsing_its_headers_again(
    tmp_path: Path, volume: Volume, syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoding = PixelEncoding.RLE if syntax == "rle" else PixelEncoding.EXPLICIT
    files = write_ct_series(volume, tmp_path / "s", CTSeriesMeta(encoding=encoding))
    if syntax == "implicit":
        _to_implicit(files)
    (series,) = scan_folder(tmp_path).series
    assert [h.path for h in series.headers] == list(series.files) and all(h.pixel_offset for h in series.headers)
    parsed: list[bool] = []
    real = series_module._read_open
    monkeypatch.setattr(series_module, "_read_open", lambda fp, stop: parsed.append(stop) or real(fp, stop))
    read = read_series(series)
    sources = read_series_datasets(series)
    assert parsed == []  # headers from the scan, pixels from each file's pixel data element on
    monkeypatch.undo()
    _assert_same(read, volume)
    whole = read_series(files)  # a list of files: every file parsed whole, as before
    np.testing.assert_array_equal(read.array, whole.array)
    assert [d.SOPInstanceUID for d in sources] == [d.SOPInstanceUID for d in read_series_datasets(files)]
    assert "PixelData" not in sources[0]  # the SEG source datasets stay header-only


def test_a_file_truncated_after_the_scan_is_named_without_a_traceback(tmp_path: Path, volume: Volume) -> None:
    files = write_ct_series(volume, tmp_path / "s", CTSeriesMeta(patient_name="SECRETNAME^PHANTOM"))
    (series,) = scan_folder(tmp_path).series
    raw = files[3].read_bytes()
    files[3].write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InputError, match=files[3].name) as info:
        read_series(series)
    assert not any(secret in str(info.value) for secret in SECRETS)
