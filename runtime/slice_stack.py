"""Irregular CT series onto a regular grid, and labels back onto the original slices (``--allow-resample``).

:func:`~d4m.dicom_io.reader.read_series` refuses a series with missing slices, non-uniform slice
spacing, a gantry tilt or mixed image sizes. With ``--allow-resample`` the runtime reads such a
series here instead:

* every slice is read on its own (pixels rescaled to HU), slices at one position are kept once;
* the regular grid has the orientation of the first slice (sorted along the slice normal), the
  in-plane matrix and pixel spacing of the most common slice size, the first slice's position as
  origin, and the median step between neighbouring slices along the normal;
* each grid slice is interpolated linearly along the normal from the two nearest original
  slices, each first resampled in-plane (linear) onto the grid slice — which undoes a tilt's
  in-plane shift and a different matrix or pixel spacing.

Mixed orientations are still refused. :func:`labels_on_slices` samples a label volume at the
pixel centres of each original slice (nearest neighbour), so the DICOM-SEG references the
slices the scanner wrote.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.series import PARSE_ERRORS, SeriesInfo, display_name, read_dicom
from d4m.dicom_io.volume import Volume

logger = logging.getLogger(__name__)

_ORIENTATION_ATOL = 1e-3
_DUPLICATE_MM = 1e-3


@dataclass(frozen=True)
class SliceStack:
    """A series resampled onto a regular grid, with its original slices.

    Attributes
    ----------
    volume
        The regular volume in HU.
    datasets
        Headers of the original slices sorted along the normal (one per position).
    notes
        What was irregular and resampled, in words (for the report's warnings).
    """

    volume: Volume
    datasets: tuple[Dataset, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Slice:
    name: str
    dataset: Dataset
    position: np.ndarray
    row: np.ndarray
    col: np.ndarray
    spacing: tuple[float, float]  # (row spacing, column spacing) as in PixelSpacing
    shape: tuple[int, int]


def _floats(ds: Dataset, keyword: str, count: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected {keyword} with {count} numbers, found {value!r}") from exc
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise InputError(f"{name}: expected {keyword} with {count} numbers, found {value!r}")
    return array


def _header(ds: Dataset, name: str) -> _Slice:
    orientation = _floats(ds, "ImageOrientationPatient", 6, name)
    spacing = _floats(ds, "PixelSpacing", 2, name)
    if min(spacing) <= 0:
        raise InputError(f"{name}: expected positive PixelSpacing, found {spacing.tolist()}")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise InputError(f"{name}: expected Rows and Columns, found {rows!r} x {cols!r}")
    return _Slice(name, ds, _floats(ds, "ImagePositionPatient", 3, name), orientation[:3], orientation[3:],
                  (float(spacing[0]), float(spacing[1])), (int(rows), int(cols)))


def _pixels(item: _Slice) -> np.ndarray:
    ds = item.dataset
    try:
        pixels = ds.pixel_array
    except PARSE_ERRORS as exc:
        raise InputError(f"{item.name}: expected pixel data that can be decoded, found "
                         f"{type(exc).__name__}") from exc
    if pixels.shape != item.shape:
        raise InputError(f"{item.name}: expected one {item.shape[0]}x{item.shape[1]} frame, found {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _slice_image(array: np.ndarray, item: _Slice, normal: np.ndarray) -> sitk.Image:
    """One slice as a 3D SimpleITK image of depth 1 in patient space."""
    image = sitk.GetImageFromArray(array[None])
    image.SetSpacing((item.spacing[1], item.spacing[0], 1.0))
    image.SetOrigin(tuple(float(v) for v in item.position))
    image.SetDirection(tuple(np.column_stack([item.row, item.col, normal]).ravel()))
    return image


def read_regridded(series: SeriesInfo) -> SliceStack:
    """Read an irregular series onto a regular grid (module docstring).

    Raises
    ------
    InputError
        A file cannot be read or decoded, fewer than two distinct positions, or the slices do
        not share one orientation.
    """
    label = series.label
    items = [_header(read_dicom(path, series.root), display_name(path, series.root)) for path in series.files]
    if not items:
        raise InputError(f"{label}: expected slices, found none")
    row, col = items[0].row, items[0].col
    for item in items:
        if not (np.allclose(item.row, row, atol=_ORIENTATION_ATOL) and np.allclose(item.col, col,
                                                                                    atol=_ORIENTATION_ATOL)):
            raise InputError(f"{label}: expected one ImageOrientationPatient, found "
                             f"{np.r_[row, col].round(4).tolist()} and {np.r_[item.row, item.col].round(4).tolist()} "
                             f"({item.name}); mixed orientations are not resampled")
    normal = np.cross(row, col)
    items.sort(key=lambda s: (float(s.position @ normal), s.name))
    kept: list[_Slice] = [items[0]]
    notes: list[str] = []
    for item in items[1:]:
        if abs(float((item.position - kept[-1].position) @ normal)) > _DUPLICATE_MM:
            kept.append(item)
        else:
            notes.append(f"{item.name} duplicates the position of {kept[-1].name}: dropped")
    if len(kept) < 2:
        raise InputError(f"{label}: expected at least 2 distinct slice positions, found {len(kept)}")
    along = np.asarray([float(s.position @ normal) for s in kept])
    steps = np.diff(along)
    step = float(np.median(steps))
    count = int(round((along[-1] - along[0]) / step)) + 1
    step = float((along[-1] - along[0]) / (count - 1))
    (shape, spacing), _ = Counter((s.shape, s.spacing) for s in kept).most_common(1)[0]
    notes += _describe(kept, steps, step, shape, spacing, normal)

    origin = kept[0].position
    grid = np.empty((count, *shape), dtype=np.float32)
    cache: dict[int, np.ndarray] = {0: _pixels(kept[0])}
    fill = float(cache[0].min())

    def in_plane(index: int, k: int) -> np.ndarray:
        """Original slice ``index`` resampled onto grid slice ``k``'s in-plane grid."""
        target = sitk.Image(shape[1], shape[0], 1, sitk.sitkFloat32)
        target.SetSpacing((spacing[1], spacing[0], 1.0))
        target.SetOrigin(tuple(float(v) for v in origin + k * step * normal))
        target.SetDirection(tuple(np.column_stack([row, col, normal]).ravel()))
        source = kept[index]
        pixels = cache.setdefault(index, _pixels(source))
        moved = _slice_image(pixels, source, normal)
        # project the slice onto the target plane: only the in-plane placement matters here
        shift = float((origin + k * step * normal - source.position) @ normal)
        moved.SetOrigin(tuple(float(v) for v in source.position + shift * normal))
        out = sitk.Resample(moved, target, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)[0]

    for k in range(count):
        z = along[0] + k * step
        upper = int(np.clip(np.searchsorted(along, z - 1e-6), 0, len(kept) - 1))
        lower = max(upper - 1, 0)
        if abs(along[upper] - z) < 1e-3 or upper == lower:
            grid[k] = in_plane(upper, k)
            continue
        weight = float((z - along[lower]) / (along[upper] - along[lower]))
        grid[k] = (1 - weight) * in_plane(lower, k) + weight * in_plane(upper, k)
        cache = {i: v for i, v in cache.items() if i >= lower}
    volume = Volume(grid, (spacing[1], spacing[0], step), tuple(origin.tolist()), np.column_stack([row, col, normal]))
    for note in notes:
        logger.warning("%s: %s", label, note)
    return SliceStack(volume, tuple(s.dataset for s in kept), tuple(notes))


def _describe(kept: list[_Slice], steps: np.ndarray, step: float, shape: tuple[int, int],
              spacing: tuple[float, float], normal: np.ndarray) -> list[str]:
    """Words for what was irregular (gaps, uneven steps, tilt, other sizes)."""
    notes = []
    median = float(np.median(steps))
    gaps = np.nonzero(steps > 1.5 * median)[0]
    for g in gaps[:3]:
        notes.append(f"gap of {steps[g]:.4g} mm between {kept[g].name} and {kept[g + 1].name} interpolated")
    if not gaps.size and np.ptp(steps) > max(0.01 * median, 5e-3):
        notes.append(f"slice steps from {steps.min():.4g} to {steps.max():.4g} mm resampled to {step:.4g} mm")
    delta = np.stack([s.position - kept[0].position for s in kept])
    drift = float(np.max(np.linalg.norm(delta - np.outer(delta @ normal, normal), axis=1)))
    if drift > 0.05 * min(spacing):
        notes.append(f"in-plane drift of slice positions up to {drift:.2f} mm (gantry tilt) resampled")
    others = [s.name for s in kept if (s.shape, s.spacing) != (shape, spacing)]
    if others:
        notes.append(f"{len(others)} slice(s) of another size or pixel spacing (e.g. {others[0]}) resampled to "
                     f"{shape[0]}x{shape[1]}")
    return notes


def labels_on_slices(labels: Volume, datasets: Sequence[Dataset]) -> np.ndarray:
    """Sample a label volume at the pixel centres of each given slice (nearest neighbour, outside: 0).

    Parameters
    ----------
    labels
        Integer label volume in patient space.
    datasets
        The slices' headers (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows,
        Columns), in the order of the result.

    Returns
    -------
    numpy.ndarray
        ``uint8`` of shape ``(len(datasets), rows, columns)``.

    Raises
    ------
    InputError
        No slice, or slices of different sizes (a DICOM-SEG needs one frame size).
    """
    if not datasets:
        raise InputError("SEG source: expected slices, found none")
    items = [_header(ds, f"slice {i}") for i, ds in enumerate(datasets)]
    sizes = sorted({s.shape for s in items})
    if len(sizes) > 1:
        raise InputError(f"SEG source: expected slices of one size for a DICOM-SEG, found {sizes}")
    source = sitk.Cast(labels.to_sitk(), sitk.sitkUInt8)
    out = np.zeros((len(items), *items[0].shape), dtype=np.uint8)
    for index, item in enumerate(items):
        normal = np.cross(item.row, item.col)
        target = _slice_image(np.zeros(item.shape, np.uint8), item, normal)
        sampled = sitk.Resample(source, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out[index] = sitk.GetArrayFromImage(sampled)[0]
    return out
