"""The fixed side of a registration, prepared once: metric region, cropped metric image, quality samples.

Every phase registered to the same reference phase (NC, ART and DEL to PVP) needs the same things
from it: the metric region (the liver mask dilated, or the body of the fixed image), the fixed
image cropped to the region's box, clipped to the intensity window and coarsened to the working
spacing, the region's centre (where rigid transforms rotate about) and the fixed image's samples
for the quality figure. :func:`prepare_reference` computes them once;
:func:`~d4m.runtime.registration.register_to_reference` takes the result, so a study pays for
them once instead of once per moving phase, with bit-for-bit the same registrations.

The mask and quality helpers (:func:`metric_region`, :func:`body_mask`, :func:`dilate_mm`,
:func:`normalized_mutual_information`) live here too. SimpleITK, numpy and scipy only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume

if TYPE_CHECKING:
    from d4m.runtime.registration import RegistrationSettings

logger = logging.getLogger(__name__)

_MAX_WORKING_VOXELS = 400_000  # the fixed box is coarsened until it holds about this many voxels
_MAX_QUALITY_VOXELS = 500_000  # the quality figure reads at most about this many voxels (regular stride)


@dataclass(frozen=True)
class PreparedReference:
    """The reference (fixed) image of a registration with everything that depends on it alone.

    Built by :func:`prepare_reference`; read-only, shared by the registrations of several phases
    (also concurrently: each registration works on its own copies of the SimpleITK images).

    Attributes
    ----------
    volume
        The fixed image.
    settings
        The registration settings the preparation followed (window, working spacing, mask margin).
    region
        Boolean metric region on the fixed grid, ``None`` for the whole image.
    mask_source
        Which metric region was used, in words.
    fixed
        The metric image the optimiser reads: cropped to the region's box, clipped, coarsened.
    mask
        The region on the grid of ``fixed`` (``None`` without a region).
    region_voxels
        Voxels of the region on the grid of ``fixed`` (the whole box without a region).
    corners
        The eight corners of the cropped box before coarsening (physical points): the moving image
        is cropped to them plus the search margin.
    working_mm
        The spacing the images are coarsened to.
    center
        Centre of mass of the region (physical point): the centre of the rigid transforms.
    quality_samples
        The fixed image's values that the quality figure reads (region, regular stride), float64.
    """

    volume: Volume
    settings: RegistrationSettings
    region: np.ndarray | None
    mask_source: str
    fixed: sitk.Image
    mask: sitk.Image | None
    region_voxels: int
    corners: tuple[tuple[float, float, float], ...]
    working_mm: float
    center: tuple[float, float, float]
    quality_samples: np.ndarray

    def quality(self, moving: Volume) -> float:
        """Normalised mutual information of ``moving`` (on the fixed grid) against the fixed image, in the region.

        Equal to ``normalized_mutual_information(volume, moving, region, settings.intensity_window)``.
        """
        values = _quality_samples(np.asarray(moving.array), self.region)
        return _nmi(self.quality_samples, values, self.settings.intensity_window, 32)


def prepare_reference(fixed: Volume, fixed_mask: Volume | None, settings: RegistrationSettings) -> PreparedReference:
    """Prepare the fixed side of a registration (see the module docstring).

    Parameters
    ----------
    fixed, fixed_mask, settings
        As for :func:`~d4m.runtime.registration.register_to_reference`: the reference phase, the
        organ label on its grid (``None``: the body is used) and the registration settings.

    Returns
    -------
    PreparedReference
        To pass to :func:`~d4m.runtime.registration.register_to_reference` for each moving phase.

    Raises
    ------
    InputError
        ``fixed_mask`` is not on the fixed grid or is empty.
    """
    region, mask_source = metric_region(fixed, fixed_mask, settings)
    return reference_from_region(fixed, region, mask_source, settings)


def reference_from_region(
    fixed: Volume, region: np.ndarray | None, mask_source: str, settings: RegistrationSettings
) -> PreparedReference:
    """:func:`prepare_reference` for a metric region already made (``None``: the whole image)."""
    fixed_img = fixed.to_sitk()
    mask_img = None
    if region is not None:
        lo, hi = bbox(region)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        fixed_img = Volume(fixed.array[box], fixed.spacing, tuple(fixed.affine[:3] @ [lo[2], lo[1], lo[0], 1.0]),
                           fixed.direction).to_sitk()
        mask_img = sitk.GetImageFromArray(np.ascontiguousarray(region[box]).astype(np.uint8))
        mask_img.CopyInformation(fixed_img)
    size_f = fixed_img.GetSize()
    corners = tuple(
        fixed_img.TransformIndexToPhysicalPoint([int(c * (n - 1)) for c, n in zip(corner, size_f, strict=True)])
        for corner in np.ndindex(2, 2, 2)
    )
    fixed_img = metric_image(fixed_img, settings.intensity_window)
    # Coarser still when the box is large (a whole body): the optimiser's cost follows the voxel count.
    box_mm3 = float(np.prod(np.asarray(fixed_img.GetSize()) * np.asarray(fixed_img.GetSpacing())))
    working = max(settings.working_spacing_mm, (box_mm3 / _MAX_WORKING_VOXELS) ** (1 / 3))
    fixed_img = coarsen(fixed_img, working)
    if mask_img is not None:
        mask_img = sitk.Resample(mask_img, fixed_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        voxels = int(sitk.GetArrayViewFromImage(mask_img).sum())
    else:
        voxels = int(np.prod(fixed_img.GetSize()))
    samples = _quality_samples(np.asarray(fixed.array), region)
    return PreparedReference(fixed, settings, region, mask_source, fixed_img, mask_img, voxels, corners, working,
                             _region_center(fixed, region), samples)


def metric_image(image: sitk.Image, window: tuple[float, float] | None) -> sitk.Image:
    """``image`` as float32, clipped to ``window`` when one is given: what the metric reads."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if window is not None:
        low, high = window
        image = sitk.Clamp(image, sitk.sitkFloat32, low, high)
    return image


