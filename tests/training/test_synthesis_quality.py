"""Synthesis-quality metrics: contrast, tumour matching across phases, consistency, distances, AE errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.training.autoencoder import AutoencoderConfig, CaseVolumes
from d4m.training.synthesis_quality import (
    QualitySettings,
    TumorMeasure,
    contrast_distances,
    measure_tumors,
    nearest_pattern_distances,
    reconstruction_errors,
    structure_consistency,
    tumor_regions,
)

SPACING = (1.0, 1.0, 2.0)  # (x, y, z) mm: the k axis is 2 mm
LIVER_HU = {Phase.NC: 55.0, Phase.ART: 75.0, Phase.PVP: 115.0, Phase.DEL: 95.0}
HCC = {Phase.NC: -10.0, Phase.ART: 40.0, Phase.PVP: -20.0, Phase.DEL: -30.0}
SHAPE = (24, 48, 48)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ball(centre: tuple[int, int, int], radius_mm: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return ((k - centre[0]) * 2.0) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius_mm**2


def phantom(offsets: list[dict[Phase, float]], centres: list[tuple[int, int, int]], radius: float = 6.0,
            noise: float = 3.0, seed: int = 0) -> tuple[dict[Phase, np.ndarray], np.ndarray]:
    """A liver ball with tumours of known contrast per phase, and its label."""
    rng = np.random.default_rng(seed)
    liver = ball((12, 24, 24), 22.0)
    label = liver.astype(np.uint8)
    images = {p: np.where(liver, LIVER_HU[p], -50.0) + rng.normal(0, noise, SHAPE) for p in PHASE_ORDER}
    for offset, centre in zip(offsets, centres, strict=True):
        tumor = ball(centre, radius) & liver
        label[tumor] = 2
        for p in PHASE_ORDER:
            images[p][tumor] += offset[p]
    return {p: v.astype(np.float32) for p, v in images.items()}, label


def test_contrast_per_phase_is_the_painted_offset_for_each_of_two_tumours() -> None:
    cyst = {p: -60.0 for p in PHASE_ORDER}
    images, label = phantom([HCC, cyst], [(12, 16, 16), (12, 32, 32)], noise=3.0)
    measures = measure_tumors(images, label, SPACING, "c0")
    assert [m.index for m in measures] == [1, 2]
    for measure, expected in zip(measures, [HCC, cyst], strict=True):
        for phase in PHASE_ORDER:
            assert measure.contrast_hu[phase] == pytest.approx(expected[phase], abs=1.5)
            assert measure.spread_hu[phase] == pytest.approx(3.0, abs=0.6)  # the noise: the tumours are flat
        assert measure.voxels > 50


def test_each_phase_is_measured_in_its_own_mask_when_the_tumour_moved() -> None:
    images, label = phantom([HCC], [(12, 24, 18)])
    moved = np.roll(images[Phase.ART], 5, axis=2)  # the arterial tumour sits 5 mm further along i
    liver = label > 0
    images[Phase.ART] = np.where(liver, moved, images[Phase.ART]).astype(np.float32)
    truth = {p: label.copy() for p in PHASE_ORDER}
    art = liver.astype(np.uint8)
    art[np.roll(label == 2, 5, axis=2) & liver] = 2
    truth[Phase.ART] = art
    own = measure_tumors(images, label, SPACING, truth=truth)[0]
    shared = measure_tumors(images, label, SPACING)[0]
    assert own.contrast_hu[Phase.ART] == pytest.approx(HCC[Phase.ART], abs=2.0)
    # measured in the PVP mask the arterial contrast is diluted by liver: what the per-phase truth avoids
    assert shared.contrast_hu[Phase.ART] < HCC[Phase.ART] - 5.0


def test_tumour_regions_match_the_nearest_reference_tumour_within_reach() -> None:
    reference = np.zeros((10, 30, 30), dtype=bool)
    reference[4:6, 5:9, 5:9] = True
    reference[4:6, 5:9, 20:24] = True
    phase = np.zeros_like(reference)
    phase[4:6, 5:9, 10:14] = True   # 1 voxel right of the first tumour's extent: nearer the first
    phase[4:6, 20:24, 20:24] = True  # 11 voxels from the second tumour: beyond reach
    n, regions = tumor_regions(reference, {Phase.ART: phase, Phase.PVP: reference}, (1.0, 1.0, 1.0), 5.0)
    assert n == 2
    assert regions[0][Phase.ART].sum() == 32 and regions[1][Phase.ART].sum() == 0
    assert regions[1][Phase.PVP].sum() == 32 and not (regions[0][Phase.PVP] & regions[1][Phase.PVP]).any()
    with pytest.raises(InputError, match="shape"):
        tumor_regions(reference, {Phase.ART: phase[:5]}, (1.0, 1.0, 1.0), 5.0)


def test_structure_consistency_is_high_for_shared_structure_and_low_for_independent_textures() -> None:
    rng = np.random.default_rng(1)
    region = ball((12, 24, 24), 10.0)
    regions = {p: region for p in PHASE_ORDER}
    shared = rng.normal(0, 20, SHAPE)
    signs = {Phase.NC: 1.0, Phase.ART: -1.0, Phase.PVP: 1.0, Phase.DEL: 0.5}
    same = {p: 100.0 + signs[p] * shared + rng.normal(0, 2, SHAPE) for p in PHASE_ORDER}
    independent = {p: 100.0 + rng.normal(0, 20, SHAPE) for p in PHASE_ORDER}
    high = structure_consistency(same, regions)
    low = structure_consistency(independent, regions)
    assert high > 0.9  # a sign flip (arterial-bright, venous-dark) is the same structure
    assert low < 0.3
    tiny = {p: ball((12, 24, 24), 1.0) for p in PHASE_ORDER}
    assert math.isnan(structure_consistency(same, tiny))
    assert math.isnan(structure_consistency({Phase.PVP: same[Phase.PVP]}, regions))


def test_structure_consistency_ignores_the_liver_around_the_core() -> None:
    rng = np.random.default_rng(2)
    region = ball((12, 24, 24), 8.0)
    images = {p: np.where(region, 100.0 + rng.normal(0, 20, SHAPE), 500.0 * (i + 1))
              for i, p in enumerate(PHASE_ORDER)}
    # with a smoothing that leaked the bright surroundings, the edge would correlate every phase
    assert structure_consistency(images, {p: region for p in PHASE_ORDER}, smooth_voxels=1.5) < 0.35


def measure(case: str, contrast: list[float], consistency: float = 0.5) -> TumorMeasure:
    return TumorMeasure(case, 1, 100, dict(zip(PHASE_ORDER, contrast, strict=True)), {}, consistency)


def test_contrast_distance_is_zero_for_equal_sets_and_the_shift_for_a_shifted_phase() -> None:
    rng = np.random.default_rng(3)
    real = [measure(f"r{i}", list(rng.normal(0, 20, 4))) for i in range(30)]
    shifted = [TumorMeasure(m.case, m.index, m.voxels, {**m.contrast_hu, Phase.ART: m.contrast_hu[Phase.ART] + 10.0},
                            m.spread_hu, m.consistency) for m in real]
    assert all(d == pytest.approx(0.0) for d in contrast_distances(real, real).values())
    distance = contrast_distances(real, shifted)
    assert distance[Phase.ART] == pytest.approx(10.0)
    assert distance[Phase.PVP] == pytest.approx(0.0)
    missing = [measure("s", [float("nan"), 1.0, 2.0, 3.0])]
    assert math.isnan(contrast_distances([], missing)[Phase.NC])
    assert not math.isnan(contrast_distances(real, missing)[Phase.ART])


def test_nearest_pattern_distance_finds_the_matching_combination_and_leaves_self_out() -> None:
    real = [measure("a", [-10, 40, -20, -30]), measure("b", [-15, -25, -45, -35]), measure("c", [-60, -60, -60, -60])]
    # each phase value occurs among the real tumours, but not this combination
    mixed = [measure("s", [-10, -25, -20, -60])]
    exact = [measure("t", [-15, -25, -45, -35])]
    assert nearest_pattern_distances(exact, real)[0] == pytest.approx(0.0)
    assert nearest_pattern_distances(mixed, real)[0] > 15.0
    loo = nearest_pattern_distances(real, real, leave_one_out=True)
    assert loo.shape == (3,) and (loo > 0).all()
    partial = [measure("p", [float("nan"), 0, 0, 0])]
    assert nearest_pattern_distances(partial, real).size == 0
    with pytest.raises(InputError, match="leave-one-out"):
        nearest_pattern_distances(exact, real, leave_one_out=True)


class Identity(torch.nn.Module):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Flat(Identity):
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


def test_reconstruction_errors_are_zero_for_a_perfect_model_and_lose_the_contrast_for_a_flat_one() -> None:
    images, label = phantom([HCC], [(12, 24, 24)], noise=1.0)
    case = CaseVolumes("c0", images, {}, {}, label, SPACING)
    config = AutoencoderConfig(crop=(16, 32, 32), window=(-175.0, 250.0))
    perfect = reconstruction_errors(Identity(), config, [case], crops_per_phase=2)
    flat = reconstruction_errors(Flat(), config, [case], crops_per_phase=2)
    assert set(perfect) == set(PHASE_ORDER)
    mid = 0.5 * (config.window[0] + config.window[1])  # a decoded 0 is the window's middle
    for phase in PHASE_ORDER:
        assert perfect[phase].liver_mae_hu == pytest.approx(0.0, abs=1e-3)
        assert perfect[phase].reconstructed_contrast_hu == pytest.approx(perfect[phase].tumor_contrast_hu, abs=1e-3)
        assert perfect[phase].tumor_contrast_hu == pytest.approx(HCC[phase], abs=1.5)
        assert flat[phase].reconstructed_contrast_hu == pytest.approx(0.0, abs=1e-3)
        assert flat[phase].tumor_mae_hu == pytest.approx(abs(LIVER_HU[phase] + HCC[phase] - mid), abs=1.5)
    with pytest.raises(InputError, match="held-out"):
        reconstruction_errors(Identity(), config, [], crops_per_phase=1)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="ring_mm"):
        QualitySettings(ring_mm=0.0)
    with pytest.raises(ValueError, match="min_core_voxels"):
        QualitySettings(min_core_voxels=1)
