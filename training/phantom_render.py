"""Render a phantom case phase by phase: misalignment, HU look-up, blur and CT noise.

PVP is the reference: its grid is a z-crop of the anatomy grid and it is sampled without any
transform. Every other phase has its own grid (a few slices more or fewer, another z origin) and
its own transform from phase space to anatomy space,

    q = u(e(p)),  e(p) = R (p - c) + c + t,   u(x) = x + d(x)

with a breathing shift ``t`` (mostly along z), a small rotation ``R`` about the liver centre
``c`` and a smooth, low-frequency displacement ``d`` (a few mm). The anatomy's label fields (tissue
code, tumour byte, texture; packed in one uint32 image) are sampled through it with nearest
neighbour, so each phase's image and its true label map live in that phase's own deformed space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from d4m.dicom_io.codes import Phase
from d4m.training.phantom_shapes import Grid, upsample_linear
from d4m.training.phantom_tissues import LIVER_TISSUES, CaseHU, phase_index

#: Total noise SD (HU) range per phase, and the kernel's in-plane PSF (Gaussian SD, mm).
NOISE_SD: dict[Phase, tuple[float, float]] = {
    Phase.NC: (10.0, 16.0),
    Phase.ART: (12.0, 18.0),
    Phase.PVP: (9.0, 14.0),
    Phase.DEL: (11.0, 17.0),
}
PSF_MM = (0.5, 0.9)
#: Breathing shift magnitude along z (mm), rotation magnitude (degrees), deformation (mm).
SHIFT_Z_MM = (3.0, 15.0)
ROTATION_DEG = (1.0, 3.0)
DEFORM_MM = (2.0, 5.0)
_TRUNCATE = 3.0
_TEXTURE_SCALE = 42.0
#: Lattice step (slices, rows, columns) on which the phase transform is evaluated exactly.
_LATTICE = (4, 8, 8)


@dataclass(frozen=True)
class PhaseSetup:
    """Where and how one phase is acquired: its grid, misalignment, noise and blur."""

    phase: Phase
    grid: Grid
    shift_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    deformation_mm: float
    displacement: np.ndarray | None  # coarse field (nk, nj, ni, 3), mm
    field_grid: Grid | None
    noise_sd: float
    noise_correlated: float  # fraction of the noise SD that is spatially correlated
    noise_corr_mm: float
    psf_mm: float

    def meta(self) -> dict[str, object]:
        """JSON-ready misalignment and acquisition-physics facts."""
        return {
            "shift_mm": [round(v, 3) for v in self.shift_mm],
            "rotation_deg": [round(v, 3) for v in self.rotation_deg],
            "rotation_centre_mm": [round(v, 2) for v in self.centre_mm],
            "deformation_mm": round(self.deformation_mm, 3),
            "grid": {"shape": list(self.grid.shape), "origin": [round(v, 4) for v in self.grid.origin]},
            "noise_sd_hu": round(self.noise_sd, 2),
            "psf_mm": round(self.psf_mm, 3),
        }

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map phase-space points (n, 3) to anatomy space: ``e(p) + d(e(p))`` (see module doc)."""
        if self.displacement is None or self.field_grid is None:
            return np.asarray(points, np.float64)
        rot = _euler_matrix(self.rotation_deg)
        centre = np.asarray(self.centre_mm)
        moved = (np.asarray(points, np.float64) - centre) @ rot.T + centre + np.asarray(self.shift_mm)
        index = (moved - np.asarray(self.field_grid.origin)) / np.asarray(self.field_grid.spacing)
        coords = index[:, ::-1].T  # (k, j, i) rows
        disp = np.stack(
            [ndimage.map_coordinates(self.displacement[..., d], coords, order=1, mode="nearest") for d in range(3)],
            axis=1,
        )
        return moved + disp

    def transform(self) -> sitk.Transform | None:
        """Phase space -> anatomy space, or ``None`` for the reference phase."""
        if self.displacement is None or self.field_grid is None:
            return None
        euler = sitk.Euler3DTransform(self.centre_mm, *np.deg2rad(self.rotation_deg), self.shift_mm)
        field = sitk.GetImageFromArray(self.displacement.astype(np.float64), isVector=True)
        field.SetSpacing(self.field_grid.spacing)
        field.SetOrigin(self.field_grid.origin)
        return sitk.CompositeTransform([sitk.DisplacementFieldTransform(field), euler])


