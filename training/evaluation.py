"""Segmentation metrics and the evaluation of a trained segmenter on held-out cases.

Metrics per case (tumour = label 2, liver region = labels 1 ∪ 2), as in the paper's tables
(DSC, JAC, SE, PRE) plus the liver DSC, lesion-wise detection and the 95 % Hausdorff distance.

Empty-mask conventions (``P`` prediction, ``T`` truth):

* DSC and Jaccard: both empty → 1 (nothing to find, nothing found); one empty → 0.
* Sensitivity ``|P∩T|/|T|``: ``T`` empty → NaN. Precision ``|P∩T|/|P|``: ``P`` empty → NaN.
* HD95 (mm): both empty → 0; exactly one empty → NaN (undefined; the detection metrics show
  the miss). Otherwise the larger of the two directed 95th percentiles of surface-to-surface
  distances (medpy's ``hd95`` and MONAI's ``percentile=95`` convention), surfaces being the
  mask voxels with a face neighbour outside, distances by a spacing-aware Euclidean distance
  transform between voxel centres.
* Lesions are 26-connected tumour components. A true lesion is *detected* when a predicted
  component overlaps it by at least one voxel; a predicted component is a *true positive*
  when it overlaps some true lesion. Recall = detected / true lesions (NaN without true
  lesions), precision = true-positive / predicted components (NaN without predictions), F1 their
  harmonic mean; F1 is 1 when there are neither true nor predicted lesions, 0 when only one
  side has lesions. ``lesion_recall_10mm`` is the recall over the true lesions whose
  equal-volume sphere is at least 10 mm across (RECIST 1.1's measurable lesion on CT; NaN
  without one).

Means over cases skip NaN. ``tumor_dice_global`` pools voxels over all cases (LiTS "Dice
global").
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from d4m.dicom_io.codes import LIVER, PHASE_ORDER, TUMOR, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime.artifacts import write_json
from d4m.runtime.postprocess import CONNECTIVITY
from d4m.runtime.preprocess import Interpolator, resample_like
from d4m.runtime.segmentation import SegmentationSpec, segment_volumes
from d4m.runtime.sliding_window import Predictor
from d4m.training.config import StageConfig
from d4m.training.datasets import Case

if TYPE_CHECKING:
    from d4m.training.segmenter import SegmenterConfig

logger = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1

#: Per-case metric columns, in table order.
METRIC_NAMES = (
    "tumor_dice", "tumor_jaccard", "tumor_sensitivity", "tumor_precision", "tumor_hd95_mm",
    "liver_dice", "lesion_recall", "lesion_precision", "lesion_f1", "true_lesions", "predicted_lesions",
    "lesion_recall_10mm",
)

#: Smallest measurable lesion (mm, equal-volume sphere diameter): RECIST 1.1 on CT.
MEASURABLE_MM = 10.0

_FACE = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------------
# voxel metrics
# --------------------------------------------------------------------------------------------

def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    pred, truth = pred.astype(bool), truth.astype(bool)
    if pred.shape != truth.shape:
        raise InputError(f"metrics: expected masks of one shape, found {pred.shape} and {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two masks (both empty → 1)."""
    tp, fp, fn = _counts(pred, truth)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index (IoU) of two masks (both empty → 1)."""
    tp, fp, fn = _counts(pred, truth)
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Voxel recall ``|P∩T| / |T|`` (NaN when the truth is empty)."""
    tp, _, fn = _counts(pred, truth)
    return math.nan if tp + fn == 0 else tp / (tp + fn)


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    """Voxel precision ``|P∩T| / |P|`` (NaN when the prediction is empty)."""
    tp, fp, _ = _counts(pred, truth)
    return math.nan if tp + fp == 0 else tp / (tp + fp)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see the module conventions).

    Parameters
    ----------
    pred, truth
        ``(z, y, x)`` masks.
    spacing
        Voxel size ``(x, y, z)`` mm, as :attr:`Volume.spacing`.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if pred.shape != truth.shape:
        raise InputError(f"hd95: expected masks of one shape, found {pred.shape} and {truth.shape}")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if has_pred != has_truth:
        return math.nan
    # work inside the joint bounding box (plus a margin) to keep the distance transforms small
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    pred, truth = pred[box], truth[box]
    sampling = tuple(float(s) for s in spacing[::-1])
    pred_surface, truth_surface = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[truth_surface]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