def coarsen(image: sitk.Image, working_mm: float) -> sitk.Image:
    """Smooth and resample an image to at least ``working_mm`` spacing per axis (unchanged if coarser)."""
    spacing = np.asarray(image.GetSpacing())
    if working_mm <= 0 or np.all(spacing >= working_mm * 0.95):
        return image
    target = np.maximum(spacing, working_mm)
    sigma = np.sqrt(np.maximum(target**2 - spacing**2, 0.0)) / 2.0  # anti-aliasing, in mm
    smooth = sitk.SmoothingRecursiveGaussian(image, [float(max(v, 1e-3)) for v in sigma])
    size = np.maximum(1, np.floor(np.asarray(image.GetSize()) * spacing / target)).astype(int)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ ((target - spacing) / 2.0)
    low = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(smooth, [int(n) for n in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         target.tolist(), image.GetDirection(), low, sitk.sitkFloat32)


def _region_center(fixed: Volume, region: np.ndarray | None) -> tuple[float, float, float]:
    if region is None or not region.any():
        kji = (np.asarray(fixed.shape) - 1) / 2.0
    else:
        kji = _center_of_mass(region)
    ijk1 = np.array([kji[2], kji[1], kji[0], 1.0])
    x, y, z = (fixed.affine @ ijk1)[:3]
    return float(x), float(y), float(z)


def _center_of_mass(mask: np.ndarray) -> np.ndarray:
    """``ndimage.center_of_mass`` of a boolean array, from its projections on each axis.

    Bit for bit the same: every sum is an integer below 2**53, exact in float64 in any order.
    """
    total = float(np.count_nonzero(mask))
    centre = []
    for axis in range(mask.ndim):
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis), dtype=np.int64)
        centre.append(float(counts @ np.arange(mask.shape[axis], dtype=np.int64)) / total)
    return np.asarray(centre)


def metric_region(
    fixed: Volume, fixed_mask: Volume | None, settings: RegistrationSettings
) -> tuple[np.ndarray | None, str]:
    """The boolean metric region on the fixed grid and a description of where it came from.

    With ``fixed_mask``: its non-zero voxels dilated by ``settings.mask_dilation_mm``. Without:
    the body of ``fixed`` (see :func:`body_mask`), not dilated (the fixed samples reach the skin,
    so the skin–air boundary of a misaligned moving image still counts). ``None`` when the body
    mask is empty or fills the whole image (e.g. an image not in HU): the whole image is used.

    Raises
    ------
    InputError
        ``fixed_mask`` is not on the fixed grid, or has no non-zero voxel.
    """
    margin = settings.mask_dilation_mm
    if fixed_mask is not None:
        if not fixed_mask.same_grid(fixed):
            raise InputError(
                f"registration mask: expected the fixed image's grid {fixed.shape} spacing {fixed.spacing}, "
                f"found {fixed_mask.shape} spacing {fixed_mask.spacing}"
            )
        organ = np.asarray(fixed_mask.array) > 0
        if not organ.any():
            raise InputError("registration mask: expected some non-zero voxels (the liver), found none")
        return dilate_mm(organ, fixed.spacing, margin), f"liver mask dilated by {margin:g} mm"
    body = body_mask(fixed, settings.body_threshold_hu)
    fraction = float(body.mean())
    described = f"body mask (fixed > {settings.body_threshold_hu:g} HU, largest component, holes filled)"
    if fraction < 0.01 or fraction > 0.98:
        return None, f"whole image: the {described} covered {fraction:.0%} of it"
    return body, described


