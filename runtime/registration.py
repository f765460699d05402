"""Registration of one contrast phase to another (NC, ART, DEL → PVP), focused on the liver.

Stage 1 of Diff4MMLiTS ("pre-registration of the target organs"): rigid, then affine, optionally a
coarse B-spline, each multi-resolution, with Mattes mutual information (the phases differ in
contrast, so intensities do not match one to one). Training (``d4m.training.prealignment``) and
inference (``d4m-infer``) share this module; it imports SimpleITK, numpy and scipy only. What
depends on the fixed image alone (metric region, its cropped metric image, the quality samples)
lives in :mod:`d4m.runtime.registration_reference` and can be prepared once for several phases.

The metric region is the fixed image's liver mask dilated by ``mask_dilation_mm`` when one is
given; without one (at inference, before segmentation) it is the body of the fixed image: voxels
above ``body_threshold_hu``, largest connected component, holes filled slice by slice.
:attr:`RegistrationResult.mask_source` says which was used. The optimiser works on the region's
bounding box, coarsened to ``working_spacing_mm``; the output is resampled from the original.

Safeguards: every stage's result is scored with the same metric on the same samples; a stage
that does not improve on the best so far is dropped, and if none improves on the physical-space
(identity) alignment, identity is kept and flagged. A quality figure in [0, 1] (normalised mutual
information in the metric region) is the gate: a registered result under
``RegistrationSettings.min_quality`` is discarded for identity (an optimiser fed noise still
"improves" its metric), and :attr:`RegistrationResult.accepted` says whether what is returned
passes. Deterministic: regular sampling with a fixed seed and one SimpleITK thread by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import SimpleITK as sitk

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime.registration_reference import (
    PreparedReference,
    body_mask,
    coarsen,
    dilate_mm,
    metric_image,
    metric_region,
    normalized_mutual_information,
    prepare_reference,
    reference_from_region,
)

logger = logging.getLogger(__name__)

REGISTRATION_SCHEMA_VERSION = 1
_METRIC_TOLERANCE = 1e-4  # metric changes smaller than this count as no change
_MIN_STEP = 1e-2  # smallest optimizer step (mm or radians after scaling) before a level ends


class MetricSampling(str, Enum):
    """Which fixed-image voxels the metric reads: both choices are deterministic."""

    REGULAR = "regular"  #: a regular grid, jittered with the fixed seed
    NONE = "none"  #: every voxel of the metric region


class Interpolator(str, Enum):
    """How :func:`resample_to` interpolates."""

    LINEAR = "linear"
    NEAREST = "nearest"


class Flag(str, Enum):
    """Machine-readable flags of a :class:`RegistrationResult` (the warnings say the details)."""

    WORSENED = "worsened"  #: a stage made the metric worse; the earlier transform was kept
    IDENTITY_FALLBACK = "identity_fallback"  #: no stage improved on physical space, or the result failed the gate
    NOT_CONVERGED = "not_converged"  #: a stage stopped at its iteration limit
    STAGE_FAILED = "stage_failed"  #: SimpleITK raised during a stage (e.g. no overlap)
    BELOW_GATE = "below_gate"  #: quality under ``min_quality``: not accepted
    NO_MASK = "no_mask"  #: neither a liver nor a body mask could be made: whole image used


_SITK_INTERPOLATORS = {Interpolator.LINEAR: sitk.sitkLinear, Interpolator.NEAREST: sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class RegistrationSettings:
    """How to register one phase to the reference phase.

    Attributes
    ----------
    rigid, affine, bspline
        Which stages run, in this order; each starts from the best transform so far.
    shrink_factors
        Multi-resolution pyramid, coarse to fine (one entry per level).
    smoothing_sigmas_mm
        Gaussian smoothing per level in millimetres (same length as ``shrink_factors``).
    histogram_bins
        Bins of the Mattes mutual-information metric.
    sampling
        Metric sampling strategy (``regular`` or ``none``, both deterministic).
    samples
        Number of metric samples per pyramid level with ``regular`` sampling (the sampled fraction
        of the metric region follows from its size, so large and small images cost about the same).
    seed
        Seed of the regular-grid jitter: the same seed and inputs give the same transform.
    iterations
        Optimizer iterations per level for the rigid and affine stages.
    bspline_iterations
        L-BFGS-B iterations per level for the B-spline stage (which runs on the two finest levels).
    bspline_grid_mm
        Control-point spacing of the B-spline stage (coarse: organ-level deformation only).
    mask_dilation_mm
        Margin added around the liver (or body) mask to make the metric region.
    body_threshold_hu
        Without a liver mask: the body is the fixed image above this value (HU).
    intensity_window
        Clip both images to ``(low, high)`` before the metric, or ``None`` to use raw values.
    min_quality
        The gate: a result with a quality figure below this is not accepted.
    threads
        SimpleITK threads while optimising. 1 (the default) makes the result bit-for-bit
        reproducible: the Mattes metric sums per-thread histograms in a varying order, so with more
        threads two runs differ by ~1e-12 in the metric and up to ~1e-4 in the transform (measured).
        The process-wide SimpleITK default is set for the duration of the call and restored; 0
        leaves SimpleITK's default (about 1.6× faster on 2 cores, not bit-reproducible).
    working_spacing_mm
        Images finer than this are smoothed and resampled to it (per axis) before optimising, so a
        512² CT costs about what a 192² one does (coarser still when the metric box would hold
        over 400k voxels, e.g. a whole body); 0 optimises at the native resolution unless the box
        is that large. The returned image is always resampled from the original.
    search_margin_mm
        The moving image is cropped to the metric region's box plus this margin before optimising
        (speed); a phase displaced by more than this cannot be recovered.
    fill_value
        Value of resampled voxels that fall outside the moving image (-1024: air in HU).
    """

    rigid: bool = True
    affine: bool = True
    bspline: bool = False
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    histogram_bins: int = 32
    sampling: MetricSampling = MetricSampling.REGULAR
    samples: int = 10000
    seed: int = 0
    iterations: int = 100
    bspline_iterations: int = 20
    bspline_grid_mm: float = 60.0
    mask_dilation_mm: float = 15.0
    body_threshold_hu: float = -500.0
    intensity_window: tuple[float, float] | None = (-300.0, 500.0)
    min_quality: float = 0.08
    threads: int = 1
    search_margin_mm: float = 40.0
    working_spacing_mm: float = 2.0
    fill_value: float = -1024.0

    def __post_init__(self) -> None:
        allowed = [m.value for m in MetricSampling]
        if self.sampling not in allowed and self.sampling not in list(MetricSampling):
            raise InputError(f"registration settings: expected sampling one of {allowed}, found {self.sampling!r}")
        object.__setattr__(self, "sampling", MetricSampling(self.sampling))
        object.__setattr__(self, "shrink_factors", tuple(int(s) for s in self.shrink_factors))
        object.__setattr__(self, "smoothing_sigmas_mm", tuple(float(s) for s in self.smoothing_sigmas_mm))
        if self.intensity_window is not None:
            object.__setattr__(self, "intensity_window", tuple(float(v) for v in self.intensity_window))
        window, sigmas = self.intensity_window, self.smoothing_sigmas_mm
        margins = (self.mask_dilation_mm, self.search_margin_mm, self.working_spacing_mm)
        checks: list[tuple[bool, str, Any]] = [
            (self.rigid or self.affine or self.bspline, "at least one of rigid/affine/bspline", "none enabled"),
            (min(self.shrink_factors, default=0) >= 1, "shrink_factors >= 1", self.shrink_factors),
            (len(self.smoothing_sigmas_mm) == len(self.shrink_factors) and min(sigmas, default=0) >= 0,
             f"{len(self.shrink_factors)} non-negative smoothing_sigmas_mm", sigmas),
            (8 <= self.histogram_bins <= 256, "histogram_bins in [8, 256]", self.histogram_bins),
            (self.samples >= 1000, "samples >= 1000", self.samples),
            (min(self.iterations, self.bspline_iterations) >= 1, "iterations >= 1",
             (self.iterations, self.bspline_iterations)),
            (self.bspline_grid_mm > 0 and min(margins) >= 0,
             "bspline_grid_mm > 0; mask_dilation_mm, search_margin_mm, working_spacing_mm >= 0",
             (self.bspline_grid_mm, *margins)),
            (window is None or (len(window) == 2 and window[0] < window[1]),
             "intensity_window (low, high) with low < high", window),
            (0 <= self.min_quality <= 1, "min_quality in [0, 1]", self.min_quality),
            (min(self.threads, self.seed) >= 0, "threads >= 0 and seed >= 0", (self.threads, self.seed)),
        ]
        for ok, expected, found in checks:
            if not ok:
                raise InputError(f"registration settings: expected {expected}, found {found}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as values, tuples as lists)."""
        out = dataclasses.asdict(self)
        out["sampling"] = self.sampling.value
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "registration settings") -> RegistrationSettings:
        """Build from :meth:`to_dict` output, refusing unknown keys.

        Raises
        ------
        InputError
            Unknown keys or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"{source}: expected only the keys {sorted(names)}, found unknown {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: expected valid registration settings, found {exc}") from exc


@dataclass(frozen=True)
class StageReport:
    """What one stage did: its metric (same samples for every stage) and whether it was kept."""

    name: str
    metric: float | None
    kept: bool
    iterations: int
    stop_condition: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**dataclasses.asdict(self), "metric": _finite_or_none(self.metric)}


@dataclass(frozen=True)
class RegistrationResult:
    """The outcome of :func:`register_to_reference`.

    Attributes
    ----------
    transform
        Maps fixed-space points to moving-space points (SimpleITK convention); identity on fallback.
    image
        The moving image resampled on the fixed grid with ``transform``.
    metric_before, metric_after
        Mattes mutual information (negative: lower is better) in the metric region at the working
        resolution, for the physical-space (identity) alignment and for ``transform``.
    quality_before, quality_after
        Normalised mutual information (2·I / (H_fixed + H_moving), in [0, 1]) in the metric region.
    stages
        One report per stage that ran.
    flags
        Short machine-readable codes (see :class:`Flag`).
    warnings
        Human-readable explanations of the flags.
    accepted
        Whether ``quality_after`` passes ``settings.min_quality``.
    mask_source
        Which metric region was used, in words.
    seconds
        Wall time of the whole registration, resampling included.
    """

    transform: sitk.Transform
    image: Volume
    metric_before: float
    metric_after: float
    quality_before: float
    quality_after: float
    stages: tuple[StageReport, ...]
    flags: tuple[Flag, ...]
    warnings: tuple[str, ...]
    accepted: bool
    mask_source: str
    seconds: float

    @property
    def identity(self) -> bool:
        """Whether the physical-space alignment was kept (no stage improved on it)."""
        return Flag.IDENTITY_FALLBACK in self.flags

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (transform parameters included, image left out)."""
        return {
            "metric_before": _finite_or_none(self.metric_before),
            "metric_after": _finite_or_none(self.metric_after),
            "quality_before": round(self.quality_before, 4),
            "quality_after": round(self.quality_after, 4),
            "accepted": self.accepted,
            "flags": [f.value for f in self.flags],
            "warnings": list(self.warnings),
            "mask_source": self.mask_source,
            "stages": [s.to_dict() for s in self.stages],
            "seconds": round(self.seconds, 3),
            "transform": transform_to_dict(self.transform),
        }


