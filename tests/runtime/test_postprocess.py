"""Post-processing on constructed label maps, and per-tumour measurements."""

from __future__ import annotations

import numpy as np
import pytest

from d4m.dicom_io.errors import InputError
from d4m.runtime.postprocess import (
    PostprocessSettings,
    clean_labels,
    labels_from_scores,
    postprocess,
    tumor_components,
)


def _scene() -> np.ndarray:
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[2:18, 5:30, 5:30] = 1          # big liver
    labels[6:10, 10:14, 10:14] = 2        # tumour inside
    labels[8:12, 26:32, 12:16] = 2        # tumour on the liver border (overlaps it)
    labels[2:5, 34:38, 34:38] = 1         # small liver island (false positive)
    labels[14:17, 34:38, 2:5] = 2         # tumour outside the liver
    labels[10, 15:18, 15:18] = 0          # an enclosed hole
    return labels


def test_keeps_largest_liver_and_tumours_inside_it() -> None:
    labels = _scene()
    out = clean_labels(labels)
    assert out.dtype == np.uint8
    assert out[3, 35, 35] == 0, "liver island removed"
    assert out[15, 35, 3] == 0, "tumour outside the liver removed"
    assert out[8, 12, 12] == 2, "inner tumour kept"
    assert out[10, 31, 14] == 2, "tumour touching the liver kept whole"
    assert out[10, 16, 16] == 1, "enclosed hole filled with liver"
    assert labels[10, 16, 16] == 0, "input untouched"
    assert np.count_nonzero(out == 2) == 4 * 4 * 4 + 4 * 6 * 4


def test_settings_switch_steps_off_and_drop_small_tumours() -> None:
    labels = _scene()
    untouched = clean_labels(labels, PostprocessSettings(largest_liver=False, fill_holes=False, min_liver_contact=0))
    np.testing.assert_array_equal(untouched, labels)
    small = clean_labels(labels, PostprocessSettings(min_tumor_voxels=65))
    assert small[8, 12, 12] == 1, "the 64-voxel tumour becomes liver"
    assert small[10, 31, 14] == 2
    settings = PostprocessSettings(min_tumor_voxels=3)
    assert PostprocessSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(InputError, match="min_tumor_voxels"):
        PostprocessSettings(min_tumor_voxels=-1)


def test_tumours_hanging_off_the_liver_are_dropped() -> None:
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[2:18, 5:25, 5:25] = 1          # liver
    labels[6:10, 10:14, 10:14] = 2        # intrahepatic tumour: its whole border is liver
    labels[8:12, 22:28, 12:16] = 2        # exophytic tumour: half inside the liver
    labels[10, 25:31, 20] = 2             # a one-voxel bridge from the liver edge ...
    labels[8:13, 31:37, 17:23] = 2        # ... to a blob outside it (kidney, spine): 2 % liver border
    out = clean_labels(labels)
    assert out[8, 12, 12] == 2 and out[10, 24, 14] == 2 and out[10, 26, 14] == 2
    assert not (out[8:13, 31:37, 17:23] == 2).any() and out[10, 28, 20] == 0
    assert out[10, 20, 20] == 1, "the liver is untouched"
    kept = clean_labels(labels, PostprocessSettings(min_liver_contact=0.0))
    assert (kept[8:13, 31:37, 17:23] == 2).all()
    both = clean_labels(labels, PostprocessSettings(min_tumor_voxels=65))  # size and contact rules together
    assert both[8, 12, 12] == 1 and both[10, 26, 14] == 2 and not (both[8:13, 31:37, 17:23] == 2).any()
    strict = clean_labels(labels, PostprocessSettings(min_liver_contact=0.9))
    assert strict[8, 12, 12] == 2 and strict[10, 26, 14] == 0, "only the intrahepatic tumour is all liver"
    with pytest.raises(InputError, match="min_liver_contact"):
        PostprocessSettings(min_liver_contact=1.5)


def test_empty_and_all_background_maps() -> None:
    empty = np.zeros((4, 4, 4), np.uint8)
    np.testing.assert_array_equal(clean_labels(empty), empty)
    assert tumor_components(empty, (1.0, 1.0, 1.0)) == []


def test_scores_to_labels() -> None:
    scores = np.zeros((3, 8, 8, 8), np.float32)
    scores[0] = 1.0
    scores[1, 1:5, 1:5, 1:5] = 2.0
    scores[2, 2:4, 2:4, 2:4] = 3.0
    scores[2, 0, 0, 7] = 5.0  # an isolated tumour voxel outside the liver
    assert labels_from_scores(scores)[0, 0, 7] == 2
    out = postprocess(scores)
    assert out[0, 0, 7] == 0 and out[3, 3, 3] == 2 and out[1, 1, 1] == 1
    with pytest.raises(InputError, match=r"\(K, z, y, x\)"):
        labels_from_scores(scores[0])


def test_tumour_measurements_on_known_shapes() -> None:
    labels = np.zeros((30, 60, 60), np.uint8)
    labels[5:10, 10:20, 10:40] = 2       # box: 5 slices × 10 rows × 30 columns
    labels[20, 50, 50] = 2               # one voxel
    spacing = (0.5, 1.0, 2.0)            # (x, y, z) mm
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (10.0, 20.0, 30.0)
    box, dot = tumor_components(labels, spacing, affine)
    assert box.index == 1 and dot.index == 2
    assert box.voxels == 1500
    assert box.volume_ml == pytest.approx(1500 * 0.5 * 1.0 * 2.0 / 1000)
    # corner to corner between voxel centres: (29·0.5, 9·1, 4·2)
    assert box.longest_diameter_mm == pytest.approx(np.sqrt(14.5**2 + 9**2 + 8**2))
    assert box.longest_axial_diameter_mm == pytest.approx(np.sqrt(14.5**2 + 9**2))
    assert box.centroid_ijk == pytest.approx((24.5, 14.5, 7.0))
    assert box.centroid_lps == pytest.approx((10 + 24.5 * 0.5, 20 + 14.5, 30 + 14.0))
    assert dot.voxels == 1 and dot.longest_diameter_mm == 0.0 and dot.centroid_lps is not None
    assert box.to_dict()["volume_ml"] == 1.5


def test_sphere_diameter_uses_the_convex_hull_path() -> None:
    z, y, x = np.ogrid[:61, :61, :61]
    labels = (((z - 30) ** 2 + (y - 30) ** 2 + (x - 30) ** 2) <= 28**2).astype(np.uint8) * 2
    (sphere,) = tumor_components(labels, (1.0, 1.0, 1.0))
    assert sphere.longest_diameter_mm == pytest.approx(56.0, abs=0.5)
    assert sphere.volume_ml == pytest.approx(4 / 3 * np.pi * 28**3 / 1000, rel=0.02)
