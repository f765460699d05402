"""Geometry primitives of the phantom: voxel grids, a label canvas, implicit shapes and tubes.

Everything works in DICOM patient space (LPS, millimetres): ``x`` grows to the patient's left,
``y`` to the back, ``z`` to the head. Shapes are evaluated only inside their bounding box, on
broadcast 1D coordinate axes, so no per-voxel Python loop is ever run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from d4m.dicom_io.volume import Volume

#: ``(slice_k, slice_j, slice_i)`` of a box inside a grid.
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid (identity direction): ``shape`` is ``(nk, nj, ni)``.

    ``spacing`` and ``origin`` are in ``(x, y, z)`` order, as in :class:`~d4m.dicom_io.volume.Volume`.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, dim: int) -> np.ndarray:
        """World coordinates (mm, float32) of the voxel centres along ``x`` (0), ``y`` (1) or ``z`` (2)."""
        n = self.shape[2 - dim]
        return (self.origin[dim] + self.spacing[dim] * np.arange(n)).astype(np.float32)

    def span(self, dim: int, lo: float, hi: float) -> slice:
        """Index range of the voxel centres whose coordinate along ``dim`` lies in ``[lo, hi]``."""
        n = self.shape[2 - dim]
        start = max(0, math.ceil((lo - self.origin[dim]) / self.spacing[dim] - 1e-6))
        stop = min(n, math.floor((hi - self.origin[dim]) / self.spacing[dim] + 1e-6) + 1)
        return slice(start, max(start, stop))

    def index(self, point: Sequence[float]) -> tuple[int, int, int] | None:
        """``(k, j, i)`` of the voxel nearest a point, or ``None`` outside the grid."""
        ijk = [round((point[d] - self.origin[d]) / self.spacing[d]) for d in range(3)]
        if all(0 <= ijk[d] < self.shape[2 - d] for d in range(3)):
            return ijk[2], ijk[1], ijk[0]
        return None

    def crop_z(self, start: int, count: int) -> Grid:
        """The sub-grid of ``count`` slices from slice ``start``."""
        z0 = self.origin[2] + start * self.spacing[2]
        return Grid((count, self.shape[1], self.shape[2]), self.spacing, (self.origin[0], self.origin[1], z0))

    def volume(self, array: np.ndarray) -> Volume:
        """A :class:`Volume` of this grid around ``array``."""
        return Volume(array, self.spacing, self.origin)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0


class Canvas:
    """A uint8 map of tissue codes on a grid, painted shape by shape."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.x, self.y, self.z = (grid.axis(d) for d in range(3))
        self.codes = np.zeros(grid.shape, np.uint8)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray] | None:
        """The voxels of the box ``[lo, hi]`` as a slice tuple and broadcastable ``X, Y, Z`` axes."""
        sx, sy, sz = (self.grid.span(d, lo[d], hi[d]) for d in range(3))
        if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
            return None
        return (sz, sy, sx), self.x[sx][None, None, :], self.y[sy][None, :, None], self.z[sz][:, None, None]

    def paint(self, box: Box, mask: np.ndarray, code: int, allowed: np.ndarray | None = None) -> None:
        """Set ``code`` where ``mask`` holds and (if given) the current code is ``allowed`` (a 256-entry bool LUT)."""
        view = self.codes[box]
        if allowed is not None:
            mask = mask & allowed[view]
        view[mask] = code


