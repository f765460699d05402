"""Sliding-window inference over a multi-channel 3D image with Gaussian blending (numpy only).

Engine-agnostic: the predictor is any callable from a batch of patches ``(N, C, pz, py, px)``
to per-class scores ``(N, K, pz, py, px)`` — an ONNX Runtime or TensorRT runner at a site, a
torch model wrapped in training's validation. One implementation serves both, so validation
scores are the scores the bundle will produce.

Window positions follow nnU-Net (``compute_steps_for_sliding_window``): along each axis the
fewest windows whose step is at most ``(1 - overlap) · patch``, spread evenly from the first to
the last voxel. The Gaussian importance map follows MONAI (``compute_importance_map``): a
separable Gaussian with ``σ = sigma_scale · patch`` centred at ``(patch - 1) / 2`` (value 1 at
the centre, a little less at the middle voxels of an even size), clamped below at 1e-3 so
borders still count where only one window covers them. An image smaller than the patch is
padded symmetrically with ``pad_value`` and the output cropped back.
With the same window positions the result equals MONAI's ``sliding_window_inference`` in
gaussian mode to float32 rounding (tested).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from itertools import product

import numpy as np

from d4m.dicom_io.errors import EngineError, InputError

logger = logging.getLogger(__name__)

#: A predictor maps ``(N, C, pz, py, px)`` float32 patches to ``(N, K, pz, py, px)`` scores.
Predictor = Callable[[np.ndarray], np.ndarray]

#: Lower clamp of the Gaussian importance map (MONAI's value).
MIN_WEIGHT = 1e-3


class BlendMode(str, Enum):
    """How overlapping windows are averaged."""

    GAUSSIAN = "gaussian"
    CONSTANT = "constant"


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (nnU-Net's rule).

    Parameters
    ----------
    size
        Image size along the axis (≥ ``patch``).
    patch
        Window size along the axis.
    overlap
        Fraction of the window shared by neighbours, in ``[0, 1)``.

    Returns
    -------
    list[int]
        Sorted starts; the first is 0 and the last ``size - patch``.
    """
    if size <= patch:
        return [0]
    target_step = max(patch * (1.0 - overlap), 1.0)
    count = math.ceil((size - patch) / target_step) + 1
    actual_step = (size - patch) / (count - 1)
    return [int(round(actual_step * i)) for i in range(count)]


def importance_map(patch_size: Sequence[int], mode: BlendMode | str = BlendMode.GAUSSIAN,
                   sigma_scale: float = 0.125) -> np.ndarray:
    """Per-voxel weight of a window's prediction, shape ``patch_size``, float32, at most 1."""
    mode = BlendMode(mode)
    if mode is BlendMode.CONSTANT:
        return np.ones(tuple(patch_size), dtype=np.float32)
    weights = np.ones((), dtype=np.float64)
    for axis, size in enumerate(patch_size):
        sigma = size * sigma_scale
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        profile = np.exp(-(x**2) / (2.0 * sigma**2))
        weights = weights[..., None] * profile[(None,) * axis] if axis else profile
    weights = weights.astype(np.float32)
    return np.maximum(weights, max(float(weights.min()), MIN_WEIGHT)).astype(np.float32)


def window_slices(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> Iterator[tuple[slice, ...]]:
    """Every window of the grid as a tuple of spatial slices, in C order of the starts."""
    axes = [window_starts(s, p, overlap) for s, p in zip(shape, patch_size, strict=True)]
    for starts in product(*axes):
        yield tuple(slice(st, st + p) for st, p in zip(starts, patch_size, strict=True))


def sliding_window_inference(
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float,
    predictor: Predictor,
    batch_size: int = 1,
    mode: BlendMode | str = BlendMode.GAUSSIAN,
    sigma_scale: float = 0.125,
    pad_value: float = 0.0,
) -> np.ndarray:
    """Predict a whole image window by window and blend the windows.

    Parameters
    ----------
    image
        ``(C, z, y, x)`` input (already normalised).
    patch_size
        Window size ``(pz, py, px)``, the network's input size.
    overlap
        Fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
    predictor
        Maps ``(N, C, pz, py, px)`` float32 to ``(N, K, pz, py, px)`` scores (logits or
        probabilities; they are averaged as given).
    batch_size
        Windows per predictor call (the last call may hold fewer).
    mode
        ``gaussian`` (centre-weighted) or ``constant`` (plain average).
    sigma_scale
        Gaussian σ as a fraction of the window size.
    pad_value
        Fill value for an image smaller than the window (0 = the z-scored mean).

    Returns
    -------
    numpy.ndarray
        ``(K, z, y, x)`` float32 blended scores.

    Raises
    ------
    InputError
        Wrong dimensions, patch size or overlap.
    EngineError
        The predictor returned another shape than ``(N, K, pz, py, px)``.
    """
    if image.ndim != 4:
        raise InputError(f"sliding window: expected a (C, z, y, x) image, found shape {image.shape}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise InputError(f"sliding window: expected three positive patch sizes, found {tuple(patch_size)}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"sliding window: expected an overlap in [0, 1), found {overlap}")
    if batch_size < 1:
        raise InputError(f"sliding window: expected a batch size >= 1, found {batch_size}")

    spatial = image.shape[1:]
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch, strict=True)]
    padded = image.astype(np.float32, copy=False)
    if any(before or after for before, after in pads):
        padded = np.pad(padded, [(0, 0), *pads], mode="constant", constant_values=pad_value)
    shape = padded.shape[1:]

    weights = importance_map(patch, mode, sigma_scale)
    windows = list(window_slices(shape, patch, overlap))
    logger.debug("sliding window: %d windows of %s over %s", len(windows), patch, shape)
    scores: np.ndarray | None = None
    norm = np.zeros(shape, dtype=np.float32)
    for first in range(0, len(windows), batch_size):
        group = windows[first:first + batch_size]
        batch = np.stack([padded[(slice(None), *w)] for w in group])
        out = np.asarray(predictor(np.ascontiguousarray(batch)))
        if out.ndim != 5 or out.shape[0] != len(group) or out.shape[2:] != patch:
            raise EngineError(
                f"predictor: expected scores of shape ({len(group)}, K, {', '.join(map(str, patch))}), "
                f"found {out.shape}"
            )
        if scores is None:
            scores = np.zeros((out.shape[1], *shape), dtype=np.float32)
        for window, patch_scores in zip(group, out, strict=True):
            scores[(slice(None), *window)] += patch_scores.astype(np.float32, copy=False) * weights
            norm[window] += weights
    if scores is None:  # pragma: no cover - there is always at least one window
        raise InputError("sliding window: expected at least one window, found none")
    scores /= norm
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial, strict=True))
    return np.ascontiguousarray(scores[(slice(None), *crop)])
