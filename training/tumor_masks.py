"""Random tumour masks inside the liver: the MCS module's mask ``y``.

The paper (section III-B): pick a centre inside the liver, draw random semi-axes, make an
ellipsoid, deform it elastically. Sizes follow DiffTumor's four classes, whose radii are 4, 8, 16
and 32 voxels ± 25 % on its 1 mm grid; here they are millimetres, so a mask drawn on an
anisotropic grid has the same physical size as on an isotropic one.

Arrays are indexed ``[k, j, i]`` (z, y, x) and spacings are given in SimpleITK's ``(x, y, z)``
order, as :class:`d4m.dicom_io.volume.Volume` holds them. No torch: these masks are numpy only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)


class SizeClass(str, Enum):
    """Tumour size classes, as DiffTumor names them."""

    TINY = "tiny"
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


#: Semi-axis range in millimetres per size class (DiffTumor's radii 4/8/16/32 voxels ± 25 % at 1 mm).
SEMI_AXES_MM: dict[SizeClass, tuple[float, float]] = {
    SizeClass.TINY: (3.0, 5.0),
    SizeClass.SMALL: (6.0, 10.0),
    SizeClass.MEDIUM: (12.0, 20.0),
    SizeClass.LARGE: (24.0, 40.0),
}


@dataclass(frozen=True)
class TumorMaskConfig:
    """How random tumour masks are drawn.

    Attributes
    ----------
    size_classes
        The classes to draw from.
    class_weights
        Relative probability of each class (same length as ``size_classes``).
    count
        Inclusive range of the number of tumours per mask.
    elasticity
        Standard deviation of the elastic displacement, as a fraction of the mean semi-axis.
    control_points
        Control points per axis of the random displacement grid (as ``elasticdeform``'s ``points``).
    liver_margin_mm
        Centres are drawn at least this far inside the liver (an erosion); falls back to the
        deepest liver voxels for a liver thinner than that.
    vessel_margin_mm
        When vessels are given, tumour voxels stay at least this far from them.
    min_kept
        A tumour whose part inside the liver (and away from vessels) is below this fraction of
        its ellipsoid is redrawn, up to ``max_tries`` times; the best draw is kept.
    max_tries
        Draws per tumour before settling for the best one.
    """

    size_classes: tuple[SizeClass, ...] = tuple(SizeClass)
    class_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    count: tuple[int, int] = (1, 3)
    elasticity: float = 0.15
    control_points: int = 3
    liver_margin_mm: float = 3.0
    vessel_margin_mm: float = 2.0
    min_kept: float = 0.6
    max_tries: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_classes", tuple(SizeClass(c) for c in self.size_classes))
        if not self.size_classes:
            raise ValueError("size_classes: expected at least one class, found none")
        if len(self.class_weights) != len(self.size_classes):
            raise ValueError(
                f"class_weights: expected {len(self.size_classes)} weights, found {len(self.class_weights)}"
            )
        if min(self.class_weights) < 0 or sum(self.class_weights) <= 0:
            raise ValueError(
                f"class_weights: expected non-negative weights with a positive sum, found {self.class_weights}"
            )
        low, high = self.count
        if low < 1 or high < low:
            raise ValueError(f"count: expected 1 <= low <= high, found {self.count}")
        if not 0 <= self.elasticity <= 1:
            raise ValueError(f"elasticity: expected a fraction in [0, 1], found {self.elasticity}")
        if self.control_points < 2:
            raise ValueError(f"control_points: expected >= 2, found {self.control_points}")
        if self.liver_margin_mm < 0 or self.vessel_margin_mm < 0:
            raise ValueError("liver_margin_mm, vessel_margin_mm: expected >= 0")
        if not 0 <= self.min_kept <= 1 or self.max_tries < 1:
            raise ValueError(f"min_kept in [0, 1] and max_tries >= 1 expected, found {self.min_kept}, {self.max_tries}")


@dataclass(frozen=True)
class Tumor:
    """One drawn tumour.

    Attributes
    ----------
    centre
        Voxel index ``(k, j, i)`` of the ellipsoid centre.
    semi_axes_mm
        The ellipsoid's three semi-axes before rotation and deformation.
    size_class
        The class the semi-axes were drawn from.
    voxels
        Voxels of this tumour in the final mask (inside the liver, away from vessels).
    kept
        Fraction of the deformed ellipsoid that lies inside the allowed region.
    """

    centre: tuple[int, int, int]
    semi_axes_mm: tuple[float, float, float]
    size_class: SizeClass
    voxels: int
    kept: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for a dataset's per-case ``meta``)."""
        return {
            "centre": list(self.centre),
            "semi_axes_mm": [round(a, 2) for a in self.semi_axes_mm],
            "size_class": self.size_class.value,
            "voxels": self.voxels,
            "kept": round(self.kept, 3),
        }


@dataclass(frozen=True)
class TumorMask:
    """A drawn mask (bool, the liver's grid) and its tumours."""

    mask: np.ndarray
    tumors: tuple[Tumor, ...] = field(default_factory=tuple)


def axis_spacing(spacing: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Voxel size per array axis ``(k, j, i)`` from a SimpleITK ``(x, y, z)`` spacing."""
    values = np.asarray(spacing, dtype=float)
    if values.shape != (3,) or np.any(values <= 0):
        raise InputError(f"spacing: expected three positive values (x, y, z), found {tuple(values)}")
    return values[::-1].copy()


def require_liver(liver: np.ndarray, where: str) -> np.ndarray:
    """The liver as a bool array, or :class:`InputError` when it is empty.

    Parameters
    ----------
    liver
        A liver mask (non-zero inside).
    where
        What holds it (a case id, "crop at ..."), for the message.
    """
    mask = np.asarray(liver) > 0
    if mask.ndim != 3:
        raise InputError(f"{where}: expected a 3D liver mask, found {mask.ndim} dimensions")
    if not mask.any():
        raise InputError(f"{where}: expected a liver label (1) to place tumours in, found no liver voxel")
    return mask


def vessels_from_pvp(pvp_hu: np.ndarray, liver: np.ndarray, threshold_hu: float = 170.0) -> np.ndarray:
    """Bright tubular structures in the portal-venous phase inside the liver: a vessel mask.

    In PVP the portal and hepatic veins enhance above the parenchyma (about 100-130 HU);
    thresholding inside the liver is a simple stand-in for a vessel segmentation.
    """
    return (np.asarray(pvp_hu) > threshold_hu) & (np.asarray(liver) > 0)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _deformed_ellipsoid(
    semi_axes_mm: np.ndarray, voxel: np.ndarray, centre: np.ndarray, shape: tuple[int, ...],
    rng: np.random.Generator, config: TumorMaskConfig,
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """A deformed, rotated ellipsoid centred at ``centre``: a bool window and where it lies in ``shape``.

    The displacement is a smooth random field: Gaussian values on a coarse control grid over
    the tumour's box, interpolated by cubic splines along each axis (a tensor product, a few
    matrix products). Only the part of the box inside the volume is evaluated.
    """
    half = np.ceil(1.5 * semi_axes_mm.max() / voxel).astype(int) + 1
    n = config.control_points
    sigma = config.elasticity * float(semi_axes_mm.mean())
    control = rng.normal(0.0, sigma, size=(3, n, n, n)) if sigma > 0 else np.zeros((3, n, n, n))
    rotation = _rotation(rng).astype(np.float32)
    lo = np.maximum(-half, -centre)
    hi = np.minimum(half, np.asarray(shape) - 1 - centre)
    if np.any(hi < lo):
        return np.zeros((0, 0, 0), dtype=bool), (slice(0, 0),) * 3
    basis, axes_mm = [], []
    for h, v, a, b in zip(half, voxel, lo, hi, strict=True):
        rows = CubicSpline(np.arange(n), np.eye(n))(np.linspace(0, n - 1, 2 * h + 1))
        basis.append(rows[a + h:b + h + 1].astype(np.float32))
        axes_mm.append((np.arange(a, b + 1) * v).astype(np.float32))
    displacement = np.einsum("cpqr,kp,jq,ir->kjic", control.astype(np.float32), *basis, optimize=True)
    points = np.stack(np.meshgrid(*axes_mm, indexing="ij"), axis=-1) + displacement
    local = points @ rotation
    inside = np.sum((local / semi_axes_mm.astype(np.float32)) ** 2, axis=-1) <= 1.0
    return inside, tuple(slice(c + a, c + b + 1) for c, a, b in zip(centre, lo, hi, strict=True))


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask."""
    where = np.nonzero(mask)
    return tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)


