"""Atomic outputs: a failing block leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import atomic_dir, read_json, write_json


def test_atomic_dir_commits_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.dcm").write_text("x")
            raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "seg.dcm").write_text("done")
    assert (target / "seg.dcm").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("1")
    with pytest.raises(InputError, match="existing one"):
        with atomic_dir(tmp_path / "out"):
            pass
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]


def test_json_errors_name_the_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"k": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"k": [1, 2]}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="bad.json: expected valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(InputError, match="missing.json: expected a JSON file"):
        read_json(tmp_path / "missing.json")