def register_to_reference(
    moving: Volume,
    fixed: Volume,
    fixed_mask: Volume | None = None,
    settings: RegistrationSettings | None = None,
    *,
    prepared: PreparedReference | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and resample it on the fixed grid.

    Parameters
    ----------
    moving
        The phase to move (e.g. NC, ART or DEL), any grid.
    fixed
        The reference phase (PVP).
    fixed_mask
        A label on the fixed grid whose non-zero voxels are the organ to focus on (the liver);
        ``None`` uses the body of the fixed image instead.
    settings
        Stages, pyramid, metric, gate; defaults to :class:`RegistrationSettings` (), or to the
        settings of ``prepared``.
    prepared
        The fixed side prepared once by :func:`prepare_reference` from this ``fixed``,
        ``fixed_mask`` and ``settings``, when several phases go to the same reference (same
        result, without recomputing the metric region and the fixed metric image each time).

    Returns
    -------
    RegistrationResult
        The transform, the resampled image, metrics, quality, flags and the gate's verdict.

    Raises
    ------
    InputError
        ``fixed_mask`` is not on the fixed grid or is empty; ``prepared`` was made from another
        fixed image or with other settings.
    """
    start = time.perf_counter()
    if prepared is None:
        prepared = prepare_reference(fixed, fixed_mask, settings or RegistrationSettings())
    elif prepared.volume is not fixed or settings not in (None, prepared.settings):
        raise InputError("registration: expected a prepared reference made from this fixed image and these "
                         "settings, found one made from another")
    settings, region, mask_source = prepared.settings, prepared.region, prepared.mask_source
    warnings: list[str] = []
    flags: list[Flag] = []
    if region is None:
        flags.append(Flag.NO_MASK)
        warnings.append(f"no metric mask could be made ({mask_source})")
    problem = _problem_for(moving, prepared)
    identity = sitk.Euler3DTransform()
    identity.SetCenter(prepared.center)

    with _sitk_threads(settings.threads):
        metric_before = _evaluate(problem, identity)
        best, best_metric, best_name, stages = _run_stages(problem, identity, metric_before, flags, warnings)
    if best_name == "identity":
        flags.append(Flag.IDENTITY_FALLBACK)
        warnings.append("no stage improved on the physical-space alignment: identity kept")

    before_image = resample_to(moving, fixed, None, Interpolator.LINEAR, settings.fill_value)
    quality_before = prepared.quality(before_image)
    image, quality_after, metric_after = before_image, quality_before, metric_before
    if best_name != "identity":
        image = resample_to(moving, fixed, best, Interpolator.LINEAR, settings.fill_value)
        quality_after = prepared.quality(image)
        metric_after = best_metric
        if quality_after < settings.min_quality:
            # An optimiser fed noise still "improves" the metric a little: do not trust it.
            flags.append(Flag.IDENTITY_FALLBACK)
            warnings.append(
                f"registered quality {quality_after:.3f} below the gate {settings.min_quality:.3f}: "
                f"{best_name} result discarded, identity kept"
            )
            best_name, image, quality_after, metric_after = "identity", before_image, quality_before, metric_before
    accepted = quality_after >= settings.min_quality
    if not accepted:
        flags.append(Flag.BELOW_GATE)
        warnings.append(f"quality {quality_after:.3f} below the gate {settings.min_quality:.3f}: not accepted")
    for message in warnings:
        logger.info("registration: %s", message)
    return RegistrationResult(
        transform=best if best_name != "identity" else sitk.Transform(3, sitk.sitkIdentity),
        image=image,
        metric_before=metric_before,
        metric_after=metric_after,
        quality_before=quality_before,
        quality_after=quality_after,
        stages=tuple(stages),
        flags=tuple(dict.fromkeys(flags)),
        warnings=tuple(warnings),
        accepted=accepted,
        mask_source=mask_source,
        seconds=time.perf_counter() - start,
    )


def resample_to(
    volume: Volume,
    reference: Volume,
    transform: sitk.Transform | None = None,
    interpolator: Interpolator | str = Interpolator.LINEAR,
    default_value: float = -1024.0,
) -> Volume:
    """Resample ``volume`` on the grid of ``reference`` (physical space, optionally through ``transform``).

    Parameters
    ----------
    volume
        The image to resample.
    reference
        Gives the output grid (shape, spacing, origin, direction).
    transform
        Maps reference-space points to ``volume``-space points; ``None`` is the identity.
    interpolator
        ``linear`` for images, ``nearest`` for labels.
    default_value
        Value of output voxels that fall outside ``volume``.

    Returns
    -------
    Volume
        On the reference grid, with the input's dtype (integers rounded and clipped).
    """
    interpolator = Interpolator(interpolator)
    dtype = volume.array.dtype
    source = volume.to_sitk()
    if interpolator is Interpolator.LINEAR and dtype not in (np.float64, np.float32):  # float32: no copy needed
        source = sitk.Cast(source, sitk.sitkFloat32)
    out = sitk.Resample(
        source,
        _grid(reference),
        transform or sitk.Transform(3, sitk.sitkIdentity),
        _SITK_INTERPOLATORS[interpolator],
        float(default_value),
    )
    array = sitk.GetArrayFromImage(out)
    if array.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            array = np.clip(np.rint(array), info.min, info.max)
        array = array.astype(dtype)
    return Volume(array, reference.spacing, reference.origin, reference.direction)


def resample_label(
    label: Volume, reference: Volume, transform: sitk.Transform | None = None
) -> Volume:
    """Resample a label map on the grid of ``reference`` with nearest-neighbour (outside: 0)."""
    return resample_to(label, reference, transform, Interpolator.NEAREST, 0)


def transform_to_dict(transform: sitk.Transform) -> dict[str, Any]:
    """JSON-ready description of a transform (composite transforms as a list, applied last first)."""
    if transform.GetTransformEnum() == sitk.sitkIdentity:
        return {"kind": "IdentityTransform", "parameters": [], "fixed_parameters": []}
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        return {
            "kind": "CompositeTransform",
            "transforms": [
                transform_to_dict(transform.GetNthTransform(i)) for i in range(transform.GetNumberOfTransforms())
            ],
        }
    return {
        "kind": transform.GetName(),
        "parameters": [float(v) for v in transform.GetParameters()],
        "fixed_parameters": [float(v) for v in transform.GetFixedParameters()],
    }


def transform_from_dict(data: dict[str, Any]) -> sitk.Transform:
    """Rebuild a transform written by :func:`transform_to_dict`.

    Raises
    ------
    InputError
        An unknown transform kind.
    """
    kind = data.get("kind")
    if kind == "CompositeTransform":
        return sitk.CompositeTransform([transform_from_dict(t) for t in data["transforms"]])
    factories = {
        "IdentityTransform": lambda: sitk.Transform(3, sitk.sitkIdentity),
        "Euler3DTransform": sitk.Euler3DTransform,
        "AffineTransform": lambda: sitk.AffineTransform(3),
        "BSplineTransform": lambda: sitk.BSplineTransform(3, 3),
    }
    if kind not in factories:
        raise InputError(f"transform: expected one of {sorted(factories)} or CompositeTransform, found {kind!r}")
    transform = factories[kind]()
    if kind != "IdentityTransform":
        transform.SetFixedParameters(tuple(data["fixed_parameters"]))
        transform.SetParameters(tuple(data["parameters"]))
    return transform


# --- internals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """The images one registration optimises on: metric images cropped around the metric region."""

    fixed: sitk.Image
    moving: sitk.Image
    mask: sitk.Image | None
    region_voxels: int
    settings: RegistrationSettings


def _problem(
    moving: Volume, fixed: Volume, region: np.ndarray | None, settings: RegistrationSettings
) -> _Problem:
    """Crop the fixed image to the region's box and the moving one to that box plus the search margin."""
    return _problem_for(moving, reference_from_region(fixed, region, "given region", settings))


def _problem_for(moving: Volume, reference: PreparedReference) -> _Problem:
    """The moving side of a registration to a prepared reference, on private copies of its images."""
    settings = reference.settings
    moving_img = moving.to_sitk()
    index_box = np.array([moving_img.TransformPhysicalPointToContinuousIndex(p) for p in reference.corners])
    pad = settings.search_margin_mm / np.asarray(moving_img.GetSpacing())
    moving_size = np.asarray(moving_img.GetSize())
    lo_m = np.clip(np.floor(index_box.min(axis=0) - pad), 0, moving_size - 1).astype(int)
    hi_m = np.clip(np.ceil(index_box.max(axis=0) + pad) + 1, lo_m + 1, moving_size).astype(int)
    if np.all(hi_m - lo_m >= 4):  # else (hardly any overlap) keep it whole: the stages will fail and say so
        moving_img = sitk.RegionOfInterest(moving_img, (hi_m - lo_m).tolist(), lo_m.tolist())
    moving_img = coarsen(metric_image(moving_img, settings.intensity_window), reference.working_mm)
    mask = None if reference.mask is None else _private(reference.mask)
    return _Problem(_private(reference.fixed), moving_img, mask, reference.region_voxels, settings)


def _private(image: sitk.Image) -> sitk.Image:
    """A copy of ``image`` that shares no buffer (concurrent registrations never share an ITK image)."""
    copy = sitk.Image(image)
    copy.MakeUnique()
    return copy


@contextlib.contextmanager
def _sitk_threads(threads: int) -> Iterator[None]:
    """Set SimpleITK's process-wide default thread count for a block (0: leave it alone)."""
    if threads <= 0:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _method(problem: _Problem, shrink_factors: tuple[int, ...]) -> sitk.ImageRegistrationMethod:
    settings = problem.settings
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    if problem.mask is not None:
        method.SetMetricFixedMask(problem.mask)
    if settings.sampling is MetricSampling.REGULAR:
        method.SetMetricSamplingStrategy(method.REGULAR)
        # The fraction applies to the whole (cropped) box; the mask keeps ``samples`` of them.
        # SimpleITK reads seed 0 as "seed from the wall clock": shift by one to stay deterministic.
        fractions = [min(1.0, settings.samples * f**3 / max(problem.region_voxels, 1)) for f in shrink_factors]
        method.SetMetricSamplingPercentagePerLevel(fractions, settings.seed + 1)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    # Gradients at the samples only: a gradient filter over the whole image costs more than the metric.
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetShrinkFactorsPerLevel(list(shrink_factors))
    return method


def _run_stages(
    problem: _Problem, identity: sitk.Transform, metric_before: float, flags: list[Flag], warnings: list[str]
) -> tuple[sitk.Transform, float, str, list[StageReport]]:
    """Run the enabled stages in order, each from the best so far; keep a stage only if it improves.

    Appends to ``flags`` and ``warnings``; returns the best transform, its metric and stage name.
    """
    settings = problem.settings
    best, best_metric, best_name = identity, metric_before, "identity"
    stages: list[StageReport] = []
    for name in ("rigid", "affine", "bspline"):
        if not getattr(settings, name):
            continue
        t0 = time.perf_counter()
        try:
            candidate, iterations, stop = _run_stage(name, problem, best)
            metric = _evaluate(problem, candidate)
        except RuntimeError as exc:
            flags.append(Flag.STAGE_FAILED)
            warnings.append(f"{name} stage failed in SimpleITK: {_first_line(exc)}; kept {best_name}")
            stages.append(StageReport(name, None, False, 0, _first_line(exc), time.perf_counter() - t0))
            continue
        if iterations >= (settings.bspline_iterations if name == "bspline" else settings.iterations):
            flags.append(Flag.NOT_CONVERGED)
            warnings.append(f"{name} stage stopped at its iteration limit ({iterations}) without converging")
        kept = metric < best_metric - _METRIC_TOLERANCE
        if metric > best_metric + _METRIC_TOLERANCE:
            flags.append(Flag.WORSENED)
            warnings.append(f"{name} stage made the metric worse ({best_metric:.4f} → {metric:.4f}); kept {best_name}")
        stages.append(StageReport(name, metric, kept, iterations, stop, time.perf_counter() - t0))
        if kept:
            best, best_metric, best_name = candidate, metric, name
    return best, best_metric, best_name, stages


def _evaluate(problem: _Problem, transform: sitk.Transform) -> float:
    """The Mattes metric of ``transform`` at the finest working level, with the same samples every time."""
    method = _method(problem, (1,))
    method.SetSmoothingSigmasPerLevel([0.0])
    method.SetInitialTransform(transform, inPlace=False)
    try:
        return float(method.MetricEvaluate(problem.fixed, problem.moving))
    except RuntimeError as exc:
        logger.debug("metric evaluation failed: %s", _first_line(exc))
        return math.inf


def _run_stage(name: str, problem: _Problem, start: sitk.Transform) -> tuple[sitk.Transform, int, str]:
    """Optimise one stage starting from ``start``; returns (transform, iterations, stop condition)."""
    settings = problem.settings
    # The B-spline refines an affine result: its two finest levels are enough (and it is the slow stage).
    levels = 2 if name == "bspline" else len(settings.shrink_factors)
    method = _method(problem, settings.shrink_factors[-levels:])
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm[-levels:]))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    start = start.Downcast()
    if name == "bspline":
        fixed = problem.fixed
        mesh = [
            max(1, int(round(n * s / settings.bspline_grid_mm)))
            for n, s in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)
        ]
        transform: sitk.Transform = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        method.SetMovingInitialTransform(start)
        method.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5,
            numberOfIterations=settings.bspline_iterations,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=4 * settings.bspline_iterations,
            costFunctionConvergenceFactor=1e7,
        )
    else:
        transform = _linear_start(name, start)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0 if name == "rigid" else 1.0,
            minStep=_MIN_STEP,
            numberOfIterations=settings.iterations,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-6,
        )
        method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    iterations: list[int] = []
    method.AddCommand(sitk.sitkEndEvent, lambda: iterations.append(int(method.GetOptimizerIteration())))
    method.Execute(problem.fixed, problem.moving)
    stop = method.GetOptimizerStopConditionDescription()
    if name == "bspline":
        transform = sitk.CompositeTransform([start, transform])
    return transform, (iterations[-1] if iterations else 0), stop