def _euler_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """The rotation matrix of ITK's ``Euler3DTransform`` (Z·X·Y order) for these angles."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx @ ry


def sample_phase_setups(
    rng: np.random.Generator, pvp: Grid, centre: tuple[float, float, float], noise_scale: float = 1.0
) -> dict[Phase, PhaseSetup]:
    """Draw each phase's grid, misalignment (identity for PVP), noise (SD × ``noise_scale``) and PSF."""
    setups = {}
    for phase in (Phase.NC, Phase.ART, Phase.PVP, Phase.DEL):
        noise = float(rng.uniform(*NOISE_SD[phase])) * noise_scale
        physics = dict(
            noise_sd=noise,
            noise_correlated=float(rng.uniform(0.45, 0.75)),
            noise_corr_mm=float(rng.uniform(1.0, 1.8)),
            psf_mm=float(rng.uniform(*PSF_MM)),
        )
        if phase == Phase.PVP:
            setups[phase] = PhaseSetup(phase, pvp, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), centre, 0.0, None, None, **physics)
            continue
        nz = pvp.shape[0] + int(rng.integers(-3, 4))
        dz = float(rng.uniform(-1.6, 1.6)) * pvp.spacing[2]
        grid = Grid((nz, pvp.shape[1], pvp.shape[2]), pvp.spacing, (pvp.origin[0], pvp.origin[1], pvp.origin[2] + dz))
        shift = (
            float(np.clip(rng.normal(0, 1.5), -3, 3)),
            float(np.clip(rng.normal(0, 1.5), -3, 3)),
            float(rng.choice([-1.0, 1.0]) * rng.uniform(*SHIFT_Z_MM)),
        )
        axis = rng.normal(size=3) * np.array([0.6, 0.6, 1.0])
        angles = axis / np.linalg.norm(axis) * float(rng.uniform(*ROTATION_DEG))
        amplitude = float(rng.uniform(*DEFORM_MM))
        field, field_grid = _displacement(rng, grid, amplitude)
        setups[phase] = PhaseSetup(
            phase,
            grid,
            shift,
            (float(angles[0]), float(angles[1]), float(angles[2])),
            centre,
            amplitude,
            field,
            field_grid,
            **physics,
        )
    return setups


def _displacement(rng: np.random.Generator, grid: Grid, amplitude: float) -> tuple[np.ndarray, Grid]:
    """A smooth random displacement field on a 40 mm lattice covering ``grid`` (max norm ``amplitude``)."""
    step = 40.0
    lo = np.array(grid.origin) - 2 * step
    extent = np.array(grid.spacing) * (np.array(grid.shape[::-1]) - 1) + 4 * step
    n = np.ceil(extent / step).astype(int) + 1
    raw = rng.normal(size=(n[2], n[1], n[0], 3))
    smooth = ndimage.gaussian_filter(raw, sigma=(1.0, 1.0, 1.0, 0.0), mode="wrap")
    smooth *= amplitude / np.linalg.norm(smooth, axis=-1).max()
    return smooth, Grid((int(n[2]), int(n[1]), int(n[0])), (step, step, step), tuple(float(v) for v in lo))  # type: ignore[arg-type]