def code_set(*codes: int) -> np.ndarray:
    """A 256-entry boolean look-up table true for ``codes``."""
    lut = np.zeros(256, bool)
    lut[list(codes)] = True
    return lut


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (a rounded union of two distance fields, blend width ``k`` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


@dataclass(frozen=True)
class SmoothNoise:
    """A smooth random field: a sum of random plane waves (evaluated analytically anywhere)."""

    waves: np.ndarray  # (m, 3) wave vectors, rad/mm
    phases: np.ndarray  # (m,)
    amplitudes: np.ndarray  # (m,)

    @classmethod
    def sample(
        cls, rng: np.random.Generator, modes: int, wavelength: tuple[float, float], amplitude: float
    ) -> SmoothNoise:
        """``modes`` waves of random direction, wavelength in ``wavelength`` mm, total RMS ``amplitude``."""
        direction = rng.normal(size=(modes, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lengths = rng.uniform(*wavelength, size=modes)
        waves = direction * (2 * np.pi / lengths)[:, None]
        return cls(waves, rng.uniform(0, 2 * np.pi, modes), np.full(modes, amplitude * math.sqrt(2.0 / modes)))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out: np.ndarray | float = 0.0
        for (kx, ky, kz), phase, amp in zip(self.waves, self.phases, self.amplitudes, strict=True):
            arg = np.float32(kx) * x + np.float32(ky) * y + (np.float32(kz) * z + np.float32(phase))
            out = out + np.float32(amp) * np.sin(arg)
        return np.asarray(out, np.float32)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with rotated axes; :meth:`field` is an approximate signed distance (mm, < 0 inside)."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """A box that holds the ellipsoid grown by ``margin`` mm."""
        half = np.abs(self.rotation) @ np.asarray(self.axes) + margin
        c = np.asarray(self.centre)
        return c - half, c + half

    def field(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2])
        total: np.ndarray | float = 0.0
        for axis in range(3):
            r = self.rotation[:, axis].astype(np.float32)
            local = (r[0] * dx + r[1] * dy + r[2] * dz) / np.float32(self.axes[axis])
            total = total + local * local
        scale = np.float32(np.cbrt(np.prod(self.axes)))
        return (np.sqrt(total) - 1.0) * scale


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix of intrinsic rotations about ``x``, ``y``, ``z`` (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class TubeVoxels:
    """The voxels of one tube segment's box, with each voxel's depth inside the tube wall."""

    box: Box
    depth: np.ndarray  # radius - distance to the centre line (mm); > 0 inside
    along: np.ndarray  # signed offset (mm) along +y from the centre line (for gas levels)
    radius: np.ndarray  # local tube radius (mm)
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray


def tube_voxels(
    canvas: Canvas, points: np.ndarray, radii: np.ndarray, max_voxels: int = 300_000
) -> Iterator[TubeVoxels]:
    """Rasterise a tube with tapering radius along a polyline (a chain of capsules).

    Consecutive segments are grouped while their joint box stays small (``max_voxels`` times the
    number of segments), and each group is evaluated at once; the depth of a voxel is the largest
    over the group's segments.
    """
    points = np.asarray(points, np.float64)
    radii = np.asarray(radii, np.float64)
    n = len(points) - 1
    start = 0
    while start < n:
        reach = max(radii[start], radii[start + 1]) + 1.0
        lo = np.minimum(points[start], points[start + 1]) - reach
        hi = np.maximum(points[start], points[start + 1]) + reach
        stop = start + 1
        while stop < n:
            r_next = max(radii[stop], radii[stop + 1]) + 1.0
            lo2 = np.minimum(lo, np.minimum(points[stop], points[stop + 1]) - r_next)
            hi2 = np.maximum(hi, np.maximum(points[stop], points[stop + 1]) + r_next)
            volume = float(np.prod((hi2 - lo2) / np.asarray(canvas.grid.spacing) + 1))
            if volume * (stop - start + 1) > max_voxels:
                break
            lo, hi, stop = lo2, hi2, stop + 1
        found = canvas.box(lo, hi)
        if found is not None:
            yield _capsules(found, points[start : stop + 1], radii[start : stop + 1])
        start = stop


def _capsules(found: tuple, points: np.ndarray, radii: np.ndarray) -> TubeVoxels:
    box, x, y, z = found
    a = points[:-1].astype(np.float32)
    d = np.diff(points, axis=0).astype(np.float32)
    length2 = np.maximum((d * d).sum(1), 1e-6).astype(np.float32)
    ra = radii[:-1].astype(np.float32)
    dr = np.diff(radii).astype(np.float32)
    m = len(a)
    shape = (m, 1, 1, 1)
    px = x[None] - a[:, 0].reshape(shape)
    py = y[None] - a[:, 1].reshape(shape)
    pz = z[None] - a[:, 2].reshape(shape)
    t = px * d[:, 0].reshape(shape) + py * d[:, 1].reshape(shape) + pz * d[:, 2].reshape(shape)
    t = np.clip(t / length2.reshape(shape), 0.0, 1.0)
    ox = px - t * d[:, 0].reshape(shape)
    oy = py - t * d[:, 1].reshape(shape)
    oz = pz - t * d[:, 2].reshape(shape)
    radius = ra.reshape(shape) + t * dr.reshape(shape)
    depth = radius - np.sqrt(ox * ox + oy * oy + oz * oz)
    if m == 1:
        return TubeVoxels(box, depth[0], oy[0], radius[0], x, y, z)
    best = np.argmax(depth, axis=0)[None]
    pick = lambda v: np.take_along_axis(np.broadcast_to(v, depth.shape), best, axis=0)[0]  # noqa: E731
    return TubeVoxels(box, pick(depth), pick(oy), pick(radius), x, y, z)


def catmull_rom(points: np.ndarray, step: float) -> np.ndarray:
    """A smooth curve through ``points`` (n, d), resampled about every ``step`` mm."""
    pts = np.asarray(points, np.float64)
    padded = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    out = [pts[0]]
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1 : i + 3]
        n = max(1, math.ceil(np.linalg.norm(p2[:3] - p1[:3]) / step))
        for t in np.arange(1, n + 1) / n:
            out.append(
                0.5
                * (
                    2 * p1
                    + (-p0 + p2) * t
                    + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t
                    + (-p0 + 3 * p1 - 3 * p2 + p3) * t * t * t
                )
            )
    return np.asarray(out)


def upsample_linear(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation of ``coarse`` onto ``shape`` (corners aligned), in float32."""
    out = coarse.astype(np.float32)
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0.0, m - 1.0, n, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), m - 2) if m > 1 else np.zeros(n, np.int64)
        w = (pos - lo).astype(np.float32) if m > 1 else np.zeros(n, np.float32)
        hi = np.minimum(lo + 1, m - 1)
        shape_w = [1] * out.ndim
        shape_w[axis] = n
        w = w.reshape(shape_w)
        out = np.take(out, lo, axis=axis) * (1.0 - w) + np.take(out, hi, axis=axis) * w
    return out
