"""The phantom's body plan: trunk, skeleton, thorax base, abdominal organs, vessels and bowel.

:func:`sample_frame` draws the case-level placement (body size, liver position and size, the
diaphragm), from which the caller places the scan grids; :func:`build_anatomy` then paints the
tissue-code map (:class:`~d4m.training.phantom_tissues.Tissue`) on the anatomy grid. Painting
order matters: later structures override earlier ones only where the current code is in their
``allowed`` set, so the liver is moulded by the abdominal wall, diaphragm, kidney and spine
instead of being an ellipsoid, and vessels carve their way through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from d4m.training.phantom_shapes import (
    Canvas,
    Ellipsoid,
    Grid,
    SmoothNoise,
    catmull_rom,
    code_set,
    rotation,
    smooth_min,
    tube_voxels,
)
from d4m.training.phantom_tissues import Tissue as T
from d4m.training.phantom_trunk import paint_ribs, paint_trunk, sample_trunk

_SOFT = code_set(T.VISC_FAT, T.BOWEL_WALL, T.BOWEL_FLUID, T.STOOL, T.GAS)
_LIVER_ALLOWED = code_set(T.VISC_FAT, T.BOWEL_WALL, T.BOWEL_FLUID, T.STOOL, T.GAS, T.PANCREAS)
_NOT_BONE = ~code_set(
    T.AIR, T.TABLE, T.SKIN, T.BONE_CORTICAL, T.BONE_CANCELLOUS, T.DISC, T.SPINAL_CANAL, T.RIB_MARROW, T.CARTILAGE
)
_VESSEL_OUT = code_set(T.VISC_FAT, T.BOWEL_WALL, T.BOWEL_FLUID, T.STOOL, T.GAS, T.PANCREAS, T.MUSCLE, T.LIVER)


@dataclass(frozen=True)
class Frame:
    """Case-level placement, drawn before any grid exists (mm, LPS)."""

    body_y: float  # y of the body centre
    half_width: float
    half_depth: float
    liver_centre: tuple[float, float, float]  # centre of the right lobe
    liver_scale: float
    liver_axes: tuple[float, float, float]
    dome_right: float  # z of the right hemidiaphragm apex
    dome_left: float


def sample_frame(rng: np.random.Generator) -> Frame:
    """Draw body size, liver position and size, and the diaphragm heights."""
    body_y = float(rng.uniform(-5, 10))
    half_width = float(rng.uniform(135, 162))
    half_depth = float(rng.uniform(100, 122))
    scale = float(rng.uniform(0.85, 1.15))
    axes = tuple(float(v) * scale * float(rng.uniform(0.93, 1.07)) for v in (70.0, 85.0, 80.0))
    centre = (
        -half_width * 0.42 + float(rng.normal(0, 6)),
        body_y - 4 + float(rng.normal(0, 6)),
        float(rng.uniform(-15, 15)),
    )
    dome_right = centre[2] + axes[2] * float(rng.uniform(0.78, 0.9))
    dome_left = dome_right - float(rng.uniform(8, 20))
    return Frame(body_y, half_width, half_depth, centre, scale, axes, dome_right, dome_left)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Anatomy:
    """The painted tissue-code map (on ``canvas``) and facts for the case metadata."""

    canvas: Canvas
    facts: dict[str, float]

    @property
    def grid(self) -> Grid:
        """The anatomy grid."""
        return self.canvas.grid

    @property
    def codes(self) -> np.ndarray:
        """Tissue codes, uint8, ``[k, j, i]``."""
        return self.canvas.codes


class _Builder:
    """Paints one case's anatomy; the methods run in :meth:`build` order."""

    def __init__(self, frame: Frame, grid: Grid, rng: np.random.Generator) -> None:
        self.frame, self.rng = frame, rng
        self.canvas = Canvas(grid)
        self.trunk = sample_trunk(rng, frame)
        self.scale = frame.liver_scale
        self.spine_y, self.vertebra = self.trunk.spine_y, self.trunk.vertebra
        self.aorta_xy = (float(rng.uniform(12, 22)), self.spine_y - self.vertebra[1] - 15.0)
        self.ivc_xy = (float(rng.uniform(-28, -20)), self.spine_y - self.vertebra[1] - 10.0)
        self.z_lo, self.z_hi = float(self.canvas.z[0]), float(self.canvas.z[-1])
        self.r_min = max(1.0, 0.42 * grid.spacing[0])
        self.kidney_centres: list[np.ndarray] = []
        self.facts: dict[str, float] = {}

    # -- thorax ---------------------------------------------------------------------------------
    def heart(self) -> None:
        f, rng = self.frame, self.rng
        c = (25.0 + float(rng.normal(0, 8)), self.trunk.yc - 35.0, f.dome_left + float(rng.uniform(35, 50)))
        heart = Ellipsoid(c, (62.0, 50.0, 48.0), rotation((0, 20, 30)))
        self._paint_blob(heart, T.MYOCARDIUM, code_set(T.LUNG), shell=(T.HEART, -9.0))

    # -- bowel ----------------------------------------------------------------------------------
    def bowel(self) -> None:
        f, rng, t = self.frame, self.rng, self.trunk
        lz = f.liver_centre[2]
        layer = np.zeros(self.canvas.codes.shape, np.uint8)
        w = t.a - t.fat - t.muscle
        jit = lambda s: rng.normal(0, s, 3)  # noqa: E731 - tiny local helper
        colon = np.array(
            [
                (-w + 40, t.yc + 5, self.z_lo - 30),
                (-w + 38, t.yc + 5, lz - 95),
                (-w + 45, t.yc - 25, lz - 70),
                (-30, t.yc - 0.62 * t.b, lz - 90),
                (35, t.yc - 0.6 * t.b, lz - 85),
                (w - 40, t.yc - 10, lz - 35),
                (w - 35, t.yc + 15, lz - 90),
                (w - 40, t.yc + 10, self.z_lo - 30),
            ]
        ) + np.array([jit(8) for _ in range(8)])
        radii = rng.uniform(17, 25, len(colon))
        self._bowel_tube(layer, colon, radii, wall=2.5, gas=float(rng.uniform(0.1, 0.4)), stool=True)
        for _ in range(int(rng.integers(6, 11))):
            p = np.array([rng.uniform(-50, 60), t.yc + rng.uniform(-60, 10), rng.uniform(self.z_lo - 20, lz - 70)])
            d = rng.normal(size=3)
            pts = [p]
            for _ in range(int(rng.integers(6, 12))):
                d = d / np.linalg.norm(d) + rng.normal(0, 0.5, 3)
                d[2] *= 0.6
                p = pts[-1] + 14.0 * d / np.linalg.norm(d)
                p[0] = np.clip(p[0], -w + 30, w - 30)
                p[1] = np.clip(p[1], t.yc - t.b + 40, t.yc + 20)
                pts.append(p)
            gas = float(rng.uniform(0.05, 0.3)) if rng.random() < 0.35 else 0.0
            self._bowel_tube(layer, np.array(pts), rng.uniform(9, 13, len(pts)), wall=2.0, gas=gas, stool=False)
        ok = _SOFT[self.canvas.codes]
        for value, code in ((1, T.BOWEL_WALL), (2, T.BOWEL_FLUID), (3, T.STOOL), (4, T.GAS)):
            self.canvas.codes[(layer == value) & ok] = code
        self._stomach()

    def _bowel_tube(
        self, layer: np.ndarray, control: np.ndarray, radii: np.ndarray, wall: float, gas: float, stool: bool
    ) -> None:
        curve = catmull_rom(np.column_stack([control, radii]), step=6.0)
        pts, rad = curve[:, :3], curve[:, 3]
        bubbles = SmoothNoise.sample(self.rng, 8, (6.0, 14.0), 1.0)
        for tv in tube_voxels(self.canvas, pts, rad):
            lumen = tv.depth > wall
            val = np.where(tv.depth > 0, 1, 0).astype(np.uint8)
            content = 3 if stool else 2
            val[lumen] = content
            if gas > 0:
                val[lumen & (tv.along < -(1.0 - 2.0 * gas) * (tv.radius - wall))] = 4
            if stool:
                val[lumen & (bubbles(tv.x, tv.y, tv.z) > 1.6)] = 4
            view = layer[tv.box]
            np.maximum(view, val, out=view)

    def _stomach(self) -> None:
        f, rng, t = self.frame, self.rng, self.trunk
        lz = f.liver_centre[2]
        fundus = Ellipsoid((55.0, t.yc - 5.0, lz + 25.0), (38.0, 38.0, 42.0))
        body = Ellipsoid((20.0, t.yc - 50.0, lz - 15.0), (48.0, 24.0, 30.0), rotation((0, -25, -20)))
        noise = SmoothNoise.sample(rng, 5, (40, 90), 4.0)
        lo = np.minimum(fundus.bounds(8)[0], body.bounds(8)[0])
        hi = np.maximum(fundus.bounds(8)[1], body.bounds(8)[1])
        found = self.canvas.box(lo, hi)
        if found is None:
            return
        box, x, y, z = found
        field = smooth_min(fundus.field(x, y, z), body.field(x, y, z), 15.0) + noise(x, y, z)
        inside = field < 0
        if not inside.any():
            return
        ys = np.broadcast_to(y, inside.shape)[inside]
        level = ys.min() + float(rng.uniform(0.1, 0.45)) * (ys.max() - ys.min())
        fill = T.STOOL if rng.random() < 0.3 else T.BOWEL_FLUID
        self.canvas.paint(box, inside, T.BOWEL_WALL, _SOFT)
        self.canvas.paint(box, field < -4.0, fill, code_set(T.BOWEL_WALL))
        self.canvas.paint(box, (field < -4.0) & (y < level), T.GAS, code_set(fill))

    # -- solid organs ---------------------------------------------------------------------------
    def kidneys(self) -> None:
        f, rng = self.frame, self.rng
        lz = f.liver_centre[2]
        for side in (-1.0, 1.0):
            zc = lz - (78.0 if side < 0 else 62.0) * self.scale + float(rng.normal(0, 8))
            centre = np.array([side * float(rng.uniform(62, 75)), self.spine_y + float(rng.uniform(5, 15)), zc])
            axes = (float(rng.uniform(20, 25)), float(rng.uniform(29, 35)), float(rng.uniform(50, 60)))
            rot = rotation((0.0, side * 10.0, side * 30.0))
            kid = Ellipsoid(tuple(centre), axes, rot)
            self._paint_blob(kid, T.KIDNEY_CORTEX, _SOFT, shell=(T.KIDNEY_MEDULLA, -6.0))
            hilum = np.array([-side, -0.7, 0.0]) / math.hypot(1.0, 0.7)
            sinus = Ellipsoid(
                tuple(centre + hilum * axes[0] * 0.8), (axes[0] * 0.55, axes[1] * 0.35, axes[2] * 0.5), rot
            )
            self._paint_blob(
                sinus, T.RENAL_SINUS, code_set(T.KIDNEY_MEDULLA, T.KIDNEY_CORTEX), shell=(T.RENAL_PELVIS, -5.0)
            )
            self.kidney_centres.append(centre + hilum * axes[0] * 1.3)

    def spleen(self) -> None:
        f, rng = self.frame, self.rng
        lz = f.liver_centre[2]
        centre = (
            float(rng.uniform(85, 100)),
            self.spine_y + float(rng.uniform(-5, 15)),
            lz + float(rng.uniform(-5, 15)),
        )
        size = float(rng.uniform(0.8, 1.2))
        organ = Ellipsoid(centre, (26.0 * size, 55.0 * size, 48.0 * size), rotation((0, 0, 35)))
        hilum = Ellipsoid((centre[0] - 38 * size, centre[1] - 22 * size, centre[2]), (30.0 * size,) * 3)
        noise = SmoothNoise.sample(rng, 4, (40, 80), 3.0)
        found = self.canvas.box(*organ.bounds(10))
        if found is None:
            return
        box, x, y, z = found
        field = np.maximum(organ.field(x, y, z), -hilum.field(x, y, z)) + noise(x, y, z)
        self.canvas.paint(box, field < 0, T.SPLEEN, _SOFT)
        self.spleen_hilum = np.array([centre[0] - 20 * size, centre[1] - 10 * size, centre[2] - 10])

    def pancreas(self) -> None:
        rng, lz, sy = self.rng, self.frame.liver_centre[2], self.spine_y
        ctrl = np.array(
            [
                (-18, sy - 48, lz - 62),
                (5, sy - 58, lz - 50),
                (40, sy - 45, lz - 38),
                (72, sy - 15, lz - 28),
            ]
        ) + rng.normal(0, 4, (4, 3))
        rad = np.array([14.0, 10.0, 9.5, 8.0]) * rng.uniform(0.85, 1.1)
        curve = catmull_rom(np.column_stack([ctrl, rad]), step=4.0)
        lobules = SmoothNoise.sample(rng, 4, (8, 16), 2.0)
        for tv in tube_voxels(self.canvas, curve[:, :3], curve[:, 3]):
            self.canvas.paint(tv.box, tv.depth + lobules(tv.x, tv.y, tv.z) > 0, T.PANCREAS, _SOFT)
        self.pancreas_ctrl = ctrl

    def liver(self) -> None:
        f, rng, s = self.frame, self.rng, self.scale
        (lx, ly, lz), (ax, ay, az) = f.liver_centre, f.liver_axes
        left_c = (lx + 88 * s + float(rng.normal(0, 6)), ly - 38 * s + float(rng.normal(0, 5)), lz + 18 * s)
        left_axes = (float(rng.uniform(55, 70)) * s, float(rng.uniform(26, 34)) * s, float(rng.uniform(36, 46)) * s)
        left_angle = math.radians(float(rng.uniform(-25, -8)))
        caud_c = (self.ivc_xy[0] + 16.0, self.ivc_xy[1] - 16.0, lz + float(rng.uniform(-10, 10)))
        caudate = Ellipsoid(caud_c, (18.0 * s, 15.0 * s, 28.0 * s))
        taper = float(rng.uniform(0.25, 0.45))
        lean = float(rng.uniform(-0.25, 0.1))
        coarse = SmoothNoise.sample(rng, 8, (60, 150), float(rng.uniform(5, 8)))
        fine = SmoothNoise.sample(rng, 8, (18, 40), float(rng.uniform(1.5, 2.5)))
        lo = np.array([lx - ax - 20, min(ly - ay, left_c[1] - 60) - 20, lz - az - 20])
        hi = np.array([left_c[0] + left_axes[0] + 20, ly + ay + 20, lz + az + 20])
        found = self.canvas.box(lo, hi)
        if found is None:
            return
        box, x, y, z = found
        down = np.clip((lz - z) / az, 0.0, 1.0)
        tap = 1.0 - taper * down
        dx = x - lx - lean * ax * down
        right = (np.sqrt((dx / (ax * tap)) ** 2 + ((y - ly) / (ay * tap)) ** 2 + ((z - lz) / az) ** 2) - 1.0) * az
        u = math.cos(left_angle) * (x - left_c[0]) + math.sin(left_angle) * (y - left_c[1])
        v = -math.sin(left_angle) * (x - left_c[0]) + math.cos(left_angle) * (y - left_c[1])
        thin = 1.0 - 0.6 * np.clip(u / left_axes[0], 0.0, 1.0)
        left = (
            (
                np.sqrt(
                    (u / left_axes[0]) ** 2
                    + (v / (left_axes[1] * thin)) ** 2
                    + ((z - left_c[2]) / (left_axes[2] * thin)) ** 2
                )
                - 1.0
            )
            * left_axes[1]
            * 1.5
        )
        field = smooth_min(smooth_min(right, left, 25.0), caudate.field(x, y, z), 12.0)
        field = field + coarse(x, y, z) + fine(x, y, z)
        self.canvas.paint(box, field < 0, T.LIVER, _LIVER_ALLOWED)
        self.liver_mask = self.canvas.codes == T.LIVER

    def gallbladder(self) -> None:
        f, rng, s = self.frame, self.rng, self.scale
        if rng.random() < 0.15:
            return
        lx, ly, lz = f.liver_centre
        centre = (lx + 38 * s + float(rng.normal(0, 5)), ly - 50 * s + float(rng.normal(0, 5)), lz - 48 * s)
        gb = Ellipsoid(
            centre,
            (float(rng.uniform(12, 17)), float(rng.uniform(13, 18)), float(rng.uniform(30, 42))),
            rotation((float(rng.uniform(-50, -30)), 0, 20)),
        )
        self._paint_blob(gb, T.GALLBLADDER, code_set(T.LIVER, *np.flatnonzero(_SOFT)))

    # -- vessels --------------------------------------------------------------------------------
    def great_vessels(self) -> None:
        f, rng = self.frame, self.rng
        lz = f.liver_centre[2]
        ax_, ay_ = self.aorta_xy
        ix, iy = self.ivc_xy
        bif = lz - float(rng.uniform(140, 170))
        aorta = np.array(
            [
                (ax_ + 6, ay_ + 18, self.z_hi + 40),
                (ax_ + 3, ay_ + 8, f.dome_left),
                (ax_, ay_, lz - 60),
                (ax_ - 3, ay_ - 2, bif),
            ]
        )
        r_ao = float(rng.uniform(10, 13))
        self._tube(aorta, [r_ao + 1.5, r_ao + 0.5, r_ao, r_ao - 1.5], T.AORTA, _NOT_BONE)
        for side in (-1.0, 1.0):
            iliac = np.array(
                [
                    (ax_ - 3, ay_ - 2, bif + 5),
                    (ax_ - 3 + side * 30, ay_ + 5, bif - 50),
                    (ax_ + side * 55, ay_ + 20, self.z_lo - 40),
                ]
            )
            self._tube(iliac, [r_ao * 0.6, r_ao * 0.55, r_ao * 0.55], T.AORTA, _NOT_BONE)
        ivc = np.array(
            [
                (ix, iy, self.z_lo - 40),
                (ix, iy, lz - 50),
                (ix + 2, iy - 4, lz + 10),
                (ix + 8, iy - 12, f.dome_right - 5),
                (ix + 18, iy - 28, f.dome_right + 30),
            ]
        )
        self.ivc_curve = catmull_rom(ivc, 4.0)
        self._tube(ivc, [11.0, 11.5, 12.0, 13.0, 14.0], T.IVC, _NOT_BONE)
        # celiac / SMA and renal vessels
        sma = np.array([(ax_, ay_ - 8, lz - 55), (ax_ - 4, ay_ - 28, lz - 68), (ax_ - 8, ay_ - 36, self.z_lo - 20)])
        self._tube(sma, [3.5, 3.5, 3.0], T.AORTA, _VESSEL_OUT)
        for centre in self.kidney_centres:
            z = float(centre[2])
            left = centre[0] > 0
            vein = [centre, (ax_, ay_ - 15, z + 8), (ix, iy, z + 10)] if left else [centre, (ix, iy, z + 5)]
            self._tube(np.array(vein, float), [5.0] * len(vein), T.RENAL_VEIN, _VESSEL_OUT)
            self._tube(np.array([(ax_, ay_, z + 12), centre + (0, 6, 0)]), [3.0, 3.0], T.AORTA, _VESSEL_OUT)

    def portal_system(self) -> None:
        f, rng, s = self.frame, self.rng, self.scale
        (lx, ly, lz) = f.liver_centre
        back = np.array([0.0, 11.0, 0.0])
        conf = self.pancreas_ctrl[1] + back
        splenic = np.vstack([self.spleen_hilum, self.pancreas_ctrl[3] + back, self.pancreas_ctrl[2] + back, conf])
        self._tube(splenic, [4.5] * 4, T.PORTAL_OUT, _VESSEL_OUT)
        smv = np.array([conf, conf + (3, -5, -40), conf + (5, -10, -120)])
        self._tube(smv, [5.5, 5.0, 4.5], T.PORTAL_OUT, _VESSEL_OUT)
        porta = self._nearest_liver(np.array([lx + 32 * s, ly - 8 * s, lz - 22 * s]))
        main = np.array([conf, 0.5 * (conf + porta) + (0, 0, 8), porta])
        r_pv = float(rng.uniform(6, 7.5))
        self._tube(main, [r_pv] * 3, T.PORTAL_OUT, _VESSEL_OUT)
        centre = np.array(f.liver_centre)
        roots = [
            (porta, np.array([-0.85, 0.35, 0.2]), r_pv * 0.8),
            (porta, np.array([0.8, -0.55, 0.15]), r_pv * 0.7),
        ]
        self._tree(roots, centre, T.PORTAL_IN, budget=260)
        top = self.ivc_curve[np.argmin(np.abs(self.ivc_curve[:, 2] - (f.dome_right - 18)))]
        roots = [
            (top + (-8, 0, 0), np.array([-0.8, 0.15, -0.55]), 5.5),
            (top + (-2, -8, 0), np.array([-0.25, -0.85, -0.45]), 5.0),
            (top + (6, -6, 0), np.array([0.75, -0.55, -0.35]), 4.5),
        ]
        self._tree(roots, centre, T.HEPATIC_IN, budget=260)

    def _tree(self, roots: list, centre: np.ndarray, code: T, budget: int) -> None:
        rng, grid = self.rng, self.canvas.grid
        mask = self.liver_mask

        def inside(p: np.ndarray) -> bool:
            idx = grid.index(p)
            return idx is not None and bool(mask[idx])

        stack = [(np.asarray(p, float), d / np.linalg.norm(d), float(r), 0) for p, d, r in roots]
        layer_boxes = []
        count = 0
        while stack and count < budget:
            p, d, r, depth = stack.pop()
            length = float(np.clip(r * rng.uniform(7, 12), 8, 70))
            step = float(np.clip(r * 1.3, 3.0, 8.0))
            pts = [p]
            for _ in range(max(2, math.ceil(length / step))):
                d = d + rng.normal(0, 0.15, 3)
                d /= np.linalg.norm(d)
                q = pts[-1] + step * d
                if not inside(q):
                    d = 0.4 * d + 0.6 * (centre - pts[-1]) / (np.linalg.norm(centre - pts[-1]) + 1e-6)
                    d /= np.linalg.norm(d)
                    q = pts[-1] + step * d
                    if not inside(q):
                        break
                pts.append(q)
            if len(pts) < 2:
                continue
            count += 1
            r_end = r * 0.85
            layer_boxes.append((np.array(pts), np.linspace(r, r_end, len(pts))))
            if r_end * 0.75 < self.r_min or depth >= 6:
                continue
            perp = _perpendicular(d, rng)
            a1, a2 = math.radians(rng.uniform(20, 45)), -math.radians(rng.uniform(20, 45))
            stack.append((pts[-1], math.cos(a1) * d + math.sin(a1) * perp, r_end * rng.uniform(0.72, 0.88), depth + 1))
            stack.append((pts[-1], math.cos(a2) * d + math.sin(a2) * perp, r_end * rng.uniform(0.58, 0.75), depth + 1))
            if len(pts) > 3 and rng.random() < 0.6:
                mid = len(pts) // 2
                side = _perpendicular(d, rng)
                a3 = math.radians(rng.uniform(45, 80))
                r_side = r * rng.uniform(0.4, 0.55)
                if r_side >= self.r_min:
                    stack.append((pts[mid], math.cos(a3) * d + math.sin(a3) * side, r_side, depth + 2))
        allowed = code_set(T.LIVER)
        for branch, radii in layer_boxes:
            for tv in tube_voxels(self.canvas, branch, radii):
                self.canvas.paint(tv.box, (tv.depth > 0) & mask[tv.box], code, allowed)
        self.facts[f"{code.name.lower()}_branches"] = float(count)

    def _nearest_liver(self, p: np.ndarray) -> np.ndarray:
        ks, js, is_ = np.nonzero(self.liver_mask[:, ::2, ::2])
        g = self.canvas.grid
        pts = np.column_stack(
            [g.origin[0] + is_ * 2 * g.spacing[0], g.origin[1] + js * 2 * g.spacing[1], g.origin[2] + ks * g.spacing[2]]
        )
        # step 6 mm inside the surface so the tree starts within the parenchyma
        best = pts[np.argmin(((pts - p) ** 2).sum(1))]
        inward = np.asarray(self.frame.liver_centre) - best
        return best + 6.0 * inward / (np.linalg.norm(inward) + 1e-6)

    # -- painting helpers -----------------------------------------------------------------------
    def _paint_blob(self, shape: Ellipsoid, code: T, allowed: np.ndarray, shell: tuple[T, float] | None = None) -> None:
        found = self.canvas.box(*shape.bounds(2.0))
        if found is None:
            return
        box, x, y, z = found
        field = shape.field(x, y, z)
        self.canvas.paint(box, field < 0, code, allowed)
        if shell is not None:
            self.canvas.paint(box, field < shell[1], shell[0], code_set(code))

    def _tube(self, control: np.ndarray, radii: list[float], code: T, allowed: np.ndarray) -> None:
        pts = np.asarray(control, float)
        rad = np.asarray(radii, float)
        curve = catmull_rom(np.column_stack([pts, rad]), step=5.0) if len(pts) > 2 else np.column_stack([pts, rad])
        for tv in tube_voxels(self.canvas, curve[:, :3], curve[:, 3]):
            self.canvas.paint(tv.box, tv.depth > 0, code, allowed)


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    v -= (v @ d) * d
    return v / (np.linalg.norm(v) + 1e-9)


def build_anatomy(frame: Frame, grid: Grid, rng: np.random.Generator) -> Anatomy:
    """Paint a case's anatomy on ``grid``; the same ``frame`` and ``rng`` state give the same map."""
    b = _Builder(frame, grid, rng)
    steps: list[Callable[[], None]] = [
        b.heart,
        b.bowel,
        b.kidneys,
        b.spleen,
        b.pancreas,
        b.liver,
        b.gallbladder,
        b.great_vessels,
        b.portal_system,
    ]
    paint_trunk(b.canvas, b.trunk, frame)
    paint_ribs(b.canvas, b.trunk, frame, rng)
    for step in steps:
        step()
    liver = np.isin(b.canvas.codes, (T.LIVER, T.PORTAL_IN, T.HEPATIC_IN))
    b.facts["liver_ml_anatomy"] = float(liver.sum()) * grid.voxel_ml
    return Anatomy(b.canvas, b.facts)
