"""The Normal CT Generator stage: holes, the three fills, resume, refusals, evaluation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image, write_image
from d4m.training.checkpoints import save_weights
from d4m.training.cli import app
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.inpainter import InpainterConfig, build_inpainter
from d4m.training.inpainting_masks import tumor_hole
from d4m.training.normal_ct import (
    InpaintingMethod,
    NormalizeConfig,
    evaluate_inpainting,
    mean_fill,
    normalize_dataset,
)

runner = CliRunner()
LIVER_HU = {Phase.NC: 55, Phase.ART: 70, Phase.PVP: 110, Phase.DEL: 90}
GRID = {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0)}
SHAPE = (5, 32, 32)


def _label() -> np.ndarray:
    """Liver, and on slice 2 two 3×3 tumour squares with a 1-pixel gap (column 15)."""
    z, y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    label = np.zeros(SHAPE, np.uint8)
    label[((y - 16) / 11) ** 2 + ((x - 16) / 12) ** 2 < 1] = 1
    label[2, 14:17, 12:15] = 2
    label[2, 14:17, 16:19] = 2
    return label


def _write_case(root: Path, name: str, rng: np.random.Generator, tumour: bool = True) -> Case:
    label = _label() if tumour else np.where(_label() > 0, 1, 0).astype(np.uint8)
    images, normal = {}, {}
    for phase, hu in LIVER_HU.items():
        array = np.full(SHAPE, -1000, np.int16)
        array[label > 0] = hu
        array += rng.integers(-4, 5, SHAPE).astype(np.int16)
        normal[phase] = root / name / "normal" / f"{phase.value}.nii.gz"
        write_image(Volume(array.copy(), **GRID), normal[phase])
        array[label == 2] = hu - 60
        images[phase] = root / name / "images" / f"{phase.value}.nii.gz"
        write_image(Volume(array, **GRID), images[phase])
    label_path = root / name / "label.nii.gz"
    write_image(Volume(label, **GRID), label_path)
    return Case(name, images, label=label_path, normal=normal, meta={"source": "test"})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registered")
    rng = np.random.default_rng(0)
    Dataset(root, (_write_case(root, "c0", rng), _write_case(root, "c1", rng, tumour=False))).save()
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny inpainter run folder (the stage does not care how good it is)."""
    folder = tmp_path_factory.mktemp("run")
    config = InpainterConfig(preset="custom", channels=8, downsamplings=1, blocks=1, crop=16, batch_size=2,
                             disc_channels=8, disc_layers=2, steps=1)
    config.save(folder / "config.json")
    save_weights(build_inpainter(config), folder / "model.safetensors")
    return folder


def _run(data: Path, out: Path, method: str, model: Path | None = None, **changes: object) -> Dataset:
    return normalize_dataset(NormalizeConfig(data=data, out=out, inpainter=method, model=model, **changes))  # type: ignore[arg-type]


# --- the hole -------------------------------------------------------------------------------------


def test_the_hole_is_the_closed_then_dilated_pvp_tumour_per_slice(data: Path, tmp_path: Path) -> None:
    result = _run(data, tmp_path / "out", "mean")
    case = result.case("c0")
    assert case.meta == {"source": "test", "hole": "cases/c0/hole.nii.gz"}
    hole = read_image(result.root / case.meta["hole"]).array.astype(bool)
    label = _label()
    np.testing.assert_array_equal(hole, tumor_hole(label == 2, 5, 3))
    assert hole[2, 15, 15], "the 1-px gap between the two tumours is closed"
    assert hole[2, 13, 12] and hole[2, 17, 18] and hole[2, 13, 11], "one pixel of growth (8-neighbourhood)"
    assert not hole[2, 12, 12] and not hole[2, 15, 10], "and no more"
    assert hole.sum() == 5 * 9, "the closed 3×7 block dilated to 5×9"
    assert not hole[[0, 1, 3, 4]].any(), "other slices untouched: per slice, not across"
    # kernel sizes reach the morphology: 1×1 closing and dilation leave the tumour itself
    plain = _run(data, tmp_path / "plain", "mean", closing=1, dilation=1)
    np.testing.assert_array_equal(read_image(plain.root / "cases/c0/hole.nii.gz").array.astype(bool), label == 2)
    # a case without tumour: empty hole, normal == image
    free = result.case("c1")
    assert not read_image(result.root / free.meta["hole"]).array.any()
    for phase in PHASE_ORDER:
        np.testing.assert_array_equal(read_image(free.normal[phase]).array, read_image(free.images[phase]).array)