@dataclasses.dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection counts and rates (see the module conventions)."""

    true_lesions: int
    predicted_lesions: int
    detected: int
    true_positive_predictions: int
    measurable_lesions: int = 0
    measurable_detected: int = 0

    @property
    def recall(self) -> float:
        return math.nan if self.true_lesions == 0 else self.detected / self.true_lesions

    @property
    def measurable_recall(self) -> float:
        """Recall over the true lesions of at least :data:`MEASURABLE_MM` (NaN without one)."""
        return math.nan if self.measurable_lesions == 0 else self.measurable_detected / self.measurable_lesions

    @property
    def precision(self) -> float:
        return math.nan if self.predicted_lesions == 0 else self.true_positive_predictions / self.predicted_lesions

    @property
    def f1(self) -> float:
        if self.true_lesions == 0 and self.predicted_lesions == 0:
            return 1.0
        if self.true_lesions == 0 or self.predicted_lesions == 0:
            return 0.0
        p, r = self.precision, self.recall
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def lesion_detection(pred: np.ndarray, truth: np.ndarray,
                     spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> LesionDetection:
    """Match 26-connected components of two tumour masks by overlap (≥ 1 voxel); ``spacing`` (mm) sizes them."""
    pred_cc, n_pred = ndimage.label(pred.astype(bool), structure=CONNECTIVITY)
    truth_cc, n_truth = ndimage.label(truth.astype(bool), structure=CONNECTIVITY)
    both = (pred_cc > 0) & (truth_cc > 0)
    found = np.unique(truth_cc[both])
    true_positive = len(np.unique(pred_cc[both]))
    voxel_mm3 = float(np.prod(spacing))
    diameters = np.cbrt(6.0 / math.pi * voxel_mm3 * np.bincount(truth_cc.ravel(), minlength=n_truth + 1)[1:])
    measurable = np.flatnonzero(diameters >= MEASURABLE_MM) + 1
    return LesionDetection(int(n_truth), int(n_pred), len(found), true_positive, len(measurable),
                           int(np.isin(measurable, found).sum()))


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Every per-case metric of :data:`METRIC_NAMES` for two label maps (0 / 1 liver / 2 tumour)."""
    if pred.shape != truth.shape:
        raise InputError(f"metrics: expected label maps of one shape, found {pred.shape} and {truth.shape}")
    tumor_p, tumor_t = pred == TUMOR.value, truth == TUMOR.value
    lesions = lesion_detection(tumor_p, tumor_t, spacing)
    return {
        "tumor_dice": dice(tumor_p, tumor_t),
        "tumor_jaccard": jaccard(tumor_p, tumor_t),
        "tumor_sensitivity": sensitivity(tumor_p, tumor_t),
        "tumor_precision": precision(tumor_p, tumor_t),
        "tumor_hd95_mm": hd95(tumor_p, tumor_t, spacing),
        "liver_dice": dice(pred >= LIVER.value, truth >= LIVER.value),
        "lesion_recall": lesions.recall,
        "lesion_precision": lesions.precision,
        "lesion_f1": lesions.f1,
        "true_lesions": float(lesions.true_lesions),
        "predicted_lesions": float(lesions.predicted_lesions),
        "lesion_recall_10mm": lesions.measurable_recall,
    }


