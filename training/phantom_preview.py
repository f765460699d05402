"""A PNG preview of a phantom study: one axial slice per phase with the liver and tumour outlines."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from d4m.dicom_io.codes import LIVER, PHASE_ORDER, TUMOR, Phase
from d4m.dicom_io.errors import require

if TYPE_CHECKING:
    from d4m.training.phantom import PhantomCase

WINDOW = (-160.0, 240.0)
_PANEL = 320
_BAND = 18


def _slice_index(case: PhantomCase, phase: Phase) -> int:
    """The slice through the largest tumour in this phase, or through the widest liver."""
    volume, truth = case.images[phase], case.truth[phase].array
    tumors = sorted(case.meta.get("tumors", []), key=lambda t: -t["volume_ml"])
    for tumor in tumors:
        centre = tumor.get("centre_mm_by_phase", {}).get(phase.value)
        if centre is not None:
            k = round((centre[2] - volume.origin[2]) / volume.spacing[2])
            return int(np.clip(k, 0, volume.shape[0] - 1))
    pvp = case.truth[Phase.PVP]
    k_pvp = int(np.argmax((pvp.array > 0).sum(axis=(1, 2))))
    z = pvp.origin[2] + k_pvp * pvp.spacing[2]
    k = round((z - volume.origin[2]) / volume.spacing[2])
    if not 0 <= k < truth.shape[0]:
        k = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    return int(k)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=1)


def render_preview(case: PhantomCase, path: Path, window: tuple[float, float] = WINDOW) -> Path:
    """Write a PNG: the four phases side by side, window ``window`` HU, liver and tumour outlined.

    Each panel shows the slice through the largest tumour as it lies in that phase (the phases
    are misaligned), or the widest liver slice for a tumour-free study.

    Raises
    ------
    EngineError
        Pillow is not installed (``pip install 'd4m[train]'``).
    """
    image_mod = require("PIL.Image", "the phantom preview", "train")
    draw_mod = require("PIL.ImageDraw", "the phantom preview", "train")
    panels = []
    lo, hi = window
    for phase in PHASE_ORDER:
        k = _slice_index(case, phase)
        hu = case.images[phase].array[k].astype(np.float32)
        labels = case.truth[phase].array[k]
        zoom = max(1, _PANEL // max(hu.shape))
        gray = np.clip((hu - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        gray = np.kron(gray, np.ones((zoom, zoom), np.uint8)) if zoom > 1 else gray
        labels = np.kron(labels, np.ones((zoom, zoom), np.uint8)) if zoom > 1 else labels
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        rgb[_outline(labels > 0)] = LIVER.rgb
        rgb[_outline(labels == 2)] = TUMOR.rgb
        panel = np.zeros((rgb.shape[0] + _BAND, rgb.shape[1], 3), np.uint8)
        panel[_BAND:] = rgb
        img = image_mod.fromarray(panel)
        description = unicodedata.normalize("NFKD", case.acquisitions[phase].description)
        text = f"{phase.value}  '{description.encode('ascii', 'ignore').decode()}'  slice {k}"
        draw_mod.Draw(img).text((4, 3), text, fill=(255, 255, 255))
        panels.append(np.asarray(img))
    height = max(p.shape[0] for p in panels)
    row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_mod.fromarray(row).save(path, format="PNG")
    return path