# --- the fills ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ffc", "median", "mean"])
def test_outside_the_hole_every_voxel_is_bit_identical(data: Path, model_dir: Path, tmp_path: Path,
                                                       method: str) -> None:
    result = _run(data, tmp_path / method, method, model_dir if method == "ffc" else None)
    case = result.case("c0")
    hole = read_image(result.root / case.meta["hole"]).array.astype(bool)
    source = load_dataset(data).case("c0")
    for phase in PHASE_ORDER:
        image = read_image(source.images[phase]).array
        normal = read_image(case.normal[phase])
        assert normal.array.dtype == image.dtype
        assert normal.same_grid(read_image(source.images[phase]))
        np.testing.assert_array_equal(normal.array[~hole], image[~hole])
        assert not np.array_equal(normal.array[hole], image[hole]), f"{method} {phase.value}: the hole changed"
        np.testing.assert_array_equal(read_image(case.images[phase]).array, image)  # images: tumours still in
    assert json.loads((result.root / "cases/c0/normal_ct.json").read_text())["hole_voxels"] == hole.sum()


@pytest.mark.parametrize("method", ["median", "mean"])
def test_baseline_fills_restore_the_liver_value(data: Path, tmp_path: Path, method: str) -> None:
    result = _run(data, tmp_path / method, method)
    case = result.case("c0")
    hole = read_image(result.root / case.meta["hole"]).array.astype(bool)
    for phase, hu in LIVER_HU.items():
        filled = read_image(case.normal[phase]).array[hole].astype(float)
        # the ring around the hole is liver (hu ± 4): the tumour (hu - 60) is gone
        assert abs(filled.mean() - hu) <= 4, (method, phase, filled.mean())
    scores = evaluate_inpainting(load_dataset(data), result, ["c0"])
    assert scores["method"] == method and scores["peak_hu"] == 400.0
    for phase in PHASE_ORDER:
        entry = scores["phases"][phase.value]
        assert entry["voxels"] == hole.sum() and entry["mae_hu"] < 5 and entry["psnr_db"] > 35


def test_mean_fill_uses_the_ring_of_each_component() -> None:
    image = np.zeros((12, 12))
    image[:, 6:] = 100.0
    hole = np.zeros((12, 12), bool)
    hole[5:7, 1:3] = True   # left component: ring all 0
    hole[5:7, 9:11] = True  # right component: ring all 100
    image[hole] = -999.0
    out = mean_fill(image, hole)
    assert np.all(out[5:7, 1:3] == 0.0) and np.all(out[5:7, 9:11] == 100.0)
    np.testing.assert_array_equal(out[~hole], image[~hole])
    everything = np.ones((4, 4), bool)
    np.testing.assert_array_equal(mean_fill(np.full((4, 4), 7.0), everything), 7.0)  # no ring: unchanged


def test_evaluation_scores_a_perfect_and_a_wrong_fill(data: Path, tmp_path: Path) -> None:
    result = _run(data, tmp_path / "mean", "mean")
    truth = load_dataset(data)
    # make c0's PVP perfect and NC wrong by 40 HU everywhere in the hole
    case = result.case("c0")
    hole = read_image(result.root / case.meta["hole"]).array.astype(bool)
    pvp, nc = read_image(truth.case("c0").normal[Phase.PVP]), read_image(truth.case("c0").normal[Phase.NC])
    write_image(pvp, case.normal[Phase.PVP])
    wrong = nc.array.copy()
    wrong[hole] += 40
    write_image(nc.with_array(wrong), case.normal[Phase.NC])
    scores = evaluate_inpainting(truth, load_dataset(result.root), ["c0"], peak=400.0)
    assert scores["phases"]["PVP"]["mae_hu"] == 0 and scores["phases"]["PVP"]["psnr_db"] == float("inf")
    assert scores["phases"]["NC"]["mae_hu"] == 40 and scores["phases"]["NC"]["psnr_db"] == pytest.approx(20.0)
    assert scores["phases"]["NC"]["bias_hu"] == 40 and scores["all"]["voxels"] == 4 * hole.sum()
    with pytest.raises(InputError, match="meta 'hole'"):
        evaluate_inpainting(truth, truth, ["c0"])


# --- resume and refusals --------------------------------------------------------------------------


def test_resume_skips_finished_cases_and_refuses_another_config(data: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    _run(data, out, "median")
    stamp = (out / "cases/c0/normal/PVP.nii.gz").stat().st_mtime_ns
    caplog.set_level("INFO", logger="d4m.training.normal_ct")
    again = _run(data, out, "median")
    assert (out / "cases/c0/normal/PVP.nii.gz").stat().st_mtime_ns == stamp
    assert "normalised 0 cases, skipped 2" in caplog.text
    assert [c.id for c in again.cases] == ["c0", "c1"] and again.case("c0").meta["hole"] == "cases/c0/hole.nii.gz"
    # a case report of another configuration (here: a lost file) is redone
    (out / "cases/c1/normal/NC.nii.gz").unlink()
    _run(data, out, "median")
    assert (out / "cases/c1/normal/NC.nii.gz").exists()
    assert (out / "cases/c0/normal/PVP.nii.gz").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match=r"expected the same configuration to resume, found other \['inpainter'"):
        _run(data, out, "mean")
    redone = _run(data, out, "mean", overwrite=True)
    assert json.loads((out / "cases/c0/normal_ct.json").read_text())["config"]["inpainter"] == "mean"
    assert redone.source["stage"] == "normalize"


