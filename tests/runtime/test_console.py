"""The CLI console: errors become their exit code and one unbroken message."""

from __future__ import annotations

import pytest
import typer

from d4m.dicom_io.errors import BundleError, InputError
from d4m.runtime import console


def _fail(exc: Exception) -> None:
    raise exc


def test_an_error_prints_its_long_path_unbroken_and_exits_with_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    path = "/data/" + "/".join(f"folder{i:02d}-with-a-long-name" for i in range(8)) + "/series/IM0001.dcm"
    with pytest.raises(typer.Exit) as info:
        console.run_command(lambda: _fail(InputError(f"{path}: expected a DICOM file, found no DICOM header")))
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert len(path) > 200 and path in err  # rich would otherwise break it at the console width (80 here)
    assert err.count("\n") == 1 and err.startswith("error (InputError): ")


def test_a_bundle_error_exits_3() -> None:
    with pytest.raises(typer.Exit) as info:
        console.run_command(lambda: _fail(BundleError("bundle: expected sha256 a, found b")))
    assert info.value.exit_code == 3


def test_a_successful_action_returns_its_value() -> None:
    assert console.run_command(lambda: 42) == 42
