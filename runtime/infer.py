"""``d4m-infer run``: a DICOM study folder in; a DICOM-SEG, a report and a QC picture out. No PyTorch.

The steps of DESIGN section 4, each timed with its peak memory (:class:`~d4m.runtime.report.StageTiming`):

``bundle``
    Load and verify the bundle (schema, sha256 of every file) before touching the study.
``scan``
    Walk the folder, headers only; skip what is not CT image storage (listed in the report);
    refuse an empty folder, a folder without CT, or several studies without ``study``.
``phases``
    Assign NC/ART/PVP/DEL from the headers (:mod:`d4m.runtime.phases`); the user's overrides win.
``read``
    Read each chosen series with its geometry. Missing slices, uneven spacing, gantry tilt and
    mixed image sizes are refused — every problem of every phase listed in one error — unless
    ``allow_resample`` (then :mod:`d4m.runtime.slice_stack` resamples them).
``register``
    Register the other phases to the *reference phase* (rigid then affine, SimpleITK; the
    reference's side prepared once, the phases concurrently, each deterministic) and record the
    quality figure. A phase under the
    registration gate is not used: it is treated as missing (filled by duplication) and the
    report says why.
``resample``
    Duplicate missing phases (:mod:`d4m.runtime.phases_fill`), resample to the bundle's spacing,
    window and z-score with the bundle's constants (:func:`~d4m.runtime.preprocess.prepare_input`).
``network``
    Gaussian-weighted sliding window on the chosen engine (ONNX Runtime CPU/CUDA or TensorRT),
    the engine opened at the first window.
``postprocess``
    Largest liver component, tumours only inside it; labels back to the reference grid; the
    tumour measurements. These three steps are
    :func:`~d4m.runtime.segmentation.segment_volumes`, the function training validates with.
``write``
    Into a temporary sibling of the output folder, renamed at the end: ``seg.dcm`` (DICOM-SEG
    on the reference series), ``report.json``, ``qc.png`` and ``seg.nii.gz`` on request. A
    failed run leaves nothing.

**The reference phase.** PVP, as the paper annotates and registers to PVP. Without a PVP series
the reference is the first present of DEL, ART, NC: the delayed (equilibrium) phase is the
contrast phase that looks most like the portal-venous one — homogeneous parenchymal
enhancement, the same lesion washout pattern — and is what the missing PVP channel is filled
with anyway (nearest later phase, :mod:`~d4m.runtime.phases_fill`); the arterial phase comes
next; the non-contrast scan, which shows the least of the liver, last. The other phases are
registered to it, the DICOM-SEG references its series, and the report carries a warning.

**Batch** (:func:`run_batch`): every sub-folder of the input is a study; the bundle is loaded
once; each study is written to ``OUT/<folder name>/`` on its own; a failed study is recorded
with its exit code and message and the next one runs; ``OUT/batch.json`` summarises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from d4m.dicom_io.codes import PHASE_ORDER, Phase, SegType
from d4m.dicom_io.errors import D4MError, EngineError, InputError
from d4m.dicom_io.reader import read_series, read_series_datasets
from d4m.dicom_io.seg_writer import write_seg
from d4m.dicom_io.series import FolderIndex, SeriesInfo, StudyInfo, scan_folder
from d4m.dicom_io.volume import Volume, write_image
from d4m.runtime.artifacts import atomic_dir, write_json
from d4m.runtime.bundle import Bundle, EngineEntry, Manifest, load_bundle
from d4m.runtime.phases import PhaseMap, assign_phases
from d4m.runtime.qc import write_qc
from d4m.runtime.registration import RegistrationSettings, prepare_reference, register_to_reference
from d4m.runtime.report import (
    PHI_ATTRIBUTES,
    EngineInfo,
    RunRecord,
    StageTiming,
    build_report,
    measure_labels,
    runtime_versions,
)
from d4m.runtime.runners import ClosingContext, Device, OnnxRuntimeRunner, TensorRTRunner, as_predictor
from d4m.runtime.segmentation import SegmentationSpec, segment_volumes
from d4m.runtime.slice_stack import labels_on_slices, read_regridded
from d4m.runtime.sliding_window import Predictor

logger = logging.getLogger(__name__)

#: Which present phase becomes the reference (registration target, SEG source), best first.
REFERENCE_PREFERENCE: tuple[Phase, ...] = (Phase.PVP, Phase.DEL, Phase.ART, Phase.NC)
SEG_FILE = "seg.dcm"
REPORT_FILE = "report.json"
QC_FILE = "qc.png"
NIFTI_FILE = "seg.nii.gz"
BATCH_FILE = "batch.json"
#: Windows per engine call when the engine's batch dimension is dynamic.
DEFAULT_BATCH_SIZE = 2

#: Called with the name of each stage as it starts (the CLI draws it).
Progress = Callable[[str], None]


def parse_phase_override(text: str) -> tuple[Phase, str]:
    """``"PVP=5"`` → ``(Phase.PVP, "5")`` (a series number or SeriesInstanceUID).

    Raises
    ------
    InputError
        Not ``PHASE=SERIES`` with a known phase.
    """
    key, sep, value = str(text).partition("=")
    allowed = [p.value for p in PHASE_ORDER]
    if not sep or not value.strip():
        raise InputError(f"--phase {text}: expected PHASE=SERIES (PHASE in {allowed}), found no '=SERIES'")
    try:
        phase = Phase(key.strip().upper())
    except ValueError as exc:
        raise InputError(f"--phase {text}: expected PHASE in {allowed}, found {key.strip()!r}") from exc
    return phase, value.strip()


@dataclass(frozen=True)
class InferConfig:
    """The options of one ``d4m-infer run`` (STYLE rule 4: frozen, validated, data only).

    Attributes
    ----------
    input
        The study folder (nested, any file names), or with :func:`run_batch` the folder of study folders.
    bundle
        The model bundle folder or ``.zip``.
    out
        The output folder (must not exist unless ``overwrite``); for a batch, the parent of one
        folder per study.
    phases
        Overrides ``(phase, series number or SeriesInstanceUID)``; also accepts a mapping or
        ``"PHASE=SERIES"`` strings.
    device
        ``auto``, ``cpu``, ``cuda`` or ``tensorrt`` (see :mod:`d4m.runtime.runners`).
    seg_format
        ``binary`` (every frame, for viewers) or ``labelmap`` (compact).
    nifti
        Also write the labels as ``seg.nii.gz`` (reference grid).
    study
        StudyInstanceUID to segment when the folder holds several studies.
    allow_resample
        Resample series with missing slices, uneven spacing, gantry tilt or mixed sizes instead
        of refusing them.
    include_phi
        Put the patient's identifiers into the report (off by default).
    threads
        ONNX Runtime intra-op threads (``None``: one per core).
    overwrite
        Replace an existing output folder (atomically, at the end).
    qc
        Write ``qc.png``.
    registration
        Registration stages, metric and gate.
    batch_size
        Windows per engine call; ``None``: the engine's fixed batch size, else 2.
    """

    input: Path
    bundle: Path
    out: Path
    phases: tuple[tuple[Phase, str], ...] = ()
    device: Device = Device.AUTO
    seg_format: SegType = SegType.BINARY
    nifti: bool = False
    study: str | None = None
    allow_resample: bool = False
    include_phi: bool = False
    threads: int | None = None
    overwrite: bool = False
    qc: bool = True
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("input", "bundle", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "device", _choice(Device, self.device, "--device"))
        object.__setattr__(self, "seg_format", _choice(SegType, self.seg_format, "--seg-format"))
        raw = self.phases.items() if isinstance(self.phases, Mapping) else self.phases
        overrides: list[tuple[Phase, str]] = []
        for item in raw:
            phase, series = parse_phase_override(item) if isinstance(item, str) else (
                _choice(Phase, item[0], "--phase"), str(item[1]).strip())
            if phase in [p for p, _ in overrides]:
                raise InputError(f"--phase {phase.value}: expected each phase once, found it twice")
            overrides.append((phase, series))
        object.__setattr__(self, "phases", tuple(overrides))
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise InputError(f"--threads: expected a positive number, found {self.threads}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch size: expected a positive number, found {self.batch_size}")
        if not isinstance(self.registration, RegistrationSettings):
            raise InputError(f"registration: expected RegistrationSettings, found {type(self.registration).__name__}")
        if self.study is not None and not str(self.study).strip():
            raise InputError("--study: expected a StudyInstanceUID, found an empty value")

    def options(self) -> dict[str, Any]:
        """The options as the report records them (no paths)."""
        return {
            "device": self.device.value,
            "seg_format": self.seg_format.value,
            "nifti": self.nifti,
            "qc": self.qc,
            "study": self.study,
            "phase_overrides": {p.value: s for p, s in self.phases},
            "allow_resample": self.allow_resample,
            "include_phi": self.include_phi,
            "threads": self.threads,
            "overwrite": self.overwrite,
            "registration": self.registration.to_dict(),
        }


def _choice(kind: type[Any], value: Any, option: str) -> Any:
    """``value`` as a member of the enum ``kind`` (its value in any case), or an InputError naming the option."""
    if isinstance(value, kind):
        return value
    text = str(value.value if isinstance(value, Enum) else value).strip()
    for candidate in (text, text.lower(), text.upper()):
        with contextlib.suppress(ValueError):
            return kind(candidate)
    raise InputError(f"{option}: expected one of {[m.value for m in kind]}, found {value!r}")


@dataclass(frozen=True)
class InferResult:
    """What a successful run wrote.

    Attributes
    ----------
    out
        The output folder.
    report
        The content of ``report.json``.
    labels
        The label volume on the reference grid (what the SEG holds).
    files
        Names of the written files.
    """

    out: Path
    report: dict[str, Any]
    labels: Volume
    files: tuple[str, ...]

    @property
    def tumor_count(self) -> int:
        """Number of tumours found."""
        return int(self.report["segmentation"]["tumor_count"])


@dataclass(frozen=True)
class BatchItem:
    """One study of a batch: where it came from and how it ended."""

    folder: str
    exit_code: int
    message: str
    seconds: float
    out: Path | None = None
    tumor_count: int | None = None
    warnings: int = 0

    @property
    def ok(self) -> bool:
        """Whether the study was segmented."""
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (output folder by name)."""
        return {"folder": self.folder, "ok": self.ok, "exit_code": self.exit_code, "message": self.message,
                "seconds": round(self.seconds, 3), "out": None if self.out is None else self.out.name,
                "tumor_count": self.tumor_count, "warnings": self.warnings}


