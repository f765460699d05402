"""Synthetic multiphase cases with exact labels: ``d4m-train synthesize`` and the online transform.

From a tumour-free ("normal") multiphase CT on one grid and its liver mask: draw a tumour mask
inside the liver (:mod:`d4m.training.tumor_masks`), let a :class:`Synthesizer` paint the tumours
into a crop around each of them, and blend each crop back into the full volume. The label is
exact by construction: liver from the normal case, tumour from the mask, identical in every phase.

Synthesizers:

* :class:`LatentDiffusionSynthesizer` — the paper's MCS (autoencoder + latent diffusion), in
  ``per-phase`` or ``joint`` mode, whatever the LDM was trained as.
* :class:`RuleSynthesizer` — the no-learning baseline for the Table V ablation: a per-phase HU shift
  by tumour type (HCC, metastasis, cyst), texture noise and a soft edge, inside the mask only.

Blending: voxels farther than ``blend_margin_mm`` from the tumour mask are never changed (bit for
bit); inside the mask the synthesized values are used as they are; in between they fade linearly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import write_image
from d4m.runtime.artifacts import atomic_dir
from d4m.training.autoencoder import (
    AutoencoderConfig,
    CTAutoencoder,
    hu_to_unit,
    load_autoencoder,
    read_case,
    resolve_device,
    unit_to_hu,
)
from d4m.training.config import StageConfig
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.ldm import (
    LATENT_FACTOR,
    LatentDenoiser,
    LDMConfig,
    LDMMode,
    condition,
    load_ldm,
    sample_latent,
    sampling_scheduler,
)
from d4m.training.tumor_masks import (
    SizeClass,
    Tumor,
    TumorMaskConfig,
    axis_spacing,
    generate_tumor_mask,
    require_liver,
    vessels_from_pvp,
)

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]


class Synthesizer(Protocol):
    """Paints tumours into a multiphase crop.

    Attributes
    ----------
    name
        Short name recorded in the output (``ldm-per-phase``, ``ldm-joint``, ``rules``).
    crop_multiple
        Crop sides must be multiples of this.
    min_crop
        Smallest crop ``(k, j, i)`` it works on.
    blend_margin_mm
        Width of the fade between synthesized and original voxels outside the mask.
    """

    name: str
    crop_multiple: int
    min_crop: tuple[int, int, int]
    blend_margin_mm: float

    def synthesize(self, crop: Mapping[Phase, np.ndarray], mask: np.ndarray, liver: np.ndarray, spacing: Spacing,
                   rng: np.random.Generator) -> dict[Phase, np.ndarray]:
        """HU crops of the same phases and shape with tumours where ``mask`` is set."""
        ...


# ------------------------------------------------------------------------------------ rules


class TumorType(str, Enum):
    """Enhancement patterns of the rule synthesizer."""

    HCC = "hcc"
    METASTASIS = "metastasis"
    CYST = "cyst"


#: HU difference to the surrounding liver per phase (cysts: absolute HU, no enhancement).
#: HCC: arterial hyper-enhancement with portal-venous/delayed washout; metastasis: hypo-enhancing;
#: cyst: water density in every phase.
RULE_SHIFTS_HU: dict[TumorType, dict[Phase, float]] = {
    TumorType.HCC: {Phase.NC: -10.0, Phase.ART: 40.0, Phase.PVP: -20.0, Phase.DEL: -30.0},
    TumorType.METASTASIS: {Phase.NC: -15.0, Phase.ART: -25.0, Phase.PVP: -45.0, Phase.DEL: -35.0},
    TumorType.CYST: {Phase.NC: 10.0, Phase.ART: 10.0, Phase.PVP: 10.0, Phase.DEL: 10.0},
}


@dataclasses.dataclass
class RuleSynthesizer:
    """The no-learning baseline: per-phase HU shift by tumour type, texture, soft edge.

    Each connected tumour gets a type drawn with ``type_weights`` (order of :class:`TumorType`)
    and a strength factor in ``strength``; the shift is relative to the median HU of the
    surrounding liver in that phase (cysts go to an absolute water-like value). A smooth noise
    texture of ``texture_hu`` standard deviation, the same in every phase, is added. Only voxels
    inside the mask change; the edge fades in over ``edge_mm`` inside the mask.
    """

    type_weights: tuple[float, float, float] = (0.5, 0.35, 0.15)
    strength: tuple[float, float] = (0.7, 1.3)
    texture_hu: float = 8.0
    edge_mm: float = 2.0
    name: str = "rules"
    crop_multiple: int = 1
    min_crop: tuple[int, int, int] = (1, 1, 1)
    blend_margin_mm: float = 0.0

    def synthesize(self, crop: Mapping[Phase, np.ndarray], mask: np.ndarray, liver: np.ndarray, spacing: Spacing,
                   rng: np.random.Generator) -> dict[Phase, np.ndarray]:
        """HU crops with rule-based tumours inside ``mask`` (voxels outside are returned unchanged)."""
        mask = np.asarray(mask) > 0
        out = {p: np.array(v, copy=True) for p, v in crop.items()}
        if not mask.any():
            return out
        voxel = axis_spacing(spacing)
        components, n = ndimage.label(mask)
        weights = np.asarray(self.type_weights, dtype=float) / sum(self.type_weights)
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=voxel)[1:-1, 1:-1, 1:-1]
        edge = np.clip(depth / max(self.edge_mm, 1e-6), 0.0, 1.0)
        background = (np.asarray(liver) > 0) & ~ndimage.binary_dilation(mask, iterations=2)
        for index in range(1, n + 1):
            where = components == index
            kind = list(TumorType)[int(rng.choice(len(TumorType), p=weights))]
            strength = rng.uniform(*self.strength)
            # one texture per tumour, shared by the phases (a tumour's structure is the same in each)
            texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, mask.shape), sigma=1.0)
            texture *= self.texture_hu / max(float(texture[where].std()), 1e-6)
            for phase, image in out.items():
                reference = float(np.median(crop[phase][background])) if background.any() else float(
                    np.median(crop[phase][where]))
                shift = RULE_SHIFTS_HU[kind][phase]
                target = shift if kind is TumorType.CYST else reference + strength * shift
                tumour = target + texture
                blended = image + edge * (tumour - image)
                image[where] = blended[where].astype(image.dtype)
        return out


# ----------------------------------------------------------------------------- latent diffusion


class LatentDiffusionSynthesizer:
    """The paper's MCS: inpaint tumours in the autoencoder latent with the trained LDM.

    Parameters
    ----------
    autoencoder, autoencoder_config
        The frozen autoencoder and its config (window, latent width).
    denoiser, ldm_config
        The trained denoiser and its config (mode, phases, schedule, crop).
    ddim_steps
        Sampling steps; ``None`` uses the LDM config's.
    blend_margin_mm
        Fade width outside the mask.
    anchor
        Reset the latent outside the mask to the known anatomy after each DDIM step (RePaint-style).
    """

    def __init__(self, autoencoder: CTAutoencoder, autoencoder_config: AutoencoderConfig, denoiser: LatentDenoiser,
                 ldm_config: LDMConfig, ddim_steps: int | None = None, blend_margin_mm: float = 2.0,
                 anchor: bool = True) -> None:
        self.autoencoder = autoencoder.eval()
        self.window = autoencoder_config.window
        self.denoiser = denoiser.eval()
        self.config = ldm_config
        self.scheduler = sampling_scheduler(ldm_config, ddim_steps)
        self.name = f"ldm-{ldm_config.mode.value}"
        self.crop_multiple = LATENT_FACTOR * 2 ** (len(ldm_config.channels) - 1)
        self.min_crop = ldm_config.crop
        self.blend_margin_mm = blend_margin_mm
        self.anchor = anchor
        self.device = next(denoiser.parameters()).device

    @classmethod
    def from_runs(cls, autoencoder: Path, ldm: Path, ddim_steps: int | None = None, device: str = "auto",
                  blend_margin_mm: float = 2.0) -> LatentDiffusionSynthesizer:
        """Load the autoencoder and LDM run folders.

        Raises
        ------
        InputError
            Missing or mismatching run files.
        """
        target = resolve_device(device)
        model, ae_config = load_autoencoder(autoencoder, target)
        denoiser, ldm_config = load_ldm(ldm, ae_config.latent_channels, target)
        return cls(model, ae_config, denoiser, ldm_config, ddim_steps, blend_margin_mm)

    def synthesize(self, crop: Mapping[Phase, np.ndarray], mask: np.ndarray, liver: np.ndarray, spacing: Spacing,
                   rng: np.random.Generator) -> dict[Phase, np.ndarray]:
        """HU crops with diffusion-inpainted tumours (the caller blends them into the originals)."""
        phases = [p for p in self.config.phases if p in crop]
        unknown = sorted(p.value for p in crop if p not in self.config.phases)
        if unknown or not phases:
            raise InputError(f"{self.name}: expected phases among {[p.value for p in self.config.phases]}, "
                             f"found {sorted(p.value for p in crop)}")
        if self.config.mode is LDMMode.JOINT and len(phases) != len(self.config.phases):
            raise InputError(f"{self.name}: expected all of {[p.value for p in self.config.phases]} for joint "
                             f"synthesis, found {[p.value for p in phases]}")
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        images = np.stack([hu_to_unit(np.asarray(crop[p]), self.window) for p in phases])
        mask_t = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))
        with torch.no_grad():
            if self.config.mode is LDMMode.PER_PHASE:
                x = torch.from_numpy(images)[:, None].to(self.device)           # (P, 1, D, H, W): a batch
                m = mask_t[None, None].expand(len(phases), 1, *mask_t.shape).to(self.device)
                phase_index = torch.tensor([PHASE_ORDER.index(p) for p in phases], device=self.device)
            else:
                x = torch.from_numpy(images)[None].to(self.device)             # (1, P, D, H, W)
                m = mask_t[None, None].expand(1, len(phases), *mask_t.shape).to(self.device)
                phase_index = None
            _, z_masked, mask_latent = condition(self.autoencoder, x, m, self.denoiser.latent_scale)
            z = sample_latent(self.denoiser, self.scheduler, z_masked, mask_latent, phase_index, generator,
                              self.anchor)
            z = z / self.denoiser.latent_scale
            per_phase = z.reshape(len(phases), -1, *z.shape[2:])
            decoded = self.autoencoder.decode(per_phase).cpu().numpy()[:, 0]
        return {p: unit_to_hu(decoded[i], self.window) for i, p in enumerate(phases)}


# ----------------------------------------------------------------------------------- blending


def blend_weights(mask: np.ndarray, spacing: Spacing, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Blend weight (1 in the mask, fading to 0 at ``margin_mm``) and the region it is non-zero in."""
    mask = np.asarray(mask) > 0
    if margin_mm <= 0:
        return mask.astype(np.float32), mask
    distance = ndimage.distance_transform_edt(~mask, sampling=axis_spacing(spacing))
    weight = np.clip(1.0 - distance / margin_mm, 0.0, 1.0).astype(np.float32)
    return weight, weight > 0


