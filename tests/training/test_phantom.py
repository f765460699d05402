"""The synthetic multiphase liver-CT phantom: determinism, physiology, geometry, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image
from d4m.training.datasets import load_dataset
from d4m.training.phantom import (
    PhantomCase,
    PhantomConfig,
    PhantomSize,
    generate_case,
    render_preview,
    tumor_free_cases,
    write_cohort,
)
from d4m.training.phantom_tissues import LIVER_TISSUES, Tissue

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _config(**changes: object) -> PhantomConfig:
    return PhantomConfig(cases=4, seed=3, size=PhantomSize.SMALL, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return generate_case(0, _config(tumor_free_fraction=0.0), with_tissues=True)


@pytest.fixture(scope="module")
def kind_cases() -> dict[str, PhantomCase]:
    """One case per tumour kind, tumours large enough to measure their core."""
    return {
        kind: generate_case(
            1, _config(tumor_free_fraction=0.0, tumor_kinds=(kind,), min_tumor_mm=20.0), with_tissues=True
        )
        for kind in ("hcc", "metastasis", "cyst")
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    calls: list[int] = []
    write_cohort(out, PhantomConfig(cases=2, seed=5, tumor_free_fraction=0.5), progress=calls.append)
    assert calls == [1, 1]
    return out


def _median(volume: Volume, mask: np.ndarray) -> float:
    assert mask.any()
    return float(np.median(volume.array[mask]))


def _parenchyma(case: PhantomCase, phase: Phase) -> np.ndarray:
    return ndimage.binary_erosion(case.tissues[phase].array == Tissue.LIVER)


def _tumor_core(case: PhantomCase, phase: Phase) -> np.ndarray:
    return ndimage.binary_erosion(case.truth[phase].array == 2)


def _on_pvp_grid(volume: Volume, reference: Volume) -> np.ndarray:
    image = sitk.Resample(volume.to_sitk(), reference.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# -- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays(case: PhantomCase) -> None:
    again = generate_case(0, _config(tumor_free_fraction=0.0))
    for phase in PHASE_ORDER:
        for field in ("images", "normal", "truth"):
            a, b = getattr(case, field)[phase], getattr(again, field)[phase]
            assert a.array.dtype == b.array.dtype
            assert a.array.tobytes() == b.array.tobytes()
            assert a.same_grid(b)
    assert case.meta == again.meta
    assert case.identity == again.identity


def test_different_seeds_differ(case: PhantomCase) -> None:
    other = generate_case(0, PhantomConfig(cases=4, seed=4, tumor_free_fraction=0.0))
    assert case.meta["body"] != other.meta["body"]
    assert case.images[Phase.PVP].array.tobytes() != other.images[Phase.PVP].array.tobytes()
    assert case.identity.study_uid != other.identity.study_uid


def test_noise_scale_changes_only_the_noise(case: PhantomCase) -> None:
    noisy = generate_case(0, _config(tumor_free_fraction=0.0, noise_scale=2.0))
    for phase in PHASE_ORDER:
        assert noisy.truth[phase].array.tobytes() == case.truth[phase].array.tobytes()
        sd = case.meta["phases"][phase.value]["noise_sd_hu"]
        assert noisy.meta["phases"][phase.value]["noise_sd_hu"] == pytest.approx(2 * sd, abs=0.011)
        body = case.tissues[phase].array > 0
        extra = noisy.images[phase].array[body].astype(float) - case.images[phase].array[body]
        assert 0.5 * sd < extra.std() < 1.5 * sd  # the added noise is the phase's noise once more
    with pytest.raises(InputError, match="noise_scale"):
        PhantomConfig(noise_scale=0.0)


# -- HU per structure and phase ------------------------------------------------------------------


def test_vessels_and_liver_enhance_physiologically(case: PhantomCase) -> None:
    aorta = {
        p: _median(case.images[p], ndimage.binary_erosion(case.tissues[p].array == Tissue.AORTA)) for p in PHASE_ORDER
    }
    liver = {p: _median(case.images[p], _parenchyma(case, p)) for p in PHASE_ORDER}
    assert aorta[Phase.ART] - aorta[Phase.NC] > 150
    assert 230 <= aorta[Phase.ART] <= 370
    assert max(liver, key=liver.get) == Phase.PVP  # type: ignore[arg-type]
    assert 95 <= liver[Phase.PVP] <= 135
    assert 40 <= liver[Phase.NC] <= 70
    assert liver[Phase.NC] < liver[Phase.ART] < liver[Phase.PVP] and liver[Phase.DEL] < liver[Phase.PVP]
    pvp = case.tissues[Phase.PVP].array
    image = case.images[Phase.PVP]
    assert _median(image, ndimage.binary_erosion(pvp == Tissue.SUBCUT_FAT)) < -60
    assert _median(image, ndimage.binary_erosion(np.isin(pvp, (Tissue.BONE_CORTICAL, Tissue.BONE_CANCELLOUS)))) > 150
    assert _median(image, pvp == Tissue.AIR) < -900


def test_hcc_washes_in_then_out(kind_cases: dict[str, PhantomCase]) -> None:
    hcc = kind_cases["hcc"]
    assert {t["type"] for t in hcc.meta["tumors"]} == {"hcc"}
    for phase, sign in ((Phase.ART, 1), (Phase.PVP, -1), (Phase.DEL, -1)):
        diff = _median(hcc.images[phase], _tumor_core(hcc, phase)) - _median(hcc.images[phase], _parenchyma(hcc, phase))
        assert sign * diff > 8, (phase, diff)


def test_metastasis_is_hypodense_in_pvp(kind_cases: dict[str, PhantomCase]) -> None:
    meta = kind_cases["metastasis"]
    core = _median(meta.images[Phase.PVP], _tumor_core(meta, Phase.PVP))
    assert core < _median(meta.images[Phase.PVP], _parenchyma(meta, Phase.PVP)) - 25


def test_cyst_is_water_and_does_not_enhance(kind_cases: dict[str, PhantomCase]) -> None:
    cyst = kind_cases["cyst"]
    values = [_median(cyst.images[p], _tumor_core(cyst, p)) for p in PHASE_ORDER]
    assert all(-2 <= v <= 22 for v in values), values
    assert max(values) - min(values) < 8


# -- tumours -------------------------------------------------------------------------------------


def test_tumours_lie_inside_the_liver_with_their_sizes(case: PhantomCase, kind_cases: dict[str, PhantomCase]) -> None:
    for c in (case, *kind_cases.values()):
        assert c.meta["tumors"], "expected tumours in these cases"
        for phase in PHASE_ORDER:
            tumour = c.truth[phase].array == 2
            # the tumour-free anatomy under every tumour voxel is liver
            assert np.isin(c.tissues[phase].array[tumour], LIVER_TISSUES).all()
            ring = ndimage.binary_dilation(tumour) & ~tumour
            assert (c.truth[phase].array[ring] > 0).mean() > 0.9
        for t in c.meta["tumors"]:
            assert 5.0 <= t["diameter_mm"] <= 60.0
            assert t["type"] in {"hcc", "metastasis", "cyst"}
            assert set(t["centre_mm_by_phase"]) == {p.value for p in PHASE_ORDER}
            equivalent = (6.0 * t["volume_ml"] * 1000.0 / math.pi) ** (1 / 3)
            assert 0.5 * t["diameter_mm"] < equivalent < 1.3 * t["diameter_mm"]
    assert case.label.array.dtype == np.uint8
    assert set(np.unique(case.label.array)) == {0, 1, 2}


def test_tumour_free_render_differs_only_at_the_tumours(case: PhantomCase) -> None:
    for phase in PHASE_ORDER:
        image, normal = case.images[phase].array, case.normal[phase].array
        tumour = case.truth[phase].array == 2
        reach = ndimage.binary_dilation(tumour, iterations=4)
        assert np.array_equal(image[~reach], normal[~reach])
        core = _tumor_core(case, phase)
        liver = _median(case.normal[phase], _parenchyma(case, phase))
        assert abs(_median(case.normal[phase], core) - liver) < 15  # no tumour contrast left
    assert not np.array_equal(case.images[Phase.PVP].array, case.normal[Phase.PVP].array)


def test_tumour_free_cases_exist_in_a_cohort(cohort: Path) -> None:
    assert len(tumor_free_cases(PhantomConfig(cases=10, tumor_free_fraction=0.15))) == 2
    assert tumor_free_cases(PhantomConfig(cases=2, tumor_free_fraction=0.15)) == frozenset()
    dataset = load_dataset(cohort)
    free = [c for c in dataset.cases if c.meta["tumor_free"]]
    sick = [c for c in dataset.cases if not c.meta["tumor_free"]]
    assert len(free) == 1 and len(sick) == 1 and sick[0].meta["tumors"] and not free[0].meta["tumors"]
    assert (free[0].read_label().array == 2).sum() == 0
    assert (sick[0].read_label().array == 2).sum() > 0
    for phase in PHASE_ORDER:
        image, normal = free[0].image(phase), read_image(free[0].normal[phase])
        assert np.array_equal(image.array, normal.array)


# -- anatomy and misalignment --------------------------------------------------------------------


def test_liver_is_not_an_ellipsoid(case: PhantomCase) -> None:
    liver = case.label.array > 0
    spacing = np.asarray(case.label.spacing[::-1])
    points = np.argwhere(liver) * spacing
    centre = points.mean(0)
    values, vectors = np.linalg.eigh(np.cov((points - centre).T))
    axes = np.sqrt(5.0 * values)  # the solid ellipsoid with the same second moments
    grid = np.argwhere(np.ones_like(liver)) * spacing - centre
    local = grid @ vectors / axes
    ellipsoid = ((local**2).sum(1) <= 1.0).reshape(liver.shape)
    iou = (liver & ellipsoid).sum() / (liver | ellipsoid).sum()
    assert iou < 0.85
    assert 700 < case.meta["liver_ml"] < 2600


def test_phases_are_misaligned_like_real_studies(case: PhantomCase) -> None:
    pvp = case.label
    grids_differ = False
    for phase in (Phase.NC, Phase.ART, Phase.DEL):
        moved = _on_pvp_grid(case.truth[phase], pvp) > 0
        dice = _dice(moved, pvp.array > 0)
        assert 0.6 < dice < 0.99, (phase, dice)
        info = case.meta["phases"][phase.value]
        assert 3.0 <= abs(info["shift_mm"][2]) <= 15.0
        assert 1.0 <= float(np.linalg.norm(info["rotation_deg"])) <= 3.0 + 1e-6
        assert 2.0 <= info["deformation_mm"] <= 5.0
        grids_differ |= not case.truth[phase].same_grid(pvp)
    assert grids_differ
    assert case.meta["phases"]["PVP"]["shift_mm"] == [0.0, 0.0, 0.0]
    assert case.label.same_grid(case.images[Phase.PVP])


def test_phase_transform_matches_simpleitk() -> None:
    from d4m.training.phantom_render import sample_phase_setups
    from d4m.training.phantom_shapes import Grid

    pvp = Grid((20, 32, 32), (5.0, 5.0, 5.0), (-80.0, -80.0, -50.0))
    setup = sample_phase_setups(np.random.default_rng(0), pvp, (-40.0, 0.0, 0.0))[Phase.ART]
    points = np.random.default_rng(1).uniform(-80, 60, size=(50, 3))
    transform = setup.transform()
    assert transform is not None
    expected = np.array([transform.TransformPoint(tuple(p)) for p in points])
    assert np.allclose(setup.map_points(points), expected, atol=1e-6)


def test_acquisition_follows_a_liver_protocol(case: PhantomCase) -> None:
    acq = case.acquisitions
    times = [acq[p].acquisition_time for p in PHASE_ORDER]
    assert times == sorted(times)
    assert acq[Phase.NC].contrast_agent is None
    assert all(acq[p].contrast_agent for p in (Phase.ART, Phase.PVP, Phase.DEL))
    assert 25 <= acq[Phase.ART].seconds_after_injection <= 45  # type: ignore[operator]
    assert 60 <= acq[Phase.PVP].seconds_after_injection <= 85  # type: ignore[operator]
    assert 150 <= acq[Phase.DEL].seconds_after_injection <= 310  # type: ignore[operator]
    assert case.identity.patient_name == "PHANTOM^CASE000" and case.identity.patient_id == "D4M-000"
    numbers = [acq[p].series_number for p in PHASE_ORDER]
    assert len(set(numbers)) == 4


# -- configuration -------------------------------------------------------------------------------


def test_config_validates_and_round_trips() -> None:
    config = PhantomConfig(size="medium", tumor_kinds=("cyst",))  # type: ignore[arg-type]
    assert config.size is PhantomSize.MEDIUM
    assert PhantomConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="expected size in"):
        PhantomConfig(size="huge")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_tumors"):
        PhantomConfig(max_tumors=0)
    with pytest.raises(InputError, match="min_tumor_mm"):
        PhantomConfig(min_tumor_mm=30.0, max_tumor_mm=20.0)


# -- files ---------------------------------------------------------------------------------------


def test_cohort_is_written_and_loads(cohort: Path) -> None:
    dataset = load_dataset(cohort)
    assert [c.id for c in dataset.cases] == ["case_000", "case_001"]
    assert dataset.source["config"]["stage"] == "phantom"
    for c in dataset.cases:
        label = c.read_label()
        assert label.array.dtype == np.uint8
        assert label.same_grid(c.image(Phase.PVP))
        assert set(c.truth) == set(c.normal) == set(PHASE_ORDER)
        assert c.dicom is not None and len([p for p in c.dicom.iterdir() if p.is_dir()]) == 4
        for phase in PHASE_ORDER:
            assert read_image(c.truth[phase]).same_grid(c.image(phase))
    text = json.loads((cohort / "dataset.json").read_text())
    assert text["cases"][0]["images"]["PVP"] == "cases/case_000/images/PVP.nii.gz"
    assert not list(cohort.rglob("*.partial"))


def test_dicom_reads_back_as_the_nifti(cohort: Path) -> None:
    from d4m.dicom_io.reader import read_series
    from d4m.dicom_io.series import scan_folder

    case = load_dataset(cohort).cases[0]
    assert case.dicom is not None
    index = scan_folder(case.dicom)
    study = index.only_study()
    assert len(study.series) == 4
    series = sorted(study.series.values(), key=lambda s: s.acquisition_time or 0.0)
    frames = {s.frame_of_reference_uid for s in series}
    assert len(frames) == 1
    assert series[0].contrast_agent is None and all(s.contrast_agent for s in series[1:])
    acq = case.meta["phases"]
    for phase, info in zip(PHASE_ORDER, series, strict=True):
        assert info.description == acq[phase.value]["description"]
        volume = read_series(info)
        nifti = case.image(phase)
        assert volume.same_grid(nifti, atol=1e-3)
        assert np.array_equal(volume.array.astype(np.int16), nifti.array)
    names = " ".join(p.name for p in case.dicom.rglob("*"))
    assert not any(p.value in names for p in PHASE_ORDER)  # only the headers tell the phase


def test_preview_is_a_png_with_coloured_outlines(case: PhantomCase, tmp_path: Path) -> None:
    from PIL import Image

    path = render_preview(case, tmp_path / "preview.png")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[1] > 4 * case.images[Phase.PVP].shape[2]
    yellow = (image[..., 0] > 200) & (image[..., 1] > 200) & (image[..., 2] < 60)
    assert yellow.sum() > 20  # the tumour outline
    colour = np.abs(image[..., 0] - image[..., 2]) > 60
    assert colour.sum() > yellow.sum()  # the liver outline too
