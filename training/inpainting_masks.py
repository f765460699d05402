"""Holes for the inpainter: LaMa-style training masks and the paper's tumour hole.

Training masks (numpy, 2D, ``True`` = hole) mix three shapes:

* strokes — thick random polylines, LaMa's "irregular" masks;
* boxes — random rectangles, LaMa's "box" masks;
* blobs — tumour-like lumps: ellipses with a smoothly perturbed radius, sized like liver lesions.

Each shape is centred on a pixel of an optional ``region`` (e.g. the liver) and every hole
pixel in the ``forbidden`` mask (e.g. a dilated tumour) is removed, so the inpainter is only ever
asked to restore tissue whose truth is known to be tumour-free.

:func:`tumor_hole` builds the hole the NCG uses at inference (paper III-A): per axial slice, the
tumour mask closed with a 5×5 kernel, then dilated once with a 3×3 kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)

_MAX_TRIES = 8


@dataclass(frozen=True)
class MaskSpec:
    """How training holes are drawn; sizes are fractions of the slice's shorter side.

    Attributes
    ----------
    p_strokes, p_boxes, p_blobs
        Relative odds of each shape family (normalised).
    stroke_count
        Inclusive range of strokes per mask.
    stroke_vertices
        Inclusive range of polyline vertices per stroke.
    stroke_width
        Range of stroke widths.
    stroke_length
        Range of segment lengths.
    box_size
        Range of box side lengths.
    box_count
        Inclusive range of boxes per mask.
    blob_radius
        Range of blob mean radii.
    blob_count
        Inclusive range of blobs per mask.
    max_fraction
        Largest share of the slice a hole may cover; larger draws are redrawn.
    """

    p_strokes: float = 0.3
    p_boxes: float = 0.2
    p_blobs: float = 0.5
    stroke_count: tuple[int, int] = (1, 3)
    stroke_vertices: tuple[int, int] = (2, 6)
    stroke_width: tuple[float, float] = (0.04, 0.12)
    stroke_length: tuple[float, float] = (0.1, 0.35)
    box_size: tuple[float, float] = (0.08, 0.35)
    box_count: tuple[int, int] = (1, 2)
    blob_radius: tuple[float, float] = (0.03, 0.15)
    blob_count: tuple[int, int] = (1, 3)
    max_fraction: float = 0.4

    def __post_init__(self) -> None:
        odds = (self.p_strokes, self.p_boxes, self.p_blobs)
        if min(odds) < 0 or sum(odds) <= 0:
            raise InputError(f"mask spec: expected non-negative shape odds with a positive sum, found {odds}")
        for name in ("stroke_count", "stroke_vertices", "box_count", "blob_count"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise InputError(f"mask spec: expected {name} as 1 <= low <= high, found {(low, high)}")
        for name in ("stroke_width", "stroke_length", "box_size", "blob_radius"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise InputError(f"mask spec: expected {name} as 0 < low <= high <= 1, found {(low, high)}")
        if not 0 < self.max_fraction <= 1:
            raise InputError(f"mask spec: expected max_fraction in (0, 1], found {self.max_fraction}")


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 4:
        raise InputError(f"training mask: expected a 2D shape of at least 4×4, found {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _centre(shape: tuple[int, int], rng: np.random.Generator, region: np.ndarray | None) -> np.ndarray:
    if region is not None and region.any():
        points = np.argwhere(region)
        return points[rng.integers(len(points))].astype(np.float64)
    return np.array([rng.uniform(0, shape[0]), rng.uniform(0, shape[1])])


def stroke_mask(
    shape: tuple[int, int], rng: np.random.Generator, spec: MaskSpec = MaskSpec(), region: np.ndarray | None = None
) -> np.ndarray:
    """Thick random polylines starting in ``region`` (anywhere without it)."""
    height, width = _check_shape(shape)
    side = min(height, width)
    centre_lines = np.zeros((height, width), bool)
    out = np.zeros((height, width), bool)
    for _ in range(rng.integers(spec.stroke_count[0], spec.stroke_count[1] + 1)):
        centre_lines[:] = False
        point = _centre((height, width), rng, region)
        for _ in range(rng.integers(spec.stroke_vertices[0], spec.stroke_vertices[1] + 1)):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(*spec.stroke_length) * side
            end = point + length * np.array([np.sin(angle), np.cos(angle)])
            end = np.clip(end, 0, [height - 1, width - 1])
            steps = max(2, int(np.ceil(np.abs(end - point).max())) + 1)
            line = np.rint(np.linspace(point, end, steps)).astype(int)
            centre_lines[line[:, 0], line[:, 1]] = True
            point = end
        radius = rng.uniform(*spec.stroke_width) * side / 2
        out |= ndimage.distance_transform_edt(~centre_lines) <= max(radius, 1.0)
    return out


def box_mask(
    shape: tuple[int, int], rng: np.random.Generator, spec: MaskSpec = MaskSpec(), region: np.ndarray | None = None
) -> np.ndarray:
    """Random axis-aligned rectangles centred in ``region`` (anywhere without it)."""
    height, width = _check_shape(shape)
    side = min(height, width)
    out = np.zeros((height, width), bool)
    for _ in range(rng.integers(spec.box_count[0], spec.box_count[1] + 1)):
        centre = _centre((height, width), rng, region)
        half = rng.uniform(*spec.box_size, size=2) * side / 2
        low = np.clip(np.rint(centre - half), 0, None).astype(int)
        high = np.rint(centre + half).astype(int) + 1
        out[low[0]:high[0], low[1]:high[1]] = True
    return out


def blob_mask(
    shape: tuple[int, int], rng: np.random.Generator, spec: MaskSpec = MaskSpec(), region: np.ndarray | None = None
) -> np.ndarray:
    """Tumour-like lumps: rotated ellipses whose radius wobbles smoothly with the angle."""
    height, width = _check_shape(shape)
    side = min(height, width)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((height, width), bool)
    for _ in range(rng.integers(spec.blob_count[0], spec.blob_count[1] + 1)):
        centre = _centre((height, width), rng, region)
        radius = max(rng.uniform(*spec.blob_radius) * side, 1.5)
        aspect = rng.uniform(0.6, 1.0)
        tilt = rng.uniform(0, np.pi)
        dy, dx = rows - centre[0], cols - centre[1]
        u = dx * np.cos(tilt) + dy * np.sin(tilt)
        v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
        theta = np.arctan2(v, u)
        wobble = np.ones_like(theta)
        for harmonic in range(2, 5):
            wobble += rng.uniform(0, 0.25 / harmonic) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
        out |= np.hypot(u, v) <= radius * wobble
    return out


_SHAPES = (stroke_mask, box_mask, blob_mask)


def training_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    spec: MaskSpec = MaskSpec(),
    region: np.ndarray | None = None,
    forbidden: np.ndarray | None = None,
) -> np.ndarray:
    """One training hole: a shape family drawn by ``spec``'s odds, kept off ``forbidden``.

    Parameters
    ----------
    shape
        Slice shape ``(rows, columns)``.
    rng
        Source of randomness; the same generator state gives the same mask.
    spec
        Shape families and sizes.
    region
        Where shapes are centred (e.g. tumour-free liver); anywhere when absent or empty.
    forbidden
        Pixels that must never be a hole (e.g. dilated tumour); removed from the result.

    Returns
    -------
    numpy.ndarray
        Boolean hole mask, non-empty unless ``forbidden`` covers the whole slice, covering at most
        ``spec.max_fraction`` of the slice.

    Raises
    ------
    InputError
        A shape below 4×4 or a region / forbidden mask of another shape.
    """
    height, width = _check_shape(shape)
    for name, extra in (("region", region), ("forbidden", forbidden)):
        if extra is not None and extra.shape != (height, width):
            raise InputError(f"training mask: expected a {name} mask of shape {(height, width)}, found {extra.shape}")
    allowed = np.ones((height, width), bool) if forbidden is None else ~forbidden.astype(bool)
    centres = allowed if region is None else (region.astype(bool) & allowed)
    odds = np.array([spec.p_strokes, spec.p_boxes, spec.p_blobs], np.float64)
    limit = spec.max_fraction * height * width
    mask = np.zeros((height, width), bool)
    for _ in range(_MAX_TRIES):
        draw = _SHAPES[rng.choice(3, p=odds / odds.sum())]((height, width), rng, spec, centres)
        mask = draw & allowed
        if 0 < mask.sum() <= limit:
            return mask
    if not allowed.any():
        return np.zeros((height, width), bool)
    # fallback: a small square on an allowed pixel, so every sample trains something
    centre = _centre((height, width), rng, centres if centres.any() else allowed).astype(int)
    half = max(1, int(0.05 * min(height, width)))
    mask = np.zeros((height, width), bool)
    mask[max(centre[0] - half, 0):centre[0] + half + 1, max(centre[1] - half, 0):centre[1] + half + 1] = True
    return mask & allowed


def tumor_hole(tumor: np.ndarray, closing: int = 5, dilation: int = 3) -> np.ndarray:
    """The paper's inpainting hole: per axial slice, close the tumour mask, then dilate once.

    Parameters
    ----------
    tumor
        Boolean tumour mask, 2D ``(rows, columns)`` or 3D ``(slices, rows, columns)``.
    closing
        Side of the square closing kernel (paper: 5).
    dilation
        Side of the square dilation kernel, applied once (paper: 3).

    Returns
    -------
    numpy.ndarray
        Boolean hole of the same shape, a superset of ``tumor``.

    Raises
    ------
    InputError
        An array that is neither 2D nor 3D, or kernels that are not positive odd sizes.
    """
    if tumor.ndim not in (2, 3):
        raise InputError(f"tumour hole: expected a 2D or 3D mask, found shape {tumor.shape}")
    for name, size in (("closing", closing), ("dilation", dilation)):
        if size < 1 or size % 2 == 0:
            raise InputError(f"tumour hole: expected a positive odd {name} kernel, found {size}")
    mask = tumor.astype(bool)
    footprint = np.ones((closing, closing), bool)
    grow = np.ones((dilation, dilation), bool)
    if mask.ndim == 3:
        footprint, grow = footprint[None], grow[None]
    # pad so that closing does not erode at the slice border (scipy treats outside as background)
    pad = [(0, 0)] * (mask.ndim - 2) + [(closing, closing)] * 2
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=footprint)
    closed = closed[tuple(slice(p[0], closed.shape[i] - p[1]) for i, p in enumerate(pad))]
    return ndimage.binary_dilation(closed | mask, structure=grow)
