"""Read one CT series into a :class:`Volume` with its geometry, refusing what cannot be trusted.

Slices are ordered by their position along the slice normal (the cross product of the two
ImageOrientationPatient directions), never by file name or InstanceNumber. The returned volume
has ``i`` along the rows' direction, ``j`` along the columns' direction and ``k`` along the
normal, so its direction matrix is right-handed whatever the patient position. Missing slices,
non-uniform spacing, duplicate positions, gantry tilt, mixed orientations or image sizes and
single-slice series are refused with an :class:`InputError` that names the series and the files
(relative to the scanned folder).

Each file is parsed once per run: a series from :func:`~d4m.dicom_io.series.scan_folder` carries
the headers the scan read (:attr:`~d4m.dicom_io.series.SeriesInfo.headers`), so planning reuses
them and reading the pixels parses only what follows the header (from the pixel data element's
offset the scan recorded). Files without a recorded offset are parsed whole, as before.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.series import (
    PARSE_ERRORS,
    InstanceHeader,
    SeriesInfo,
    display_name,
    read_dicom,
    series_label,
)
from d4m.dicom_io.volume import Volume

logger = logging.getLogger(__name__)

#: Orientation cosines and pixel spacings closer than this are "the same".
_ORIENTATION_ATOL = 1e-3
_SPACING_RTOL = 1e-3
#: Two slices closer than this along the normal share a position (mm).
_DUPLICATE_ATOL = 1e-3
#: A step larger than this many median spacings means missing slices.
_GAP_FACTOR = 1.5
#: Allowed deviation of one step from the median step: relative, and absolute floor in mm.
_STEP_RTOL = 0.01
_STEP_ATOL = 5e-3
#: In-plane drift of the slice origins tolerated before calling it a tilt (fraction of a pixel).
_TILT_PIXEL_TOL = 0.05
#: How many file names a message lists before summarising.
_MAX_NAMES = 3


@dataclass(frozen=True)
class _Slice:
    """Header facts of one file, as the geometry checks need them."""

    path: Path
    name: str
    dataset: Dataset
    position: np.ndarray
    orientation: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    pixel_offset: int | None = None  # where the pixel data element starts (None: parse the whole file)


@dataclass(frozen=True)
class _Plan:
    """A validated, sorted series: the slices and the grid they lie on."""

    label: str
    root: Path | None
    slices: tuple[_Slice, ...]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    #: In-plane offset (mm, LPS) of each slice origin from the first slice's normal line.
    offsets: np.ndarray
    tilted: bool


def read_series(series: SeriesInfo | Sequence[Path], *, allow_gantry_tilt_resample: bool = False) -> Volume:
    """Read a CT series as a float32 volume in Hounsfield units with its patient-space geometry.

    Parameters
    ----------
    series
        A series from :func:`~d4m.dicom_io.series.scan_folder`, or the files of one series.
    allow_gantry_tilt_resample
        Resample a gantry-tilted series onto an orthogonal grid (linear interpolation, slice by
        slice) instead of refusing it.

    Returns
    -------
    Volume
        ``array[k, j, i]`` in HU (RescaleSlope/Intercept applied per file); origin = position of
        the first slice along the normal; direction columns = row direction, column direction, normal.

    Raises
    ------
    InputError
        A file cannot be read or decoded, or the slices do not form a regular 3D grid (the message
        says what was expected and what was found, naming the files).
    """
    plan = _plan(series, allow_gantry_tilt_resample)
    array = _load_pixels(plan)
    if plan.tilted:
        array = _untilt(array, plan)
    first = plan.slices[0]
    return Volume(array, plan.spacing, tuple(first.position.tolist()), plan.direction)


def read_series_datasets(
    series: SeriesInfo | Sequence[Path], *, allow_gantry_tilt_resample: bool = False, with_pixels: bool = False
) -> list[Dataset]:
    """The datasets of a series, sorted along the slice normal exactly as :func:`read_series` orders them.

    These are the source images of a DICOM-SEG written on the grid of :func:`read_series`.

    Parameters
    ----------
    series
        A series from :func:`~d4m.dicom_io.series.scan_folder`, or the files of one series.
    allow_gantry_tilt_resample
        Accept a gantry-tilted series (as :func:`read_series` does with the same flag).
    with_pixels
        Read the pixel data too; by default headers only (all a SEG writer needs).

    Raises
    ------
    InputError
        As :func:`read_series`.
    """
    plan = _plan(series, allow_gantry_tilt_resample)
    if not with_pixels:
        return [s.dataset for s in plan.slices]
    return [_full_dataset(s, plan.root) for s in plan.slices]


# --------------------------------------------------------------------------- planning


def _plan(series: SeriesInfo | Sequence[Path], allow_tilt: bool) -> _Plan:
    """Read headers, validate them and sort the slices; decide the grid."""
    files, root, label = _resolve(series)
    headers = series.headers if isinstance(series, SeriesInfo) and len(series.headers) == len(files) else None
    if headers is None:
        slices = [_slice_header(path, root) for path in files]
    else:
        slices = [_slice_header(h.path, root, h) for h in headers]
    label = label or _label_from(slices[0].dataset)
    _check_one_series(slices, label)
    if len(slices) < 2:
        raise InputError(f"{label}: expected at least 2 slices, found 1 ({slices[0].name})")
    _check_size(slices, label)
    _check_spacing(slices, label)
    _check_orientation(slices, label)
    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, col)
    slices = sorted(slices, key=lambda s: (float(s.position @ normal), str(s.path)))
    slices = _drop_duplicates(slices, normal, root, label)
    if len(slices) < 2:
        raise InputError(f"{label}: expected at least 2 distinct slice positions, found 1")
    offsets, tilted = _check_tilt(slices, normal, label, allow_tilt)
    step = _check_steps(slices, normal, label)
    sx, sy = slices[0].pixel_spacing[1], slices[0].pixel_spacing[0]
    direction = np.column_stack([row, col, normal])
    return _Plan(label, root, tuple(slices), (sx, sy, step), direction, offsets, tilted)


def _resolve(series: SeriesInfo | Sequence[Path]) -> tuple[list[Path], Path | None, str]:
    """Files, the folder names are relative to, and the series label ('' to derive from headers)."""
    if isinstance(series, SeriesInfo):
        return list(series.files), series.root, series.label
    files = [Path(p) for p in series]
    if not files:
        raise InputError("series: expected at least one DICOM file, found none")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    return files, root, ""


def _label_from(ds: Dataset) -> str:
    return series_label(ds.get("SeriesNumber"), ds.get("SeriesDescription", ""))


def _slice_header(path: Path, root: Path | None, header: InstanceHeader | None = None) -> _Slice:
    """Header facts of one file (parsed now unless ``header`` holds them), or an InputError naming the file."""
    name = display_name(path, root)
    ds = header.dataset if header is not None else read_dicom(path, root, stop_before_pixels=True)
    values = {}
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        value = ds.get(keyword)
        try:
            values[keyword] = np.asarray([float(v) for v in value], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected {keyword} with {count} numbers, found {value!r}") from exc
        if values[keyword].shape != (count,) or not np.all(np.isfinite(values[keyword])):
            raise InputError(f"{name}: expected {keyword} with {count} numbers, found {value!r}")
    orientation = values["ImageOrientationPatient"]
    if not _is_orthonormal(orientation):
        raise InputError(f"{name}: expected orthonormal ImageOrientationPatient, found {orientation.tolist()}")
    frames = ds.get("NumberOfFrames", 1)
    if str(frames or 1).strip() != "1":
        raise InputError(f"{name}: expected a single-frame image, found NumberOfFrames {frames!r}")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise InputError(f"{name}: expected Rows and Columns, found {rows!r} x {cols!r}")
    spacing = values["PixelSpacing"]
    if min(spacing) <= 0:
        raise InputError(f"{name}: expected positive PixelSpacing, found {spacing.tolist()}")
    return _Slice(
        path,
        name,
        ds,
        values["ImagePositionPatient"],
        orientation,
        int(rows),
        int(cols),
        (float(spacing[0]), float(spacing[1])),
        header.pixel_offset if header is not None else None,
    )


def _is_orthonormal(orientation: np.ndarray) -> bool:
    row, col = orientation[:3], orientation[3:]
    return bool(abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3)


def _names(slices: Sequence[_Slice]) -> str:
    """A short list of file names for messages."""
    names = [s.name for s in slices[:_MAX_NAMES]]
    more = len(slices) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _check_one_series(slices: list[_Slice], label: str) -> None:
    uids = {str(s.dataset.get("SeriesInstanceUID", "")) for s in slices}
    if len(uids) > 1:
        raise InputError(f"{label}: expected files of one series, found {len(uids)} SeriesInstanceUIDs")


def _mixed_error(slices: list[_Slice], label: str, what: str, key: Callable[[_Slice], str]) -> InputError:
    """The error for slices that disagree on ``what``, naming the files of each value (majority first)."""
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(key(s), []).append(s)
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    found = "; ".join(f"{value} in {len(group)} file(s) ({_names(group)})" for value, group in ordered)
    return InputError(f"{label}: expected one {what}, found {found}")


def _check_size(slices: list[_Slice], label: str) -> None:
    if len({(s.rows, s.cols) for s in slices}) > 1:
        raise _mixed_error(slices, label, "image size (rows x columns)", lambda s: f"{s.rows}x{s.cols}")


def _check_spacing(slices: list[_Slice], label: str) -> None:
    reference = np.asarray(slices[0].pixel_spacing)
    if not all(np.allclose(s.pixel_spacing, reference, rtol=_SPACING_RTOL, atol=0) for s in slices):
        raise _mixed_error(slices, label, "PixelSpacing", lambda s: "{:.6g}\\{:.6g}".format(*s.pixel_spacing))


def _check_orientation(slices: list[_Slice], label: str) -> None:
    reference = slices[0].orientation
    if not all(np.allclose(s.orientation, reference, atol=_ORIENTATION_ATOL, rtol=0) for s in slices):
        raise _mixed_error(
            slices, label, "ImageOrientationPatient", lambda s: "[" + ", ".join(f"{v:.6g}" for v in s.orientation) + "]"
        )


def _drop_duplicates(slices: list[_Slice], normal: np.ndarray, root: Path | None, label: str) -> list[_Slice]:
    """Keep one slice per position; refuse two slices at one position with different pixels."""
    kept = [slices[0]]
    for s in slices[1:]:
        previous = kept[-1]
        if abs(float((s.position - previous.position) @ normal)) > _DUPLICATE_ATOL:
            kept.append(s)
            continue
        if not np.array_equal(_pixels_hu(previous.path, root), _pixels_hu(s.path, root)):
            where = float(s.position @ normal)
            raise InputError(
                f"{label}: expected one slice per position, found {previous.name} and {s.name} "
                f"at {where:.3f} mm along the normal with different pixel data"
            )
        logger.warning("%s: %s duplicates %s (same position and pixels); dropped", label, s.name, previous.name)
    return kept


def _check_tilt(slices: list[_Slice], normal: np.ndarray, label: str, allow_tilt: bool) -> tuple[np.ndarray, bool]:
    """In-plane offsets of the slice origins; refuse a tilt unless it may be resampled."""
    delta = np.stack([s.position - slices[0].position for s in slices])
    offsets = delta - np.outer(delta @ normal, normal)
    drift = float(np.max(np.linalg.norm(offsets, axis=1)))
    if drift <= _TILT_PIXEL_TOL * min(slices[0].pixel_spacing):
        return np.zeros_like(offsets), False
    extent = float(delta[-1] @ normal)
    angle = math.degrees(math.atan2(float(np.linalg.norm(offsets[-1])), extent))
    if not allow_tilt:
        raise InputError(
            f"{label}: expected slice positions along the slice normal, found a gantry tilt of {angle:.2f} "
            f"degrees (in-plane shift up to {drift:.2f} mm, from {slices[0].name} to {slices[-1].name}); "
            "pass allow_gantry_tilt_resample=True to resample"
        )
    logger.warning("%s: resampling a gantry tilt of %.2f degrees onto an orthogonal grid", label, angle)
    return offsets, True


def _check_steps(slices: list[_Slice], normal: np.ndarray, label: str) -> float:
    """Refuse missing slices and non-uniform spacing; return the slice spacing along the normal."""
    along = np.asarray([float(s.position @ normal) for s in slices])
    steps = np.diff(along)
    median = float(np.median(steps))
    gaps = np.nonzero(steps > _GAP_FACTOR * median)[0]
    if gaps.size:
        g = int(gaps[0])
        missing = round(steps[g] / median) - 1
        raise InputError(
            f"{label}: expected slices every {median:.4g} mm, found a gap of {steps[g]:.4g} mm between "
            f"{slices[g].name} and {slices[g + 1].name} (about {missing} missing slice(s); "
            f"{gaps.size} gap(s) in all)"
        )
    deviation = np.abs(steps - median)
    bad = np.nonzero(deviation > max(_STEP_RTOL * median, _STEP_ATOL))[0]
    if bad.size:
        b = int(bad[0])
        raise InputError(
            f"{label}: expected uniform slice spacing of {median:.4g} mm, found steps from {steps.min():.4g} "
            f"to {steps.max():.4g} mm (first irregular step {steps[b]:.4g} mm between {slices[b].name} "
            f"and {slices[b + 1].name})"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


# --------------------------------------------------------------------------- pixels


def _full_dataset(s: _Slice, root: Path | None) -> Dataset:
    """The slice's dataset with its pixel data: the parsed header plus the elements from the pixel offset on.

    Without a recorded offset the whole file is parsed. Raises InputError naming the file.
    """
    if s.pixel_offset is None:
        return read_dicom(s.path, root)
    header = s.dataset
    implicit, little = header.original_encoding
    try:
        with s.path.open("rb") as fp:
            fp.seek(s.pixel_offset)
            tail = read_dataset(fp, bool(implicit), bool(little), parent_encoding=header.original_character_set)
            for _ in tail.iterall():  # convert now, so corruption shows here (as read_dicom does)
                pass
    except PARSE_ERRORS as exc:
        raise InputError(f"{s.name}: expected a readable DICOM file, found a corrupt dataset "
                         f"({type(exc).__name__})") from exc
    full = Dataset({**dict(header.items()), **dict(tail.items())})
    full.file_meta = header.file_meta
    full.set_original_encoding(implicit, little, header.original_character_set)
    return full


def _pixels_hu(path: Path, root: Path | None, dataset: Dataset | None = None) -> np.ndarray:
    """Decode one file's pixels and apply its rescale, as float32; InputError naming the file."""
    name = display_name(path, root)
    ds = dataset if dataset is not None else read_dicom(path, root)
    syntax = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""))
    try:
        pixels = ds.pixel_array
    except PARSE_ERRORS as exc:
        syntax_name = f"{syntax.name} ({syntax})" if syntax else "an unknown transfer syntax"
        raise InputError(
            f"{name}: expected pixel data that can be decoded, found {syntax_name} that failed to decode "
            f"({type(exc).__name__}: {exc}); the JPEG family needs pylibjpeg, pylibjpeg-libjpeg, "
            "pylibjpeg-openjpeg or pyjpegls"
        ) from exc
    if pixels.ndim != 2 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{name}: expected one grayscale frame, found pixel data of shape {pixels.shape}")
    slope, intercept = _rescale(ds, name)
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (1 and 0 when absent)."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        try:
            values.append(default if value in (None, "") else float(value))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected a number in {keyword}, found {value!r}") from exc
    if not all(math.isfinite(v) for v in values) or values[0] == 0:
        raise InputError(f"{name}: expected a finite non-zero rescale, found slope {values[0]}, intercept {values[1]}")
    return values[0], values[1]


