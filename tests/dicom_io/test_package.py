"""The lazy public API of d4m.dicom_io."""

from __future__ import annotations

import pytest

import d4m.dicom_io as dicom_io


def test_every_public_name_resolves() -> None:
    for name in dicom_io.__all__:
        assert getattr(dicom_io, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = dicom_io.nope