def _crop_box(component: np.ndarray, shape: tuple[int, ...], synthesizer: Synthesizer,
              context: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and size of a crop holding a component with ``context`` voxels around it."""
    where = np.nonzero(component)
    lo = np.array([w.min() for w in where])
    hi = np.array([w.max() + 1 for w in where])
    multiple = synthesizer.crop_multiple
    size = np.maximum(hi - lo + 2 * context, np.asarray(synthesizer.min_crop))
    size = (np.ceil(size / multiple) * multiple).astype(int)
    start = (lo + hi) // 2 - size // 2
    return start, size


def _take(volume: np.ndarray, start: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    src, dst = _overlap(volume.shape, start, size)
    out[dst] = volume[src]
    return out


def _overlap(shape: tuple[int, ...], start: np.ndarray,
             size: np.ndarray) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    src, dst = [], []
    for s, n, dim in zip(start, size, shape, strict=True):
        a, b = max(int(s), 0), min(int(s + n), dim)
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    return tuple(src), tuple(dst)


def synthesize_with_mask(case_images: Mapping[Phase, np.ndarray], liver: np.ndarray, mask: np.ndarray,
                         spacing: Spacing, rng: np.random.Generator,
                         synthesizer: Synthesizer) -> dict[Phase, np.ndarray]:
    """Paint tumours where ``mask`` is set, one crop per tumour, blended back into full volumes.

    Raises
    ------
    InputError
        No liver, images of different shapes, or a mask outside the liver.
    """
    liver = require_liver(liver, "synthesis")
    mask = np.asarray(mask) > 0
    shapes = {p.value: np.shape(v) for p, v in case_images.items()}
    if not case_images or any(s != liver.shape for s in shapes.values()) or mask.shape != liver.shape:
        raise InputError(f"synthesis: expected images and masks on one grid {liver.shape}, found images {shapes} "
                         f"and mask {mask.shape}")
    if (mask & ~liver).any():
        raise InputError(f"synthesis: expected a tumour mask inside the liver, found {int((mask & ~liver).sum())} "
                         "voxels outside")
    out = {p: np.array(v, copy=True) for p, v in case_images.items()}
    if not mask.any():
        return out
    voxel = axis_spacing(spacing)
    margin_voxels = int(np.ceil(synthesizer.blend_margin_mm / voxel.min())) if synthesizer.blend_margin_mm > 0 else 0
    grown = ndimage.binary_dilation(mask, iterations=margin_voxels) if margin_voxels else mask
    groups, n = ndimage.label(grown)
    for index in range(1, n + 1):
        component = (groups == index) & mask
        start, size = _crop_box(component, mask.shape, synthesizer, margin_voxels + 4)
        src, dst = _overlap(mask.shape, start, size)
        crop_mask = _take(component, start, size, False)
        crop_liver = _take(liver, start, size, False)
        if not crop_liver.any():
            raise InputError(f"synthesis: expected liver in the crop at {tuple(int(s) for s in start)}, found none")
        originals = {p: _take(v, start, size, -1000.0) for p, v in out.items()}
        painted = synthesizer.synthesize(originals, crop_mask, crop_liver, spacing, rng)
        weight, region = blend_weights(crop_mask, spacing, synthesizer.blend_margin_mm)
        for phase, image in out.items():
            original = originals[phase]
            mixed = np.where(region, original + weight * (painted[phase].astype(np.float32) - original), original)
            image[src] = mixed[dst].astype(image.dtype)
    return out


# ------------------------------------------------------------------------------ quality filter


@dataclasses.dataclass(frozen=True)
class QualityFilter:
    """Keep a synthetic tumour only if a segmenter finds enough of it (in the spirit of FreeTumor).

    Attributes
    ----------
    predict
        A segmenter: HU images per phase → tumour map (probability or 0/1) on the same grid.
    min_detected
        Fraction of a tumour's voxels that must be predicted as tumour for it to be kept.
    threshold
        Probability above which a voxel counts as predicted tumour.
    """

    predict: Callable[[dict[Phase, np.ndarray]], np.ndarray]
    min_detected: float = 0.5
    threshold: float = 0.5

    def kept(self, images: dict[Phase, np.ndarray], mask: np.ndarray) -> np.ndarray:
        """The part of ``mask`` made of tumours the segmenter finds."""
        found = np.asarray(self.predict(images)) > self.threshold
        components, n = ndimage.label(mask)
        keep = np.zeros(mask.shape, dtype=bool)
        for index in range(1, n + 1):
            where = components == index
            if found[where].mean() >= self.min_detected:
                keep |= where
        return keep


# ------------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    """Images, label and what was drawn."""

    images: dict[Phase, np.ndarray]
    label: np.ndarray
    tumors: tuple[Tumor, ...]


def synthesize_case(case_images: Mapping[Phase, np.ndarray], liver: np.ndarray, spacing: Spacing,
                    rng: np.random.Generator, synthesizer: Synthesizer, *, masks: TumorMaskConfig | None = None,
                    vessels: np.ndarray | None = None, quality: QualityFilter | None = None,
                    ) -> tuple[dict[Phase, np.ndarray], np.ndarray]:
    """One synthetic multiphase case from a normal one.

    Parameters
    ----------
    case_images
        Tumour-free CT per phase, HU, all on one grid.
    liver
        Liver mask on that grid.
    spacing
        Voxel size in mm ``(x, y, z)``.
    rng
        Random generator (same seed, same case).
    synthesizer
        A :class:`Synthesizer`.
    masks
        How tumour masks are drawn (default :class:`TumorMaskConfig`).
    vessels
        Optional vessel mask the tumours avoid.
    quality
        Optional :class:`QualityFilter`; rejected tumours are undone (images and label).

    Returns
    -------
    tuple
        Images per phase and the label (0 background, 1 liver, 2 tumour).

    Raises
    ------
    InputError
        No liver voxel, or images off the liver's grid.
    """
    result = synthesize_case_result(case_images, liver, spacing, rng, synthesizer,
                                    CaseOptions(masks=masks, vessels=vessels, quality=quality))
    return result.images, result.label


@dataclasses.dataclass(frozen=True)
class CaseOptions:
    """Optional inputs of :func:`synthesize_case_result`.

    Attributes
    ----------
    masks
        How tumour masks are drawn (default :class:`TumorMaskConfig`).
    vessels
        Vessel mask the tumours avoid.
    quality
        Quality filter; rejected tumours are undone.
    avoid
        Voxels that must stay tumour-free (existing tumours).
    """

    masks: TumorMaskConfig | None = None
    vessels: np.ndarray | None = None
    quality: QualityFilter | None = None
    avoid: np.ndarray | None = None


def synthesize_case_result(case_images: Mapping[Phase, np.ndarray], liver: np.ndarray, spacing: Spacing,
                           rng: np.random.Generator, synthesizer: Synthesizer,
                           options: CaseOptions | None = None) -> SynthesisResult:
    """:func:`synthesize_case` that also returns the tumours drawn."""
    options = options or CaseOptions()
    masks, vessels, quality, avoid = options.masks, options.vessels, options.quality, options.avoid
    liver_mask = require_liver(liver, "synthesis")
    drawn = generate_tumor_mask(liver_mask, spacing, rng, masks, vessels=vessels, avoid=avoid)
    images = synthesize_with_mask(case_images, liver_mask, drawn.mask, spacing, rng, synthesizer)
    mask = drawn.mask
    tumors = drawn.tumors
    if quality is not None and mask.any():
        kept = quality.kept(images, mask)
        dropped = mask & ~kept
        if dropped.any():
            _, region = blend_weights(dropped, spacing, synthesizer.blend_margin_mm)
            for phase, image in images.items():
                image[region] = np.asarray(case_images[phase])[region]
            logger.info("quality filter: %d of %d tumour voxels rejected", int(dropped.sum()), int(mask.sum()))
            tumors = tuple(t for t in tumors if kept[t.centre] or not mask[t.centre])
            mask = kept
    label = liver_mask.astype(np.uint8)
    label[mask] = 2
    return SynthesisResult(images, label, tumors)


# ------------------------------------------------------------------------------------ online


class OnlineSynthesis:
    """A data-loader transform: with probability ``p``, replace a sample by a synthetic one.

    The sample is a dict of numpy arrays: one key per phase (``"NC"``, ``"ART"``, ``"PVP"``,
    ``"DEL"``; HU, 3D or with a leading channel of 1) and ``"label"`` (0/1/2). When it also holds
    ``"normal_<PHASE>"`` arrays, those tumour-free images are the background and the label's
    tumours are replaced; otherwise the images themselves are the background and their tumours are
    kept (new tumours avoid them). An optional ``"spacing"`` entry (x, y, z) overrides ``spacing``.
    Samples with fewer than ``min_liver_voxels`` liver voxels pass through unchanged. The keys and
    shapes of the sample never change.

    Parameters
    ----------
    synthesizer
        A :class:`Synthesizer`.
    p
        Probability of synthesizing.
    masks
        Tumour-mask configuration.
    spacing
        Default voxel size in mm ``(x, y, z)``.
    seed
        Seed of the transform's own generator (a call may pass its own ``rng``).
    min_liver_voxels
        Fewer liver voxels than this: the sample is passed through.
    """

    def __init__(self, synthesizer: Synthesizer, p: float = 0.5, masks: TumorMaskConfig | None = None,
                 spacing: Spacing = (1.0, 1.0, 1.0), seed: int = 0, min_liver_voxels: int = 64) -> None:
        if not 0 <= p <= 1:
            raise InputError(f"online synthesis: expected a probability p in [0, 1], found {p}")
        self.synthesizer = synthesizer
        self.p = p
        self.masks = masks
        self.spacing = spacing
        self.rng = np.random.default_rng(seed)
        self.min_liver_voxels = min_liver_voxels
        self.calls = 0
        self.applied = 0

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        """The sample, or a synthetic version of it (same keys, shapes and dtypes)."""
        rng = rng or self.rng
        self.calls += 1
        if rng.random() >= self.p:
            return sample
        phases = [p for p in PHASE_ORDER if p.value in sample]
        if "label" not in sample or not phases:
            raise InputError(f"online synthesis: expected phase images and a 'label', found keys {sorted(sample)}")
        label = np.asarray(sample["label"])
        squeeze = label.ndim == 4
        label3 = label[0] if squeeze else label
        liver = label3 > 0
        if liver.sum() < self.min_liver_voxels:
            logger.debug("online synthesis: sample with %d liver voxels passed through", int(liver.sum()))
            return sample
        use_normal = all(f"normal_{p.value}" in sample for p in phases)
        keys = {p: f"normal_{p.value}" if use_normal else p.value for p in phases}
        images = {p: _as3d(sample[k]) for p, k in keys.items()}
        spacing = tuple(float(s) for s in sample.get("spacing", self.spacing))
        existing = None if use_normal else label3 == 2
        result = synthesize_case_result(images, liver, (spacing[0], spacing[1], spacing[2]), rng, self.synthesizer,
                                        CaseOptions(masks=self.masks, avoid=existing))
        new_label = result.label if existing is None else np.where(existing, 2, result.label).astype(np.uint8)
        out = dict(sample)
        for phase in phases:
            original = np.asarray(sample[phase.value])
            out[phase.value] = result.images[phase].reshape(original.shape).astype(original.dtype)
        out["label"] = new_label.reshape(label.shape).astype(label.dtype)
        self.applied += 1
        return out


def _as3d(array: Any) -> np.ndarray:
    values = np.asarray(array)
    return values[0] if values.ndim == 4 else values


# ----------------------------------------------------------------------------------- offline


class SynthesizerKind(str, Enum):
    """``ldm`` (the paper's MCS) or ``rules`` (the Table V baseline)."""

    LDM = "ldm"
    RULES = "rules"


SYNTHESIS_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"copies": 1, "ddim_steps": 10},
    "cpu": {"copies": 2, "ddim_steps": 25},
    "paper": {"copies": 4, "ddim_steps": 50},
}


