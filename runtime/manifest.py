"""The bundle manifest: the schema ``d4m-export`` writes and ``d4m-infer`` reads, parsed strictly.

``manifest.json`` holds::

    schema_version                first key; any other version is refused
    phases                        input channels, in order
    preprocessing                 HU window, z-score constants, target spacing (x, y, z) mm
    sliding_window                patch size (z, y, x), overlap, blending
    labels                        output labels with their SNOMED CT codes and colours
    postprocessing                clean-up after the argmax
    engines                       one entry per engine file: name, format, precision, tensors,
                                  sha256, opset (ONNX) or GPU / TensorRT version (TensorRT)
    golden                        reference input and output of the segmenter
    files                         other hashed files (parity report, synthesizer settings, ...)
    provenance                    free JSON: training config, data summary, metrics, versions

The dataclasses validate on construction; :meth:`Manifest.from_dict` refuses another schema
version, unknown or missing keys and wrong types, naming the file and the place in it. Loading a
bundle from disk (hashes, zips, engine selection) lives in :mod:`d4m.runtime.bundle`.

Spacing is in (x, y, z) order (SimpleITK, like :class:`~d4m.dicom_io.volume.Volume`); the patch
size is in array order (z, y, x), like the sliding window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePosixPath
from typing import Any

from d4m.dicom_io.codes import LABELS, CodedConcept, Label, Phase
from d4m.dicom_io.errors import BundleError, InputError
from d4m.runtime.postprocess import PostprocessSettings
from d4m.runtime.preprocess import Normalization
from d4m.runtime.runners import EngineKind
from d4m.runtime.sliding_window import BlendMode

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: The engine the inference runs; other names (inpainter, encoder, ...) belong to synthesis.
SEGMENTER = "segmenter"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"})


class Precision(str, Enum):
    """Numeric precision an engine was built for."""

    FP32 = "fp32"
    FP16 = "fp16"


# --------------------------------------------------------------------------- manifest dataclasses


@dataclass(frozen=True)
class TensorEntry:
    """A named engine input or output: dims are ints when fixed, names (``"N"``) when dynamic."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if not self.name or not isinstance(self.name, str):
            raise BundleError(f"tensor: expected a non-empty name, found {self.name!r}")
        for dim in self.shape:
            if isinstance(dim, bool) or not ((isinstance(dim, int) and dim >= 1) or (isinstance(dim, str) and dim)):
                raise BundleError(f"tensor '{self.name}': expected dims that are ints >= 1 or names, "
                                  f"found {list(self.shape)}")
        if self.dtype not in _DTYPES:
            raise BundleError(f"tensor '{self.name}': expected a dtype in {sorted(_DTYPES)}, found {self.dtype!r}")


@dataclass(frozen=True)
class FileRef:
    """A bundle file (path relative to the bundle, POSIX) and its sha256."""

    file: str
    sha256: str

    def __post_init__(self) -> None:
        check_relative(self.file)
        _check_sha256(self.file, self.sha256)


@dataclass(frozen=True)
class EngineEntry:
    """One engine file of the bundle.

    Attributes
    ----------
    name
        Which network: ``segmenter`` (inference) or a synthesis part.
    file
        Path relative to the bundle.
    format
        ``onnx`` or ``tensorrt``.
    precision
        ``fp32`` or ``fp16``.
    inputs, outputs
        Names, shapes and dtypes, in engine order.
    sha256
        Hash of the file.
    opset
        ONNX opset (ONNX files).
    gpu_name, compute_capability, tensorrt_version
        What a TensorRT engine was built on and for (required for TensorRT, absent for ONNX).
    """

    name: str
    file: str
    format: EngineKind
    precision: Precision
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    sha256: str
    opset: int | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    tensorrt_version: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise BundleError(f"engine {self.file!r}: expected a name, found {self.name!r}")
        check_relative(self.file)
        _check_sha256(self.file, self.sha256)
        object.__setattr__(self, "format", as_enum(EngineKind, self.format, f"{self.file}: format"))
        object.__setattr__(self, "precision", as_enum(Precision, self.precision, f"{self.file}: precision"))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not self.inputs or not self.outputs:
            raise BundleError(f"{self.file}: expected at least one input and one output, "
                              f"found {len(self.inputs)} and {len(self.outputs)}")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise BundleError(f"{self.file}: expected unique tensor names, found {names}")
        gpu = {"gpu_name": self.gpu_name, "compute_capability": self.compute_capability,
               "tensorrt_version": self.tensorrt_version}
        if self.format == EngineKind.TENSORRT:
            missing = [k for k, v in gpu.items() if not v]
            if missing:
                raise BundleError(f"{self.file}: expected {missing} for a TensorRT engine, found none")
            if not re.fullmatch(r"\d+\.\d+", str(self.compute_capability)):
                raise BundleError(f"{self.file}: expected compute_capability 'major.minor', "
                                  f"found {self.compute_capability!r}")
        else:
            present = [k for k, v in gpu.items() if v is not None]
            if present:
                raise BundleError(f"{self.file}: expected no {present} for an ONNX model, found them set")
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)
                                       or self.opset < 1):
            raise BundleError(f"{self.file}: expected opset >= 1, found {self.opset!r}")


