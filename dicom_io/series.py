"""Find the CT image series in a folder: headers only, every skipped file with its reason.

The scan walks a folder recursively (any file names, nested folders, files with or without the
128-byte preamble), reads DICOM headers without pixel data and groups CT Image Storage instances
by study and series. The dataclasses below hold UIDs, series-level acquisition facts and file
paths; the parsed headers of the indexed instances travel with their series
(:attr:`SeriesInfo.headers`, left out of ``repr``) so that reading a series does not parse them
again, and are never printed or logged.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID, CTImageStorage, DeflatedExplicitVRLittleEndian

from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_MULTIFRAME_CT = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
#: SOP class UID prefixes of objects that hold no image: SR, SEG, presentation states, RT, KOS, ...
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, segmentation
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)
_BACKSLASH = "\\"
#: What pydicom raises on a truncated or corrupt file (it converts elements lazily, so also on access).
PARSE_ERRORS = (
    OSError, ValueError, KeyError, TypeError, EOFError, IndexError, OverflowError, AttributeError,
    NotImplementedError, RuntimeError, BytesLengthException, struct.error,
)  # fmt: skip
_LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW"})
_LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "scanogram")
_PIXEL_TAGS_LE = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
_PIXEL_TAGS_BE = (b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09")
#: First two bytes of a preamble-less dataset: group 0x0002 or 0x0008 (little or big endian).
_BARE_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


@dataclass(frozen=True)
class SkippedFile:
    """A file the scan did not index, with the reason.

    Attributes
    ----------
    path
        Path relative to the scanned folder.
    reason
        Why the file was skipped, in words.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class InstanceHeader:
    """The parsed header of one indexed file, kept so that reading does not parse it again.

    Attributes
    ----------
    path
        The file.
    dataset
        The header, every element converted (read without pixel data).
    pixel_offset
        Byte offset of the pixel data element in the file, where the header-only read stopped;
        ``None`` when unknown (e.g. a deflated file): the reader then parses the whole file.
    """

    path: Path
    dataset: Dataset
    pixel_offset: int | None


@dataclass(frozen=True)
class SeriesInfo:
    """One CT image series as found by :func:`scan_folder` (no patient identifiers).

    Times are seconds since midnight (``None`` when absent); series-level values are taken from
    the first file in path order, except ``acquisition_time`` which is the earliest of the series.

    Attributes
    ----------
    study_uid, series_uid, frame_of_reference_uid
        The DICOM UIDs.
    series_number
        SeriesNumber, or ``None`` when absent.
    description
        SeriesDescription ('' when absent).
    modality, sop_class_uid
        Modality and SOP Class UID (always CT / CT Image Storage for indexed series).
    files
        Absolute paths of the instances, sorted by path (not by position: see ``read_series``).
    root
        The scanned folder; file names in messages are given relative to it.
    rows, cols
        Image matrix of the first instance.
    image_orientation
        ImageOrientationPatient of the first instance.
    contrast_agent, contrast_route
        ContrastBolusAgent and ContrastBolusRoute, ``None`` when absent or empty.
    contrast_start_time
        ContrastBolusStartTime in seconds since midnight.
    acquisition_time, series_time
        Earliest AcquisitionTime of the series and SeriesTime, in seconds since midnight.
    image_type
        ImageType values of the first instance.
    body_part, study_date, manufacturer
        BodyPartExamined, StudyDate (YYYYMMDD) and Manufacturer, ``None`` when absent.
    kvp, slice_thickness
        KVP and SliceThickness of the first instance.
    headers
        The parsed header of each file, in ``files`` order, as the scan read it; empty when the
        series was built otherwise (then :func:`~d4m.dicom_io.reader.read_series` parses the files).
        Not part of ``repr`` or equality.
    """

    study_uid: str
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    sop_class_uid: str
    files: tuple[Path, ...]
    root: Path
    frame_of_reference_uid: str | None = None
    rows: int | None = None
    cols: int | None = None
    image_orientation: tuple[float, ...] | None = None
    contrast_agent: str | None = None
    contrast_route: str | None = None
    contrast_start_time: float | None = None
    acquisition_time: float | None = None
    series_time: float | None = None
    image_type: tuple[str, ...] = ()
    body_part: str | None = None
    study_date: str | None = None
    manufacturer: str | None = None
    kvp: float | None = None
    slice_thickness: float | None = None
    headers: tuple[InstanceHeader, ...] = field(default=(), repr=False, compare=False)

    @property
    def n_instances(self) -> int:
        """Number of files (instances) in the series."""
        return len(self.files)

    @property
    def label(self) -> str:
        """How messages name the series: ``series 3 'PVP 1.5mm'``."""
        return series_label(self.series_number, self.description)

    @property
    def display_names(self) -> tuple[str, ...]:
        """File names relative to the scanned folder, for messages and reports."""
        return tuple(display_name(path, self.root) for path in self.files)