@dataclass(frozen=True)
class BatchResult:
    """The studies of a batch, in folder order."""

    items: tuple[BatchItem, ...]

    @property
    def failed(self) -> tuple[BatchItem, ...]:
        """The studies that did not finish."""
        return tuple(item for item in self.items if not item.ok)

    @property
    def exit_code(self) -> int:
        """0 when every study finished, else the highest exit code among the failures."""
        return max((item.exit_code for item in self.failed), default=0)


# --------------------------------------------------------------------------- timing and memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``); ``False`` where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mib() -> float | None:
    """Peak resident memory since the last reset (Linux VmHWM), else since the process started."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / 1024.0 if peak else None


class _Clock:
    """Times stages and records their peak memory (a stage entered twice is one entry)."""

    def __init__(self, progress: Progress | None) -> None:
        self.timings: list[StageTiming] = []
        self._progress = progress

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._progress is not None:
            self._progress(name)
        _reset_peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            timing = StageTiming(name, time.perf_counter() - start, _peak_rss_mib())
            earlier = next((i for i, t in enumerate(self.timings) if t.name == name), None)
            if earlier is None:
                self.timings.append(timing)
            else:  # a stage entered again accumulates: its time adds up, its peak is the higher one
                first = self.timings[earlier]
                peaks = [p for p in (first.peak_rss_mib, timing.peak_rss_mib) if p is not None]
                self.timings[earlier] = StageTiming(name, first.seconds + timing.seconds, max(peaks, default=None))
            logger.debug("stage %s: %.2f s", name, timing.seconds)


# --------------------------------------------------------------------------- the steps


def choose_study(index: FolderIndex, wanted: str | None, name: str) -> StudyInfo:
    """The study to segment.

    Raises
    ------
    InputError
        No CT series (the skipped files summarised), several studies without ``wanted``, or
        ``wanted`` not among them.
    """
    if not index.studies:
        if not index.skipped:
            raise InputError(f"{name}: expected DICOM CT image files, found an empty folder")
        reasons = "; ".join(f"{reason} ({count})" for reason, count in sorted(index.skipped_reasons().items()))
        raise InputError(f"{name}: expected at least one CT image series, found none among "
                         f"{len(index.skipped)} file(s): {reasons}")
    listing = ", ".join(f"{uid} ({len(s.series)} CT series)" for uid, s in index.studies.items())
    if wanted is not None:
        if wanted in index.studies:
            return index.studies[wanted]
        raise InputError(f"--study {wanted}: expected one of the studies in {name}, found {listing}")
    if len(index.studies) > 1:
        raise InputError(f"{name}: expected one study (choose one with --study UID), found "
                         f"{len(index.studies)} studies: {listing}")
    return next(iter(index.studies.values()))


def choose_reference(present: set[Phase] | frozenset[Phase]) -> Phase:
    """The reference phase: PVP, else the first present of DEL, ART, NC (module docstring).

    Raises
    ------
    InputError
        No phase present.
    """
    for phase in REFERENCE_PREFERENCE:
        if phase in present:
            return phase
    raise InputError("phases: expected at least one phase series, found none")


@dataclass(frozen=True)
class _Loaded:
    """One phase series read into a volume."""

    series: SeriesInfo
    volume: Volume
    datasets: tuple[Dataset, ...] | None  # original slices when regridded (else read on demand)
    note: str | None  # what was resampled


def _read_phase(series: SeriesInfo, allow_resample: bool) -> _Loaded:
    try:
        return _Loaded(series, read_series(series), None, None)
    except InputError as exc:
        if not allow_resample:
            raise
        logger.info("%s: %s; resampling (--allow-resample)", series.label, exc)
        try:
            stack = read_regridded(series)
        except InputError as second:
            raise InputError(f"{exc}; resampling did not help: {second}") from second
        return _Loaded(series, stack.volume, stack.datasets, "; ".join(stack.notes) or "resampled")


def read_phases(phase_map: PhaseMap, allow_resample: bool) -> dict[Phase, _Loaded]:
    """Read every chosen series (concurrently); all problems of all phases are raised together.

    Raises
    ------
    InputError
        One line per phase that could not be read, with the reason.
    """
    chosen = [(phase, phase_map.selected[phase]) for phase in PHASE_ORDER if phase in phase_map.selected]

    def attempt(item: tuple[Phase, SeriesInfo]) -> _Loaded | InputError:
        try:
            return _read_phase(item[1], allow_resample)
        except InputError as exc:
            return exc

    # One thread per phase: reading is file I/O and numpy (the GIL is released), the headers come
    # parsed from the scan; about 1.8x faster on two cores, the same volumes.
    with ThreadPoolExecutor(max_workers=max(1, len(chosen)), thread_name_prefix="d4m-read") as pool:
        outcomes = list(pool.map(attempt, chosen))
    loaded = {phase: out for (phase, _), out in zip(chosen, outcomes, strict=True) if isinstance(out, _Loaded)}
    problems = [f"{phase.value}: {out}" for (phase, _), out in zip(chosen, outcomes, strict=True)
                if isinstance(out, InputError)]
    if problems:
        hint = "" if allow_resample else " (--allow-resample resamples irregular series;"
        hint += " --phase PHASE=SERIES chooses another series)" if hint else " (--phase PHASE=SERIES chooses another)"
        raise InputError(f"expected readable phase series, found {len(problems)} problem(s){hint}:\n  - "
                         + "\n  - ".join(problems))
    return loaded


def _phase_map(study: StudyInfo, config: InferConfig) -> PhaseMap:
    phase_map = assign_phases(list(study.series.values()), dict(config.phases))
    if not phase_map.selected:
        reasons = "; ".join(f"{phase_map.assignments[uid].label}: {why}" for uid, why in phase_map.unassigned.items())
        raise InputError(f"study {study.study_uid}: expected at least one CT series with a contrast phase, "
                         f"found none ({reasons or 'no series'}); use --phase PHASE=SERIES")
    return phase_map


@dataclass
class _Registered:
    images: dict[Phase, Volume]
    figures: dict[Phase, dict[str, Any]]
    dropped: dict[Phase, str]


def register_phases(loaded: Mapping[Phase, _Loaded], reference: Phase, settings: RegistrationSettings,
                    warnings: list[str]) -> _Registered:
    """Register every phase to ``reference``; a phase under the gate is dropped with a warning.

    The fixed side (body mask, cropped and coarsened metric image, quality samples) is prepared
    once (:func:`~d4m.runtime.registration.prepare_reference`) and shared. The phases are
    registered concurrently, one thread per core (SimpleITK releases the GIL; three threads on
    two cores were no faster and held about 250 MiB more, measured), each with
    ``settings.threads`` SimpleITK threads: with the default of 1 the results are bit for bit
    those of one registration after the other (tested). The process-wide SimpleITK thread count
    is set once around the block, not per registration, so the concurrent registrations cannot
    see each other's setting.
    """
    fixed = loaded[reference].volume
    result = _Registered({reference: fixed}, {}, {})
    moving = [p for p in PHASE_ORDER if p != reference and p in loaded]
    if not moving:
        return result
    inner = dataclasses.replace(settings, threads=0) if settings.threads else settings
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if settings.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    try:
        prepared = prepare_reference(fixed, None, inner)
        workers = max(1, min(len(moving), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d4m-register") as pool:
            outcomes = dict(zip(moving, pool.map(
                lambda phase: register_to_reference(loaded[phase].volume, fixed, prepared=prepared), moving),
                strict=True))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    for phase, outcome in outcomes.items():
        result.figures[phase] = {**outcome.to_dict(), "used": outcome.accepted}
        if outcome.accepted:
            result.images[phase] = outcome.image
            logger.info("%s → %s: quality %.3f → %.3f", phase.value, reference.value, outcome.quality_before,
                        outcome.quality_after)
        else:
            why = (f"registration to {reference.value} failed the gate (quality {outcome.quality_after:.3f} < "
                   f"{settings.min_quality:.3f})")
            result.dropped[phase] = why
            warnings.append(f"{phase.value} not used: {why}; filled by duplication instead")
    return result


def _batch_size(entry_batch: int | str, config: InferConfig) -> int:
    if isinstance(entry_batch, int):
        if config.batch_size not in (None, entry_batch):
            logger.warning("engine has a fixed batch size of %d; --batch-size %s ignored", entry_batch,
                           config.batch_size)
        return entry_batch
    return config.batch_size or DEFAULT_BATCH_SIZE


class _Engine(ClosingContext):
    """The bundle's engine as a predictor, opened at the first window (the network stage times its set-up).

    Counts the windows, records the providers that ran, and refuses non-finite scores.
    """

    def __init__(self, bundle: Bundle, config: InferConfig, entry: EngineEntry) -> None:
        self._bundle, self._config, self._entry = bundle, config, entry
        self._runner: OnnxRuntimeRunner | TensorRTRunner | None = None
        self._predict: Predictor | None = None
        self.windows = 0
        self.providers: tuple[str, ...] = ()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._predict is None:
            self._runner = self._bundle.open_runner(self._config.device, self._config.threads)
            self._predict = as_predictor(self._runner)
            self.providers = tuple(self._runner.providers)
        scores = self._predict(batch)
        self.windows += int(batch.shape[0])
        if not np.all(np.isfinite(scores)):
            raise EngineError(f"{self._entry.file}: expected finite scores, found NaN or infinity "
                              f"(providers {', '.join(self.providers)})")
        return scores

    def close(self) -> None:
        """Release the runner."""
        if self._runner is not None:
            self._runner.close()
        self._runner, self._predict = None, None


def _segmentation_spec(manifest: Manifest, batch_size: int) -> SegmentationSpec:
    window = manifest.sliding_window
    return SegmentationSpec(manifest.preprocessing.normalization, manifest.preprocessing.target_spacing,
                            window.patch_size, window.overlap, manifest.phases, manifest.postprocessing, batch_size,
                            window.mode, window.sigma_scale)


def _patient(dataset: Dataset) -> dict[str, str]:
    return {key: str(dataset.get(keyword, "") or "") for keyword, key in PHI_ATTRIBUTES.items()}


def _bundle_summary(bundle: Bundle) -> dict[str, Any]:
    manifest = bundle.manifest
    window = manifest.sliding_window
    return {
        **bundle.describe(),
        "source": bundle.source.name,
        "preprocessing": {"hu_window": list(manifest.preprocessing.hu_window), "mean": manifest.preprocessing.mean,
                          "std": manifest.preprocessing.std,
                          "target_spacing": list(manifest.preprocessing.target_spacing)},
        "sliding_window": {"patch_size": list(window.patch_size), "overlap": window.overlap,
                           "mode": window.mode.value, "sigma_scale": window.sigma_scale},
        "postprocessing": manifest.postprocessing.to_dict(),
    }


# --------------------------------------------------------------------------- the run


def run(config: InferConfig, progress: Progress | None = None) -> InferResult:
    """Segment one study: the whole pipeline of the module docstring.

    Parameters
    ----------
    config
        What to segment, with which bundle, where to write.
    progress
        Called with each stage's name as it starts.

    Returns
    -------
    InferResult
        The output folder, the report and the labels.

    Raises
    ------
    InputError
        Bad input (exit 2): the message lists every reason found.
    BundleError
        A missing, tampered or incompatible bundle (exit 3).
    EngineError
        The engine cannot run here or failed (exit 4).
    """
    _check_out(config)
    clock = _Clock(progress)
    with clock.stage("bundle"):
        bundle = load_bundle(config.bundle)
    with bundle:
        return _run_study(config, bundle, clock)


def _check_out(config: InferConfig) -> None:
    if config.out.exists() and not config.overwrite:
        raise InputError(f"{config.out}: expected a new output folder, found an existing one (use --overwrite)")
    if config.out.resolve().is_relative_to(config.input.resolve()):
        raise InputError(f"{config.out}: expected an output folder outside the input folder, found it inside")


def _run_study(config: InferConfig, bundle: Bundle, clock: _Clock) -> InferResult:
    warnings: list[str] = []
    name = config.input.name or str(config.input)
    resolved, entry = bundle.select(config.device)  # an engine that cannot be had fails before any work
    with clock.stage("scan"):
        index = scan_folder(config.input)
        study = choose_study(index, config.study, name)
    if index.skipped:
        logger.info("%s: skipped %d file(s): %s", name, len(index.skipped), index.skipped_reasons())
    with clock.stage("phases"):
        phase_map = _phase_map(study, config)
        warnings += [f"phase assignment: {c}" for c in phase_map.conflicts]
    with clock.stage("read"):
        loaded = read_phases(phase_map, config.allow_resample)
        reference = choose_reference(frozenset(loaded))
        ref = loaded[reference]
        source = ref.datasets if ref.datasets is not None else tuple(read_series_datasets(ref.series))
    regridded = {p: item.note for p, item in loaded.items() if item.note}
    warnings += [f"{p.value} ({loaded[p].series.label}) resampled while reading: {note}"
                 for p, note in regridded.items()]
    if reference != Phase.PVP:
        warnings.append(f"no portal-venous (PVP) series: the other phases were registered to {reference.value} "
                        f"({ref.series.label}) and the SEG references that series")
    with clock.stage("register"):
        registered = register_phases(loaded, reference, config.registration, warnings)
    batch = _batch_size(entry.inputs[0].shape[0], config)
    with _Engine(bundle, config, entry) as predictor:
        labels, duplicated = segment_volumes(registered.images, predictor, _segmentation_spec(bundle.manifest, batch),
                                             reference=ref.volume, stage=clock.stage)
    untrained = untrained_duplication(bundle.manifest, duplicated)
    if untrained:
        warnings.append(untrained)
    engine = EngineInfo(resolved.value, config.device.value, entry.file, entry.format.value, entry.precision.value,
                        predictor.providers, predictor.windows, batch)
    logger.info("%s on %s: %d windows", entry.file, ", ".join(predictor.providers), predictor.windows)
    with clock.stage("postprocess"):
        measurements = measure_labels(labels)
    if not np.any(labels.array):
        warnings.append("no liver found: the SEG and the report are empty")
    with atomic_dir(config.out, overwrite=config.overwrite) as tmp:
        with clock.stage("write"):
            centres = [float(t["centroid_ijk"][2]) for t in measurements["tumors"]]
            outputs = _write_outputs(tmp, config, labels, source, ref, registered, duplicated, centres)
        record = RunRecord(
            input_name=name if config.include_phi else None,
            study=study,
            skipped=index.skipped,
            phase_map=phase_map,
            reference=reference,
            used=tuple(registered.images),
            duplicated=duplicated,
            dropped=registered.dropped,
            registration=registered.figures,
            labels=labels,
            measurements=measurements,
            reference_series_uid=ref.series.series_uid,
            bundle=_bundle_summary(bundle),
            engine=engine,
            options=config.options(),
            outputs=outputs,
            timings=tuple(clock.timings),
            warnings=tuple(warnings),
            versions=runtime_versions(),
            regridded=regridded,
            patient=_patient(source[0]) if config.include_phi else None,
        )
        report = build_report(record)
        write_json(tmp / REPORT_FILE, report)
    for warning in warnings:
        logger.warning("%s", warning)
    files = tuple(v for v in outputs.values() if v)
    logger.info("wrote %s to %s", ", ".join(files), config.out.name)
    return InferResult(config.out, report, labels, files)


def untrained_duplication(manifest: Manifest, duplicated: Mapping[Phase, Phase]) -> str | None:
    """A warning when phases were filled by duplication for a model trained without phase dropout.

    Such a model saw every phase in training, so a duplicated phase is an input it never met; on the
    phantom a four-phase model given PVP alone lost the liver (docs/results.md). ``None`` when nothing
    was duplicated or the bundle's training provenance does not say ``phase_dropout`` 0.
    """
    training = manifest.provenance.get("training")
    if not duplicated or not isinstance(training, dict) or training.get("phase_dropout") != 0:
        return None
    filled = ", ".join(f"{phase.value} from {duplicated[phase].value}" for phase in PHASE_ORDER if phase in duplicated)
    return (f"{len(duplicated)} of {len(manifest.phases)} phases missing, filled by duplication ({filled}); "
            "the model was trained without phase dropout and never saw such input: expect lower accuracy than "
            "with every phase (a model for such studies: d4m-train segmenter --phase-dropout)")


def _write_outputs(tmp: Path, config: InferConfig, labels: Volume, source: tuple[Dataset, ...], ref: _Loaded,
                   registered: _Registered, duplicated: dict[Phase, Phase], tumor_centres_k: list[float]
                   ) -> dict[str, str | None]:
    seg_labels = labels.array if ref.datasets is None else labels_on_slices(labels, source)
    write_seg(seg_labels, source, tmp / SEG_FILE, seg_type=config.seg_format)
    outputs: dict[str, str | None] = {"seg": SEG_FILE, "report": REPORT_FILE, "qc": None, "nifti": None}
    if config.nifti:
        write_image(labels, tmp / NIFTI_FILE)
        outputs["nifti"] = NIFTI_FILE
    if config.qc:
        write_qc(tmp / QC_FILE, registered.images, labels, tumor_centres_k, duplicated)
        outputs["qc"] = QC_FILE
    return outputs


# --------------------------------------------------------------------------- batch


def study_folders(root: Path, exclude: Path | None = None) -> list[Path]:
    """The study folders of a batch: the non-hidden sub-folders of ``root``, sorted, ``exclude`` left out.

    Raises
    ------
    InputError
        ``root`` is not a folder or holds no sub-folder.
    """
    if not root.is_dir():
        found = "a file" if root.exists() else "nothing"
        raise InputError(f"{root}: expected a folder of study folders, found {found}")
    skip = exclude.resolve() if exclude is not None else None
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
               and (skip is None or p.resolve() != skip)]
    if not folders:
        raise InputError(f"{root.name}: expected study folders (one sub-folder per study), found none")
    return folders


def run_batch(config: InferConfig, progress: Callable[[str, str], None] | None = None) -> BatchResult:
    """Segment every study folder under ``config.input``; one failure does not stop the others.

    Parameters
    ----------
    config
        ``input`` is the folder of study folders; ``out`` receives one folder per study and ``batch.json``.
    progress
        Called with ``(study folder name, stage name)``.

    Returns
    -------
    BatchResult
        One item per study folder, failures included (with exit code and message).

    Raises
    ------
    InputError
        No study folder under the input.
    BundleError
        The bundle is bad (nothing is run).
    """
    folders = study_folders(config.input, exclude=config.out)
    bundle = load_bundle(config.bundle)
    items: list[BatchItem] = []
    with bundle:
        for folder in folders:
            study_config = dataclasses.replace(config, input=folder, out=config.out / folder.name)
            start = time.perf_counter()
            clock = _Clock(None if progress is None else functools.partial(progress, folder.name))
            try:
                _check_out(study_config)
                result = _run_study(study_config, bundle, clock)
            except D4MError as exc:
                logger.error("%s: %s", folder.name, exc)
                items.append(BatchItem(folder.name, exc.exit_code, str(exc), time.perf_counter() - start))
                continue
            except (OSError, MemoryError, RuntimeError, ValueError) as exc:  # one broken study must not end the batch
                logger.error("%s: unexpected %s", folder.name, type(exc).__name__, exc_info=exc)
                items.append(BatchItem(folder.name, 1, f"unexpected {type(exc).__name__}: {exc}",
                                       time.perf_counter() - start))
                continue
            items.append(BatchItem(folder.name, 0, "ok", time.perf_counter() - start, result.out, result.tumor_count,
                                   len(result.report["warnings"])))
    batch = BatchResult(tuple(items))
    write_json(config.out / BATCH_FILE, {"schema_version": 1, "bundle_sha256": bundle.sha256,
                                         "studies": [item.to_dict() for item in batch.items],
                                         "failed": len(batch.failed), "exit_code": batch.exit_code})
    return batch


__all__ = [
    "REFERENCE_PREFERENCE",
    "BatchItem",
    "BatchResult",
    "InferConfig",
    "InferResult",
    "choose_reference",
    "choose_study",
    "parse_phase_override",
    "read_phases",
    "register_phases",
    "run",
    "run_batch",
    "study_folders",
]
