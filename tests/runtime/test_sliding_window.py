"""Sliding window: nnU-Net window positions, MONAI Gaussian blending, agreement with MONAI."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from d4m.dicom_io.errors import EngineError, InputError
from d4m.runtime.sliding_window import importance_map, sliding_window_inference, window_starts

torch = pytest.importorskip("torch")
monai_inferers = pytest.importorskip("monai.inferers")
monai_data = pytest.importorskip("monai.data.utils")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(4, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 3, 3, padding=1),
    ).eval()


def _image(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal((4, *shape))
    return (np.stack([ndimage.gaussian_filter(c, 2) for c in noise]) * 5).astype(np.float32)


def _both(image: np.ndarray, patch: tuple[int, int, int], overlap: float) -> tuple[np.ndarray, np.ndarray]:
    net = _net()

    def predictor(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    ours = sliding_window_inference(image, patch, overlap, predictor, batch_size=3)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            torch.from_numpy(image)[None], patch, 2, net, overlap=overlap, mode="gaussian", sigma_scale=0.125
        )[0].numpy()
    return ours, theirs


def test_window_starts_follow_nnunet() -> None:
    assert window_starts(64, 32, 0.5) == [0, 16, 32]
    assert window_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68]  # 6 windows, step 13.6 ≤ 16
    assert window_starts(20, 32, 0.5) == [0]
    assert window_starts(33, 32, 0.0) == [0, 1]
    for size, patch, overlap in [(97, 24, 0.5), (200, 96, 0.25), (50, 49, 0.9)]:
        starts = window_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert max(np.diff(starts)) <= patch * (1 - overlap) + 1


def test_importance_map_matches_monai() -> None:
    for patch in [(16, 32, 32), (7, 9, 12)]:
        ours = importance_map(patch, "gaussian", 0.125)
        theirs = monai_data.compute_importance_map(patch, mode="gaussian", sigma_scale=0.125).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
        assert 0.9 < ours.max() <= 1.0 and ours.min() >= 1e-3
        centre = tuple(p // 2 for p in patch)
        assert ours[centre] == ours.max()


# Tolerance: where both place the windows at the same positions, the blended scores must match
# MONAI's to 1e-5 (float32 rounding) and the argmax on ≥ 99.9 % of voxels.
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((24, 32, 48), (12, 16, 16), 0.5),   # size = patch + n·step: [0, 6, 12], [0, 8, 16], [0, 8, …, 32]
     ((32, 48, 24), (16, 24, 24), 0.5),   # [0, 8, 16], [0, 12, 24], [0]
     ((10, 20, 40), (16, 32, 32), 0.5),   # smaller than the patch on two axes: padding
     ((60, 42, 24), (24, 24, 24), 0.25)],  # step 18: [0, 18, 36], [0, 18], [0]
)
def test_agrees_with_monai_where_windows_coincide(shape, patch, overlap) -> None:
    image = _image(shape)
    ours, theirs = _both(image, patch, overlap)
    assert ours.shape == theirs.shape == (3, *shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.999


def test_close_to_monai_where_windows_differ() -> None:
    # nnU-Net spreads the windows evenly, MONAI clamps its last one: positions differ, so only
    # the border effects of the zero-padded convolutions differ. Measured on this untrained net
    # (tiny class margins): argmax agreement ≈ 0.98; scores within 0.06 of score range ≈ 1.
    image = _image((40, 52, 47))
    ours, theirs = _both(image, (24, 32, 32), 0.5)
    assert np.abs(ours - theirs).max() < 0.1
    assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.95


def test_constant_mode_of_a_pointwise_predictor_is_exact() -> None:
    image = _image((30, 41, 37))
    weights = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)

    def pointwise(batch: np.ndarray) -> np.ndarray:
        return np.einsum("kc,nczyx->nkzyx", weights, batch)

    expected = np.einsum("kc,czyx->kzyx", weights, image)
    for mode in ("constant", "gaussian"):
        out = sliding_window_inference(image, (16, 16, 16), 0.5, pointwise, batch_size=4, mode=mode)
        np.testing.assert_allclose(out, expected, atol=1e-4)


def test_bad_inputs_and_predictor_shapes_are_refused() -> None:
    image = np.zeros((4, 8, 8, 8), np.float32)
    with pytest.raises(InputError, match="overlap"):
        sliding_window_inference(image, (8, 8, 8), 1.0, lambda b: b)
    with pytest.raises(InputError, match=r"\(C, z, y, x\)"):
        sliding_window_inference(image[0], (8, 8, 8), 0.5, lambda b: b)
    with pytest.raises(EngineError, match="expected scores of shape"):
        sliding_window_inference(image, (8, 8, 8), 0.5, lambda b: b[:, :, :4])