@dataclasses.dataclass(frozen=True)
class SynthesisConfig(StageConfig):
    """Configuration of ``d4m-train synthesize`` (offline synthesis to a dataset).

    Attributes
    ----------
    data
        A d4m dataset of cases with liver labels and ``normal`` images (or ``images`` when
        ``background`` is ``images``).
    out
        Output dataset folder (written atomically).
    preset
        Name of the preset the values came from.
    synthesizer
        ``ldm`` or ``rules``.
    autoencoder, ldm
        Run folders of the trained autoencoder and LDM (``ldm`` synthesizer).
    ddim_steps
        Sampling steps (``None``: the LDM config's).
    background
        ``normal`` (tumour-free images, the paper) or ``images`` (real images; their tumours are kept).
    copies
        Synthetic cases written per input case.
    phases
        Phases synthesized (those the case has).
    size_classes, class_weights, tumors
        Tumour sizes and count range (see :class:`TumorMaskConfig`).
    liver_margin_mm
        Tumour centres at least this deep in the liver.
    avoid_vessels, vessel_threshold_hu
        Keep tumours off the PVP-bright vessels (threshold inside the liver).
    blend_margin_mm
        Fade width around each tumour (``ldm``).
    seed, device, overwrite
        Seed, torch device, replace an existing ``out``.
    """

    stage = "synthesize"

    data: Path = Path("data")
    out: Path = Path("synthetic")
    preset: str = "tiny"
    synthesizer: SynthesizerKind = SynthesizerKind.LDM
    autoencoder: Path | None = None
    ldm: Path | None = None
    ddim_steps: int | None = None
    background: str = "normal"
    copies: int = 1
    phases: tuple[Phase, ...] = PHASE_ORDER
    size_classes: tuple[SizeClass, ...] = tuple(SizeClass)
    class_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    tumors: tuple[int, int] = (1, 3)
    liver_margin_mm: float = 3.0
    avoid_vessels: bool = False
    vessel_threshold_hu: float = 170.0
    blend_margin_mm: float = 2.0
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "synthesizer", SynthesizerKind(self.synthesizer))
        object.__setattr__(self, "phases", tuple(Phase(p) for p in self.phases))
        object.__setattr__(self, "size_classes", tuple(SizeClass(c) for c in self.size_classes))
        if self.synthesizer is SynthesizerKind.LDM and (self.autoencoder is None or self.ldm is None):
            raise ValueError("autoencoder, ldm: expected both run folders for the ldm synthesizer, found "
                             f"{self.autoencoder}, {self.ldm}")
        if self.background not in ("normal", "images"):
            raise ValueError(f"background: expected 'normal' or 'images', found '{self.background}'")
        if self.copies < 1 or (self.ddim_steps is not None and self.ddim_steps < 1):
            raise ValueError("copies >= 1 and ddim_steps >= 1 expected")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, found {self.device}")
        self.mask_config()  # validates the tumour-mask fields

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SynthesisConfig:
        """A config from a named preset (``tiny``, ``cpu``, ``paper``), with overrides."""
        if name not in SYNTHESIS_PRESETS:
            raise InputError(f"synthesis preset: expected one of {sorted(SYNTHESIS_PRESETS)}, found '{name}'")
        return cls(**{**SYNTHESIS_PRESETS[name], "preset": name, **overrides})

    def mask_config(self) -> TumorMaskConfig:
        """The tumour-mask configuration these fields describe."""
        return TumorMaskConfig(size_classes=self.size_classes, class_weights=self.class_weights, count=self.tumors,
                               liver_margin_mm=self.liver_margin_mm)