def body_mask(volume: Volume, threshold: float = -500.0) -> np.ndarray:
    """The patient's body: voxels above ``threshold``, largest 3D component, holes filled per slice."""
    above = np.asarray(volume.array) > threshold
    labels, count = ndimage.label(above)
    if count == 0:
        return above
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    del labels
    return _fill_holes_per_slice(body)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``binary_fill_holes`` on every ``[k]`` slice, in one labelling pass (same result, much faster).

    A background pixel stays background when its 4-connected background component (within its
    slice) reaches the slice's edge, which is what ``ndimage.binary_fill_holes`` computes.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    outside, _ = ndimage.label(~mask, structure=in_plane)
    touches_edge = np.zeros(int(outside.max()) + 1, dtype=bool)
    for edge in (outside[:, 0, :], outside[:, -1, :], outside[:, :, 0], outside[:, :, -1]):
        touches_edge[edge] = True
    touches_edge[0] = False  # label 0: the mask itself
    return ~touches_edge[outside]


def dilate_mm(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> np.ndarray:
    """Dilate a boolean ``[k, j, i]`` mask by a Euclidean margin in millimetres."""
    mask = np.asarray(mask, dtype=bool)
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    sampling = (spacing[2], spacing[1], spacing[0])
    pad = [int(math.ceil(margin_mm / s)) + 1 for s in sampling]
    lo, hi = bbox(mask)
    lo = [max(0, a - p) for a, p in zip(lo, pad, strict=True)]
    hi = [min(n, b + p) for b, p, n in zip(hi, pad, mask.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    out = np.zeros_like(mask)
    out[box] = ndimage.distance_transform_edt(~mask[box], sampling=sampling) <= margin_mm
    return out


def normalized_mutual_information(
    fixed: Volume,
    moving: Volume,
    region: np.ndarray | None = None,
    window: tuple[float, float] | None = None,
    bins: int = 32,
) -> float:
    """Normalised mutual information 2·I(F; M) / (H(F) + H(M)) in ``region``, in [0, 1].

    1 means one image determines the other (same anatomy, any monotone contrast change); near 0
    means unrelated (noise, another patient). Both images must be on the same grid.
    """
    f = _quality_samples(np.asarray(fixed.array), region)
    m = _quality_samples(np.asarray(moving.array), region)
    return _nmi(f, m, window, bins)


def _quality_samples(array: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """The voxels the quality figure reads: the region's, at a regular stride, as float64."""
    values = array[region] if region is not None else array
    stride = max(1, values.size // _MAX_QUALITY_VOXELS)
    return values.ravel()[::stride].astype(np.float64)


def _nmi(f: np.ndarray, m: np.ndarray, window: tuple[float, float] | None, bins: int) -> float:
    if f.size < 2:
        return 0.0
    f_edges, m_edges = _edges(f, window, bins), _edges(m, window, bins)
    if f_edges is None or m_edges is None:
        return 0.0
    joint = np.histogram2d(f, m, bins=(f_edges, m_edges))[0]
    p = joint / joint.sum()
    h_f, h_m, h_joint = _entropy(p.sum(axis=1)), _entropy(p.sum(axis=0)), _entropy(p.ravel())
    if h_f + h_m <= 0:
        return 0.0
    return float(np.clip(2.0 * (h_f + h_m - h_joint) / (h_f + h_m), 0.0, 1.0))


def bbox(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Half-open bounding box ``(lo, hi)`` of a non-empty boolean array."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo.append(int(present[0]))
        hi.append(int(present[-1]) + 1)
    return lo, hi


def _edges(values: np.ndarray, window: tuple[float, float] | None, bins: int) -> np.ndarray | None:
    if window is None:
        low, high = float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5))
    else:
        low, high = window
    if not high > low:
        return None
    edges = np.linspace(low, high, bins + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


__all__ = [
    "PreparedReference",
    "body_mask",
    "coarsen",
    "dilate_mm",
    "metric_image",
    "metric_region",
    "normalized_mutual_information",
    "prepare_reference",
    "reference_from_region",
]
