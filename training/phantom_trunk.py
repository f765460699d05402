"""The trunk of the phantom: body outline and wall layers, spine, lung bases and diaphragm, ribs.

The outline is a superellipse flattened at the back with random low-order radial harmonics that
drift along z; fat and muscle thicknesses depend on the angle (thicker fat in front, paired rectus
muscles, thicker muscles behind). Everything height-independent is computed once per case and
each slice then costs a handful of 2D operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from d4m.training.phantom_shapes import Canvas, code_set, tube_voxels
from d4m.training.phantom_tissues import Tissue as T

if TYPE_CHECKING:
    from d4m.training.phantom_anatomy import Frame

_HARMONICS = 4


class Angles:
    """cos/sin of an angle field and of its harmonics, computed once."""

    def __init__(self, theta: np.ndarray) -> None:
        self.cos, self.sin = np.cos(theta), np.sin(theta)
        self.harm = [(np.cos(k * theta), np.sin(k * theta)) for k in range(2, 2 + _HARMONICS)]


@dataclass(frozen=True)
class Trunk:
    """The body outline, its fat and muscle layers (functions of angle and height) and the spine."""

    yc: float
    a: float
    b: float
    coef: np.ndarray  # (2, K) base harmonic coefficients (cos, sin)
    coef_var: np.ndarray  # (2, K) amplitude of their variation along z
    coef_wave: np.ndarray  # (2, K) wavelength along z (mm)
    coef_phase: np.ndarray  # (2, K)
    size_wave: tuple[float, float, float]  # amplitude, wavelength, phase
    fat: float
    fat_front: float
    muscle: float
    spine_y: float  # y of the vertebral bodies' centre
    vertebra: tuple[float, float]  # half width and half depth of a vertebral body
    levels: tuple[float, float, float]  # vertebra period (mm), disc fraction, phase (mm)
    paraspinal: tuple[float, float]  # half axes of the paraspinal muscles
    psoas_top: float  # z where the psoas muscles start

    @property
    def canal_y(self) -> float:
        """y of the spinal canal's centre."""
        return self.spine_y + self.vertebra[1] + 11.0

    def profile(self, ang: Angles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The height-independent parts: base outline radius, fat and muscle thickness per angle."""
        back = np.maximum(ang.sin, 0.0)
        n = 2.0 + 1.6 * back
        r = (np.abs(ang.cos / self.a) ** n + np.abs(ang.sin / self.b) ** n) ** (-1.0 / n)
        front = np.maximum(-ang.sin, 0.0)
        fat = self.fat * (1.0 + self.fat_front * front) * (1.0 - 0.5 * back) + 2.0
        muscle = self.muscle * (1.0 + 0.6 * back)
        # paired rectus muscles either side of the linea alba (angle -pi/2 is straight ahead)
        ahead = np.arccos(np.clip(-ang.sin, -1.0, 1.0))  # angle away from straight ahead
        rectus = np.exp(-(((ahead - 0.2) / 0.13) ** 2)) * (1.0 - np.exp(-((ahead / 0.03) ** 2)))
        muscle = muscle * (1.0 + 0.9 * rectus)
        return r, fat, muscle

    def radii(
        self, ang: Angles, z: float | np.ndarray, profile: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Radius of the skin, of the fat/muscle border and of the inner (peritoneal) border."""
        r, fat, muscle = profile if profile is not None else self.profile(ang)
        amp, wave, phase = self.size_wave
        pert: np.ndarray | float = 1.0 + amp * np.sin(2 * np.pi * z / wave + phase)
        scale: np.ndarray | float = 1.0
        for k, (ck, sk) in enumerate(ang.harm):
            c = self.coef[0, k] + self.coef_var[0, k] * np.sin(
                2 * np.pi * z / self.coef_wave[0, k] + self.coef_phase[0, k]
            )
            s = self.coef[1, k] + self.coef_var[1, k] * np.sin(
                2 * np.pi * z / self.coef_wave[1, k] + self.coef_phase[1, k]
            )
            scale = scale + c * ck + s * sk
        skin = r * pert * scale
        return skin, skin - fat, skin - fat - muscle


def sample_trunk(rng: np.random.Generator, frame: Frame) -> Trunk:
    """Draw the body outline, wall layers and spine of a case."""
    k = _HARMONICS
    trunk = dict(
        yc=frame.body_y,
        a=frame.half_width,
        b=frame.half_depth,
        coef=rng.normal(0, 0.025, (2, k)) / np.arange(1, k + 1),
        coef_var=rng.uniform(0, 0.012, (2, k)),
        coef_wave=rng.uniform(150, 400, (2, k)),
        coef_phase=rng.uniform(0, 2 * np.pi, (2, k)),
        size_wave=(float(rng.uniform(0, 0.04)), float(rng.uniform(250, 500)), float(rng.uniform(0, 2 * np.pi))),
        fat=float(rng.uniform(7, 30)),
        fat_front=float(rng.uniform(0.2, 1.0)),
        muscle=float(rng.uniform(7, 13)),
    )
    period = float(rng.uniform(30, 35))
    return Trunk(
        **trunk,  # type: ignore[arg-type]
        spine_y=frame.body_y + 0.3 * frame.half_depth + float(rng.uniform(-5, 5)),
        vertebra=(float(rng.uniform(20, 25)), float(rng.uniform(15, 18))),
        levels=(period, float(rng.uniform(0.2, 0.26)), float(rng.uniform(0, period))),
        paraspinal=(float(rng.uniform(24, 30)), float(rng.uniform(20, 27))),
        psoas_top=frame.liver_centre[2] - float(rng.uniform(40, 70)),
    )


def paint_trunk(canvas: Canvas, trunk: Trunk, frame: Frame) -> None:
    """Paint every slice: table, skin, fat, wall muscles, cavity, lung bases and diaphragm, spine."""
    f, t, c = frame, trunk, canvas
    x2, y2 = c.x[None, :], c.y[:, None]
    rho = np.hypot(x2, y2 - t.yc)
    ang = Angles(np.arctan2(y2 - t.yc, x2))
    profile = t.profile(ang)
    table_y = t.yc + t.b * 0.93
    curve = 18 * (x2 / 230) ** 2
    depth = y2 - table_y + curve  # below the table top, along the table's curvature
    table = (depth > 3.0) & (depth < 9.0) & (np.abs(x2) < 230)
    dome = np.maximum(
        f.dome_right - ((x2 - f.liver_centre[0]) ** 2 + (1.3 * (y2 - t.yc + 10)) ** 2) / 230.0,
        f.dome_left - ((x2 + f.liver_centre[0]) ** 2 + (1.3 * (y2 - t.yc + 10)) ** 2) / 230.0,
    ).astype(np.float32)
    period, disc, level0 = t.levels
    paraspinal = t.paraspinal
    # the spine and its muscles live in a window around the midline
    win = (c.grid.span(1, t.spine_y - 40, t.canal_y + 70), c.grid.span(0, -90, 90))
    wx, wy = x2[:, win[1]], y2[win[0], :]
    back_muscle = (
        ((np.abs(wx) - paraspinal[0] - 4) / paraspinal[0]) ** 2
        + ((wy - t.canal_y - paraspinal[1] * 0.7) / paraspinal[1]) ** 2
    ) < 1.0
    below_table = y2 < table_y
    fat_cut = y2 < table_y - 2.0
    for k, z in enumerate(c.z):
        skin, fat, inner = t.radii(ang, float(z), profile)
        out = np.zeros(rho.shape, np.uint8)
        out[table] = T.TABLE
        body = (rho < skin) & below_table
        out[body] = T.SKIN
        out[body & (rho < skin - 2.0) & fat_cut] = T.SUBCUT_FAT
        out[body & (rho < fat) & fat_cut] = T.MUSCLE
        cavity = body & (rho < inner)
        out[cavity] = T.VISC_FAT
        out[cavity & (z > dome)] = T.LUNG
        out[cavity & (z <= dome) & (z > dome - 5.0)] = T.MUSCLE
        spine_y = t.spine_y + 4.0 * math.sin((z - level0) / 180.0)
        view = out[win]
        view[back_muscle & body[win]] = T.MUSCLE
        if z < t.psoas_top:
            rp = 24.0 * min(1.0, (t.psoas_top - z) / 90.0) ** 0.7
            view[((np.abs(wx) - t.vertebra[0] - rp * 0.7) ** 2 + (wy - spine_y + 2) ** 2) < rp * rp] = T.MUSCLE
        _vertebra_slice(t, view, wx, wy, spine_y, ((z - level0) / period) % 1.0, disc)
        c.codes[k] = out


def _vertebra_slice(
    t: Trunk, out: np.ndarray, x2: np.ndarray, y2: np.ndarray, sy: float, level: float, disc: float
) -> None:
    """Vertebral body (or disc), neural arch, spinous and transverse processes, canal."""
    va, vb = t.vertebra
    ell = (x2 / va) ** 2 + ((y2 - sy) / vb) ** 2
    if level < disc:
        out[ell < 1.0] = T.DISC
    else:
        out[ell < 1.0] = T.BONE_CORTICAL
        out[((x2 / (va - 2.5)) ** 2 + ((y2 - sy) / (vb - 2.5)) ** 2) < 1.0] = T.BONE_CANCELLOUS
    cy = t.canal_y + (sy - t.spine_y)
    d = np.hypot(x2, y2 - cy)
    arch = (d < 14.0) & (y2 > cy - 9.0)
    if level < disc * 0.5:
        arch &= np.abs(x2) > 7.0  # facet joints only at the disc level
    out[arch] = T.BONE_CORTICAL
    out[arch & (d > 10.5) & (d < 12.5)] = T.BONE_CANCELLOUS
    if disc < level < 0.9:
        spinous = ((x2 / 4.0) ** 2 + ((y2 - cy - 20.0) / 10.0) ** 2) < 1.0
        out[spinous] = T.BONE_CORTICAL
        out[spinous & (((x2 / 2.0) ** 2 + ((y2 - cy - 20.0) / 7.5) ** 2) < 1.0)] = T.BONE_CANCELLOUS
    if 0.45 < level < 0.75:
        out[(np.abs(x2) > 12) & (np.abs(x2) < 36) & (np.abs(y2 - cy + 2) < 3.5)] = T.BONE_CORTICAL
    out[d < 9.0] = T.SPINAL_CANAL


def paint_ribs(canvas: Canvas, trunk: Trunk, frame: Frame, rng: np.random.Generator) -> None:
    """Ribs 5-12 on both sides: tubes from the spine round the wall, with marrow and cartilage."""
    f = frame
    layer = np.zeros(canvas.codes.shape, np.uint8)
    lz = f.liver_centre[2]
    gap = float(rng.uniform(23, 28))
    for number in range(5, 13):
        z_head = lz - 40.0 + (12 - number) * gap
        span = {12: 1.2, 11: 1.8, 10: 2.5}.get(number, 2.75)
        drop = float(rng.uniform(75, 100)) + (number - 5) * 4.0
        for side in (-1.0, 1.0):
            s = np.linspace(0.0, 1.0, 40)
            theta = np.pi / 2 - side * (0.45 + span * s)
            z = z_head - drop * s**1.1
            ang = Angles(theta)
            _, fat, inner = trunk.radii(ang, z)
            rr = 0.5 * (fat + inner)
            wall = np.stack([rr * ang.cos, trunk.yc + rr * ang.sin, z], 1)
            head = np.array([side * 30.0, trunk.spine_y + 8.0, z_head])
            blend = np.clip(s / 0.18, 0, 1)[:, None] ** 0.7
            pts = head + (wall - head) * blend
            radius = np.full(len(s), 4.6 if number < 11 else 4.0)
            cartilage = s > (0.78 if number <= 10 else 2.0)
            for tv in tube_voxels(canvas, pts, radius):
                val = np.where(tv.depth > 1.5, 2, 1).astype(np.uint8)
                view = layer[tv.box]
                np.maximum(view, np.where(tv.depth > 0, val, 0).astype(np.uint8), out=view)
            if cartilage.sum() > 1:
                for tv in tube_voxels(canvas, pts[cartilage], radius[cartilage]):
                    view = layer[tv.box]
                    np.maximum(view, np.where(tv.depth > 0, 3, 0).astype(np.uint8), out=view)
    allowed = code_set(T.MUSCLE, T.SUBCUT_FAT, T.VISC_FAT, T.LUNG)
    ok = allowed[canvas.codes]
    for value, code in ((1, T.BONE_CORTICAL), (2, T.RIB_MARROW), (3, T.CARTILAGE)):
        canvas.codes[(layer == value) & ok] = code