def build_synthesizer(config: SynthesisConfig) -> Synthesizer:
    """The synthesizer a config names (loads the runs for ``ldm``)."""
    if config.synthesizer is SynthesizerKind.RULES:
        return RuleSynthesizer()
    if config.autoencoder is None or config.ldm is None:  # checked in __post_init__ as well
        raise InputError("synthesize: expected --autoencoder and --ldm run folders, found none")
    return LatentDiffusionSynthesizer.from_runs(config.autoencoder, config.ldm, config.ddim_steps, config.device,
                                                config.blend_margin_mm)


def synthesize_dataset(config: SynthesisConfig, progress: Callable[[int], None] | None = None,
                       quality: QualityFilter | None = None, synthesizer: Synthesizer | None = None) -> Dataset:
    """Write a dataset of synthetic multiphase cases (images and exact label on the PVP grid).

    Parameters
    ----------
    config
        The stage configuration.
    progress
        Called with the number of synthetic cases written since the last call.
    quality
        Optional quality filter (a segmenter).
    synthesizer
        Use this synthesizer instead of the one the config names.

    Returns
    -------
    Dataset
        The written dataset (``config.out``), one case per input case and copy.

    Raises
    ------
    InputError
        A case without a liver label or without the background images, images off the label
        grid, an existing output folder (without ``overwrite``), or unusable runs.
    """
    dataset = load_dataset(config.data)
    painter = synthesizer or build_synthesizer(config)
    masks = config.mask_config()
    with atomic_dir(config.out, overwrite=config.overwrite) as tmp:
        cases = []
        for number, case in enumerate(dataset.cases):
            cases.extend(_synthesize_copies(case, number, config, painter, masks, quality, tmp, progress))
        Dataset(tmp, tuple(cases), dataset.phases, {
            "stage": "synthesize", "synthesizer": painter.name, "from": str(config.data),
            "config": config.to_dict(),
        }).save()
    return load_dataset(config.out)


