"""Phase-to-PVP registration: recovery of a known transform, determinism, fallback, gate, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime import registration
from d4m.runtime.registration import (
    Flag,
    RegistrationResult,
    RegistrationSettings,
    dilate_mm,
    metric_region,
    normalized_mutual_information,
    register_to_reference,
    resample_label,
    resample_to,
    transform_from_dict,
    transform_to_dict,
)

SHAPE = (40, 96, 96)
SPACING = (2.0, 2.0, 3.5)
# The true fixed → moving map: a rigid rotation, a small anisotropic scale and a shift (mm).
ANGLES = (3.0, -2.0, 5.0)
SCALE = (1.03, 0.98, 1.0)
SHIFT = np.array([6.0, -4.0, 5.0])
CONTRAST = {"NC": (55, 40), "ART": (75, 280), "PVP": (115, 170), "DEL": (90, 120)}  # liver, vessels (HU)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


MATRIX = _rotation(*ANGLES) @ np.diag(SCALE)


def _abdomen(
    phase: str,
    seed: int,
    moved: bool = False,
    shape: tuple[int, int, int] = SHAPE,
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] | None = None,
) -> tuple[Volume, Volume]:
    """A smooth synthetic abdomen (body, fat, liver, spleen, spine, aorta) and its liver mask.

    With ``moved``, the anatomy sits where ``x ↦ MATRIX·x + SHIFT`` sends it, so registering this
    image to an unmoved one must recover that map.
    """
    nk, nj, ni = shape
    if origin is None:
        origin = tuple(-(n - 1) * s / 2 for n, s in zip((ni, nj, nk), spacing, strict=True))
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    p = np.stack([i.ravel() * spacing[0] + origin[0], j.ravel() * spacing[1] + origin[1],
                  k.ravel() * spacing[2] + origin[2]], 1)
    if moved:
        p = (p - SHIFT) @ np.linalg.inv(MATRIX).T
    x, y, z = p.T
    liver_hu, vessel_hu = CONTRAST[phase]
    hu = np.full(len(p), -1000.0)
    body = (x / 85) ** 2 + (y / 65) ** 2 <= 1
    hu[body] = -90.0
    hu[body & ((x / 78) ** 2 + (y / 58) ** 2 > 1)] = 50.0
    hu[(x / 60) ** 2 + (y / 45) ** 2 <= 1] = 20.0
    wobble = 0.15 * np.sin(x / 9) * np.cos(z / 11)
    liver = ((x + 25) / 38) ** 2 + ((y - 5) / 30) ** 2 + ((z - 3) / 40) ** 2 + wobble <= 1
    hu[liver] = liver_hu
    hu[((x + 30) / 9) ** 2 + ((y - 10) / 8) ** 2 + ((z + 5) / 8) ** 2 <= 1] = liver_hu - 45
    hu[((x - 45) / 15) ** 2 + ((y - 15) / 20) ** 2 + ((z - 10) / 25) ** 2 <= 1] = liver_hu + 10
    hu[(x / 14) ** 2 + ((y - 42) / 14) ** 2 <= 1] = 420.0
    hu[((x - 8) / 7) ** 2 + ((y - 22) / 7) ** 2 <= 1] = vessel_hu
    hu = ndimage.gaussian_filter(hu.reshape(shape), 0.8) + np.random.default_rng(seed).normal(0, 12, shape)
    return (
        Volume(hu.astype(np.int16), spacing, origin),
        Volume(liver.reshape(shape).astype(np.uint8), spacing, origin),
    )


def _error_mm(result: RegistrationResult, liver: Volume) -> np.ndarray:
    """Distance between the recovered and the true map at liver voxels (fixed space, mm)."""
    kji = np.argwhere(liver.array > 0)[::7]
    points = kji[:, ::-1] * np.asarray(liver.spacing) + np.asarray(liver.origin)
    recovered = np.array([result.transform.TransformPoint(tuple(map(float, q))) for q in points])
    return np.linalg.norm(recovered - (points @ MATRIX.T + SHIFT), axis=1)


@pytest.fixture(scope="module")
def pair() -> tuple[Volume, Volume, Volume]:
    fixed, liver = _abdomen("PVP", seed=1)
    moving, _ = _abdomen("ART", seed=2, moved=True, origin=(-100.0, -105.0, -75.0))
    return fixed, liver, moving


@pytest.fixture(scope="module")
def registered(pair: tuple[Volume, Volume, Volume]) -> RegistrationResult:
    fixed, liver, moving = pair
    return register_to_reference(moving, fixed, liver, RegistrationSettings())


def test_recovers_rigid_plus_affine_within_a_millimetre(
    pair: tuple[Volume, Volume, Volume], registered: RegistrationResult
) -> None:
    fixed, liver, _ = pair
    error = _error_mm(registered, liver)
    before = np.linalg.norm(
        (np.argwhere(liver.array > 0)[::7][:, ::-1] * np.asarray(liver.spacing) + np.asarray(liver.origin))
        @ (MATRIX.T - np.eye(3)) + SHIFT, axis=1,
    )
    assert before.mean() > 6.0  # the phases really start misaligned
    assert error.mean() < 1.0 and error.max() < 2.0, (error.mean(), error.max())
    assert registered.accepted and not registered.identity
    assert registered.metric_after < registered.metric_before
    assert registered.quality_after > registered.quality_before + 0.2
    assert [s.name for s in registered.stages] == ["rigid", "affine"]
    assert registered.image.same_grid(fixed) and registered.image.array.dtype == np.int16
    assert registered.mask_source.startswith("liver mask dilated by 15 mm")
    report = json.loads(json.dumps(registered.to_dict()))
    assert report["transform"]["kind"] == "AffineTransform" and report["accepted"] is True
    assert {"metric_before", "metric_after", "quality_before", "quality_after", "flags", "warnings", "stages"} <= set(
        report
    )


def test_is_deterministic(pair: tuple[Volume, Volume, Volume], registered: RegistrationResult) -> None:
    fixed, liver, moving = pair
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    again = register_to_reference(moving, fixed, liver, RegistrationSettings())
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # restored after the call
    assert again.transform.GetParameters() == registered.transform.GetParameters()
    assert again.metric_after == registered.metric_after
    np.testing.assert_array_equal(again.image.array, registered.image.array)


def test_optimising_on_a_coarser_working_grid_keeps_the_accuracy(pair: tuple[Volume, Volume, Volume]) -> None:
    fixed, liver, moving = pair
    problem = registration._problem(moving, fixed, liver.array > 0, RegistrationSettings(working_spacing_mm=3.0))
    assert problem.fixed.GetSpacing() == (3.0, 3.0, 3.5) and problem.mask.GetSpacing() == (3.0, 3.0, 3.5)
    result = register_to_reference(moving, fixed, liver, RegistrationSettings(working_spacing_mm=3.0))
    assert result.image.same_grid(fixed)  # the output is resampled from the original, on the fixed grid
    assert _error_mm(result, liver).mean() < 1.0


def test_without_a_mask_uses_the_body_and_still_aligns(pair: tuple[Volume, Volume, Volume]) -> None:
    fixed, liver, moving = pair
    result = register_to_reference(moving, fixed, None, RegistrationSettings(shrink_factors=(4, 2),
                                                                             smoothing_sigmas_mm=(4.0, 1.0)))
    assert result.mask_source.startswith("body mask (fixed > -500 HU")
    assert _error_mm(result, liver).mean() < 1.5
    assert result.accepted


def test_noise_falls_back_to_identity_and_fails_the_gate(pair: tuple[Volume, Volume, Volume]) -> None:
    fixed, liver, _ = pair
    noise = Volume(np.random.default_rng(0).uniform(-1000, 1000, fixed.shape).astype(np.int16), fixed.spacing,
                   fixed.origin)
    result = register_to_reference(noise, fixed, liver, RegistrationSettings(shrink_factors=(2, 1),
                                                                             smoothing_sigmas_mm=(2.0, 0.0)))
    assert Flag.IDENTITY_FALLBACK in result.flags and Flag.BELOW_GATE in result.flags
    assert not result.accepted and result.identity
    assert result.quality_after < 0.02
    assert transform_to_dict(result.transform)["kind"] == "IdentityTransform"
    np.testing.assert_array_equal(result.image.array, noise.array)  # same grid: identity resampling
    assert any("identity kept" in w for w in result.warnings)


def test_a_moving_image_that_does_not_overlap_is_flagged_not_raised(pair: tuple[Volume, Volume, Volume]) -> None:
    fixed, liver, moving = pair
    far = Volume(moving.array, moving.spacing, (900.0, 900.0, 900.0))
    result = register_to_reference(far, fixed, liver, RegistrationSettings(iterations=5))
    assert result.identity and not result.accepted
    assert Flag.STAGE_FAILED in result.flags and Flag.BELOW_GATE in result.flags
    assert (result.image.array == -1024).all()
    assert json.loads(json.dumps(result.to_dict()))["metric_before"] is None  # not finite: left out


def test_the_gate_rejects_below_min_quality(pair: tuple[Volume, Volume, Volume]) -> None:
    fixed, liver, moving = pair
    strict = RegistrationSettings(affine=False, iterations=20, min_quality=0.95)
    result = register_to_reference(moving, fixed, liver, strict)
    assert not result.accepted
    assert Flag.BELOW_GATE in result.flags and Flag.IDENTITY_FALLBACK in result.flags
    assert result.metric_after == result.metric_before  # the discarded transform is not reported


def test_an_image_registered_to_itself_keeps_identity() -> None:
    fixed, liver = _abdomen("PVP", seed=3, shape=(28, 72, 72), spacing=(2.6, 2.6, 5.0))
    result = register_to_reference(fixed, fixed, liver, RegistrationSettings(shrink_factors=(2, 1),
                                                                             smoothing_sigmas_mm=(2.0, 0.0)))
    # Nothing can beat identity: it is kept (and flagged), the image is returned unchanged.
    assert result.identity and result.accepted
    assert result.metric_after == result.metric_before
    assert not any(s.kept for s in result.stages)
    np.testing.assert_array_equal(result.image.array, fixed.array)


def test_a_stage_that_worsens_the_metric_is_dropped(
    pair: tuple[Volume, Volume, Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed, liver, moving = pair
    real_stage = registration._run_stage

    def sabotaged(name: str, problem: object, start: sitk.Transform) -> tuple[sitk.Transform, int, str]:
        transform, iterations, stop = real_stage(name, problem, start)
        if name == "affine":
            transform = sitk.AffineTransform(3)
            transform.SetTranslation((25.0, 0.0, 0.0))
        return transform, iterations, stop

    monkeypatch.setattr(registration, "_run_stage", sabotaged)
    result = register_to_reference(moving, fixed, liver, RegistrationSettings(iterations=30))
    rigid, affine = result.stages
    assert rigid.kept and not affine.kept and affine.metric > rigid.metric
    assert Flag.WORSENED in result.flags and not result.identity
    assert result.metric_after == rigid.metric
    assert transform_to_dict(result.transform)["kind"] == "Euler3DTransform"
    assert _error_mm(result, liver).mean() < 3.0  # the rigid part of the true map


def test_bspline_stage_composes_with_affine_and_round_trips() -> None:
    fixed, liver = _abdomen("PVP", seed=4, shape=(28, 72, 72), spacing=(2.6, 2.6, 5.0))
    moving, _ = _abdomen("DEL", seed=5, moved=True, shape=(28, 72, 72), spacing=(2.6, 2.6, 5.0))
    settings = RegistrationSettings(bspline=True, bspline_iterations=5, bspline_grid_mm=80.0)
    result = register_to_reference(moving, fixed, liver, settings)
    names = [s.name for s in result.stages]
    assert names == ["rigid", "affine", "bspline"]
    data = json.loads(json.dumps(transform_to_dict(result.transform)))
    rebuilt = transform_from_dict(data)
    point = (-20.0, 5.0, 3.0)
    np.testing.assert_allclose(rebuilt.TransformPoint(point), result.transform.TransformPoint(point), atol=1e-9)
    if result.stages[-1].kept:
        assert data["kind"] == "CompositeTransform" and len(data["transforms"]) == 2


def test_resample_to_shifts_by_the_transform_and_keeps_dtype() -> None:
    array = np.zeros((10, 12, 14), np.int16)
    array[5, 6, 7] = 1000
    volume = Volume(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    shift = sitk.TranslationTransform(3, (2.0, 0.0, 4.0))  # fixed point + (2, 0, 4) mm → moving point
    out = resample_to(volume, volume, shift, "linear", default_value=-1024)
    assert out.array.dtype == np.int16
    assert out.array[3, 6, 5] == 1000  # i: 7 - 2 voxels, k: 5 - 2 slices
    assert out.array[-1, 0, 0] == -1024  # outside the moving image
    label = volume.with_array((array > 0).astype(np.uint8) * 2)
    moved = resample_label(label, volume, shift)
    assert set(np.unique(moved.array)) == {0, 2} and moved.array[3, 6, 5] == 2
    other = Volume(np.zeros((5, 6, 7), np.float32), (2.0, 2.0, 4.0), (0.5, 0.5, 1.0))
    assert resample_to(volume, other).same_grid(other)


def test_settings_validate_and_round_trip() -> None:
    settings = RegistrationSettings(bspline=True, sampling="none", intensity_window=None, threads=2)
    data = json.loads(json.dumps(settings.to_dict()))
    assert RegistrationSettings.from_dict(data) == settings
    with pytest.raises(InputError, match="expected only the keys"):
        RegistrationSettings.from_dict({**data, "bogus": 1})
    with pytest.raises(InputError, match="at least one of rigid/affine/bspline"):
        RegistrationSettings(rigid=False, affine=False)
    with pytest.raises(InputError, match="smoothing_sigmas_mm"):
        RegistrationSettings(shrink_factors=(4, 2, 1), smoothing_sigmas_mm=(1.0,))
    with pytest.raises(InputError, match=r"expected sampling one of \['regular', 'none'\], found 'random'"):
        RegistrationSettings(sampling="random")


def test_mask_dilation_is_in_millimetres_and_checked() -> None:
    mask = np.zeros((21, 41, 41), bool)
    mask[10, 20, 20] = True
    grown = dilate_mm(mask, (1.0, 1.0, 2.5), 5.0)
    assert grown[10, 20].sum() == 11  # ±5 voxels of 1 mm along i
    assert grown[:, 20, 20].sum() == 5  # ±2 slices of 2.5 mm along k
    fixed = Volume(np.zeros((21, 41, 41), np.int16), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0))
    off_grid = Volume(mask.astype(np.uint8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="expected the fixed image's grid"):
        metric_region(fixed, off_grid, RegistrationSettings())
    with pytest.raises(InputError, match="found none"):
        metric_region(fixed, fixed.with_array(np.zeros((21, 41, 41), np.uint8)), RegistrationSettings())
    # An image that is not in HU has no body below -500: the whole image is the region, and it says so.
    region, source = metric_region(fixed.with_array(np.full((21, 41, 41), 7, np.int16)), None, RegistrationSettings())
    assert region is None and source.startswith("whole image")


def test_normalized_mutual_information_orders_alignment() -> None:
    fixed, liver = _abdomen("PVP", seed=6, shape=(28, 72, 72), spacing=(2.6, 2.6, 5.0))
    other, _ = _abdomen("NC", seed=7, shape=(28, 72, 72), spacing=(2.6, 2.6, 5.0))
    shifted = other.with_array(np.roll(other.array, 4, axis=2))
    noise = other.with_array(np.random.default_rng(1).normal(0, 300, other.shape))
    aligned = normalized_mutual_information(fixed, other, liver.array > 0, (-300, 500))
    assert normalized_mutual_information(fixed, fixed, liver.array > 0) == pytest.approx(1.0)
    assert aligned > normalized_mutual_information(fixed, shifted, liver.array > 0, (-300, 500)) + 0.05
    assert normalized_mutual_information(fixed, noise, liver.array > 0, (-300, 500)) < 0.02


def test_registration_module_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from d4m.dicom_io.volume import Volume\n"
        "from d4m.runtime.registration import register_to_reference, RegistrationSettings\n"
        "a = np.random.default_rng(0).normal(0, 100, (16, 32, 32)).astype(np.float32)\n"
        "v = Volume(a, (2., 2., 2.), (0, 0, 0))\n"
        "register_to_reference(v, v, None, RegistrationSettings(affine=False, iterations=2, shrink_factors=(1,),"
        " smoothing_sigmas_mm=(0.,), intensity_window=None))\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in {'torch', 'monai'} or m.startswith(('d4m.training', 'd4m.export')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