def _linear_start(name: str, start: sitk.Transform) -> sitk.Transform:
    """A rigid or affine transform equal to ``start`` (identity, rigid or affine)."""
    if name == "rigid":
        rigid = sitk.Euler3DTransform()
        if isinstance(start, sitk.Euler3DTransform):
            rigid.SetFixedParameters(start.GetFixedParameters())
            rigid.SetParameters(start.GetParameters())
        return rigid
    affine = sitk.AffineTransform(3)
    if isinstance(start, (sitk.Euler3DTransform, sitk.AffineTransform)):
        affine.SetCenter(start.GetCenter())
        affine.SetMatrix(start.GetMatrix())
        affine.SetTranslation(start.GetTranslation())
    return affine


def _grid(reference: Volume) -> sitk.Image:
    """An empty image carrying the reference grid (cheaper than converting its voxels)."""
    image = sitk.Image([int(n) for n in reversed(reference.shape)], sitk.sitkUInt8)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(tuple(reference.direction.ravel()))
    return image


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


__all__ = [
    "Flag",
    "Interpolator",
    "MetricSampling",
    "PreparedReference",
    "RegistrationResult",
    "RegistrationSettings",
    "StageReport",
    "body_mask",
    "dilate_mm",
    "metric_region",
    "normalized_mutual_information",
    "prepare_reference",
    "register_to_reference",
    "resample_label",
    "resample_to",
    "transform_from_dict",
    "transform_to_dict",
]