def _synthesize_copies(case: Case, number: int, config: SynthesisConfig, painter: Synthesizer,
                       masks: TumorMaskConfig, quality: QualityFilter | None, root: Path,
                       progress: Callable[[int], None] | None) -> list[Case]:
    volumes = read_case(case, config.phases)
    background = volumes.normal if config.background == "normal" else volumes.images
    if not background:
        raise InputError(f"case {case.id}: expected {config.background} images of "
                         f"{[p.value for p in config.phases]} (run d4m-train normalize first), found none")
    geometry = case.read_label()
    liver = volumes.label > 0
    existing = volumes.label == 2 if config.background == "images" else None
    vessels = None
    if config.avoid_vessels and Phase.PVP in background:
        vessels = vessels_from_pvp(background[Phase.PVP], liver, config.vessel_threshold_hu)
    written = []
    for copy in range(config.copies):
        rng = np.random.default_rng([config.seed, number, copy])
        result = synthesize_case_result(background, liver, volumes.spacing, rng, painter,
                                        CaseOptions(masks=masks, vessels=vessels, quality=quality, avoid=existing))
        label = result.label if existing is None else np.where(existing, 2, result.label).astype(np.uint8)
        case_id = f"{case.id}_syn{copy:02d}"
        folder = root / "cases" / case_id
        images = {}
        for phase, array in result.images.items():
            images[phase] = folder / f"{phase.value}.nii.gz"
            write_image(dataclasses.replace(geometry, array=array.astype(np.float32)), images[phase])
        write_image(dataclasses.replace(geometry, array=label), folder / "label.nii.gz")
        written.append(Case(case_id, images, folder / "label.nii.gz",
                            truth={p: folder / "label.nii.gz" for p in images},
                            meta={"synthetic": True, "source_case": case.id, "synthesizer": painter.name,
                                  "tumors": [t.to_dict() for t in result.tumors]}))
        if progress is not None:
            progress(1)
    return written
