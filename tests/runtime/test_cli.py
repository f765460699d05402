"""d4m-infer's commands through Typer's runner, on a phantom study written as DICOM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from d4m.runtime.cli import app
from d4m.training.phantom import PhantomConfig, generate_case, write_case

runner = CliRunner()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("study") / "case"
    write_case(generate_case(0, PhantomConfig(cases=1, seed=5)), folder, write_dicom=True)
    (folder / "dicom" / "notes.txt").write_text("not DICOM")
    return folder / "dicom"


def test_inspect_json_lists_four_phases_and_skipped_files(study: Path) -> None:
    result = runner.invoke(app, ["inspect", str(study), "--json"])
    assert result.exit_code == 0, result.output
    description = json.loads(result.output)
    (only,) = description["studies"]
    assert sorted(s["phase"] for s in only["series"]) == ["ART", "DEL", "NC", "PVP"]
    assert only["phases_missing"] == []
    assert [s["file"] for s in description["skipped"]] == ["notes.txt"]


def test_inspect_never_shows_patient_identity(study: Path) -> None:
    for args in (["inspect", str(study)], ["inspect", str(study), "--json"]):
        output = runner.invoke(app, args).output
        assert "PHANTOM" not in output and "D4M-000" not in output


def test_inspect_of_an_empty_folder_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0
    assert "No CT study found" in result.output