def _load_pixels(plan: _Plan) -> np.ndarray:
    """Stack the decoded, rescaled slices in plan order."""
    first = plan.slices[0]
    array = np.empty((len(plan.slices), first.rows, first.cols), dtype=np.float32)
    for k, s in enumerate(plan.slices):
        pixels = _pixels_hu(s.path, plan.root, _full_dataset(s, plan.root))
        if pixels.shape != (first.rows, first.cols):
            raise InputError(
                f"{s.name}: expected pixel data of {first.rows}x{first.cols}, found {pixels.shape[0]}x{pixels.shape[1]}"
            )
        array[k] = pixels
    return array


def _untilt(array: np.ndarray, plan: _Plan) -> np.ndarray:
    """Shift each slice in-plane by its offset so the slices stack along the normal."""
    row, col = plan.direction[:, 0], plan.direction[:, 1]
    sx, sy = plan.spacing[0], plan.spacing[1]
    fill = float(array.min())
    out = np.empty_like(array)
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k])
        image.SetSpacing((sx, sy))
        shift = sitk.TranslationTransform(2, (-float(plan.offsets[k] @ row), -float(plan.offsets[k] @ col)))
        resampled = sitk.Resample(image, image, shift, sitk.sitkLinear, fill, sitk.sitkFloat32)
        out[k] = sitk.GetArrayFromImage(resampled)
    return out
