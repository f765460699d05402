"""Parity: does an engine compute what the torch network computed? Measured, gated, saved.

Polygraphy's idea (``Comparator.run`` + ``compare_accuracy``), on d4m's terms (STYLE rule 16):

* the inputs are the bundle's real golden inputs (a phantom patch, normalised with the run's
  constants), never random noise alone;
* parity tests randomise **all** weights first (:func:`randomize_weights`): MONAI's diffusion
  U-Net zero-initialises its output layer, so a fresh model compares zeros with zeros;
* each output is compared with a stated statistic and a tolerance per precision
  (:data:`TOLERANCES`): ``statistic(|engine - reference|) <= atol + rtol * max|reference|``,
  and for the segmenter the Dice of the argmax label maps, per label, must reach ``min_dice``;
* the results are saved as ``parity.json`` in the bundle (:func:`parity_document`).

This module imports no torch at import time: ``d4m-export verify`` runs where only the runtime
is installed. :func:`randomize_weights` and :func:`torch_predictor_agreement` import it inside.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from d4m.dicom_io.codes import LABELS
from d4m.dicom_io.errors import BundleError, D4MError, EngineError, InputError
from d4m.runtime.bundle import Bundle, load_bundle
from d4m.runtime.manifest import SEGMENTER, EngineEntry, Precision
from d4m.runtime.runners import Device, EngineKind, OnnxRuntimeRunner, Runner, TensorRTRunner
from d4m.runtime.sliding_window import Predictor, sliding_window_inference

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

PARITY_NAME = "parity.json"
PARITY_SCHEMA_VERSION = 1


class ParityError(D4MError):
    """An engine's outputs are outside the tolerance of its precision (exit code 1)."""

    exit_code = 1


class Statistic(str, Enum):
    """Which statistic of the absolute error is gated."""

    MAX = "max"
    MEAN = "mean"
    MEDIAN = "median"


@dataclass(frozen=True)
class Tolerance:
    """A parity gate.

    Attributes
    ----------
    atol, rtol
        The gated statistic of ``|engine - reference|`` must be ``<= atol + rtol * max|reference|``.
    statistic
        Which statistic is gated.
    min_dice
        Lowest Dice of the argmax label maps, per label (segmenter outputs only).
    """

    atol: float
    rtol: float
    statistic: Statistic = Statistic.MAX
    min_dice: float = 0.999

    def bound(self, reference_max: float) -> float:
        """The error bound for a reference whose largest magnitude is ``reference_max``."""
        return self.atol + self.rtol * reference_max


#: Gates per precision. FP32: the issue's ``max |Δ| <= 1e-4``, plus 1e-4 of the largest reference
#: value for GPUs, whose convolution algorithms round differently from torch's CPU kernels.
#: FP16: ``max |Δ| <= 1e-3 + 1e-2 · max|ref|`` and argmax Dice >= 0.99 per label. Measured on the
#: tiny-preset DynUNet with randomised weights on the golden phantom patch, ONNX Runtime CPU
#: (normalisation in FP32; max|ref| = 9.1): FP32 max |Δ| 1.3e-5, mean 7.8e-7, Dice 1.0 / 1.0;
#: FP16 max |Δ| 1.8e-2 (1.9e-3 of max|ref|), mean 1.4e-3, Dice 0.9992 (liver) / 0.9983 (tumour).
TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(atol=1e-4, rtol=1e-4, statistic=Statistic.MAX, min_dice=0.999),
    Precision.FP16: Tolerance(atol=1e-3, rtol=1e-2, statistic=Statistic.MAX, min_dice=0.99),
}


@dataclass(frozen=True)
class Comparison:
    """Errors of one output against its reference.

    Attributes
    ----------
    output
        Output name.
    max_abs, mean_abs, median_abs
        Statistics of ``|engine - reference|``.
    reference_max
        ``max|reference|`` (scale of the relative tolerance).
    dice
        Argmax Dice per label value (segmenter only; empty otherwise).
    """

    output: str
    max_abs: float
    mean_abs: float
    median_abs: float
    reference_max: float
    dice: dict[int, float] = field(default_factory=dict)

    def statistic(self, which: Statistic) -> float:
        """The value of one error statistic."""
        return {Statistic.MAX: self.max_abs, Statistic.MEAN: self.mean_abs, Statistic.MEDIAN: self.median_abs}[which]

    def passes(self, tolerance: Tolerance) -> bool:
        """Whether this output is within ``tolerance``."""
        within = self.statistic(tolerance.statistic) <= tolerance.bound(self.reference_max)
        return within and all(d >= tolerance.min_dice for d in self.dice.values())


