"""Write and read the d4m DICOM-SEG: liver and liver tumor on the grid of a CT series (highdicom).

The label volume ``[k, j, i]`` lies on the grid of the source slices in the order
:func:`~d4m.dicom_io.reader.read_series_datasets` returns them (slice ``k`` is ``source[k]``).
The binary form keeps every frame (``n_slices x n_segments``), which viewers place reliably; the
labelmap form stores one frame per slice. Both are written uncompressed (dcmqi refuses JPEG 2000)
and atomically.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from d4m.dicom_io.codes import LABELS, CodedConcept, Label, SegType
from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)

#: Segmented property types read as a liver tumor besides the d4m code (SNOMED CT Mass, Lesion).
_TUMOR_ALIASES = frozenset({("SCT", "4147007"), ("SCT", "52988006")})
_PACKAGE = "d4m"


def package_version() -> str:
    """The installed d4m version, or ``"0+unknown"`` when it is not installed."""
    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _concept(concept: CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


def _segment_description(label: Label, algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    """The highdicom description of one d4m label, with its recommended display colour."""
    regions = [] if label.anatomic_region == label.property_type else [_concept(label.anatomic_region)]
    return hd.seg.SegmentDescription(
        segment_number=label.value,
        segment_label=label.name,
        segmented_property_category=_concept(label.category),
        segmented_property_type=_concept(label.property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=regions or None,
        display_color=hd.color.CIELabColor.from_rgb(*label.rgb),
    )


def _check_labels(labels: np.ndarray, source: Sequence[Dataset]) -> np.ndarray:
    """Validate the label volume against the source grid; return a uint8 copy."""
    if not source:
        raise InputError("SEG source: expected the datasets of a CT series, found none")
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    expected = (len(source), rows, cols)
    if labels.shape != expected:
        raise InputError(f"SEG labels: expected shape {expected} (slices, rows, columns), found {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise InputError(f"SEG labels: expected an integer label volume, found dtype {labels.dtype}")
    values = set(np.unique(labels).tolist())
    allowed = {0, *LABELS}
    if not values <= allowed:
        raise InputError(f"SEG labels: expected values in {sorted(allowed)}, found {sorted(values - allowed)}")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in source}
    if len(series) != 1:
        raise InputError(f"SEG source: expected the datasets of one series, found {len(series)} series")
    return np.array(labels, dtype=np.uint8, copy=True)


def write_seg(
    labels: np.ndarray,
    source: Sequence[Dataset],
    out_path: Path,
    *,
    seg_type: SegType | str = SegType.BINARY,
    series_number: int = 900,
    description: str = "d4m liver and tumor",
    algorithm_version: str | None = None,
) -> Path:
    """Write a DICOM-SEG of the liver (1) and liver tumor (2) labels on a CT series.

    Parameters
    ----------
    labels
        Label volume ``[k, j, i]`` with values 0, 1, 2 on the grid of ``source``.
    source
        The CT datasets in slice order (e.g. :func:`~d4m.dicom_io.reader.read_series_datasets`);
        headers are enough.
    out_path
        The SEG file to write (replaced atomically when it exists).
    seg_type
        ``binary`` (every frame kept, for viewers) or ``labelmap`` (compact).
    series_number, description
        SeriesNumber and SeriesDescription of the SEG.
    algorithm_version
        Version in the algorithm identification; the installed d4m version by default.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    InputError
        The labels do not fit the source grid, hold unknown values, the segmentation type is
        unknown, or highdicom refuses the source images.
    """
    try:
        kind = SegType(seg_type)
    except ValueError as exc:
        allowed = ", ".join(t.value for t in SegType)
        raise InputError(f"SEG type: expected one of {allowed}, found {seg_type!r}") from exc
    pixels = _check_labels(labels, source)
    version = algorithm_version or package_version()
    seg = _build(pixels, source, kind, series_number, description, version)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s SEG with %d frames to %s", kind.value, int(seg.NumberOfFrames), out_path.name)
    return out_path


def _build(
    pixels: np.ndarray, source: Sequence[Dataset], kind: SegType, series_number: int, description: str, version: str
) -> hd.seg.Segmentation:
    """The highdicom Segmentation object (a copy of ``pixels`` is passed: highdicom may mutate it)."""
    segmentation_type = {
        SegType.BINARY: hd.seg.SegmentationTypeValues.BINARY,
        SegType.LABELMAP: getattr(hd.seg.SegmentationTypeValues, "LABELMAP", None),
    }[kind]
    if segmentation_type is None:
        raise InputError(f"SEG type: expected a highdicom with LABELMAP support, found highdicom {hd.__version__}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_PACKAGE, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    try:
        return hd.seg.Segmentation(
            source_images=list(source),
            pixel_array=pixels.copy(),
            segmentation_type=segmentation_type,
            segment_descriptions=[_segment_description(label, algorithm) for label in LABELS.values()],
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=_PACKAGE,
            manufacturer_model_name=_PACKAGE,
            software_versions=version,
            device_serial_number=_PACKAGE,
            content_description=description[:64],
            content_label="D4M_SEG",
            series_description=description[:64],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"SEG: expected source images highdicom accepts, found {type(exc).__name__}: {exc}") from exc


def _label_value(seg: hd.seg.Segmentation, number: int) -> int:
    """The d4m label value of one SEG segment, from its segmented property type code."""
    code = seg.get_segment_description(number).segmented_property_type
    key = (str(code.scheme_designator), str(code.value))
    for label in LABELS.values():
        if key == (label.property_type.scheme, label.property_type.value):
            return label.value
    if key in _TUMOR_ALIASES:
        return 2
    raise InputError(
        f"SEG segment {number}: expected a liver or liver tumor property type, found {code.meaning} ({key[0]} {key[1]})"
    )


def read_seg(path: Path, source: Sequence[Dataset]) -> np.ndarray:
    """Read a DICOM-SEG as a uint8 label volume ``[k, j, i]`` on the grid of ``source``.

    Frames are matched to ``source`` by their referenced SOP instances (never by frame order);
    source slices without a frame are background. Where segments overlap, the tumor wins.

    Parameters
    ----------
    path
        The SEG file.
    source
        The CT datasets the labels should lie on, in slice order.

    Returns
    -------
    numpy.ndarray
        Labels 0 (background), 1 (liver), 2 (liver tumor).

    Raises
    ------
    InputError
        The file is not a readable SEG, references none of the source instances, or holds a
        segment that is neither liver nor liver tumor.
    """
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except (OSError, InvalidDicomError, ValueError, AttributeError, KeyError) as exc:
        raise InputError(f"{path.name}: expected a DICOM-SEG, found {type(exc).__name__}: {exc}") from exc
    uids = [str(ds.SOPInstanceUID) for ds in source]
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    if not referenced.intersection(uids):
        raise InputError(
            f"{path.name}: expected a SEG referencing the given series, found none of its {len(uids)} instances"
        )
    numbers = list(seg.segment_numbers)
    values = [_label_value(seg, n) for n in numbers]
    try:
        masks = seg.get_pixels_by_source_instance(
            uids, segment_numbers=numbers, combine_segments=False, assert_missing_frames_are_empty=True
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path.name}: expected frames on the source instances, found {exc}") from exc
    out = np.zeros(masks.shape[:3], dtype=np.uint8)
    for index in np.argsort(values, kind="stable"):
        out[masks[..., index] > 0] = values[index]
    return out
