"""From network scores to a clean label map, and per-tumour measurements for the report.

Post-processing (the paper keeps only tumours inside the liver, Sec. IV-B), in this order:

1. ``argmax`` over the class axis → 0 background, 1 liver, 2 tumour.
2. The *liver region* is liver ∪ tumour. Only its largest connected component is kept
   (26-connectivity); everything outside becomes background. A tumour is therefore kept
   only if it touches (overlaps the region of) the kept liver.
3. Holes of the kept region (enclosed background, 3D) are filled with liver.
4. Tumour components smaller than ``min_tumor_voxels`` become liver.
5. Tumour components whose outer border (the voxels 26-adjacent to them) is less than
   ``min_liver_contact`` liver become background: a "tumour" that merely touches the liver, e.g.
   one painted in the kidney or the spine and joined to the liver by a few voxels, is not a liver
   tumour. An intrahepatic tumour's border is all liver, an exophytic one's typically a third or more.

numpy + scipy.ndimage only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from d4m.dicom_io.codes import LIVER, TUMOR
from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)

#: Full 3×3×3 neighbourhood (26-connectivity) used for every component analysis.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)

#: Brute-force pairwise diameters up to this many surface points; beyond, use the convex hull.
_BRUTE_FORCE_POINTS = 2000


@dataclass(frozen=True)
class PostprocessSettings:
    """Which clean-up steps run after the argmax (stored in the bundle manifest).

    Attributes
    ----------
    largest_liver
        Keep only the largest connected liver region (liver ∪ tumour).
    fill_holes
        Fill background enclosed by the kept liver region with liver.
    min_tumor_voxels
        Tumour components with fewer voxels are relabelled liver (0 keeps all).
    min_liver_contact
        Tumour components whose border is less than this fraction liver become background
        (0 keeps all; the default 0.25 asks for a quarter of the border).
    """

    largest_liver: bool = True
    fill_holes: bool = True
    min_tumor_voxels: int = 0
    min_liver_contact: float = 0.25

    def __post_init__(self) -> None:
        if self.min_tumor_voxels < 0:
            raise InputError(f"postprocess: expected min_tumor_voxels >= 0, found {self.min_tumor_voxels}")
        if not 0.0 <= self.min_liver_contact <= 1.0:
            raise InputError(f"postprocess: expected min_liver_contact in [0, 1], found {self.min_liver_contact}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"largest_liver": self.largest_liver, "fill_holes": self.fill_holes,
                "min_tumor_voxels": self.min_tumor_voxels, "min_liver_contact": self.min_liver_contact}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessSettings:
        """Read the form written by :meth:`to_dict` (unknown keys refused)."""
        unknown = sorted(set(data) - set(cls().to_dict()))
        if unknown:
            raise InputError(f"postprocess: expected keys among {sorted(cls().to_dict())}, found {unknown}")
        return cls(**data)


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """Argmax over the class axis of ``(K, z, y, x)`` scores → ``uint8`` label map."""
    if scores.ndim != 4:
        raise InputError(f"postprocess: expected (K, z, y, x) scores, found shape {scores.shape}")
    return np.argmax(scores, axis=0).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    components, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count <= 1:
        return components > 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def clean_labels(labels: np.ndarray, settings: PostprocessSettings | None = None) -> np.ndarray:
    """Apply the liver / tumour clean-up to a label map (0 bg, 1 liver, 2 tumour).

    Parameters
    ----------
    labels
        ``(z, y, x)`` integer label map.
    settings
        Which steps run; defaults to all of them with no size threshold.

    Returns
    -------
    numpy.ndarray
        A new ``uint8`` label map.
    """
    settings = settings or PostprocessSettings()
    if labels.ndim != 3:
        raise InputError(f"postprocess: expected a (z, y, x) label map, found shape {labels.shape}")
    out = labels.astype(np.uint8, copy=True)
    region = out > 0
    if settings.largest_liver:
        region = largest_component(region)
        removed = int(np.count_nonzero(out)) - int(np.count_nonzero(region))
        if removed:
            logger.debug("postprocess: removed %d voxels outside the largest liver region", removed)
        out[~region] = 0
    if settings.fill_holes and region.any():
        holes = ndimage.binary_fill_holes(region) & ~region
        out[holes] = LIVER.value
    if settings.min_tumor_voxels or settings.min_liver_contact:
        # one labelling serves both rules: two tumour components are never 26-adjacent, so
        # relabelling the small ones leaves every other component's border as it was
        components, count = ndimage.label(out == TUMOR.value, structure=CONNECTIVITY)
        if settings.min_tumor_voxels:
            small = np.bincount(components.ravel(), minlength=count + 1) < settings.min_tumor_voxels
            small[0] = False
            out[small[components]] = LIVER.value
            components[small[components]] = 0
        if settings.min_liver_contact:
            out[_detached_tumors(out, components, count, settings.min_liver_contact)] = 0
    return out


def _detached_tumors(labels: np.ndarray, components: np.ndarray, count: int, min_contact: float) -> np.ndarray:
    """Tumour ``components`` (1..``count``) whose 26-neighbour border in ``labels`` is under ``min_contact`` liver."""
    detached = np.zeros(count + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        inside = components[grown] == index
        border = ndimage.binary_dilation(inside, structure=CONNECTIVITY) & ~inside
        liver = np.count_nonzero(labels[grown][border] == LIVER.value)
        detached[index] = liver < min_contact * np.count_nonzero(border)
    return detached[components]


def postprocess(scores: np.ndarray, settings: PostprocessSettings | None = None) -> np.ndarray:
    """Scores ``(K, z, y, x)`` → cleaned ``uint8`` label map (argmax then :func:`clean_labels`)."""
    return clean_labels(labels_from_scores(scores), settings)


@dataclass(frozen=True)
class TumorComponent:
    """One connected tumour of a label map.

    Attributes
    ----------
    index
        1-based number, tumours sorted by decreasing volume.
    voxels
        Voxel count.
    volume_ml
        Volume in millilitres (cm³).
    longest_diameter_mm
        Largest distance between two voxel centres of the tumour, in 3D.
    longest_axial_diameter_mm
        Largest in-plane distance on any one slice (the RECIST measurement).
    centroid_ijk
        Centre of mass as voxel indices ``(i, j, k)``.
    centroid_lps
        Centre of mass in patient coordinates (mm), when an affine was given.
    """

    index: int
    voxels: int
    volume_ml: float
    longest_diameter_mm: float
    longest_axial_diameter_mm: float
    centroid_ijk: tuple[float, float, float]
    centroid_lps: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, rounded for reports."""
        return {
            "index": self.index,
            "voxels": self.voxels,
            "volume_ml": round(self.volume_ml, 3),
            "longest_diameter_mm": round(self.longest_diameter_mm, 2),
            "longest_axial_diameter_mm": round(self.longest_axial_diameter_mm, 2),
            "centroid_ijk": [round(c, 2) for c in self.centroid_ijk],
            "centroid_lps": None if self.centroid_lps is None else [round(c, 2) for c in self.centroid_lps],
        }


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise Euclidean distance between rows of ``points`` (mm)."""
    if len(points) < 2:
        return 0.0
    if len(points) > _BRUTE_FORCE_POINTS:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat or degenerate sets: fall back to the extreme points per axis
            extremes = np.concatenate([points[np.argmin(points, 0)], points[np.argmax(points, 0)]])
            points = np.unique(extremes, axis=0)
    best = 0.0
    for start in range(0, len(points), 512):
        block = points[start:start + 512]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """Voxel indices ``(k, j, i)`` of the boundary voxels of a mask (all voxels if tiny)."""
    surface = mask & ~ndimage.binary_erosion(mask, structure=CONNECTIVITY)
    return np.argwhere(surface if surface.any() else mask)


def tumor_components(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
    tumor_label: int = TUMOR.value,
) -> list[TumorComponent]:
    """Measure each connected tumour of a label map.

    Parameters
    ----------
    labels
        ``(z, y, x)`` label map.
    spacing
        Voxel size along ``i``, ``j``, ``k`` (x, y, z) in mm, as :attr:`Volume.spacing`.
    affine
        Optional 4×4 voxel ``(i, j, k)`` → LPS matrix (:attr:`Volume.affine`) for
        ``centroid_lps``.
    tumor_label
        Label value of tumours.

    Returns
    -------
    list[TumorComponent]
        Sorted by decreasing volume (empty when there is no tumour).
    """
    if labels.ndim != 3:
        raise InputError(f"tumors: expected a (z, y, x) label map, found shape {labels.shape}")
    scale_kji = np.asarray(spacing[::-1], dtype=np.float64)
    voxel_ml = float(np.prod(scale_kji)) / 1000.0
    components, count = ndimage.label(labels == tumor_label, structure=CONNECTIVITY)
    found = []
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        mask = components[box] == number
        offset = np.asarray([s.start for s in box], dtype=np.float64)
        voxels = int(mask.sum())
        centroid_kji = np.argwhere(mask).mean(0) + offset
        surface = _surface_points(mask).astype(np.float64)
        diameter = _max_distance(surface * scale_kji)
        axial = 0.0
        for k in np.unique(surface[:, 0]):
            in_slice = surface[surface[:, 0] == k][:, 1:] * scale_kji[1:]
            axial = max(axial, _max_distance(in_slice))
        ijk = tuple(float(c) for c in centroid_kji[::-1])
        lps = None
        if affine is not None:
            lps = tuple(float(c) for c in (np.asarray(affine) @ np.array([*ijk, 1.0]))[:3])
        found.append((voxels, diameter, axial, ijk, lps))
    found.sort(key=lambda t: -t[0])
    return [
        TumorComponent(n, v, v * voxel_ml, d, a, ijk, lps)  # type: ignore[arg-type]
        for n, (v, d, a, ijk, lps) in enumerate(found, start=1)
    ]


__all__ = [
    "CONNECTIVITY",
    "PostprocessSettings",
    "TumorComponent",
    "clean_labels",
    "labels_from_scores",
    "largest_component",
    "postprocess",
    "tumor_components",
]