def label_dice(reference: np.ndarray, actual: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of two label maps for each label value (1.0 when the label is absent from both)."""
    scores = {}
    for label in labels:
        a, b = reference == label, actual == label
        total = int(a.sum()) + int(b.sum())
        scores[int(label)] = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
    return scores


def compare(name: str, reference: np.ndarray, actual: np.ndarray, class_axis: int | None = None,
            labels: Sequence[int] = tuple(LABELS)) -> Comparison:
    """Compare one output with its reference.

    Parameters
    ----------
    name
        Output name (for messages).
    reference, actual
        Arrays of one shape.
    class_axis
        The class axis of segmentation scores: argmax Dice per label is measured along it.
    labels
        Label values whose Dice is reported.

    Raises
    ------
    EngineError
        The shapes differ, or the engine produced NaN or infinity.
    """
    reference = np.asarray(reference, np.float64)
    actual = np.asarray(actual, np.float64)
    if reference.shape != actual.shape:
        raise EngineError(f"output '{name}': expected shape {reference.shape} as in the reference, "
                          f"found {actual.shape}")
    if not np.isfinite(actual).all():
        raise EngineError(f"output '{name}': expected finite values, found {int((~np.isfinite(actual)).sum())} "
                          f"NaN or infinite")
    error = np.abs(actual - reference)
    dice = {}
    if class_axis is not None:
        dice = label_dice(reference.argmax(class_axis), actual.argmax(class_axis), labels)
    return Comparison(name, float(error.max()), float(error.mean()), float(np.median(error)),
                      float(np.abs(reference).max()), dice)


@dataclass(frozen=True)
class ParityRow:
    """One engine checked against its golden reference.

    Attributes
    ----------
    name, file, format, precision
        The engine.
    provider
        What actually ran (``CPUExecutionProvider``, ``CUDAExecutionProvider``, ``TensorRT``, ``torch``).
    comparisons
        One per output.
    latency_ms
        Median wall time of one call on the golden input (after a warm-up call).
    tolerance
        The gate applied.
    """

    name: str
    file: str
    format: str
    precision: Precision
    provider: str
    comparisons: tuple[Comparison, ...]
    latency_ms: float
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        """Whether every output is within the tolerance."""
        return all(c.passes(self.tolerance) for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``parity.json`` row)."""
        return {
            "name": self.name, "file": self.file, "format": self.format, "precision": self.precision.value,
            "provider": self.provider, "latency_ms": round(self.latency_ms, 3), "passed": self.passed,
            "tolerance": {**asdict(self.tolerance), "statistic": self.tolerance.statistic.value},
            "outputs": [{**asdict(c), "dice": {str(k): v for k, v in c.dice.items()}} for c in self.comparisons],
        }


def golden_arrays(bundle: Bundle, entry: EngineEntry) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The golden inputs and reference outputs of an engine, by tensor name.

    The segmenter's come from ``manifest.golden`` (``.npy``); another network's from the listed
    file ``golden/<name>.npz`` holding ``input.<tensor>`` and ``output.<tensor>`` arrays.

    Raises
    ------
    BundleError
        No golden data for this engine, or arrays that do not match its tensors.
    """
    names_in = [t.name for t in entry.inputs]
    names_out = [t.name for t in entry.outputs]
    if entry.name == SEGMENTER:
        golden = bundle.manifest.golden
        if golden is None:
            raise BundleError(f"{bundle.source}: expected golden input/output in the manifest, found none")
        inputs = {names_in[0]: _load_npy(bundle.path(golden.input))}
        outputs = {names_out[0]: _load_npy(bundle.path(golden.output))}
    else:
        file = golden_file(entry.name)
        if file not in {ref.file for ref in bundle.manifest.files}:
            raise BundleError(f"{bundle.source}: expected {file} listed for engine '{entry.name}', found none")
        try:
            with np.load(bundle.path(file), allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"{bundle.source}/{file}: expected an .npz of arrays, found "
                              f"{type(exc).__name__}") from exc
        inputs = {k.removeprefix("input."): v for k, v in arrays.items() if k.startswith("input.")}
        outputs = {k.removeprefix("output."): v for k, v in arrays.items() if k.startswith("output.")}
    if sorted(inputs) != sorted(names_in) or not set(outputs) <= set(names_out) or not outputs:
        raise BundleError(f"{bundle.source}: expected golden arrays for {names_in} → {names_out} of "
                          f"{entry.file}, found {sorted(inputs)} → {sorted(outputs)}")
    return inputs, outputs


def golden_file(name: str) -> str:
    """Bundle path of the golden ``.npz`` of a non-segmenter network."""
    return f"golden/{name}.npz"


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: expected a .npy array, found {type(exc).__name__}") from exc


def time_runner(runner: Runner, inputs: Mapping[str, np.ndarray], repeat: int = 3) -> tuple[dict[str, np.ndarray],
                                                                                           float]:
    """Run once to warm up, then ``repeat`` times; return the outputs and the median time in ms."""
    outputs = runner(inputs)
    times = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        outputs = runner(inputs)
        times.append(time.perf_counter() - start)
    return outputs, 1000.0 * float(np.median(times))


def check_outputs(entry: EngineEntry, reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
                  provider: str, latency_ms: float) -> ParityRow:
    """Compare an engine's outputs with the reference ones under its precision's tolerance."""
    comparisons = tuple(
        compare(name, reference[name], actual[name], class_axis=1 if entry.name == SEGMENTER else None)
        for name in reference
    )
    return ParityRow(entry.name, entry.file, entry.format.value, entry.precision, provider, comparisons,
                     latency_ms, TOLERANCES[entry.precision])


def open_engine(bundle: Bundle, entry: EngineEntry, device: Device | str, threads: int | None = None) -> Runner:
    """Open the runner for one listed engine (ONNX on ``cpu``/``cuda``, TensorRT on its GPU).

    Raises
    ------
    EngineError
        The engine cannot run here (no CUDA provider, no TensorRT, another GPU, ...).
    """
    path = bundle.path(entry)
    if entry.format == EngineKind.TENSORRT:
        status = next(s for s in bundle.status if s.entry == entry)
        if not status.usable:
            raise EngineError(status.reason)
        return TensorRTRunner(path)
    return OnnxRuntimeRunner(path, device=Device(device) if Device(device) != Device.TENSORRT else Device.CUDA,
                             threads=threads)


def engines_for(bundle: Bundle, device: Device | str) -> list[EngineEntry]:
    """The engines ``verify`` runs for a device: ONNX files on ``cpu``/``cuda``, plans on ``tensorrt``.

    Raises
    ------
    EngineError
        The bundle lists none of that kind: the engine cannot run (exit code 4; build it with
        ``d4m-export tensorrt``).
    """
    device = Device(device)
    if device == Device.AUTO:
        raise InputError("verify: expected --device cpu, cuda or tensorrt, found auto")
    kind = EngineKind.TENSORRT if device == Device.TENSORRT else EngineKind.ONNX
    chosen = [e for e in bundle.manifest.engines if e.format == kind]
    if not chosen:
        raise EngineError(f"{bundle.source}: expected a {kind.value} engine to verify on {device.value}, "
                          f"found {[e.file for e in bundle.manifest.engines]}")
    return chosen


@dataclass(frozen=True)
class VerifyReport:
    """What ``d4m-export verify`` found.

    Attributes
    ----------
    bundle
        The bundle path as given.
    sha256
        The bundle's identity.
    device
        The device asked for.
    rows
        One per engine run.
    """

    bundle: str
    sha256: str
    device: str
    rows: tuple[ParityRow, ...]

    @property
    def passed(self) -> bool:
        """Whether every engine passed its gate."""
        return all(r.passed for r in self.rows)

    def failures(self) -> list[str]:
        """One line per engine outside its tolerance."""
        lines = []
        for row in self.rows:
            for c in row.comparisons:
                if not c.passes(row.tolerance):
                    stat = c.statistic(row.tolerance.statistic)
                    bound = row.tolerance.bound(c.reference_max)
                    lines.append(f"{row.file} ({row.provider}) output '{c.output}': expected "
                                 f"{row.tolerance.statistic.value} |error| <= {bound:.3g} and Dice >= "
                                 f"{row.tolerance.min_dice}, found {stat:.3g} and {_dice_text(c.dice)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"schema_version": PARITY_SCHEMA_VERSION, "bundle": self.bundle, "sha256": self.sha256,
                "device": self.device, "passed": self.passed, "engines": [r.to_dict() for r in self.rows]}


def _dice_text(dice: Mapping[int, float]) -> str:
    return ", ".join(f"label {k}: {v:.4f}" for k, v in dice.items()) or "no labels"


def verify_bundle(path: Path, device: Device | str = Device.CPU, threads: int | None = None,
                  progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Run every engine of a bundle for ``device`` on its golden inputs and compare with the references.

    Parameters
    ----------
    path
        Bundle folder or zip.
    device
        ``cpu`` or ``cuda`` (ONNX engines through ONNX Runtime) or ``tensorrt`` (the plans).
    threads
        ONNX Runtime intra-op threads.
    progress
        Called with 1 after each engine.

    Returns
    -------
    VerifyReport
        Check ``passed``; nothing is written into the bundle (its files are hashed).

    Raises
    ------
    BundleError
        Tampered or inconsistent bundle (hash, schema, missing file or golden data).
    EngineError
        An engine cannot run here.
    """
    with load_bundle(path, probe_gpu=Device(device) == Device.TENSORRT) as bundle:
        rows = []
        for entry in engines_for(bundle, device):
            inputs, reference = golden_arrays(bundle, entry)
            with open_engine(bundle, entry, device, threads) as runner:
                outputs, latency = time_runner(runner, inputs)
                provider = runner.providers[0]
            row = check_outputs(entry, reference, outputs, provider, latency)
            logger.info("%s on %s: max |error| %.3g, %s", entry.file, provider,
                        max(c.max_abs for c in row.comparisons), "pass" if row.passed else "FAIL")
            rows.append(row)
            if progress is not None:
                progress(1)
        return VerifyReport(str(path), bundle.sha256, Device(device).value, tuple(rows))


def parity_document(rows: Sequence[ParityRow], study: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``parity.json`` content: one row per engine, the study-level agreement when measured."""
    document: dict[str, Any] = {"schema_version": PARITY_SCHEMA_VERSION, "passed": all(r.passed for r in rows),
                                "engines": [r.to_dict() for r in rows]}
    if study is not None:
        document["study"] = dict(study)
    if extra:
        document.update(extra)
    return document


# --------------------------------------------------------------------------- torch side


def randomize_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and float buffer random values (in place), so parity cannot pass on zeros.

    Weight tensors (2 or more dims) are drawn from N(0, 1/fan_in) so activations keep their scale
    through deep networks; 1-D parameters from N(1, 0.2²) when named ``weight`` (norm scales) and
    N(0, 0.2²) otherwise (biases); running variances from U(0.5, 1.5), running means from
    N(0, 0.1²). Integer buffers, scalars and fixed tables (DFT matrices) are left alone.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = max(param[0].numel(), 1)
                values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
            else:
                centre = 1.0 if name.endswith("weight") else 0.0
                values = centre + 0.2 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))
        for name, buffer in module.named_buffers():
            if not buffer.is_floating_point() or buffer.ndim == 0:
                continue
            if name.endswith("running_var"):
                values = 0.5 + torch.rand(buffer.shape, generator=generator)
            elif name.endswith("running_mean"):
                values = 0.1 * torch.randn(buffer.shape, generator=generator)
            else:
                continue  # fixed tables (DFT matrices, embeddings' sinusoids) keep their values
            buffer.copy_(values.to(buffer.dtype))
    return module


def predictor_agreement(
    image: np.ndarray,
    reference: Predictor,
    candidate: Predictor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    pad_value: float = 0.0,
) -> dict[str, Any]:
    """Segment one prepared study with two predictors through the runtime's sliding window.

    Parameters
    ----------
    image
        ``(C, z, y, x)`` normalised study.
    reference, candidate
        E.g. the torch network and the ONNX Runtime runner.
    patch_size, overlap, pad_value
        Sliding-window settings (the bundle's).

    Returns
    -------
    dict
        ``dice`` per label of the argmax maps, ``max_abs``/``mean_abs`` of the blended scores,
        the study shape and the seconds each predictor took.
    """
    clock = time.perf_counter()
    ref = sliding_window_inference(image, patch_size, overlap, reference, batch_size=2, pad_value=pad_value)
    middle = time.perf_counter()
    got = sliding_window_inference(image, patch_size, overlap, candidate, batch_size=2, pad_value=pad_value)
    end = time.perf_counter()
    error = np.abs(ref.astype(np.float64) - got)
    labels = tuple(LABELS)
    ref_labels, got_labels = ref.argmax(0), got.argmax(0)
    return {
        "shape": list(image.shape),
        "dice": {str(k): v for k, v in label_dice(ref_labels, got_labels, labels).items()},
        "voxels": {str(k): [int((ref_labels == k).sum()), int((got_labels == k).sum())] for k in labels},
        "max_abs": float(error.max()),
        "mean_abs": float(error.mean()),
        "seconds": {"reference": round(middle - clock, 3), "candidate": round(end - middle, 3)},
    }
