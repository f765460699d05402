"""Stage 1 on a dataset: registered phases on the PVP grid, reports, resume, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image, write_image
from d4m.runtime.registration import RegistrationSettings
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.prealignment import RegistrationConfig, dice, register_dataset

SHAPE = (28, 72, 72)
SPACING = (2.6, 2.6, 5.0)
CONTRAST = {Phase.NC: 55, Phase.ART: 75, Phase.PVP: 115, Phase.DEL: 90}
# Per phase: (rotation about z in degrees, shift in mm) of the anatomy relative to PVP.
MOTION = {Phase.NC: (-4.0, (-7.0, 5.0, -6.0)), Phase.ART: (5.0, (6.0, -4.0, 5.0)), Phase.DEL: (2.0, (3.0, 3.0, -9.0))}


def _phase(phase: Phase, seed: int) -> tuple[Volume, Volume]:
    """A synthetic abdomen in one phase (moved unless PVP) and its label (1 liver, 2 tumor)."""
    nk, nj, ni = SHAPE
    origin = tuple(-(n - 1) * s / 2 for n, s in zip((ni, nj, nk), SPACING, strict=True))
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    p = np.stack([i.ravel() * SPACING[0] + origin[0], j.ravel() * SPACING[1] + origin[1],
                  k.ravel() * SPACING[2] + origin[2]], 1)
    if phase in MOTION:
        angle, shift = MOTION[phase]
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        p = (p - np.asarray(shift)) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    x, y, z = p.T
    hu = np.full(len(p), -1000.0)
    hu[(x / 85) ** 2 + (y / 65) ** 2 <= 1] = -90.0
    hu[(x / 60) ** 2 + (y / 45) ** 2 <= 1] = 20.0
    liver = ((x + 25) / 38) ** 2 + ((y - 5) / 30) ** 2 + ((z - 3) / 40) ** 2 <= 1
    tumor = ((x + 30) / 9) ** 2 + ((y - 10) / 8) ** 2 + ((z + 5) / 8) ** 2 <= 1
    hu[liver] = CONTRAST[phase]
    hu[tumor] = CONTRAST[phase] - 45
    hu[((x - 45) / 15) ** 2 + ((y - 15) / 20) ** 2 + ((z - 10) / 25) ** 2 <= 1] = CONTRAST[phase] + 10
    hu[(x / 14) ** 2 + ((y - 42) / 14) ** 2 <= 1] = 420.0
    hu = ndimage.gaussian_filter(hu.reshape(SHAPE), 0.8) + np.random.default_rng(seed).normal(0, 12, SHAPE)
    label = liver.astype(np.uint8) + tumor.astype(np.uint8) * (liver.astype(np.uint8))
    return Volume(hu.astype(np.int16), SPACING, origin), Volume(label.reshape(SHAPE), SPACING, origin)


def _write_dataset(root: Path, phases_per_case: dict[str, tuple[Phase, ...]], with_truth: bool = True) -> Path:
    cases = []
    for n, (case_id, phases) in enumerate(phases_per_case.items()):
        folder = root / case_id
        images, truth, normal = {}, {}, {}
        label_path = None
        for phase in phases:
            image, label = _phase(phase, seed=10 * n + len(images))
            images[phase] = folder / f"{phase.value}.nii.gz"
            write_image(image, images[phase])
            if with_truth:
                truth[phase] = folder / f"truth_{phase.value}.nii.gz"
                write_image(label, truth[phase])
            if phase is Phase.PVP:
                label_path = folder / "label.nii.gz"
                write_image(label, label_path)
                normal[phase] = folder / "normal_PVP.nii.gz"
                write_image(image, normal[phase])
        cases.append(Case(case_id, images, label=label_path, truth=truth, normal=normal, meta={"n": n}))
    Dataset(root, tuple(cases), source={"stage": "test"}).save()
    return root


FAST = RegistrationSettings(shrink_factors=(4, 2, 1), iterations=60)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RegistrationConfig, Dataset, list[int]]:
    root = tmp_path_factory.mktemp("prealign")
    data = _write_dataset(root / "data", {
        "case_000": (Phase.NC, Phase.ART, Phase.PVP, Phase.DEL),
        "case_001": (Phase.ART, Phase.PVP),
    })
    config = RegistrationConfig(data=data, out=root / "out", settings=FAST)
    ticks: list[int] = []
    dataset = register_dataset(config, progress=ticks.append)
    return config, dataset, ticks


def test_writes_registered_phases_on_the_pvp_grid(run: tuple[RegistrationConfig, Dataset, list[int]]) -> None:
    config, dataset, ticks = run
    out = config.out
    assert ticks == [1, 1]
    loaded = load_dataset(out)
    assert [c.id for c in loaded.cases] == ["case_000", "case_001"]
    assert loaded.source["stage"] == "register"
    assert loaded.source["config"]["settings"]["iterations"] == 60
    case = loaded.case("case_000")
    assert set(case.images) == {Phase.NC, Phase.ART, Phase.PVP, Phase.DEL}
    pvp = case.image(Phase.PVP)
    for phase in case.images:
        assert case.image(phase).same_grid(pvp), phase
        assert read_image(case.truth[phase]).same_grid(pvp), phase
    assert (out / "cases/case_000/images/PVP.nii.gz").read_bytes() == (
        config.data / "case_000/PVP.nii.gz"
    ).read_bytes()
    assert case.label == out / "cases/case_000/label.nii.gz" and case.label.exists()
    assert case.normal[Phase.PVP].exists()
    assert case.meta["n"] == 0 and case.meta["registration"]["ART"]["accepted"] is True
    assert RegistrationConfig.load(out / "config.json") == config


def test_reports_metrics_flags_transforms_and_dice(run: tuple[RegistrationConfig, Dataset, list[int]]) -> None:
    config, _, _ = run
    report = json.loads((config.out / "cases/case_000/registration.json").read_text())
    assert report["schema_version"] == 1 and report["reference"] == "PVP"
    assert report["metric_mask"].startswith("PVP label liver")
    assert set(report["phases"]) == {"NC", "ART", "DEL"}
    for name, entry in report["phases"].items():
        assert {"metric_before", "metric_after", "accepted", "flags", "warnings", "transform", "dice"} <= set(entry)
        assert entry["metric_after"] < entry["metric_before"], name
        assert entry["accepted"] is True and "identity_fallback" not in entry["flags"], name
        assert entry["transform"]["kind"] == "AffineTransform"
        d = entry["dice"]
        assert d["liver_before"] < 0.9 < d["liver_after"], (name, d)
        assert d["tumor_after"] > d["tumor_before"], (name, d)
    summary = json.loads((config.out / "registration_summary.json").read_text())
    assert summary["cases"] == 2 and summary["registered_this_run"] == 2 and summary["skipped"] == 0
    assert summary["phases"]["ART"]["registered"] == 2 and summary["phases"]["NC"]["registered"] == 1
    art = summary["phases"]["ART"]
    assert art["mean_liver_dice_after"] > art["mean_liver_dice_before"]
    assert isinstance(summary["n_flagged"], int) and isinstance(summary["flagged"], list)


def test_resume_skips_finished_cases_and_redoes_missing_ones(
    run: tuple[RegistrationConfig, Dataset, list[int]], tmp_path: Path
) -> None:
    config, _, _ = run
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    config = config.replace(out=out)
    report = out / "cases/case_000/registration.json"
    stamp = report.stat().st_mtime_ns
    shutil.rmtree(out / "cases/case_001")  # as if the run had stopped before this case
    register_dataset(config)
    summary = json.loads((out / "registration_summary.json").read_text())
    assert summary["skipped"] == 1 and summary["registered_this_run"] == 1
    assert report.stat().st_mtime_ns == stamp
    assert (out / "cases/case_001/images/ART.nii.gz").exists()
    with pytest.raises(InputError, match=r"expected the same configuration to resume, found other \['settings'\]"):
        register_dataset(config.replace(settings=RegistrationSettings(iterations=10)))


def test_same_input_gives_the_same_output(run: tuple[RegistrationConfig, Dataset, list[int]], tmp_path: Path) -> None:
    config, _, _ = run
    again = RegistrationConfig(data=config.data, out=tmp_path / "again", settings=FAST, phases=(Phase.ART,))
    register_dataset(again)
    for case_id in ("case_000", "case_001"):
        first = read_image(config.out / f"cases/{case_id}/images/ART.nii.gz").array
        second = read_image(again.out / f"cases/{case_id}/images/ART.nii.gz").array
        np.testing.assert_array_equal(first, second)
    # A phase left out of the configuration is put on the PVP grid unmoved, and says so.
    report = json.loads((again.out / "cases/case_000/registration.json").read_text())
    assert report["phases"]["NC"]["registered"] is False
    assert read_image(again.out / "cases/case_000/images/NC.nii.gz").shape == SHAPE


def test_a_case_without_pvp_is_refused_by_name(tmp_path: Path) -> None:
    data = _write_dataset(tmp_path / "data", {"case_ok": (Phase.ART, Phase.PVP), "case_nopvp": (Phase.NC, Phase.ART)},
                          with_truth=False)
    config = RegistrationConfig(data=data, out=tmp_path / "out")
    with pytest.raises(InputError, match=r"case case_nopvp: expected a PVP image .* found only \['NC', 'ART'\]"):
        register_dataset(config)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_label_off_the_pvp_grid_is_refused(tmp_path: Path) -> None:
    data = _write_dataset(tmp_path / "data", {"case_x": (Phase.ART, Phase.PVP)}, with_truth=False)
    label = read_image(data / "case_x/label.nii.gz")
    write_image(Volume(label.array[:, :, :-2], label.spacing, label.origin), data / "case_x/label.nii.gz")
    with pytest.raises(InputError, match=r"case case_x: expected the label on the PVP grid \(size \(72, 72, 28\)"):
        register_dataset(RegistrationConfig(data=data, out=tmp_path / "out"))


def test_config_validates_and_round_trips(tmp_path: Path) -> None:
    config = RegistrationConfig(data=tmp_path / "d", out=tmp_path / "o", settings=FAST, phases=("ART", "DEL"), seed=7)
    assert config.settings.seed == 7 and config.phases == (Phase.ART, Phase.DEL)
    config.save(tmp_path / "config.json")
    assert RegistrationConfig.load(tmp_path / "config.json") == config
    with pytest.raises(InputError, match="expected distinct phases to register"):
        RegistrationConfig(data=tmp_path, out=tmp_path, phases=(Phase.PVP,))
    data = config.to_dict()
    data["settings"]["bogus"] = 1
    with pytest.raises(InputError, match="settings: expected only the keys"):
        RegistrationConfig.from_dict(data)


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) is None
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_phantom_liver_dice_improves_for_every_phase(tmp_path: Path) -> None:
    phantom = pytest.importorskip("d4m.training.phantom")
    config = phantom.PhantomConfig(cases=1, seed=3, size="small", write_dicom=False)
    case = phantom.write_case(phantom.generate_case(0, config), tmp_path / "data/cases/case_000", write_dicom=False)
    Dataset(tmp_path / "data", (case,)).save()
    out = tmp_path / "out"
    register_dataset(RegistrationConfig(data=tmp_path / "data", out=out))
    report = json.loads((out / "cases/case_000/registration.json").read_text())
    for name in ("NC", "ART", "DEL"):
        entry = report["phases"][name]
        assert entry["accepted"] and "identity_fallback" not in entry["flags"], (name, entry["flags"])
        assert entry["dice"]["liver_after"] > entry["dice"]["liver_before"] + 0.02, (name, entry["dice"])
        assert entry["dice"]["liver_after"] > 0.95, (name, entry["dice"])