def _variant(root: Path, name: str, change: str) -> Path:
    """A one-case dataset with one defect."""
    rng = np.random.default_rng(1)
    case = _write_case(root, name, rng)
    if change == "label_grid":
        write_image(Volume(np.zeros((5, 30, 32), np.uint8), **GRID), case.label)  # type: ignore[arg-type]
    elif change == "phase_grid":
        write_image(Volume(np.zeros(SHAPE, np.int16), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0)), case.images[Phase.ART])
    elif change == "missing_phase":
        case = Case(case.id, {p: f for p, f in case.images.items() if p is not Phase.DEL}, label=case.label)
    Dataset(root, (case,)).save()
    return root


@pytest.mark.parametrize(("change", "message"), [
    ("label_grid", r"case bad: expected the label on the PVP grid \(shape \(5, 32, 32\), spacing \[1.0, 1.0, 2.0\]\), "
                   r"found shape \(5, 30, 32\)"),
    ("phase_grid", r"case bad ART image: expected the PVP grid .* "
                   r"found shape \(5, 32, 32\), spacing \[1.0, 1.0, 3.0\]"),
    ("missing_phase", r"case bad: expected images of \['NC', 'ART', 'PVP', 'DEL'\].*missing \['DEL'\]"),
])
def test_bad_datasets_are_refused_before_any_work(tmp_path: Path, change: str, message: str) -> None:
    data = _variant(tmp_path / "data", "bad", change)
    with pytest.raises(InputError, match=message):
        _run(data, tmp_path / "out", "mean")
    assert not (tmp_path / "out").exists()


def test_bad_model_folders_and_configs_are_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a model folder .* for inpainter ffc, found none"):
        NormalizeConfig(data=data, out=tmp_path / "o", inpainter=InpaintingMethod.FFC)
    with pytest.raises(InputError, match=r"expected inpainter one of \['ffc', 'median', 'mean'\], found 'blur'"):
        NormalizeConfig(data=data, out=tmp_path / "o", inpainter="blur")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="expected closing as a positive odd kernel size, found 4"):
        NormalizeConfig(data=data, out=tmp_path / "o", inpainter="mean", closing=4)  # type: ignore[arg-type]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"expected an inpainter run folder with config.json and model.safetensors"):
        _run(data, tmp_path / "o", "ffc", empty)
    other = tmp_path / "other"
    other.mkdir()
    NormalizeConfig(data=data, out=tmp_path / "x", inpainter="mean").save(other / "config.json")  # type: ignore[arg-type]
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"other: expected an inpainter run folder, found: .*a 'inpainter' config"):
        _run(data, tmp_path / "o", "ffc", other)
    assert not (tmp_path / "o").exists(), "refused before anything is written"
    config = NormalizeConfig(data=data, out=tmp_path / "o", inpainter="median", closing=3)  # type: ignore[arg-type]
    config.save(tmp_path / "config.json")
    assert NormalizeConfig.load(tmp_path / "config.json") == config


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_trains_an_inpainter_and_normalises_with_it(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = runner.invoke(app, ["-q", "inpainter", "--data", str(data), "--out", str(run), "--steps", "1",
                                  "--holdout", "c1", "--seed", "5"])
    assert trained.exit_code == 0, trained.output
    config = InpainterConfig.load(run / "config.json")
    assert (config.preset, config.steps, config.holdout, config.seed) == ("cpu", 1, ("c1",), 5)
    assert (run / "model.safetensors").is_file()
    out = tmp_path / "normal"
    made = runner.invoke(app, ["-q", "normalize", "--data", str(data), "--out", str(out), "--inpainter", "ffc",
                               "--model", str(run)])
    assert made.exit_code == 0, made.output
    assert "normalised 2 cases (ffc)" in made.output
    result = load_dataset(out)
    assert set(result.case("c0").normal) == set(PHASE_ORDER)
    assert json.loads((out / "cases/c0/normal_ct.json").read_text())["config"]["model_sha256"]


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long messages


def test_cli_refusals_exit_with_code_2(data: Path, tmp_path: Path) -> None:
    out, run = str(tmp_path / "o"), str(tmp_path / "r")
    code, output = _invoke("normalize", "--data", str(data), "--out", out, "--inpainter", "ffc")
    assert code == 2 and "expected a model folder" in output
    code, output = _invoke("normalize", "--data", str(data), "--out", out, "--inpainter", "blur")
    assert code == 2 and "expected inpainter one of ['ffc', 'median', 'mean'], found 'blur'" in output
    code, output = _invoke("inpainter", "--data", str(data), "--out", run, "--preset", "huge")
    assert code == 2 and "expected one of ['cpu', 'paper', 'tiny'], found 'huge'" in output
    code, output = _invoke("inpainter", "--data", str(data), "--out", run, "--holdout", "zz")
    assert code == 2 and "unknown ['zz']" in output
    assert not (tmp_path / "o").exists()
