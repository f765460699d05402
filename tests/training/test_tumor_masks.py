"""Random tumour masks: sizes in millimetres, inside the liver, away from vessels, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from d4m.dicom_io.errors import InputError
from d4m.training.tumor_masks import (
    SEMI_AXES_MM,
    SizeClass,
    TumorMaskConfig,
    equivalent_radius_mm,
    generate_tumor_mask,
    vessels_from_pvp,
)


def ellipsoid_liver(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                    radii_mm: tuple[float, float, float]) -> np.ndarray:
    """A liver-sized ellipsoid ``[k, j, i]`` with radii in mm ``(z, y, x)``, centred."""
    axes = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) for n in shape], indexing="ij")
    voxel = spacing[::-1]
    return sum(((a * v) / r) ** 2 for a, v, r in zip(axes, voxel, radii_mm, strict=True)) <= 1.0


def one_class(size_class: SizeClass, **changes: object) -> TumorMaskConfig:
    return TumorMaskConfig(size_classes=(size_class,), class_weights=(1.0,), count=(1, 1), **changes)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)])
def test_size_classes_hold_in_millimetres_on_any_grid(spacing: tuple[float, float, float]) -> None:
    shape = tuple(int(round(110 / s)) for s in spacing[::-1])  # a 110 mm cube on either grid
    liver = ellipsoid_liver(shape, spacing, (52.0, 52.0, 52.0))
    radii: dict[SizeClass, list[float]] = {}
    for size_class in (SizeClass.TINY, SizeClass.SMALL, SizeClass.MEDIUM):
        for seed in range(3):
            config = one_class(size_class, liver_margin_mm=26.0)  # centres deep enough for whole tumours
            drawn = generate_tumor_mask(liver, spacing, np.random.default_rng(seed), config)
            (tumor,) = drawn.tumors
            low, high = SEMI_AXES_MM[size_class]
            assert all(low <= a <= high for a in tumor.semi_axes_mm)
            assert tumor.kept > 0.8
            radii.setdefault(size_class, []).append(equivalent_radius_mm(drawn.mask, spacing))
        low, high = SEMI_AXES_MM[size_class]
        # the physical size, not the voxel count, follows the class (elastic deformation: ± ~20 %)
        assert all(0.75 * low <= r <= 1.2 * high for r in radii[size_class]), (size_class, radii[size_class])
    assert max(radii[SizeClass.TINY]) < min(radii[SizeClass.SMALL]) < max(radii[SizeClass.SMALL]) < min(
        radii[SizeClass.MEDIUM])


def test_anisotropic_grid_gives_fewer_slices_than_rows() -> None:
    spacing = (0.8, 0.8, 2.5)
    liver = ellipsoid_liver((40, 120, 120), spacing, (45.0, 45.0, 45.0))
    drawn = generate_tumor_mask(liver, spacing, np.random.default_rng(3), one_class(SizeClass.MEDIUM, elasticity=0.0))
    k, j, i = np.nonzero(drawn.mask)
    # a roughly round tumour spans ~3× more rows than slices on a 0.8 × 2.5 mm grid
    assert (np.ptp(j) + 1) / (np.ptp(k) + 1) > 2.0


def test_mask_never_leaves_the_liver_even_for_large_tumours() -> None:
    spacing = (1.5, 1.5, 2.0)
    liver = ellipsoid_liver((40, 64, 64), spacing, (30.0, 40.0, 40.0))
    for seed in range(4):
        drawn = generate_tumor_mask(liver, spacing, np.random.default_rng(seed), TumorMaskConfig(count=(1, 4)))
        assert drawn.mask.any()
        assert drawn.mask[liver].sum() == drawn.mask.sum()  # inside-liver fraction exactly 1
        assert 1 <= len(drawn.tumors) <= 4
        assert sum(t.voxels for t in drawn.tumors) == drawn.mask.sum()


def test_same_seed_same_mask_other_seed_other_mask() -> None:
    spacing = (1.0, 1.0, 1.0)
    liver = ellipsoid_liver((48, 48, 48), spacing, (20.0, 20.0, 20.0))
    config = TumorMaskConfig(size_classes=(SizeClass.SMALL,), class_weights=(1.0,), count=(1, 3))
    a = generate_tumor_mask(liver, spacing, np.random.default_rng(5), config)
    b = generate_tumor_mask(liver, spacing, np.random.default_rng(5), config)
    c = generate_tumor_mask(liver, spacing, np.random.default_rng(6), config)
    assert np.array_equal(a.mask, b.mask) and a.tumors == b.tumors
    assert not np.array_equal(a.mask, c.mask)


def test_vessels_are_avoided_with_a_margin() -> None:
    spacing = (1.0, 1.0, 1.0)
    liver = ellipsoid_liver((48, 48, 48), spacing, (22.0, 22.0, 22.0))
    vessels = np.zeros_like(liver)
    vessels[:, 24, :] = True          # a vessel sheet across the liver
    vessels[:, :, 12] = True
    vessels &= liver
    config = TumorMaskConfig(size_classes=(SizeClass.SMALL,), class_weights=(1.0,), count=(2, 3),
                             vessel_margin_mm=2.0)
    for seed in range(4):
        drawn = generate_tumor_mask(liver, spacing, np.random.default_rng(seed), config, vessels=vessels)
        assert drawn.mask.any()
        assert not (drawn.mask & vessels).any()
        distance = ndimage.distance_transform_edt(~vessels)
        assert distance[drawn.mask].min() >= 2.0


def test_vessels_from_pvp_thresholds_inside_the_liver() -> None:
    pvp = np.full((8, 8, 8), 110.0)
    pvp[2:4] = 200.0
    liver = np.zeros((8, 8, 8), bool)
    liver[:, :4] = True
    vessels = vessels_from_pvp(pvp, liver)
    assert vessels.sum() == 2 * 4 * 8 and not vessels[:, 4:].any()


def test_clear_errors_for_no_liver_and_bad_inputs() -> None:
    with pytest.raises(InputError, match="expected a liver label"):
        generate_tumor_mask(np.zeros((8, 8, 8)), (1.0, 1.0, 1.0), np.random.default_rng(0))
    with pytest.raises(InputError, match="spacing"):
        generate_tumor_mask(np.ones((8, 8, 8)), (1.0, 0.0, 1.0), np.random.default_rng(0))
    with pytest.raises(InputError, match="vessels of shape"):
        generate_tumor_mask(np.ones((8, 8, 8)), (1.0, 1.0, 1.0), np.random.default_rng(0), vessels=np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="class_weights"):
        TumorMaskConfig(class_weights=(1.0,))