@dataclass(frozen=True)
class StudyInfo:
    """One study of the scanned folder and its CT image series.

    Attributes
    ----------
    study_uid
        StudyInstanceUID.
    study_date, description
        StudyDate (YYYYMMDD) and StudyDescription, when present.
    series
        SeriesInstanceUID -> series, in series-number order.
    """

    study_uid: str
    study_date: str | None
    description: str
    series: dict[str, SeriesInfo] = field(default_factory=dict)


@dataclass(frozen=True)
class FolderIndex:
    """What :func:`scan_folder` found: studies, their CT series, and every skipped file.

    Attributes
    ----------
    root
        The scanned folder.
    studies
        StudyInstanceUID -> study.
    skipped
        Files not indexed, with the reason, in path order.
    """

    root: Path
    studies: dict[str, StudyInfo]
    skipped: tuple[SkippedFile, ...] = ()

    @property
    def series(self) -> list[SeriesInfo]:
        """Every indexed series, study by study, in series-number order."""
        return [s for study in self.studies.values() for s in study.series.values()]

    def get_series(self, series_uid: str) -> SeriesInfo:
        """The series with this SeriesInstanceUID.

        Raises
        ------
        InputError
            No indexed series has this UID.
        """
        for series in self.series:
            if series.series_uid == series_uid:
                return series
        raise InputError(f"{self.root}: expected a CT series with UID {series_uid}, found none")

    def only_study(self) -> StudyInfo:
        """The single study of the folder.

        Raises
        ------
        InputError
            The folder holds no CT study or several.
        """
        if len(self.studies) != 1:
            found = "none" if not self.studies else f"{len(self.studies)} studies ({', '.join(self.studies)})"
            raise InputError(f"{self.root}: expected exactly one CT study, found {found}")
        return next(iter(self.studies.values()))

    def skipped_reasons(self) -> dict[str, int]:
        """Count of skipped files per reason, for summaries."""
        counts: dict[str, int] = {}
        for item in self.skipped:
            counts[item.reason] = counts.get(item.reason, 0) + 1
        return counts


def series_label(number: object, description: object) -> str:
    """Name a series in messages without patient data: ``series 3 'PVP 1.5mm'``."""
    as_int = _int_or_none(number)
    num = "?" if as_int is None else str(as_int)
    description = str(description or "").strip()
    return f"series {num} '{description}'" if description else f"series {num}"


