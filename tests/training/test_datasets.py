"""The dataset format: save, load, refuse what is broken."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.training.datasets import Case, Dataset, load_dataset


def _dataset(root: Path) -> Dataset:
    vol = Volume(np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    images = {}
    for phase in (Phase.PVP, Phase.ART):
        images[phase] = root / "c0" / f"{phase.value}.nii.gz"
        write_image(vol, images[phase])
    write_image(vol.with_array(np.zeros((4, 5, 6), np.uint8)), root / "c0" / "label.nii.gz")
    return Dataset(root, (Case("c0", images, label=root / "c0" / "label.nii.gz", meta={"n": 1}),))


def test_round_trip_with_relative_paths(tmp_path: Path) -> None:
    path = _dataset(tmp_path).save()
    text = json.loads(path.read_text())
    assert text["cases"][0]["images"]["PVP"] == "c0/PVP.nii.gz"
    loaded = load_dataset(tmp_path)
    case = loaded.case("c0")
    assert set(case.images) == {Phase.PVP, Phase.ART}
    assert case.image("PVP").shape == (4, 5, 6)
    assert case.meta == {"n": 1}
    with pytest.raises(InputError, match="expected a NC image, found only"):
        case.image(Phase.NC)


def test_a_view_beside_its_source_with_relative_paths_loads_from_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `d4m-train all --out run` (a relative path) writes run/train-cases, a view of run/03-normalize
    monkeypatch.chdir(tmp_path)
    source = load_dataset(_dataset(Path("run") / "source").save())
    view = Dataset(Path("run") / "view", source.cases)
    view.save()
    assert json.loads((tmp_path / "run/view/dataset.json").read_text())["cases"][0]["images"]["PVP"] == \
        "../source/c0/PVP.nii.gz"
    monkeypatch.chdir(tmp_path / "run")
    assert load_dataset(Path("view")).case("c0").image(Phase.PVP).shape == (4, 5, 6)
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    assert load_dataset(moved / "view").case("c0").label is not None


def test_missing_file_and_bad_schema_are_named(tmp_path: Path) -> None:
    _dataset(tmp_path).save()
    (tmp_path / "c0" / "ART.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case c0: expected the file c0/ART.nii.gz"):
        load_dataset(tmp_path)
    data = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**data, "schema_version": 9}))
    with pytest.raises(InputError, match="expected schema_version 1, found 9"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({**data, "cases": [{"id": "x", "images": {"XX": "a"}}]}))
    with pytest.raises(InputError, match="expected cases with"):
        load_dataset(tmp_path)