def generate_tumor_mask(
    liver: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    config: TumorMaskConfig | None = None,
    vessels: np.ndarray | None = None,
    avoid: np.ndarray | None = None,
) -> TumorMask:
    """Draw one to several tumours inside the liver.

    Parameters
    ----------
    liver
        Liver mask ``[k, j, i]`` (non-zero inside).
    spacing
        Voxel size in mm, ``(x, y, z)``.
    rng
        The random generator: the same seed gives the same mask.
    config
        Size classes, counts and deformation; defaults to :class:`TumorMaskConfig`.
    vessels
        Optional vessel mask: tumours keep ``vessel_margin_mm`` away from it.
    avoid
        Optional mask of voxels that must stay tumour-free (e.g. existing tumours).

    Returns
    -------
    TumorMask
        The union mask (bool, never outside the liver) and the tumours drawn.

    Raises
    ------
    InputError
        No liver voxel, arrays of different shapes, or a bad spacing.
    """
    config = config or TumorMaskConfig()
    allowed = require_liver(liver, "tumour mask")
    voxel = axis_spacing(spacing)
    for name, extra in (("vessels", vessels), ("avoid", avoid)):
        if extra is not None and np.shape(extra) != allowed.shape:
            raise InputError(f"tumour mask: expected {name} of shape {allowed.shape}, found {np.shape(extra)}")
    if vessels is not None and np.any(vessels):
        far = ndimage.distance_transform_edt(~(np.asarray(vessels) > 0), sampling=voxel)
        allowed &= far >= max(config.vessel_margin_mm, 1e-6)
    if avoid is not None:
        allowed &= ~(np.asarray(avoid) > 0)
    if not allowed.any():
        raise InputError("tumour mask: expected liver voxels away from vessels and existing tumours, found none")
    box = _bbox(allowed)
    depth = np.zeros(allowed.shape, dtype=float)
    depth[box] = ndimage.distance_transform_edt(np.pad(allowed[box], 1), sampling=voxel)[1:-1, 1:-1, 1:-1]
    centres = np.flatnonzero(depth >= config.liver_margin_mm)
    if centres.size == 0:
        logger.warning("tumour mask: no voxel %.1f mm inside the liver; centres drawn from the deepest voxels",
                       config.liver_margin_mm)
        centres = np.flatnonzero(depth >= depth.max())

    weights = np.asarray(config.class_weights, dtype=float)
    weights = weights / weights.sum()
    count = int(rng.integers(config.count[0], config.count[1] + 1))
    voxel_volume = float(np.prod(voxel))
    capacity = float(allowed.sum())
    mask = np.zeros(allowed.shape, dtype=bool)
    tumors: list[Tumor] = []
    for _ in range(count):
        size_class = config.size_classes[int(rng.choice(len(config.size_classes), p=weights))]
        low, high = SEMI_AXES_MM[size_class]
        best: tuple[float, tuple[np.ndarray, tuple[slice, ...]], Tumor] | None = None
        for _try in range(config.max_tries):
            axes = rng.uniform(low, high, size=3)
            centre = np.array(np.unravel_index(centres[int(rng.integers(centres.size))], allowed.shape))
            expected = 4.0 / 3.0 * np.pi * float(np.prod(axes)) / voxel_volume
            inside, window = _deformed_ellipsoid(axes, voxel, centre, allowed.shape, rng, config)
            placed = inside & allowed[window] & ~mask[window]
            count_placed = int(placed.sum())
            kept = min(1.0, count_placed / expected)
            where = (int(centre[0]), int(centre[1]), int(centre[2]))
            tumor = Tumor(where, (float(axes[0]), float(axes[1]), float(axes[2])), size_class, count_placed, kept)
            if best is None or kept > best[0]:
                best = (kept, (placed, window), tumor)
            if kept >= config.min_kept or expected * config.min_kept > capacity:
                break
        if best is None or best[2].voxels == 0:
            continue
        if best[0] < config.min_kept:
            logger.info("tumour mask: a %s tumour keeps only %.0f %% inside the liver", size_class.value, 100 * best[0])
        placed, window = best[1]
        mask[window] |= placed
        tumors.append(best[2])
    return TumorMask(mask, tuple(tumors))


def equivalent_radius_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Radius of the sphere with the mask's physical volume."""
    volume = float(np.count_nonzero(mask)) * float(np.prod(axis_spacing(spacing)))
    return float((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0))
