"""Write a :class:`Volume` as a CT Image Storage series (one file per slice), atomically.

Used for the phantom studies of the demo and the tests: the files carry what the CT Image IOD
asks for (``dciodvfy`` reports no error) and what a DICOM-SEG built on them needs, with an
anonymous identity chosen by the caller.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.series import parse_time
from d4m.dicom_io.volume import Volume

logger = logging.getLogger(__name__)

_INT16 = np.iinfo(np.int16)


class PixelEncoding(str, Enum):
    """Transfer syntax of a written CT series (all lossless)."""

    EXPLICIT = "explicit"
    RLE = "rle"
    JPEG_LS = "jpeg-ls"
    JPEG2000 = "jpeg2000"

    @property
    def transfer_syntax(self) -> UID:
        """The transfer syntax UID."""
        return _SYNTAXES[self]


_SYNTAXES = {
    PixelEncoding.EXPLICIT: ExplicitVRLittleEndian,
    PixelEncoding.RLE: RLELossless,
    PixelEncoding.JPEG_LS: JPEGLSLossless,
    PixelEncoding.JPEG2000: JPEG2000Lossless,
}


def _time_ok(value: str) -> bool:
    """Whether ``value`` is a full DICOM time ``HHMMSS[.ffffff]``."""
    main, _, frac = value.partition(".")
    return len(main) == 6 and len(frac) <= 6 and ":" not in value and parse_time(value) is not None


@dataclass(frozen=True)
class CTSeriesMeta:
    """What a written CT series says about itself (UIDs, timing, contrast, anonymous identity).

    Attributes
    ----------
    study_uid, series_uid, frame_of_reference_uid
        UIDs; fresh ones by default (give the same study and frame of reference to the series of
        one study).
    series_number, description
        SeriesNumber and SeriesDescription.
    contrast_agent
        ContrastBolusAgent, or ``None`` for a non-contrast series (no Contrast/Bolus module).
    contrast_start_time
        ContrastBolusStartTime ``HHMMSS[.ffffff]``, written with the agent only.
    acquisition_time
        AcquisitionTime ``HHMMSS.ffffff`` (also SeriesTime and ContentTime).
    study_date, study_time
        StudyDate ``YYYYMMDD`` and StudyTime ``HHMMSS``.
    patient_name, patient_id, patient_sex, patient_age
        The (anonymous) patient identity.
    accession_number, study_id
        AccessionNumber and StudyID.
    patient_position
        PatientPosition, e.g. ``"FFS"`` or ``"HFS"``.
    encoding
        Transfer syntax (lossless), :class:`PixelEncoding` or its value.
    rescale_intercept, rescale_slope
        Stored value = round((HU - intercept) / slope) as int16.
    kvp, slice_thickness
        KVP; SliceThickness (default: the slice spacing).
    body_part
        BodyPartExamined.
    file_pattern
        File name from ``series_number`` and ``instance_number``.
    """

    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    description: str = "d4m phantom"
    contrast_agent: str | None = None
    contrast_start_time: str | None = None
    acquisition_time: str = "120000.000000"
    study_date: str = "20240101"
    study_time: str = "115500"
    patient_name: str = "D4M^PHANTOM"
    patient_id: str = "D4M-PHANTOM"
    patient_sex: str = "O"
    patient_age: str = "060Y"
    accession_number: str = "D4M0001"
    study_id: str = "1"
    patient_position: str = "FFS"
    encoding: PixelEncoding | str = PixelEncoding.EXPLICIT
    rescale_intercept: float = -1024.0
    rescale_slope: float = 1.0
    kvp: float = 120.0
    slice_thickness: float | None = None
    body_part: str = "ABDOMEN"
    file_pattern: str = "{series_number:03d}_{instance_number:04d}.dcm"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "encoding", PixelEncoding(self.encoding))
        except ValueError as exc:
            allowed = ", ".join(e.value for e in PixelEncoding)
            raise InputError(f"CT series encoding: expected one of {allowed}, found {self.encoding!r}") from exc
        times = [self.acquisition_time, self.study_time, self.contrast_start_time or "000000"]
        if not all(_time_ok(t) for t in times):
            raise InputError(f"CT series times: expected HHMMSS[.ffffff], found {' / '.join(map(repr, times))}")
        try:
            datetime.datetime.strptime(self.study_date, "%Y%m%d")
        except ValueError as exc:
            raise InputError(f"CT series study date: expected YYYYMMDD, found {self.study_date!r}") from exc
        if self.rescale_slope <= 0:
            raise InputError(f"CT series rescale slope: expected a positive number, found {self.rescale_slope}")
        if not 0 <= self.series_number < 2**31:
            raise InputError(f"CT series number: expected 0..2^31-1, found {self.series_number}")


def _ds(value: float) -> str:
    """A float as a DICOM DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def _stored_values(volume: Volume, meta: CTSeriesMeta) -> np.ndarray:
    """HU -> int16 stored values (rounded; clipped with a warning when out of range)."""
    scaled = np.rint((volume.array.astype(np.float64) - meta.rescale_intercept) / meta.rescale_slope)
    outside = int(np.count_nonzero((scaled < _INT16.min) | (scaled > _INT16.max)))
    if outside:
        logger.warning("%d voxel(s) outside the int16 range after rescale; clipped", outside)
    return np.clip(scaled, _INT16.min, _INT16.max).astype(np.int16)