def display_name(path: Path, root: Path | None) -> str:
    """The path relative to ``root`` (POSIX form), or the bare file name when outside it."""
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def parse_time(value: object) -> float | None:
    """DICOM TM (``HHMMSS.ffffff``, ``HHMM``, legacy ``HH:MM:SS``) as seconds since midnight."""
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    main, _, frac = text.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    hours, minutes, seconds = int(main[0:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds + (float(f"0.{frac}") if frac else 0.0)


def read_dicom(path: Path, root: Path | None = None, *, stop_before_pixels: bool = False) -> Dataset:
    """Read one DICOM file, with or without its preamble, or raise :class:`InputError` naming it.

    Parameters
    ----------
    path
        The file.
    root
        Folder that messages name the file relative to.
    stop_before_pixels
        Read the header only.

    Raises
    ------
    InputError
        The file is not DICOM or cannot be parsed.
    """
    name = display_name(path, root)
    try:
        with path.open("rb") as fp:
            return _read_open(fp, stop_before_pixels)
    except InvalidDicomError as exc:
        raise InputError(f"{name}: expected a DICOM file, found no DICOM header") from exc
    except PARSE_ERRORS as exc:
        # the cause's text may quote element values (patient data): name only its type
        found = f"a corrupt dataset ({type(exc).__name__})"
        raise InputError(f"{name}: expected a readable DICOM file, found {found}") from exc


def _read_open(fp, stop_before_pixels: bool) -> Dataset:  # noqa: ANN001 - binary file object
    """Parse a dataset (preamble optional) and convert every element now, so corruption shows here."""
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=False)
    except InvalidDicomError:
        fp.seek(0)
        if fp.read(2) not in _BARE_STARTS:
            raise
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise
    for _ in ds.iterall():  # pydicom converts raw elements lazily, on first access
        pass
    return ds


def _pixel_tag_offset(fp, ds: Dataset) -> tuple[bool, int | None]:  # noqa: ANN001 - binary file object
    """Whether the header-only read stopped at a pixel data element, and that element's byte offset.

    Deflated files are assumed to hold pixels, at an unknown offset (the stream is compressed).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return True, None
    offset = fp.tell()
    tag = fp.read(4)
    found = tag in _PIXEL_TAGS_LE or tag in _PIXEL_TAGS_BE
    return found, offset if found else None


def _header_or_reason(path: Path) -> tuple[InstanceHeader | None, str]:
    """Read a header and decide whether it is a usable CT image; return (header, '') or (None, reason)."""
    if path.name.upper() == "DICOMDIR":
        return None, "DICOMDIR index file"
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with path.open("rb") as fp:
            ds = _read_open(fp, stop_before_pixels=True)
            has_pixels, offset = _pixel_tag_offset(fp, ds)
    except InvalidDicomError:
        return None, "not a DICOM file"
    except PARSE_ERRORS as exc:
        return None, f"unreadable DICOM header ({type(exc).__name__})"
    reason = _skip_reason(ds, has_pixels)
    return (None, reason) if reason else (InstanceHeader(path, ds, offset), "")


def _skip_reason(ds: Dataset, has_pixels: bool) -> str:
    """Why a header is not a usable single-frame CT image, or '' when it is."""
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    if sop == _DICOMDIR_SOP_CLASS:
        return "DICOMDIR index file"
    if not sop:
        return "no SOPClassUID (not a DICOM image)"
    if sop in _MULTIFRAME_CT:
        return f"multiframe {_MULTIFRAME_CT[sop]} is not supported (expected single-frame CT Image Storage)"
    if sop.startswith(_NON_IMAGE_PREFIXES):
        return f"non-image object: {UID(sop).name}"
    if sop != CTImageStorage:
        return f"not a CT image: modality {modality or 'missing'}, SOP class {UID(sop).name}"
    if modality and modality != "CT":
        return f"not a CT image: modality {modality}"
    image_type = tuple(str(v).upper() for v in _multi(ds.get("ImageType")))
    if _LOCALIZER_TYPES.intersection(image_type):
        return f"localizer (ImageType {_BACKSLASH.join(image_type)})"
    description = str(ds.get("SeriesDescription", "") or "").lower()
    if any(word in description for word in _LOCALIZER_WORDS):
        return "localizer (SeriesDescription names a scout)"
    if not has_pixels:
        return "missing pixel data"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            return f"missing {keyword}"
    return ""


def _multi(value: object) -> list[object]:
    """A DICOM value as a list, whether single- or multi-valued."""
    if value is None:
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    return list(value)  # type: ignore[call-overload]


def _float_or_none(value: object) -> float | None:
    try:
        return None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _floats_or_none(value: object) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in _multi(value)) or None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        return None if value in (None, "") else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _text_or_none(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _walk(root: Path) -> Iterator[Path]:
    """Every regular file under ``root``, in sorted order, symlinked folders not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if path.is_file():
                yield path


def _series_info(headers: list[InstanceHeader], root: Path) -> SeriesInfo:
    """Series-level facts from the accepted instances of one series."""
    first = headers[0].dataset
    times = [parse_time(h.dataset.get("AcquisitionTime")) for h in headers]
    known_times = [t for t in times if t is not None]
    orientation = first.get("ImageOrientationPatient")
    return SeriesInfo(
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        series_number=_int_or_none(first.get("SeriesNumber")),
        description=str(first.get("SeriesDescription", "") or "").strip(),
        modality=str(first.get("Modality", "CT") or "CT"),
        sop_class_uid=str(first.SOPClassUID),
        files=tuple(h.path for h in headers),
        root=root,
        frame_of_reference_uid=_text_or_none(first.get("FrameOfReferenceUID")),
        rows=_int_or_none(first.get("Rows")),
        cols=_int_or_none(first.get("Columns")),
        image_orientation=_floats_or_none(orientation),
        contrast_agent=_text_or_none(first.get("ContrastBolusAgent")),
        contrast_route=_text_or_none(first.get("ContrastBolusRoute")),
        contrast_start_time=parse_time(first.get("ContrastBolusStartTime")),
        acquisition_time=min(known_times) if known_times else None,
        series_time=parse_time(first.get("SeriesTime")),
        image_type=tuple(str(v) for v in _multi(first.get("ImageType"))),
        body_part=_text_or_none(first.get("BodyPartExamined")),
        study_date=_text_or_none(first.get("StudyDate")),
        manufacturer=_text_or_none(first.get("Manufacturer")),
        kvp=_float_or_none(first.get("KVP")),
        slice_thickness=_float_or_none(first.get("SliceThickness")),
        headers=tuple(headers),
    )


def _series_sort_key(series: SeriesInfo) -> tuple[int, str]:
    return (series.series_number if series.series_number is not None else 1 << 30, series.series_uid)


def scan_folder(root: Path) -> FolderIndex:
    """Index the CT image series under a folder, reading headers only.

    Parameters
    ----------
    root
        Folder to walk recursively; any file names, nested folders.

    Returns
    -------
    FolderIndex
        Studies -> series, and every skipped file with its reason (relative to ``root``).

    Raises
    ------
    InputError
        ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: expected a folder of DICOM files, found {'a file' if root.exists() else 'nothing'}")
    grouped: dict[str, dict[str, list[InstanceHeader]]] = {}
    seen: dict[str, Path] = {}
    skipped: list[SkippedFile] = []
    for path in _walk(root):
        rel = Path(display_name(path, root))
        header, reason = _header_or_reason(path)
        if header is None:
            skipped.append(SkippedFile(rel, reason))
            continue
        ds = header.dataset
        sop_uid = str(ds.SOPInstanceUID)
        if sop_uid in seen:
            skipped.append(SkippedFile(rel, f"duplicate SOPInstanceUID of {display_name(seen[sop_uid], root)}"))
            continue
        seen[sop_uid] = path
        study = grouped.setdefault(str(ds.StudyInstanceUID), {})
        study.setdefault(str(ds.SeriesInstanceUID), []).append(header)
    studies = {uid: _study_info(uid, series, root) for uid, series in grouped.items()}
    logger.info(
        "scanned %s: %d studies, %d series, %d files skipped",
        root.name,
        len(studies),
        sum(len(s.series) for s in studies.values()),
        len(skipped),
    )
    return FolderIndex(root=root, studies=studies, skipped=tuple(skipped))


def _study_info(study_uid: str, series: dict[str, list[InstanceHeader]], root: Path) -> StudyInfo:
    infos = sorted((_series_info(headers, root) for headers in series.values()), key=_series_sort_key)
    first = next(iter(series.values()))[0].dataset
    return StudyInfo(
        study_uid=study_uid,
        study_date=_text_or_none(first.get("StudyDate")),
        description=str(first.get("StudyDescription", "") or "").strip(),
        series={info.series_uid: info for info in infos},
    )
