"""Intensity normalisation, resampling and phase stacking shared by training and inference.

One implementation, used by ``d4m-train`` (patch sampling, validation) and by ``d4m-infer``
(before the engine runs), so that the window, the z-score constants and the resampling a model
was trained with are exactly the ones it meets at a site. numpy and SimpleITK only: no torch.

The paper clips every phase to the HU window [-21, 189] and z-scores it; d4m z-scores with one
dataset-level mean and standard deviation measured on the clipped liver (foreground) voxels of
the training cases (the nnU-Net CT scheme), stored with the model and shipped in the bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import SimpleITK as sitk

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime.phases_fill import fill_missing_phases

logger = logging.getLogger(__name__)

#: HU window of the paper (Sec. IV-B).
PAPER_HU_WINDOW: tuple[float, float] = (-21.0, 189.0)


@dataclass(frozen=True)
class Normalization:
    """Clip to a HU window, then z-score with constants measured on training foreground.

    Attributes
    ----------
    hu_window
        ``(low, high)`` HU bounds applied before the z-score.
    mean
        Mean of the clipped foreground intensities.
    std
        Standard deviation of the clipped foreground intensities (> 0).
    """

    hu_window: tuple[float, float] = PAPER_HU_WINDOW
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.hu_window)
        if not low < high:
            raise InputError(f"normalization: expected a HU window low < high, found {self.hu_window}")
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise InputError(
                f"normalization: expected a finite mean and a positive std, found {self.mean}, {self.std}"
            )
        object.__setattr__(self, "hu_window", (low, high))
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the bundle manifest stores exactly these keys)."""
        return {"hu_window": list(self.hu_window), "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "normalization") -> Normalization:
        """Read the form written by :meth:`to_dict`.

        Raises
        ------
        InputError
            Missing keys or invalid values.
        """
        try:
            return cls(tuple(data["hu_window"]), float(data["mean"]), float(data["std"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: expected hu_window, mean and std, found {dict(data)}") from exc

    @property
    def background(self) -> float:
        """Normalised value of anything at or below the window's low bound (e.g. padding)."""
        return (self.hu_window[0] - self.mean) / self.std


def compute_normalization(
    volumes: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    window: tuple[float, float] = PAPER_HU_WINDOW,
) -> Normalization:
    """Measure z-score constants on the clipped foreground voxels of several volumes.

    Sums are accumulated in float64 one volume at a time, so no volume is kept.

    Parameters
    ----------
    volumes
        HU arrays, one per phase and case.
    masks
        Foreground masks paired with ``volumes`` (non-zero = foreground, e.g. liver + tumour).
    window
        HU window applied before measuring.

    Returns
    -------
    Normalization

    Raises
    ------
    InputError
        A mask of another shape than its volume, or no foreground voxel at all.
    """
    low, high = window
    count, total, total_sq = 0, 0.0, 0.0
    for index, (volume, mask) in enumerate(zip(volumes, masks, strict=True)):
        if volume.shape != mask.shape:
            raise InputError(f"volume {index}: expected a mask of shape {volume.shape}, found {mask.shape}")
        values = np.clip(volume[mask > 0].astype(np.float64), low, high)
        count += values.size
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
    if count == 0:
        raise InputError("normalization: expected foreground voxels in the masks, found none")
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    if std == 0.0:
        logger.warning("foreground intensities are constant (%.3f HU); using std 1", mean)
        std = 1.0
    logger.info("normalization from %d foreground voxels: mean %.2f, std %.2f HU", count, mean, std)
    return Normalization((float(low), float(high)), mean, std)


def normalize(array: np.ndarray, norm: Normalization) -> np.ndarray:
    """Clip to the HU window, then z-score; returns a new float32 array."""
    out = np.clip(array.astype(np.float32, copy=True), *norm.hu_window)
    out -= np.float32(norm.mean)
    out /= np.float32(norm.std)
    return out


class Interpolator(str, Enum):
    """Resampling kernels: linear for images, nearest for label maps."""

    LINEAR = "linear"
    NEAREST = "nearest"
    BSPLINE = "bspline"


_SITK_INTERPOLATORS = {
    Interpolator.LINEAR: sitk.sitkLinear,
    Interpolator.NEAREST: sitk.sitkNearestNeighbor,
    Interpolator.BSPLINE: sitk.sitkBSpline,
}


def _resample(volume: Volume, reference: sitk.Image, interpolator: Interpolator | str, default: float) -> Volume:
    interpolator = Interpolator(interpolator)
    image = volume.to_sitk()
    if interpolator is not Interpolator.NEAREST and image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetInterpolator(_SITK_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(default)
    resampler.SetTransform(sitk.Transform())
    return Volume.from_sitk(resampler.Execute(image))


def target_size(volume: Volume, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Grid size ``(ni, nj, nk)`` covering ``volume``'s extent at ``spacing`` (rounded, ≥ 1)."""
    size = np.asarray(volume.shape[::-1], dtype=np.float64)
    extent = size * np.asarray(volume.spacing)
    return tuple(int(max(1, round(e / s))) for e, s in zip(extent, spacing, strict=True))  # type: ignore[return-value]


def resample_to_spacing(
    volume: Volume,
    spacing: Sequence[float],
    interpolator: Interpolator | str = Interpolator.LINEAR,
    default: float | None = None,
) -> Volume:
    """Resample onto a grid with the same origin and direction and another voxel size.

    The new grid keeps the first voxel centre and covers the same extent (size rounded).
    Images come back as float32 (linear, bspline); nearest keeps the pixel type (labels).

    Parameters
    ----------
    volume
        Input image.
    spacing
        Target voxel size along ``i``, ``j``, ``k`` in mm (``Volume.spacing`` order).
    interpolator
        ``linear`` (images), ``nearest`` (labels) or ``bspline``.
    default
        Value outside the input; defaults to the input minimum (air for CT, 0 for labels).

    Returns
    -------
    Volume

    Raises
    ------
    InputError
        Not three positive spacings.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"resample: expected three positive spacings, found {spacing}")
    if np.allclose(spacing, volume.spacing, rtol=0, atol=1e-6):
        return volume
    reference = sitk.Image(list(target_size(volume, spacing)), sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetOrigin(volume.origin)
    reference.SetDirection(tuple(volume.direction.ravel()))
    fill = float(volume.array.min()) if default is None else float(default)
    return _resample(volume, reference, interpolator, fill)


def resample_like(
    volume: Volume,
    reference: Volume,
    interpolator: Interpolator | str = Interpolator.NEAREST,
    default: float = 0.0,
) -> Volume:
    """Resample onto the grid of ``reference`` (e.g. labels back to the PVP grid)."""
    grid = sitk.Image(list(reference.shape[::-1]), sitk.sitkUInt8)
    grid.SetSpacing(reference.spacing)
    grid.SetOrigin(reference.origin)
    grid.SetDirection(tuple(reference.direction.ravel()))
    return _resample(volume, grid, interpolator, default)


def stack_phases(volumes: Mapping[Phase, Volume], order: Sequence[Phase] = PHASE_ORDER) -> np.ndarray:
    """Stack phase volumes on one grid into a ``(len(order), z, y, x)`` float32 array.

    Parameters
    ----------
    volumes
        One volume per phase of ``order``, all on the same grid (after registration and
        missing-phase filling).
    order
        Channel order.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    InputError
        A phase of ``order`` is missing, or the volumes are not on one grid.
    """
    order = [Phase(p) for p in order]
    missing = [p.value for p in order if p not in volumes]
    if missing:
        raise InputError(f"stack: expected the phases {[p.value for p in order]}, found {missing} missing")
    first = volumes[order[0]]
    for phase in order[1:]:
        other = volumes[phase]
        if not first.same_grid(other):
            raise InputError(
                f"{phase.value}: expected the grid of {order[0].value} (shape {first.shape}, spacing "
                f"{first.spacing}, origin {first.origin}), found shape {other.shape}, spacing "
                f"{other.spacing}, origin {other.origin}"
            )
    return np.stack([volumes[p].array.astype(np.float32, copy=False) for p in order])


@dataclass(frozen=True)
class PreparedInput:
    """A study ready for the network.

    Attributes
    ----------
    image
        ``(len(order), z, y, x)`` float32, windowed and z-scored, on the target grid.
    grid
        Geometry of the target grid (its array is one resampled phase, in HU).
    duplicated
        ``{missing phase: present phase copied into it}``.
    """

    image: np.ndarray
    grid: Volume
    duplicated: dict[Phase, Phase]


def prepare_input(
    volumes: Mapping[Phase, Volume],
    norm: Normalization,
    spacing: Sequence[float] | None,
    order: Sequence[Phase] = PHASE_ORDER,
) -> PreparedInput:
    """Fill missing phases, resample to the target spacing, stack and normalise.

    The same steps, in the same order, at validation time in training and at a site.

    Parameters
    ----------
    volumes
        The present phases, all on one grid (registered to PVP).
    norm
        Window and z-score constants of the model.
    spacing
        Target voxel size ``(x, y, z)`` mm; ``None`` keeps the input grid.
    order
        Channel order of the model.

    Returns
    -------
    PreparedInput

    Raises
    ------
    InputError
        No phase given, or phases on different grids.
    """
    present = {Phase(p): v for p, v in volumes.items()}
    if spacing is not None:
        present = {p: resample_to_spacing(v, spacing, Interpolator.LINEAR) for p, v in present.items()}
    filled, duplicated = fill_missing_phases(present)
    stacked = stack_phases(filled, order)
    image = normalize(stacked, norm)
    return PreparedInput(image, filled[order[0]], duplicated)