def anatomy_grid(setups: dict[Phase, PhaseSetup], margin_mm: float = 40.0) -> tuple[Grid, int]:
    """The anatomy grid: the PVP grid extended in z (whole slices) to cover every phase's reach.

    Returns the grid and the index of the PVP grid's first slice inside it.
    """
    pvp = setups[Phase.PVP].grid
    sz = pvp.spacing[2]
    z_lo = min(s.grid.origin[2] for s in setups.values()) - margin_mm
    z_hi = max(s.grid.origin[2] + (s.grid.shape[0] - 1) * sz for s in setups.values()) + margin_mm
    below = math.ceil((pvp.origin[2] - z_lo) / sz)
    above = math.ceil((z_hi - (pvp.origin[2] + (pvp.shape[0] - 1) * sz)) / sz)
    grid = Grid(
        (pvp.shape[0] + below + above, pvp.shape[1], pvp.shape[2]),
        pvp.spacing,
        (pvp.origin[0], pvp.origin[1], pvp.origin[2] - below * sz),
    )
    return grid, below


def texture_field(rng: np.random.Generator, grid: Grid, cell_mm: float = 5.0) -> np.ndarray:
    """A smooth unit-SD random texture on ``grid``, quantised to uint8 (128 = 0)."""
    extent = np.array(grid.spacing[::-1]) * (np.array(grid.shape) - 1)
    n = tuple(int(v) for v in np.maximum(2, np.ceil(extent / cell_mm) + 1))
    coarse = ndimage.gaussian_filter(rng.standard_normal(n).astype(np.float32), 0.7, mode="wrap")
    coarse /= coarse.std() + 1e-6
    fine = upsample_linear(coarse, grid.shape)
    return np.clip(np.rint(fine * _TEXTURE_SCALE + 127.5), 0, 255).astype(np.uint8)


