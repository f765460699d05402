"""Training holes: kept off forbidden tissue, sane coverage, reproducible; the paper's tumour hole."""

from __future__ import annotations

import numpy as np
import pytest

from d4m.dicom_io.errors import InputError
from d4m.training.inpainting_masks import (
    MaskSpec,
    blob_mask,
    box_mask,
    stroke_mask,
    training_mask,
    tumor_hole,
)

SHAPE = (64, 80)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


@pytest.mark.parametrize("odds", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.3, 0.2, 0.5)])
def test_masks_avoid_the_forbidden_region_and_cover_a_sane_fraction(odds: tuple[float, float, float]) -> None:
    spec = MaskSpec(*odds, max_fraction=0.4)
    forbidden = _disc(SHAPE, (30, 40), 10)
    region = _disc(SHAPE, (32, 40), 22) & ~forbidden
    rng = np.random.default_rng(0)
    fractions = []
    near_region = 0
    for _ in range(40):
        mask = training_mask(SHAPE, rng, spec, region=region, forbidden=forbidden)
        assert mask.dtype == bool and mask.shape == SHAPE
        assert not (mask & forbidden).any()
        fractions.append(mask.mean())
        near_region += bool((mask & region).any())
    assert min(fractions) > 0.0
    assert max(fractions) <= 0.4
    assert 0.01 < np.mean(fractions) < 0.3
    assert near_region >= 36, "holes are centred on the region"


def test_masks_are_deterministic_for_a_seed() -> None:
    forbidden = _disc(SHAPE, (10, 10), 6)
    first = [training_mask(SHAPE, np.random.default_rng(5), forbidden=forbidden) for _ in range(3)]
    again = [training_mask(SHAPE, np.random.default_rng(5), forbidden=forbidden) for _ in range(3)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = training_mask(SHAPE, np.random.default_rng(6), forbidden=forbidden)
    assert not np.array_equal(first[0], other)


def test_each_shape_family_draws_its_own_kind() -> None:
    rng = np.random.default_rng(1)
    box = box_mask(SHAPE, rng, MaskSpec(box_count=(1, 1)))
    rows, cols = np.nonzero(box)
    assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1), "a box is a full rectangle"
    blob = blob_mask(SHAPE, rng, MaskSpec(blob_count=(1, 1)))
    assert blob.any() and blob.sum() < box.size * 0.4
    stroke = stroke_mask(SHAPE, rng)
    assert stroke.any()


def test_fully_forbidden_slice_gives_an_empty_hole_and_bad_shapes_are_refused() -> None:
    everything = np.ones(SHAPE, bool)
    assert not training_mask(SHAPE, np.random.default_rng(0), forbidden=everything).any()
    with pytest.raises(InputError, match="expected a forbidden mask of shape"):
        training_mask(SHAPE, np.random.default_rng(0), forbidden=np.zeros((3, 3), bool))
    with pytest.raises(InputError, match="expected a 2D shape of at least 4×4"):
        training_mask((2, 2), np.random.default_rng(0))
    with pytest.raises(InputError, match="expected non-negative shape odds"):
        MaskSpec(0, 0, 0)


def test_tumor_hole_closes_then_dilates_per_slice() -> None:
    tumor = np.zeros((3, 20, 20), bool)
    tumor[1, 5:9, 5:9] = True
    tumor[1, 5:9, 10:14] = True  # a 1-pixel gap at column 9 that closing bridges
    hole = tumor_hole(tumor)
    assert hole[tumor].all(), "the hole covers the tumour"
    assert hole[1, 6, 9], "closing bridges the gap"
    assert hole[1, 4, 5] and hole[1, 9, 13], "one 3×3 dilation grows the hole by one pixel"
    assert not hole[1, 3, 5], "but not by two"
    assert not hole[0].any() and not hole[2].any(), "slices stay independent"
    edge = np.zeros((10, 10), bool)
    edge[0:3, 0:3] = True
    assert tumor_hole(edge)[0:3, 0:3].all(), "no erosion at the border"
    with pytest.raises(InputError, match="positive odd closing kernel"):
        tumor_hole(tumor, closing=4)