@dataclass(frozen=True)
class Preprocessing:
    """How the runtime prepares the input, exactly as in training.

    Attributes
    ----------
    hu_window
        ``(low, high)`` HU clip.
    mean, std
        z-score constants after clipping.
    target_spacing
        Resampling spacing in mm, (x, y, z) order.
    """

    hu_window: tuple[float, float]
    mean: float
    std: float
    target_spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        try:
            norm = Normalization(tuple(self.hu_window), self.mean, self.std)  # type: ignore[arg-type]
        except (InputError, TypeError, ValueError) as exc:
            raise BundleError(f"preprocessing: {exc}") from exc
        object.__setattr__(self, "hu_window", norm.hu_window)
        object.__setattr__(self, "mean", norm.mean)
        object.__setattr__(self, "std", norm.std)
        spacing = tuple(self.target_spacing)
        if len(spacing) != 3 or not all(_number(v) and v > 0 for v in spacing):
            raise BundleError(f"preprocessing: expected 3 positive target spacings (x, y, z) in mm, "
                              f"found {list(spacing)}")
        object.__setattr__(self, "target_spacing", tuple(float(v) for v in spacing))

    @property
    def normalization(self) -> Normalization:
        """The window and z-score as :func:`~d4m.runtime.preprocess.normalize` takes them."""
        return Normalization(self.hu_window, self.mean, self.std)


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window settings of the segmenter.

    Attributes
    ----------
    patch_size
        Network input size ``(pz, py, px)``.
    overlap
        Fraction shared by neighbouring windows, in ``[0, 1)``.
    mode
        Blending: ``gaussian`` or ``constant``.
    sigma_scale
        Gaussian σ as a fraction of the patch size.
    """

    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    mode: BlendMode = BlendMode.GAUSSIAN
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        patch = tuple(self.patch_size)
        if len(patch) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in patch):
            raise BundleError(f"sliding_window: expected 3 positive integer patch sizes, found {list(patch)}")
        object.__setattr__(self, "patch_size", patch)
        if not (_number(self.overlap) and 0 <= self.overlap < 1):
            raise BundleError(f"sliding_window: expected overlap in [0, 1), found {self.overlap!r}")
        if not (_number(self.sigma_scale) and self.sigma_scale > 0):
            raise BundleError(f"sliding_window: expected sigma_scale > 0, found {self.sigma_scale!r}")
        object.__setattr__(self, "mode", as_enum(BlendMode, self.mode, "sliding_window: mode"))
        object.__setattr__(self, "overlap", float(self.overlap))
        object.__setattr__(self, "sigma_scale", float(self.sigma_scale))


@dataclass(frozen=True)
class Golden:
    """A small input and the reference output of the segmenter, for ``d4m-export verify``."""

    input: FileRef
    output: FileRef


def _default_labels() -> tuple[Label, ...]:
    return tuple(LABELS.values())


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` holds (``schema_version`` is written and checked, not stored).

    Attributes
    ----------
    phases
        Input channels, in order.
    preprocessing
        Window, z-score, target spacing.
    sliding_window
        Patch size, overlap, blending.
    engines
        Engine files (at least one).
    labels
        Output labels with their codes (default: :data:`~d4m.dicom_io.codes.LABELS`).
    postprocessing
        Clean-up after the argmax.
    golden
        Reference input/output, when exported.
    files
        Other hashed files (parity report, synthesizer parts, ...).
    provenance
        Free JSON: training config, data summary, validation metrics, package versions.
    """

    phases: tuple[Phase, ...]
    preprocessing: Preprocessing
    sliding_window: SlidingWindow
    engines: tuple[EngineEntry, ...]
    labels: tuple[Label, ...] = field(default_factory=_default_labels)
    postprocessing: PostprocessSettings = field(default_factory=PostprocessSettings)
    golden: Golden | None = None
    files: tuple[FileRef, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        phases = tuple(as_enum(Phase, p, "phases") for p in self.phases)
        if not phases or len(set(phases)) != len(phases):
            raise BundleError(f"phases: expected distinct phases in channel order, found {[p.value for p in phases]}")
        object.__setattr__(self, "phases", phases)
        for name in ("engines", "labels", "files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.engines:
            raise BundleError("engines: expected at least one engine, found none")
        values = [label.value for label in self.labels]
        if not values or len(set(values)) != len(values) or min(values) < 1:
            raise BundleError(f"labels: expected distinct label values >= 1, found {values}")
        listed = [ref.file for ref in self.all_files()]
        duplicates = sorted({f for f in listed if listed.count(f) > 1})
        if duplicates:
            raise BundleError(f"files: expected each file listed once, found {duplicates} several times")
        try:
            json.dumps(self.provenance, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"provenance: expected plain JSON data, found {exc}") from exc
        for engine in self.engines:
            if engine.name == SEGMENTER:
                self._check_segmenter(engine)

    def _check_segmenter(self, engine: EngineEntry) -> None:
        """The segmenter takes (N, phases, z, y, x) and returns (N, 1 + labels, z, y, x)."""
        for role, tensors, channels in (("input", engine.inputs, len(self.phases)),
                                        ("output", engine.outputs, len(self.labels) + 1)):
            shape = tensors[0].shape
            if len(shape) != 5 or (isinstance(shape[1], int) and shape[1] != channels):
                raise BundleError(f"{engine.file}: expected the segmenter's first {role} as (N, {channels}, z, y, x), "
                                  f"found {list(shape)}")

    def all_files(self) -> list[FileRef]:
        """Every listed file with its hash: engines, golden, other files."""
        refs = [FileRef(e.file, e.sha256) for e in self.engines]
        if self.golden is not None:
            refs += [self.golden.input, self.golden.output]
        return refs + list(self.files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, ``schema_version`` first; TensorRT fields only on TensorRT engines."""
        data = {"schema_version": SCHEMA_VERSION, **_json(self)}
        for engine in data["engines"]:
            if engine["format"] != EngineKind.TENSORRT.value:
                for key in ("gpu_name", "compute_capability", "tensorrt_version"):
                    del engine[key]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> Manifest:
        """Read the form written by :meth:`to_dict`, strictly.

        Raises
        ------
        BundleError
            Another schema version, unknown or missing keys, wrong types or values; the message
            names ``source`` and where in the manifest.
        """
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{source}: expected schema_version {SCHEMA_VERSION}, found {version!r}")
        top = _keys(source, "the manifest", data,
                    required=("schema_version", "phases", "preprocessing", "sliding_window", "engines"),
                    optional=("labels", "postprocessing", "golden", "files", "provenance"))
        try:
            kwargs: dict[str, Any] = {
                "phases": tuple(_list(source, "phases", top["phases"])),
                "preprocessing": Preprocessing(**_keys(source, "preprocessing", top["preprocessing"],
                                                       ("hu_window", "mean", "std", "target_spacing"))),
                "sliding_window": SlidingWindow(**_keys(source, "sliding_window", top["sliding_window"],
                                                        ("patch_size",), ("overlap", "mode", "sigma_scale"))),
                "engines": tuple(_engine(source, f"engines[{i}]", e)
                                 for i, e in enumerate(_list(source, "engines", top["engines"]))),
            }
            if "labels" in top:
                kwargs["labels"] = tuple(_label(source, f"labels[{i}]", item)
                                         for i, item in enumerate(_list(source, "labels", top["labels"])))
            if "postprocessing" in top:
                kwargs["postprocessing"] = _postprocessing(source, top["postprocessing"])
            if top.get("golden") is not None:
                golden = _keys(source, "golden", top["golden"], ("input", "output"))
                kwargs["golden"] = Golden(_file_ref(source, "golden.input", golden["input"]),
                                          _file_ref(source, "golden.output", golden["output"]))
            if "files" in top:
                kwargs["files"] = tuple(_file_ref(source, f"files[{i}]", item)
                                        for i, item in enumerate(_list(source, "files", top["files"])))
            if "provenance" in top:
                if not isinstance(top["provenance"], dict):
                    raise BundleError(f"{source}: expected provenance as an object, "
                                      f"found {type(top['provenance']).__name__}")
                kwargs["provenance"] = top["provenance"]
            return cls(**kwargs)
        except BundleError as exc:
            if str(exc).startswith(source):
                raise
            raise BundleError(f"{source}: {exc}") from exc
        except (InputError, TypeError, ValueError) as exc:
            raise BundleError(f"{source}: expected a valid manifest, found {exc}") from exc


# --------------------------------------------------------------------------- strict JSON reading


def _keys(source: str, where: str, data: Any, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected an object at {where}, found {type(data).__name__}")
    allowed = set(required) | set(optional)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BundleError(f"{source}: expected only the keys {sorted(allowed)} in {where}, found unknown {unknown}")
    missing = [k for k in required if k not in data]
    if missing:
        raise BundleError(f"{source}: expected the keys {missing} in {where}, found them missing")
    return dict(data)


def _list(source: str, where: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise BundleError(f"{source}: expected a list at {where}, found {type(data).__name__}")
    return data


def _file_ref(source: str, where: str, data: Any) -> FileRef:
    return FileRef(**_keys(source, where, data, ("file", "sha256")))


def _tensor(source: str, where: str, data: Any) -> TensorEntry:
    item = _keys(source, where, data, ("name", "shape"), ("dtype",))
    return TensorEntry(item["name"], tuple(_list(source, f"{where}.shape", item["shape"])),
                       item.get("dtype", "float32"))


def _engine(source: str, where: str, data: Any) -> EngineEntry:
    item = _keys(source, where, data, ("name", "file", "format", "precision", "inputs", "outputs", "sha256"),
                 ("opset", "gpu_name", "compute_capability", "tensorrt_version"))
    for role in ("inputs", "outputs"):
        item[role] = tuple(_tensor(source, f"{where}.{role}[{i}]", t)
                           for i, t in enumerate(_list(source, f"{where}.{role}", item[role])))
    return EngineEntry(**item)


def _postprocessing(source: str, data: Any) -> PostprocessSettings:
    kinds = {"largest_liver": (bool, "true/false"), "fill_holes": (bool, "true/false"),
             "min_tumor_voxels": (int, "an integer"), "min_liver_contact": ((int, float), "a number in [0, 1]")}
    item = _keys(source, "postprocessing", data, (), tuple(kinds))
    for key, value in item.items():
        kind, words = kinds[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise BundleError(f"{source}: expected postprocessing.{key} as {words}, found {value!r}")
    item.setdefault("min_liver_contact", 0.0)  # a bundle written before the rule keeps its behaviour
    try:
        return PostprocessSettings(**item)
    except InputError as exc:
        raise BundleError(f"{source}: {exc}") from exc


def _concept(source: str, where: str, data: Any) -> CodedConcept:
    return CodedConcept(**{k: str(v) for k, v in _keys(source, where, data, ("value", "scheme", "meaning")).items()})


def _label(source: str, where: str, data: Any) -> Label:
    item = _keys(source, where, data, ("value", "name", "category", "property_type", "anatomic_region", "rgb"))
    rgb = tuple(_list(source, f"{where}.rgb", item["rgb"]))
    if len(rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb):
        raise BundleError(f"{source}: expected 3 colour values 0-255 at {where}.rgb, found {list(rgb)}")
    if isinstance(item["value"], bool) or not isinstance(item["value"], int):
        raise BundleError(f"{source}: expected an integer at {where}.value, found {item['value']!r}")
    return Label(item["value"], str(item["name"]), _concept(source, f"{where}.category", item["category"]),
                 _concept(source, f"{where}.property_type", item["property_type"]),
                 _concept(source, f"{where}.anatomic_region", item["anatomic_region"]),
                 (int(rgb[0]), int(rgb[1]), int(rgb[2])))


def _json(value: Any) -> Any:
    """Dataclasses, enums and tuples as plain JSON values (field order kept)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    return value


def as_enum(cls: type[Any], value: Any, what: str) -> Any:
    """``value`` as a member of the enum ``cls`` (members pass through).

    Raises
    ------
    BundleError
        Not one of the enum's values; the message names ``what`` and the allowed values.
    """
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError as exc:
        raise BundleError(f"{what}: expected one of {[m.value for m in cls]}, found {value!r}") from exc


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def check_relative(file: Any) -> None:
    """Check a bundle path: relative, POSIX, no ``..``, no drive, no backslash.

    Raises
    ------
    BundleError
        The path could leave the bundle.
    """
    text = str(file) if isinstance(file, str) else ""
    parts = PurePosixPath(text).parts
    if (not text or "\\" in text or text.startswith("/") or ":" in text
            or any(p in ("..", ".") for p in text.split("/")) or not parts):
        raise BundleError(f"file {file!r}: expected a relative path inside the bundle (no '..', no '/' or drive "
                          f"at the start), found one outside it")


def _check_sha256(file: str, value: Any) -> None:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise BundleError(f"{file}: expected a sha256 of 64 lowercase hex digits, found {value!r}")