def summarize(rows: Iterable[Mapping[str, Any]], names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """NaN-skipping mean of each metric over rows (NaN when no row has a value)."""
    rows = list(rows)
    out: dict[str, float] = {}
    for name in names:
        values = [float(r[name]) for r in rows if name in r and not math.isnan(float(r[name]))]
        out[name] = float(np.mean(values)) if values else math.nan
    out["cases"] = float(len(rows))
    return out


# --------------------------------------------------------------------------------------------
# predicting one study (the runtime's steps, with any predictor)
# --------------------------------------------------------------------------------------------

def inference_spec(config: SegmenterConfig) -> SegmentationSpec:
    """What the model needs around its network, as the runtime's spec of a segmenter config.

    A model is thus validated with exactly the steps ``d4m-infer`` runs (:mod:`d4m.runtime.segmentation`);
    the config's spacing and z-score constants must be measured.
    """
    return SegmentationSpec(config.normalization, config.spacing, config.patch_size, config.overlap, config.phases)


def image_on_label_grid(case: Case, phase: Phase, label: Volume) -> Volume:
    """A case's phase image, resampled (linear, air outside) onto its label's grid when not already on it."""
    volume = case.image(phase)
    if not volume.same_grid(label):
        volume = resample_like(volume, label, Interpolator.LINEAR, -1024.0)
    return volume


def phase_set_name(phases: Iterable[Phase]) -> str:
    """``"NC+PVP"``-style name of a phase subset, in acquisition order."""
    chosen = {Phase(p) for p in phases}
    return "+".join(p.value for p in PHASE_ORDER if p in chosen)


def every_phase_subset() -> tuple[tuple[Phase, ...], ...]:
    """The 15 non-empty phase subsets, the full set first, then by size and order."""
    subsets = [tuple(p for i, p in enumerate(PHASE_ORDER) if mask >> i & 1) for mask in range(1, 16)]
    return tuple(sorted(subsets, key=lambda s: (-len(s), [PHASE_ORDER.index(p) for p in s])))


def shared_phases(cases: Sequence[Case]) -> tuple[Phase, ...]:
    """The phases every case has, in acquisition order (what a default evaluation gives the model).

    Raises
    ------
    InputError
        No phase is common to all cases.
    """
    phases = tuple(p for p in PHASE_ORDER if all(p in c.images for c in cases))
    if not phases:
        raise InputError(f"expected a phase that all {len(cases)} cases have, found none")
    return phases


def evaluate_cases(
    cases: Sequence[Case],
    predictor: Predictor,
    spec: SegmentationSpec,
    phase_sets: Sequence[Sequence[Phase]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment each case with each phase subset and score it against its label.

    ``phase_sets`` ``None`` gives the model the phases every case has (:func:`shared_phases`),
    the others duplicated as at inference. Cases lacking a phase of a subset are skipped for
    that subset (logged).

    Returns
    -------
    list[dict]
        One row per (case, phase set): ``case``, ``phases``, ``duplicated``, ``seconds`` and
        every metric of :data:`METRIC_NAMES`.
    """
    if phase_sets is None:
        phase_sets = (shared_phases(cases),)
    rows = []
    for case in cases:
        label = case.read_label()
        loaded: dict[Phase, Volume] = {}
        for phases in phase_sets:
            wanted = [Phase(p) for p in phases]
            if any(p not in case.images for p in wanted):
                logger.info("case %s: skipping %s (phases missing)", case.id, phase_set_name(wanted))
                continue
            for phase in wanted:
                if phase not in loaded:
                    loaded[phase] = image_on_label_grid(case, phase, label)
            clock = time.perf_counter()
            pred, duplicated = segment_volumes({p: loaded[p] for p in wanted}, predictor, spec)
            row: dict[str, Any] = {
                "case": case.id,
                "phases": phase_set_name(wanted),
                "duplicated": ";".join(f"{m.value}<-{s.value}" for m, s in duplicated.items()),
                "seconds": round(time.perf_counter() - clock, 3),
            }
            row.update(case_metrics(pred.array, label.array, label.spacing))
            row["tumor_counts"] = list(_counts(pred.array == TUMOR.value, label.array == TUMOR.value))
            rows.append(row)
        if progress is not None:
            progress(1)
    return rows


# --------------------------------------------------------------------------------------------
# the evaluate stage
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvaluationConfig(StageConfig):
    """Evaluate a trained segmenter folder on a dataset split.

    Attributes
    ----------
    model
        A segmenter training folder (``config.json`` + ``model.safetensors``).
    out
        Folder for ``results.md``, ``results.csv`` and ``results.json``.
    data
        Dataset to evaluate on; ``None`` = the model's training dataset.
    split
        ``test``, ``val``, ``train`` (the model's split of ``data``) or ``all`` cases.
    phase_sets
        Phase subsets to evaluate; empty = the phases every evaluated case has (the four phases
        of a complete dataset, only PVP of a PVP-only one).
    every_subset
        Evaluate all 15 phase subsets (the missing-phase study); overrides ``phase_sets``.
    postprocess
        Apply the liver / tumour clean-up: the run's ``postprocess.json`` (chosen on its
        validation cases), or the defaults for a run without one.
    overlap
        Sliding-window overlap (``None`` = the model's).
    batch_size
        Windows per network call.
    device
        ``auto``, ``cpu`` or ``cuda``.
    weights
        ``model.safetensors`` (best) or ``last.safetensors`` inside ``model``.
    """

    stage = "evaluate"

    model: Path = Path("runs/segmenter")
    out: Path = Path("runs/evaluation")
    data: Path | None = None
    split: str = "test"
    phase_sets: tuple[tuple[Phase, ...], ...] = ()
    every_subset: bool = False
    postprocess: bool = True
    overlap: float | None = None
    batch_size: int = 4
    device: str = "auto"
    weights: str = "model.safetensors"

    def __post_init__(self) -> None:
        if self.split not in ("test", "val", "train", "all"):
            raise ValueError(f"split must be test, val, train or all, found {self.split!r}")
        object.__setattr__(self, "phase_sets", tuple(tuple(Phase(p) for p in s) for s in self.phase_sets))
        if any(not s for s in self.phase_sets):
            raise ValueError("phase_sets must not hold an empty set")
        if self.overlap is not None and not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), found {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, found {self.device!r}")
        if self.weights not in ("model.safetensors", "last.safetensors"):
            raise ValueError(f"weights must be model.safetensors or last.safetensors, found {self.weights!r}")

    @property
    def chosen_phase_sets(self) -> tuple[tuple[Phase, ...], ...] | None:
        """The phase subsets this evaluation runs (``None``: those every case has, see :func:`evaluate_cases`)."""
        if self.every_subset:
            return every_phase_subset()
        return self.phase_sets or None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def results_markdown(summary: Mapping[str, Mapping[str, float]], title: str) -> str:
    """A Markdown table: one row per phase set, one column per metric (means over cases)."""
    columns = ["tumor_dice", "tumor_jaccard", "tumor_sensitivity", "tumor_precision", "tumor_hd95_mm",
               "liver_dice", "lesion_recall", "lesion_recall_10mm", "lesion_precision", "lesion_f1",
               "tumor_dice_global", "cases"]
    lines = [f"# {title}", "", "| phases | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in summary.items():
        cells = [_fmt(int(values["cases"])) if c == "cases" else _fmt(values.get(c, math.nan)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Means over cases (NaN-skipping); DSC/JAC both-empty = 1; HD95 in mm. "
              "See d4m.training.evaluation for the conventions.", ""]
    return "\n".join(lines)


def write_results(out: Path, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``results.csv`` (per case), ``results.md`` and ``results.json`` (summary + rows)."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["phases"] for r in rows):
        part = [r for r in rows if r["phases"] == name]
        summary[name] = summarize(part)
        if all("tumor_counts" in r for r in part):
            counts = np.sum([r["tumor_counts"] for r in part], axis=0)
            tp, fp, fn = (int(c) for c in counts)
            summary[name]["tumor_dice_global"] = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    fields = ["case", "phases", "duplicated", *METRIC_NAMES, "seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    (out / "results.csv").write_text(buffer.getvalue())
    (out / "results.md").write_text(results_markdown(summary, str(info.get("title", "Segmenter evaluation"))))

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    result = {"schema_version": RESULTS_SCHEMA_VERSION, "kind": "d4m-evaluation", **dict(info),
              "summary": clean(summary), "cases": clean([dict(r) for r in rows])}
    write_json(out / "results.json", result)
    return result


def load_segmenter(folder: Path, weights: str = "model.safetensors", device: str = "auto") -> tuple[
        Any, Predictor, SegmentationSpec]:
    """Rebuild a trained segmenter from its folder: config, network with weights, predictor, spec.

    Raises
    ------
    InputError
        Missing or invalid ``config.json`` / weights, or a config without measured
        normalisation constants or spacing.
    """
    from d4m.training.checkpoints import load_weights
    from d4m.training.segmenter import SegmenterConfig, build_network, torch_predictor

    config = SegmenterConfig.load(folder / "config.json")
    if config.norm_mean is None or config.spacing is None:
        raise InputError(f"{folder / 'config.json'}: expected measured norm_mean/norm_std and spacing, found none "
                         f"(a config saved before training?)")
    network = build_network(config)
    load_weights(network, folder / weights)
    predictor = torch_predictor(network, device)
    return config, predictor, inference_spec(config)


def evaluate(config: EvaluationConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate a trained segmenter on a dataset split; write ``results.{md,csv,json}`` into ``out``.

    Parameters
    ----------
    config
        What to evaluate and how.
    progress
        Called with 1 after each case.

    Returns
    -------
    dict
        The content of ``results.json``: ``summary`` per phase set, per-case ``cases`` rows.

    Raises
    ------
    InputError
        A bad model folder or dataset, or no case in the chosen split.
    """
    from d4m.training.datasets import load_dataset
    from d4m.training.postprocess_choice import run_postprocess
    from d4m.training.segmenter_data import split_cases

    model_config, predictor, spec = load_segmenter(config.model, config.weights, config.device)
    spec = dataclasses.replace(
        spec,
        overlap=spec.overlap if config.overlap is None else config.overlap,
        postprocess=run_postprocess(config.model) if config.postprocess else None,
        batch_size=config.batch_size,
    )
    data = config.data or model_config.data
    dataset = load_dataset(data)
    if config.split == "all":
        cases = list(dataset.cases)
    else:
        cases = split_cases(dataset, model_config.split, model_config.seed)[config.split]
    cases = [c for c in cases if c.label is not None]
    if not cases:
        raise InputError(f"{data}: expected labelled cases in the '{config.split}' split, found none")
    phase_sets = config.chosen_phase_sets
    logger.info("evaluating %s on %d %s cases, %d phase sets", config.model, len(cases), config.split,
                len(phase_sets) if phase_sets else 1)
    rows = evaluate_cases(cases, predictor, spec, phase_sets, progress)
    info = {
        "title": f"Segmenter evaluation ({config.split} split, {len(cases)} cases)",
        "model": config.model.name,
        "backbone": model_config.backbone.value,
        "weights": config.weights,
        "split": config.split,
        "postprocess": spec.postprocess.to_dict() if spec.postprocess is not None else None,
        "config": config.to_dict(),
    }
    return write_results(config.out, rows, info)
