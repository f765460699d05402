"""Liver tumours of the phantom: what kind, how big, where, and their inner compartments.

Centres are drawn from the liver's distance map (coarse, in mm) so that the lobulated outline
stays inside the liver; some tumours are put on purpose just under the liver surface or next to
a vessel. The painted map is the *tumour byte* ``8 * instance + part``
(:class:`~d4m.training.phantom_tissues.TumorPart`), kept apart from the tissue codes so the same
anatomy renders with and without tumours.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import ndimage

from d4m.training.phantom_shapes import Canvas, SmoothNoise, rotation
from d4m.training.phantom_tissues import LIVER_TISSUES, Tissue, TumorPart

logger = logging.getLogger(__name__)


class TumorKind(str, Enum):
    """Tumour types with their own enhancement pattern."""

    HCC = "hcc"
    METASTASIS = "metastasis"
    CYST = "cyst"


#: Diameter range (mm, drawn log-uniformly) per kind, before the config's bounds apply.
KIND_DIAMETERS: dict[TumorKind, tuple[float, float]] = {
    TumorKind.HCC: (10.0, 60.0),
    TumorKind.METASTASIS: (5.0, 45.0),
    TumorKind.CYST: (5.0, 40.0),
}
_COUNT_WEIGHTS = (0.35, 0.25, 0.18, 0.12, 0.10)
_PLACEMENTS = ("edge", "vessel", "deep")


@dataclass(frozen=True)
class Tumor:
    """One placed tumour (centre in anatomy/PVP space, mm)."""

    index: int
    kind: TumorKind
    centre: tuple[float, float, float]
    diameter: float
    placement: str
    hu_draws: dict[TumorPart, float]


def draw_tumor_kinds(
    rng: np.random.Generator, kinds: tuple[TumorKind, ...], max_tumors: int, diameters: tuple[float, float]
) -> list[tuple[TumorKind, float]]:
    """Draw a case's tumour list: 1..max_tumors (kind, diameter mm), mostly of one main kind."""
    weights = np.array(_COUNT_WEIGHTS[:max_tumors] + (0.05,) * max(0, max_tumors - len(_COUNT_WEIGHTS)))
    count = int(rng.choice(np.arange(1, max_tumors + 1), p=weights / weights.sum()))
    main_p = np.array([{TumorKind.HCC: 0.4, TumorKind.METASTASIS: 0.4, TumorKind.CYST: 0.2}[k] for k in kinds])
    main = kinds[int(rng.choice(len(kinds), p=main_p / main_p.sum()))]
    out = []
    for _ in range(count):
        kind = TumorKind.CYST if (TumorKind.CYST in kinds and rng.random() < 0.2) else main
        lo, hi = KIND_DIAMETERS[kind]
        lo, hi = max(lo, diameters[0]), min(hi, diameters[1])
        if lo > hi:
            lo, hi = diameters
        out.append((kind, float(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
    return out


def place_tumors(
    rng: np.random.Generator,
    canvas: Canvas,
    wanted: list[tuple[TumorKind, float]],
    z_range: tuple[float, float],
    min_diameter: float,
) -> list[Tumor]:
    """Find centres inside the liver (``canvas.codes``) for the wanted tumours, largest first.

    A tumour that finds no room shrinks (down to ``min_diameter``) or is dropped; the centre
    snaps to a voxel centre so that even the smallest tumour holds a voxel.
    """
    grid = canvas.grid
    f = tuple(max(1, round(5.0 / grid.spacing[2 - a])) for a in range(3))
    liver_lut = np.zeros(256, bool)
    liver_lut[list(LIVER_TISSUES)] = True
    full = liver_lut[canvas.codes[:: f[0], :: f[1], :: f[2]]]
    if not full.any():
        return []
    # work in the liver's bounding box (plus a margin) of the coarse grid
    box = tuple(
        slice(max(0, int(hit[0]) - 3), int(hit[-1]) + 4)
        for hit in (np.flatnonzero(full.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3))
    )
    codes = canvas.codes[:: f[0], :: f[1], :: f[2]][box]
    liver = full[box]
    sampling = (grid.spacing[2] * f[0], grid.spacing[1] * f[1], grid.spacing[0] * f[2])
    edt = ndimage.distance_transform_edt(liver, sampling=sampling)
    vessel_lut = np.zeros(256, bool)
    vessel_lut[[Tissue.PORTAL_IN, Tissue.HEPATIC_IN, Tissue.IVC, Tissue.PORTAL_OUT]] = True
    near_vessel = ndimage.distance_transform_edt(~vessel_lut[codes], sampling=sampling)
    coarse = [canvas.z[:: f[0]][box[0]], canvas.y[:: f[1]][box[1]], canvas.x[:: f[2]][box[2]]]
    zc = coarse[0][:, None, None]
    placed: list[Tumor] = []
    order = sorted(range(len(wanted)), key=lambda i: -wanted[i][1])
    for i in order:
        kind, diameter = wanted[i]
        while True:
            r = diameter / 2.0
            room = r * 1.15 + 1.0 + 0.5 * max(sampling)
            ok = (edt >= room) & (zc >= z_range[0] + r) & (zc <= z_range[1] - r)
            for t in placed:
                c = t.centre
                dist2 = (
                    (coarse[2][None, None, :] - c[0]) ** 2
                    + (coarse[1][None, :, None] - c[1]) ** 2
                    + (coarse[0][:, None, None] - c[2]) ** 2
                )
                ok &= dist2 > (r + t.diameter / 2.0 + 3.0) ** 2
            placement = _PLACEMENTS[int(rng.integers(3))]
            pick = {
                "edge": ok & (edt < room + 7.0),
                "vessel": ok & (near_vessel > r * 0.8) & (near_vessel < r + 5.0),
                "deep": ok & (edt >= room + 7.0),
            }[placement]
            if not pick.any():
                placement, pick = "any", ok
            if pick.any() or diameter <= min_diameter:
                break
            diameter = max(min_diameter, diameter * 0.8)
        if not pick.any():
            logger.debug("tumour %d (%s, %.0f mm): no room in the liver, dropped", i, kind.value, diameter)
            continue
        k, j, ii = np.unravel_index(rng.choice(np.flatnonzero(pick)), pick.shape)
        jitter = rng.uniform(-0.5, 0.5, 3) * np.array(sampling[::-1])
        approx = (coarse[2][ii] + jitter[0], coarse[1][j] + jitter[1], coarse[0][k] + jitter[2])
        exact = grid.index((coarse[2][ii], coarse[1][j], coarse[0][k]))
        idx = grid.index(approx) or exact
        if idx is None or exact is None:
            continue
        if not liver_lut[canvas.codes[idx]]:
            idx = exact
        centre = tuple(float(grid.origin[d] + grid.spacing[d] * idx[2 - d]) for d in range(3))
        draws = {part: float(rng.random()) for part in TumorPart}
        placed.append(Tumor(len(placed) + 1, kind, centre, float(diameter), placement, draws))  # type: ignore[arg-type]
    return placed


def paint_tumors(rng: np.random.Generator, canvas: Canvas, tumors: list[Tumor]) -> np.ndarray:
    """The tumour-byte map (uint8) of ``tumors`` on the canvas grid, restricted to the liver."""
    out = np.zeros(canvas.codes.shape, np.uint8)
    liver_lut = np.zeros(256, bool)
    liver_lut[list(LIVER_TISSUES)] = True
    min_voxel = min(canvas.grid.spacing)
    for t in tumors:
        r = t.diameter / 2.0
        smooth = t.kind == TumorKind.CYST
        axes = rng.uniform(0.97, 1.03, 3) if smooth else rng.uniform(0.85, 1.15, 3)
        axes /= np.cbrt(np.prod(axes))
        rot = rotation(rng.uniform(0, 360, 3))
        lobes = SmoothNoise.sample(rng, 6, (max(4.0, 0.7 * r), max(6.0, 2.0 * r)), (0.03 if smooth else 0.12) * r)
        inner = SmoothNoise.sample(rng, 4, (max(3.0, 0.3 * r), max(5.0, 0.8 * r)), 1.0)
        found = canvas.box(np.asarray(t.centre) - r * 1.5 - 2, np.asarray(t.centre) + r * 1.5 + 2)
        if found is None:
            continue
        box, x, y, z = found
        dx, dy, dz = x - t.centre[0], y - t.centre[1], z - t.centre[2]
        dist2: np.ndarray | float = 0.0
        for a in range(3):
            local = (rot[0, a] * dx + rot[1, a] * dy + rot[2, a] * dz) / axes[a]
            dist2 = dist2 + local * local
        field = np.sqrt(dist2) - r + lobes(x, y, z)
        depth = -field
        inside = (depth > 0) & liver_lut[canvas.codes[box]] & (out[box] == 0)
        part = _parts(t, depth, inner(x, y, z), r, min_voxel)
        view = out[box]
        view[inside] = (8 * t.index + part)[inside]
    return out


def _parts(t: Tumor, depth: np.ndarray, inner: np.ndarray, r: float, min_voxel: float) -> np.ndarray:
    """Compartment of each voxel from its depth below the tumour surface (mm)."""
    part = np.empty(depth.shape, np.uint8)
    if t.kind == TumorKind.CYST:
        part[...] = TumorPart.CYST
    elif t.kind == TumorKind.HCC:
        part[...] = TumorPart.HCC_CORE
        if t.diameter >= 12:
            part[depth < max(1.6, 0.6 * min_voxel) + 0.6 * t.hu_draws[TumorPart.HCC_CAPSULE]] = TumorPart.HCC_CAPSULE
        if t.diameter >= 30:
            part[(depth > 0.35 * r) & (inner > 0.6)] = TumorPart.HCC_NECROSIS
    else:
        part[...] = TumorPart.META_CORE
        rim = max(2.0, 0.7 * min_voxel, (0.15 + 0.15 * t.hu_draws[TumorPart.META_RIM]) * r)
        part[depth < rim] = TumorPart.META_RIM
        if t.diameter >= 25:
            part[(depth > 0.55 * r) & (inner > -0.3)] = TumorPart.META_NECROSIS
    return part


def tumor_parts(tumors: list[Tumor]) -> dict[int, tuple[TumorPart, float]]:
    """Every tumour byte that may occur, with the part and its per-tumour HU draw."""
    return {8 * t.index + part: (part, t.hu_draws[part]) for t in tumors for part in TumorPart}