#: DICOM keyword ← :class:`CTSeriesMeta` field, the same on every slice of the series.
_FROM_META = (
    # patient and study
    ("PatientName", "patient_name"), ("PatientID", "patient_id"), ("PatientSex", "patient_sex"),
    ("PatientAge", "patient_age"), ("StudyInstanceUID", "study_uid"), ("StudyDate", "study_date"),
    ("StudyTime", "study_time"), ("StudyID", "study_id"), ("AccessionNumber", "accession_number"),
    # series, equipment, frame of reference
    ("SeriesInstanceUID", "series_uid"), ("SeriesNumber", "series_number"), ("SeriesDescription", "description"),
    ("SeriesDate", "study_date"), ("SeriesTime", "acquisition_time"), ("BodyPartExamined", "body_part"),
    ("PatientPosition", "patient_position"), ("FrameOfReferenceUID", "frame_of_reference_uid"),
    # acquisition
    ("AcquisitionDate", "study_date"), ("AcquisitionTime", "acquisition_time"), ("ContentDate", "study_date"),
    ("ContentTime", "acquisition_time"),
)
#: DICOM keyword → value, fixed for every series this writer makes.
_FIXED = (
    ("SpecificCharacterSet", "ISO_IR 100"), ("SOPClassUID", CTImageStorage),
    ("PatientBirthDate", ""), ("ReferringPhysicianName", ""), ("StudyDescription", "d4m phantom abdomen"),
    ("Modality", "CT"), ("Manufacturer", "d4m phantom"), ("ManufacturerModelName", "d4m phantom"),
    ("SoftwareVersions", "d4m"), ("PositionReferenceIndicator", ""), ("AcquisitionNumber", 1),
    ("ConvolutionKernel", "STANDARD"), ("RescaleType", "HU"), ("WindowCenter", "40"), ("WindowWidth", "400"),
)


def _base_dataset(volume: Volume, meta: CTSeriesMeta) -> Dataset:
    """The attributes shared by every slice of the series."""
    ds = Dataset()
    for keyword, value in _FIXED:
        setattr(ds, keyword, value)
    for keyword, attribute in _FROM_META:
        setattr(ds, keyword, getattr(meta, attribute))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = datetime.date.today().strftime("%Y%m%d")
    ds.InstanceCreationTime = datetime.datetime.now().strftime("%H%M%S")
    ds.KVP = _ds(meta.kvp)
    ds.RescaleIntercept = _ds(meta.rescale_intercept)
    ds.RescaleSlope = _ds(meta.rescale_slope)
    if meta.contrast_agent:
        ds.ContrastBolusAgent = meta.contrast_agent
        ds.ContrastBolusRoute = "IV"
        if meta.contrast_start_time:
            ds.ContrastBolusStartTime = meta.contrast_start_time
    _add_geometry(ds, volume, meta)
    _add_pixel_module(ds, volume)
    return ds


def _add_geometry(ds: Dataset, volume: Volume, meta: CTSeriesMeta) -> None:
    d = volume.direction
    ds.ImageOrientationPatient = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[0])]
    ds.SliceThickness = _ds(meta.slice_thickness if meta.slice_thickness is not None else volume.spacing[2])
    ds.SpacingBetweenSlices = _ds(volume.spacing[2])


def _add_pixel_module(ds: Dataset, volume: Volume) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1


def _slice_dataset(base: Dataset, volume: Volume, stored: np.ndarray, k: int) -> Dataset:
    """One slice: the shared attributes plus its UID, number, position and pixels."""
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    position = volume.affine @ np.array([0.0, 0.0, float(k), 1.0])
    ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
    normal = np.cross(volume.direction[:, 0], volume.direction[:, 1])
    ds.SliceLocation = _ds(float(position[:3] @ normal))
    pixels = np.ascontiguousarray(stored[k])
    ds.PixelData = pixels.tobytes()
    ds.file_meta = _file_meta(ds.SOPInstanceUID)
    return ds


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _encode(ds: Dataset, pixels: np.ndarray, encoding: PixelEncoding, name: str) -> None:
    if encoding is PixelEncoding.EXPLICIT:
        return
    try:
        ds.compress(encoding.transfer_syntax, pixels, generate_instance_uid=False)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise InputError(
            f"{name}: expected to encode with {encoding.transfer_syntax.name}, found no working encoder ({exc})"
        ) from exc


def write_ct_series(volume: Volume, out_dir: Path, meta: CTSeriesMeta | None = None) -> list[Path]:
    """Write ``volume`` (HU) as a CT Image Storage series, one file per slice, into a new folder.

    The files are written into a temporary sibling folder that is renamed to ``out_dir`` at the
    end, so a crash never leaves half a series.

    Parameters
    ----------
    volume
        The image in Hounsfield units; its geometry gives ImagePositionPatient (per slice),
        ImageOrientationPatient, PixelSpacing and SpacingBetweenSlices.
    out_dir
        The series folder to create; it must not exist or be empty.
    meta
        UIDs, description, timing, contrast, identity and encoding; defaults otherwise.

    Returns
    -------
    list[Path]
        The written files, in slice (``k``) order.

    Raises
    ------
    InputError
        ``out_dir`` holds files already, or the pixels cannot be encoded.
    """
    meta = meta or CTSeriesMeta()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir}: expected a new or empty folder for the CT series, found existing content")
    stored = _stored_values(volume, meta)
    base = _base_dataset(volume, meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()
    names: list[str] = []
    try:
        for k in range(volume.shape[0]):
            ds = _slice_dataset(base, volume, stored, k)
            name = meta.file_pattern.format(series_number=meta.series_number, instance_number=k + 1)
            if name in names or Path(name).name != name:
                raise InputError(
                    f"file pattern {meta.file_pattern!r}: expected one plain file name per slice, "
                    f"found {name!r} twice or with a folder"
                )
            _encode(ds, stored[k], PixelEncoding(meta.encoding), name)
            ds.save_as(tmp / name, enforce_file_format=True)
            names.append(name)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote CT series %d (%d slices) to %s", meta.series_number, len(names), out_dir.name)
    return [out_dir / name for name in names]
