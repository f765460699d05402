"""d4m.dicom_io: find CT series in a folder, read them with their geometry, write CT series and DICOM-SEG.

Nothing here imports torch or monai; messages name files relative to the scanned folder and
never hold patient identifiers. The names below are imported lazily (on first use), so that
``import d4m.dicom_io.codes`` does not pay for highdicom.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "LABELS": "codes",
    "LIVER": "codes",
    "PHASE_ORDER": "codes",
    "TUMOR": "codes",
    "CodedConcept": "codes",
    "Label": "codes",
    "Phase": "codes",
    "SegType": "codes",
    "CTSeriesMeta": "ct_writer",
    "PixelEncoding": "ct_writer",
    "write_ct_series": "ct_writer",
    "BundleError": "errors",
    "D4MError": "errors",
    "EngineError": "errors",
    "InputError": "errors",
    "require": "errors",
    "read_series": "reader",
    "read_series_datasets": "reader",
    "package_version": "seg_writer",
    "read_seg": "seg_writer",
    "write_seg": "seg_writer",
    "FolderIndex": "series",
    "SeriesInfo": "series",
    "SkippedFile": "series",
    "StudyInfo": "series",
    "parse_time": "series",
    "scan_folder": "series",
    "Volume": "volume",
    "read_image": "volume",
    "write_image": "volume",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'd4m.dicom_io' has no attribute {name!r}")
    return getattr(importlib.import_module(f"d4m.dicom_io.{module}"), name)


__all__ = [
    "LABELS",
    "LIVER",
    "PHASE_ORDER",
    "TUMOR",
    "BundleError",
    "CTSeriesMeta",
    "CodedConcept",
    "D4MError",
    "EngineError",
    "FolderIndex",
    "InputError",
    "Label",
    "Phase",
    "PixelEncoding",
    "SegType",
    "SeriesInfo",
    "SkippedFile",
    "StudyInfo",
    "Volume",
    "package_version",
    "parse_time",
    "read_image",
    "read_seg",
    "read_series",
    "read_series_datasets",
    "require",
    "scan_folder",
    "write_ct_series",
    "write_image",
    "write_seg",
]