def pack(codes: np.ndarray, tumor: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Tissue code (byte 0), texture (byte 1) and tumour byte (byte 2) in one uint32 per voxel.

    The three fields are resampled together; the low 16 bits (code + 256 * texture) index the
    per-phase HU table directly.
    """
    out = tumor.astype(np.uint32)
    out <<= 8
    out |= texture
    out <<= 8
    out |= codes
    return out


@dataclass(frozen=True)
class RenderedPhase:
    """One phase rendered on its own grid."""

    image: np.ndarray  # int16 HU, with tumours
    normal: np.ndarray  # int16 HU, same case without tumours (same noise)
    truth: np.ndarray  # uint8: 0 background, 1 liver, 2 tumour
    tumor_centres: dict[int, tuple[float, float, float]]  # instance -> centre (mm) in this phase
    tumor_voxels: dict[int, int]  # instance -> voxel count in this phase


def sample_phase(setup: PhaseSetup, packed: np.ndarray, anatomy: Grid, pvp_offset: int) -> np.ndarray:
    """The packed anatomy as seen on the phase's grid (nearest neighbour through the phase transform).

    The transform is evaluated exactly on a lattice (every 4th slice, every 8th row and column)
    and interpolated linearly in between, which is exact for the rigid part and accurate to far
    below a voxel for the deformation (smooth on a 40 mm scale); each voxel then takes the
    nearest anatomy voxel (the interpolated map differs from :meth:`PhaseSetup.map_points` by less
    than 0.2 voxel). Points mapped outside the anatomy take its border value (air).
    """
    if setup.displacement is None:
        return packed[pvp_offset : pvp_offset + setup.grid.shape[0]]
    grid = setup.grid
    nk, nj, ni = grid.shape
    steps = (_LATTICE[0], _LATTICE[1], _LATTICE[2])
    counts = [n // st + 2 for n, st in zip(grid.shape, steps, strict=True)]
    lattice = [grid.origin[2 - a] + grid.spacing[2 - a] * steps[a] * np.arange(counts[a]) for a in range(3)]
    zz, yy, xx = np.meshgrid(lattice[0], lattice[1], lattice[2], indexing="ij")
    mapped = setup.map_points(np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)).reshape(*zz.shape, 3)
    # anatomy indices (i, j, k) on the lattice, +0.5 so that truncation rounds
    limits = anatomy.shape[::-1]  # (ni, nj, nk)
    index = ((mapped - np.asarray(anatomy.origin)) / np.asarray(anatomy.spacing) + 0.5).astype(np.float32)
    flat_source = packed.reshape(-1)
    out = np.empty(grid.shape, np.uint32)
    chunk = steps[0] * 2
    ramp = [np.arange(st, dtype=np.float32) / st for st in steps]
    row_buf = np.empty((chunk, counts[1] - 1, steps[1], counts[2]), np.float32)
    col_buf = np.empty((chunk, nj, counts[2] - 1, steps[2]), np.float32)
    nearest = np.empty((chunk, nj, ni), np.int32)
    flat = np.empty_like(nearest)
    for k0 in range(0, nk, chunk):
        n = min(nk, k0 + chunk) - k0
        c0 = k0 // steps[0]
        near, fl = nearest[:n], flat[:n]
        for d in (2, 1, 0):
            lat = index[c0 : c0 + 3, :, :, d]
            slabs = lat[:-1, None] + (lat[1:] - lat[:-1])[:, None] * ramp[0][None, :, None, None]
            slabs = slabs.reshape(-1, *lat.shape[1:])[:n]
            rows = row_buf[:n]
            np.multiply(np.diff(slabs, axis=1)[:, :, None, :], ramp[1][None, None, :, None], out=rows)
            rows += slabs[:, :-1, None, :]
            rows2 = rows.reshape(n, -1, counts[2])[:, :nj]
            cols = col_buf[:n]
            np.multiply(np.diff(rows2, axis=2)[:, :, :, None], ramp[2], out=cols)
            cols += rows2[:, :, :-1, None]
            value = cols.reshape(n, nj, -1)[:, :, :ni]
            if d == 2:
                np.copyto(fl, value, casting="unsafe")
                np.clip(fl, 0, limits[d] - 1, out=fl)
            else:
                np.copyto(near, value, casting="unsafe")
                np.clip(near, 0, limits[d] - 1, out=near)
                fl *= limits[d]
                fl += near
        out[k0 : k0 + n] = flat_source[fl]
    return out


def render_phase(
    setup: PhaseSetup,
    sampled: np.ndarray,
    hu: CaseHU,
    tumor_tables: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> RenderedPhase:
    """HU image (with and without tumours), truth labels and tumour centres of one phase.

    ``image = blur(hu + a * n) + c * n`` with one white Gaussian field ``n``: the noise that goes
    through the PSF is correlated like the reconstruction kernel's, the rest is white; ``a`` and
    ``c`` give the phase's total SD and correlated share. Tumours add ``blur(delta)`` inside
    their box only, so the tumour-free image equals the other one outside it and shares its noise.
    """
    p = phase_index(setup.phase)
    fields = sampled.view(np.uint8).reshape(*sampled.shape, 4)  # little-endian bytes: code, texture, tumour
    low = sampled.view(np.uint16).reshape(*sampled.shape, 2)[..., 0]
    image = _hu_table(hu.base[p], hu.texture[p])[low]
    sigma = _psf_sigma(setup)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    a, c = _noise_weights(setup, sigma)
    image += a * noise
    image = ndimage.gaussian_filter(image, sigma, truncate=_TRUNCATE)
    noise *= c
    image += noise
    del noise
    normal = _to_hu(image.copy())
    truth = _LIVER_LUT[fields[..., 0]]
    centres: dict[int, tuple[float, float, float]] = {}
    counts: dict[int, int] = {}
    box = _tumor_box(fields[..., 2], sigma)
    if box is not None:
        tumor = fields[..., 2][box]
        texture = fields[..., 1][box]
        base, tex = tumor_tables
        tumor_hu = base[p][tumor] + tex[p][tumor] * _TEXTURE_LUT[texture]
        delta = np.where(tumor > 0, tumor_hu - _hu_table(hu.base[p], hu.texture[p])[low[box]], 0.0)
        image[box] += ndimage.gaussian_filter(delta.astype(np.float32), sigma, truncate=_TRUNCATE)
        truth[box][tumor > 0] = 2
        centres, counts = _centres(tumor, setup.grid, tuple(b.start for b in box))
    return RenderedPhase(_to_hu(image), normal, truth, centres, counts)


_TEXTURE_LUT = ((np.arange(256, dtype=np.float32) - 127.5) / _TEXTURE_SCALE).astype(np.float32)
_LIVER_LUT = np.zeros(256, np.uint8)
_LIVER_LUT[list(LIVER_TISSUES)] = 1


def _hu_table(base: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """HU of every (code, texture byte) pair, indexed by ``code + 256 * texture``."""
    return (base[None, :] + texture[None, :] * _TEXTURE_LUT[:, None]).astype(np.float32).reshape(-1)


def _psf_sigma(setup: PhaseSetup) -> tuple[float, float, float]:
    """Gaussian SD (voxels, k/j/i) of the PSF: kernel blur in-plane, slice profile along z."""
    sx, sy, sz = setup.grid.spacing
    return (math.hypot(0.42, 0.3), math.hypot(setup.psf_mm / sy, 0.35), math.hypot(setup.psf_mm / sx, 0.35))


def _kernel(sigma: float) -> np.ndarray:
    radius = int(_TRUNCATE * sigma + 0.5)
    delta = np.zeros(2 * radius + 1)
    delta[radius] = 1.0
    return ndimage.gaussian_filter1d(delta, sigma, truncate=_TRUNCATE)


def _noise_weights(setup: PhaseSetup, sigma: tuple[float, float, float]) -> tuple[float, float]:
    """``a``, ``c`` such that ``blur(a n) + c n`` has SD ``noise_sd`` with the correlated share asked."""
    kernels = [_kernel(s) for s in sigma]
    norm = math.sqrt(math.prod(float((k**2).sum()) for k in kernels))
    centre = math.prod(float(k[len(k) // 2]) for k in kernels)
    total = setup.noise_sd
    a = setup.noise_correlated * total / norm
    correlated = a * norm
    c = -a * centre + math.sqrt((a * centre) ** 2 + max(0.0, total**2 - correlated**2))
    return a, c


def _tumor_box(tumor: np.ndarray, sigma: tuple[float, float, float]) -> tuple[slice, slice, slice] | None:
    """Bounding box of the tumour voxels grown by the blur kernel's reach (or ``None``)."""
    hits = [np.flatnonzero(tumor.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if len(hits[0]) == 0:
        return None
    box = []
    for axis, s in enumerate(sigma):
        pad = int(_TRUNCATE * s + 0.5) + 1
        box.append(slice(max(0, int(hits[axis][0]) - pad), min(tumor.shape[axis], int(hits[axis][-1]) + pad + 1)))
    return box[0], box[1], box[2]


def _to_hu(image: np.ndarray) -> np.ndarray:
    np.clip(image, -1024, 3071, out=image)
    np.rint(image, out=image)
    return image.astype(np.int16)


def _centres(
    tumor: np.ndarray, grid: Grid, start: tuple[int, int, int]
) -> tuple[dict[int, tuple[float, float, float]], dict[int, int]]:
    """Centre (mm) and voxel count of each tumour instance in a box starting at ``start``."""
    k, j, i = np.nonzero(tumor)
    inst = tumor[k, j, i] >> 3
    out, counts = {}, {}
    for n in np.unique(inst):
        sel = inst == n
        counts[int(n)] = int(sel.sum())
        out[int(n)] = (
            float(grid.origin[0] + grid.spacing[0] * (start[2] + i[sel].mean())),
            float(grid.origin[1] + grid.spacing[1] * (start[1] + j[sel].mean())),
            float(grid.origin[2] + grid.spacing[2] * (start[0] + k[sel].mean())),
        )
    return out, counts
