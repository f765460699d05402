"""How close synthetic tumours come to real ones: the MCS evidence metrics.

Three questions, each answered by a pure function on numpy arrays (no torch here except in
:func:`reconstruction_errors`, which runs a trained autoencoder):

* **Contrast per phase.** For every tumour, the mean HU inside it minus the median HU of a shell
  of surrounding liver (:func:`measure_tumors`), per phase. The real and synthetic
  distributions are compared per phase by the 1-D Wasserstein distance (:func:`contrast_distances`).
* **Inter-phase consistency.** Two views:
  :func:`structure_consistency` — the mean over phase pairs of ``|r|``, the Pearson correlation
  of the tumour's per-voxel pattern (masked-smoothed HU) between two phases. A tumour whose inner
  structure (capsule, rim, necrosis, texture) is the same object in every phase scores high;
  phases sampled independently score near 0.
  :func:`nearest_pattern_distances` — the distance of a tumour's 4-phase contrast vector to the
  nearest real tumour's: small when the combination of phases is one a real tumour shows (HCC:
  arterial hyper, portal-venous wash-out), large when each phase is plausible alone but the
  combination is not. The real tumours' own leave-one-out value is the reference.
* **Autoencoder reconstruction.** :func:`reconstruction_errors`: MAE in HU inside the liver and
  inside the tumours of held-out crops, per phase, and the tumour contrast before and after the
  round trip (an upper bound on what the latent diffusion can paint).

Real tumours of a registered dataset are only roughly aligned across phases, so each phase is
measured inside its own mask (the dataset's per-phase ``truth`` when it has one), matched to the
tumour of the reference (PVP) label it lies nearest to.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.training.tumor_masks import axis_spacing

if TYPE_CHECKING:
    from d4m.training.autoencoder import AutoencoderConfig, CaseVolumes, CTAutoencoder

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """How tumours are measured.

    Attributes
    ----------
    ring_gap_mm
        Liver closer than this to any tumour of the phase is left out of the shell.
    ring_mm
        Width of the liver shell (beyond the gap) whose median is the liver reference.
    match_mm
        A phase's tumour voxels belong to the nearest reference tumour within this distance.
    min_voxels
        Fewer tumour (or shell) voxels than this in a phase: that phase's contrast is not measured.
    smooth_voxels
        Gaussian sigma (voxels) of the masked smoothing before the structure correlation.
    min_core_voxels
        Fewer voxels than this in the part shared by every phase: no structure correlation.
    """

    ring_gap_mm: float = 2.0
    ring_mm: float = 6.0
    match_mm: float = 8.0
    min_voxels: int = 8
    smooth_voxels: float = 1.0
    min_core_voxels: int = 27

    def __post_init__(self) -> None:
        if self.ring_gap_mm < 0 or self.ring_mm <= 0 or self.match_mm < 0:
            raise ValueError(f"ring_gap_mm >= 0, ring_mm > 0, match_mm >= 0 expected, found {self.ring_gap_mm}, "
                             f"{self.ring_mm}, {self.match_mm}")
        if self.min_voxels < 1 or self.min_core_voxels < 3 or self.smooth_voxels < 0:
            raise ValueError("min_voxels >= 1, min_core_voxels >= 3 and smooth_voxels >= 0 expected")


@dataclasses.dataclass(frozen=True)
class TumorMeasure:
    """One tumour's measurements.

    Attributes
    ----------
    case
        Case id.
    index
        Component number in the reference tumour label.
    voxels
        Voxels of the reference component.
    contrast_hu
        Per phase: tumour mean minus liver-shell median (HU); NaN where not measurable.
    spread_hu
        Per phase: standard deviation of the HU inside the tumour (texture, compartments and
        noise together); NaN where not measurable.
    consistency
        :func:`structure_consistency` of the tumour (NaN when its shared core is too small).
    """

    case: str
    index: int
    voxels: int
    contrast_hu: dict[Phase, float]
    spread_hu: dict[Phase, float]
    consistency: float

    def vector(self, phases: Sequence[Phase] = PHASE_ORDER) -> np.ndarray:
        """The contrasts in ``phases`` order (NaN where missing)."""
        return np.array([self.contrast_hu.get(p, np.nan) for p in phases], dtype=float)


def tumor_regions(reference: np.ndarray, phase_masks: Mapping[Phase, np.ndarray], spacing: Spacing,
                  match_mm: float) -> tuple[int, list[dict[Phase, np.ndarray]]]:
    """Per reference tumour (connected component), its voxels in each phase's mask.

    A voxel of a phase's mask belongs to the reference component it is nearest to, if that is
    within ``match_mm``; so a tumour that moved a little between phases is still found, and two
    neighbouring tumours do not share voxels.

    Returns
    -------
    tuple
        The number of components and, per component, a bool mask per phase.

    Raises
    ------
    InputError
        Masks of different shapes.
    """
    reference = np.asarray(reference) > 0
    shapes = {p.value: np.shape(m) for p, m in phase_masks.items()}
    if any(s != reference.shape for s in shapes.values()):
        raise InputError(f"tumour regions: expected phase masks of shape {reference.shape}, found {shapes}")
    labels, n = ndimage.label(reference)
    if n == 0:
        return 0, []
    distance, nearest = ndimage.distance_transform_edt(labels == 0, sampling=axis_spacing(spacing),
                                                        return_indices=True)
    owner = np.where(distance <= match_mm, labels[tuple(nearest)], 0)
    regions = [{p: (np.asarray(m) > 0) & (owner == c) for p, m in phase_masks.items()} for c in range(1, n + 1)]
    return n, regions


def liver_shell(region: np.ndarray, liver: np.ndarray, tumors: np.ndarray, spacing: Spacing,
                settings: QualitySettings) -> np.ndarray:
    """Liver voxels between ``ring_gap_mm`` and ``ring_gap_mm + ring_mm`` from ``region``, away from every tumour."""
    voxel = axis_spacing(spacing)
    reach = settings.ring_gap_mm + settings.ring_mm
    where = np.nonzero(region)
    pad = np.ceil(reach / voxel).astype(int) + 1
    box = tuple(slice(max(int(w.min()) - p, 0), int(w.max()) + p + 1) for w, p in zip(where, pad, strict=True))
    distance = ndimage.distance_transform_edt(~region[box], sampling=voxel)
    near_tumor = ndimage.distance_transform_edt(~tumors[box], sampling=voxel) < settings.ring_gap_mm
    shell = np.zeros(region.shape, dtype=bool)
    shell[box] = (liver[box] > 0) & ~tumors[box] & ~near_tumor & (distance <= reach)
    return shell


def structure_consistency(images: Mapping[Phase, np.ndarray], regions: Mapping[Phase, np.ndarray],
                          smooth_voxels: float = 1.0, min_core_voxels: int = 27) -> float:
    """Mean over phase pairs of ``|r|``: how much the tumour's inner pattern is the same in every phase.

    Inside the core (the voxels the tumour covers in every phase), each phase is smoothed with
    a Gaussian restricted to the core (normalised convolution, so no liver leaks in) and the
    Pearson correlation of the voxel values is taken for every pair of phases. The absolute value
    is used: an arterial-bright rim that is dark in the portal-venous phase is the same structure.

    Returns
    -------
    float
        In [0, 1]; NaN when the core has fewer than ``min_core_voxels`` voxels, fewer than two
        phases are given, or a phase is constant in it.
    """
    phases = [p for p in images if p in regions]
    if len(phases) < 2:
        return float("nan")
    core = np.logical_and.reduce([np.asarray(regions[p]) > 0 for p in phases])
    if core.sum() < min_core_voxels:
        return float("nan")
    where = np.nonzero(core)
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
    inside = core[box].astype(np.float64)
    weight = ndimage.gaussian_filter(inside, smooth_voxels) if smooth_voxels > 0 else inside
    patterns = []
    for phase in phases:
        values = np.asarray(images[phase], dtype=np.float64)[box] * inside
        smooth = ndimage.gaussian_filter(values, smooth_voxels) if smooth_voxels > 0 else values
        patterns.append((smooth / np.maximum(weight, 1e-12))[core[box]])
    scores = []
    for a, b in combinations(patterns, 2):
        if a.std() < 1e-9 or b.std() < 1e-9:
            return float("nan")
        scores.append(abs(float(np.corrcoef(a, b)[0, 1])))
    return float(np.mean(scores))


def measure_tumors(images: Mapping[Phase, np.ndarray], label: np.ndarray, spacing: Spacing, case_id: str = "case",
                   truth: Mapping[Phase, np.ndarray] | None = None,
                   settings: QualitySettings | None = None) -> list[TumorMeasure]:
    """Contrast per phase and structure consistency of every tumour of a case.

    Parameters
    ----------
    images
        HU images per phase, on the label's grid.
    label
        Reference label (0 background, 1 liver, 2 tumour): one tumour per connected component of 2.
    spacing
        Voxel size in mm ``(x, y, z)``.
    case_id
        Recorded in the results.
    truth
        Optional per-phase labels on the same grid (tumours where each phase shows them); the
        reference label serves every phase without it.
    settings
        Shell, matching and smoothing settings.

    Returns
    -------
    list of TumorMeasure
        One per reference tumour, in component order.

    Raises
    ------
    InputError
        Arrays of different shapes.
    """
    settings = settings or QualitySettings()
    label = np.asarray(label)
    truth = truth or {}
    phase_labels = {p: np.asarray(truth.get(p, label)) for p in images}
    shapes = {p.value: np.shape(v) for p, v in images.items()}
    if any(s != label.shape for s in shapes.values()) or any(v.shape != label.shape for v in phase_labels.values()):
        raise InputError(f"case {case_id}: expected images and labels on the label grid {label.shape}, found {shapes}")
    reference = label == 2
    n, regions = tumor_regions(reference, {p: v == 2 for p, v in phase_labels.items()}, spacing, settings.match_mm)
    components = ndimage.label(reference)[0] if n else None
    out = []
    for index, region in enumerate(regions, start=1):
        contrast: dict[Phase, float] = {}
        spread: dict[Phase, float] = {}
        for phase, image in images.items():
            tumor = region[phase]
            contrast[phase] = spread[phase] = float("nan")
            if tumor.sum() < settings.min_voxels:
                continue
            spread[phase] = float(np.asarray(image, dtype=np.float64)[tumor].std())
            shell = liver_shell(tumor, phase_labels[phase] > 0, phase_labels[phase] == 2, spacing, settings)
            if shell.sum() < settings.min_voxels:
                continue
            values = np.asarray(image, dtype=np.float64)
            contrast[phase] = float(values[tumor].mean() - np.median(values[shell]))
        consistency = structure_consistency(images, region, settings.smooth_voxels, settings.min_core_voxels)
        voxels = int((components == index).sum()) if components is not None else 0
        out.append(TumorMeasure(case_id, index, voxels, contrast, spread, consistency))
    return out


def contrast_table(measures: Sequence[TumorMeasure], phases: Sequence[Phase] = PHASE_ORDER) -> np.ndarray:
    """``(tumours, phases)`` contrasts in HU (NaN where not measured)."""
    if not measures:
        return np.zeros((0, len(phases)))
    return np.stack([m.vector(phases) for m in measures])


def spread_table(measures: Sequence[TumorMeasure], phases: Sequence[Phase] = PHASE_ORDER) -> np.ndarray:
    """``(tumours, phases)`` HU standard deviations inside the tumours (NaN where not measured)."""
    if not measures:
        return np.zeros((0, len(phases)))
    return np.array([[m.spread_hu.get(p, np.nan) for p in phases] for m in measures], dtype=float)


def contrast_distances(real: Sequence[TumorMeasure], synthetic: Sequence[TumorMeasure],
                       phases: Sequence[Phase] = PHASE_ORDER) -> dict[Phase, float]:
    """Per phase, the 1-D Wasserstein distance (HU) between real and synthetic tumour contrasts.

    NaN for a phase with no measured tumour on either side.
    """
    a, b = contrast_table(real, phases), contrast_table(synthetic, phases)
    out = {}
    for column, phase in enumerate(phases):
        x, y = a[:, column], b[:, column]
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        out[phase] = float(wasserstein_distance(x, y)) if x.size and y.size else float("nan")
    return out


def nearest_pattern_distances(query: Sequence[TumorMeasure], reference: Sequence[TumorMeasure],
                              phases: Sequence[Phase] = PHASE_ORDER, leave_one_out: bool = False) -> np.ndarray:
    """Per query tumour, the RMS distance (HU) of its contrast vector to the nearest reference tumour's.

    Only tumours measured in every phase take part. With ``leave_one_out`` the query and the
    reference are the same list and a tumour is never its own neighbour.

    Returns
    -------
    numpy.ndarray
        One distance per fully measured query tumour (empty when there is none, or no reference).
    """
    q = contrast_table(query, phases)
    r = contrast_table(reference, phases)
    q_ok = np.isfinite(q).all(axis=1) if q.size else np.zeros(0, dtype=bool)
    r_ok = np.isfinite(r).all(axis=1) if r.size else np.zeros(0, dtype=bool)
    if not q_ok.any() or not r_ok.any():
        return np.zeros(0)
    distance = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).mean(axis=2))
    distance[:, ~r_ok] = np.inf
    if leave_one_out:
        if len(query) != len(reference):
            raise InputError("pattern distance: expected the same tumours for leave-one-out, found two lists")
        np.fill_diagonal(distance, np.inf)
    nearest = distance[q_ok].min(axis=1)
    return nearest[np.isfinite(nearest)]


@dataclasses.dataclass(frozen=True)
class ReconstructionError:
    """Autoencoder round trip on one phase's held-out crops.

    Attributes
    ----------
    crops
        Crops measured.
    liver_mae_hu, tumor_mae_hu
        MAE (HU, within the window) inside the liver and inside the tumours.
    tumor_contrast_hu, reconstructed_contrast_hu
        Mean tumour-minus-liver-shell contrast of the crops, before and after the round trip.
    """

    crops: int
    liver_mae_hu: float
    tumor_mae_hu: float
    tumor_contrast_hu: float
    reconstructed_contrast_hu: float


def reconstruction_errors(model: CTAutoencoder, config: AutoencoderConfig, cases: Sequence[CaseVolumes],
                          crops_per_phase: int, seed: int = 0,
                          settings: QualitySettings | None = None) -> dict[Phase, ReconstructionError]:
    """Per phase, the autoencoder's errors on crops centred on tumour voxels of ``cases``.

    Crops are ``config.crop`` around a random tumour voxel (a random liver voxel for a
    tumour-free case) of a random case, drawn from a generator seeded by ``(seed, phase)``; the
    tumour is the phase's own label (``truth``) when the case has one.

    Raises
    ------
    InputError
        No case, or no case with an image of a phase in ``config.phases``.
    """
    import torch

    from d4m.training.autoencoder import crop_volume, hu_to_unit, unit_to_hu

    settings = settings or QualitySettings()
    if not cases:
        raise InputError("reconstruction errors: expected held-out cases, found none")
    out: dict[Phase, ReconstructionError] = {}
    for phase in config.phases:
        having = [c for c in cases if phase in c.images]
        if not having:
            continue
        rng = np.random.default_rng([seed, PHASE_ORDER.index(phase)])
        liver_errors, tumor_errors, before, after = [], [], [], []
        for _ in range(crops_per_phase):
            case = having[int(rng.integers(len(having)))]
            centre = case.random_tumor_voxel(rng) or case.random_liver_voxel(rng)
            label = case.truth.get(phase, case.label)
            hu = crop_volume(case.images[phase], centre, config.crop, fill=config.window[0])
            crop_label = crop_volume(label, centre, config.crop, fill=0)
            with torch.no_grad():
                x = torch.from_numpy(hu_to_unit(hu, config.window))[None, None]
                unit = model.decode(model.encode(x)).numpy()[0, 0]
            error = np.abs(unit_to_hu(unit, config.window) - np.clip(hu, *config.window))
            liver_errors.append(error[crop_label > 0])
            tumor = crop_label == 2
            if tumor.sum() >= settings.min_voxels:
                tumor_errors.append(error[tumor])
                shell = liver_shell(tumor, crop_label > 0, tumor, case.spacing, settings)
                if shell.sum() >= settings.min_voxels:
                    clipped = np.clip(hu, *config.window)
                    rebuilt = unit_to_hu(unit, config.window)
                    before.append(float(clipped[tumor].mean() - np.median(clipped[shell])))
                    after.append(float(rebuilt[tumor].mean() - np.median(rebuilt[shell])))
        out[phase] = ReconstructionError(
            crops_per_phase, float(np.concatenate(liver_errors).mean()),
            float(np.concatenate(tumor_errors).mean()) if tumor_errors else float("nan"),
            float(np.mean(before)) if before else float("nan"), float(np.mean(after)) if after else float("nan"))
    if not out:
        raise InputError(f"reconstruction errors: expected images of {[p.value for p in config.phases]}, found none")
    return out
