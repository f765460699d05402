"""Phase volumes in, a label volume on the reference grid out: the steps around the network, once.

``d4m-infer run`` (:mod:`d4m.runtime.infer`) and the training-time evaluation
(:mod:`d4m.training.evaluation`) segment a study with this one function, so a model is scored in
training exactly as a site runs it:

1. fill missing phases, resample to the target spacing, window and z-score
   (:func:`~d4m.runtime.preprocess.prepare_input`);
2. the Gaussian-weighted sliding window on any predictor (an engine runner or a torch network);
3. argmax and the clean-up (largest liver component, tumours only inside it), then the labels
   back to the reference grid (nearest neighbour), as ``uint8``.

Each step can be timed by the caller through ``stage`` (``resample``, ``network`` with the
argmax, ``postprocess``). :func:`network_labels` and :func:`finish_labels` are the two halves of
:func:`segment_volumes`, for a caller that tries several clean-ups on one prediction. No torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.volume import Volume
from d4m.runtime.postprocess import PostprocessSettings, clean_labels, labels_from_scores
from d4m.runtime.preprocess import Interpolator, Normalization, prepare_input, resample_like
from d4m.runtime.sliding_window import BlendMode, Predictor, sliding_window_inference

logger = logging.getLogger(__name__)

#: Called with a step's name (``resample``, ``network``, ``postprocess``); returns the context that times it.
StageTimer = Callable[[str], AbstractContextManager[Any]]


def _untimed(_name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SegmentationSpec:
    """What a model needs around its network to segment a study.

    Attributes
    ----------
    norm
        Window and z-score constants.
    spacing
        Target voxel size ``(x, y, z)`` mm (``None`` = input grid).
    patch_size
        Sliding-window size ``(z, y, x)``.
    overlap
        Sliding-window overlap.
    order
        Channel order.
    postprocess
        Clean-up settings; ``None`` skips post-processing (plain argmax).
    batch_size
        Windows per predictor call (≥ 2 lets PyTorch's CPU convolutions use oneDNN: 4× faster
        per window than batch 1, measured on a 2-core machine).
    mode, sigma_scale
        Blending of the windows (Gaussian with this sigma, as a fraction of the patch, or constant).
    """

    norm: Normalization
    spacing: tuple[float, float, float] | None
    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    order: tuple[Phase, ...] = PHASE_ORDER
    postprocess: PostprocessSettings | None = dataclasses.field(default_factory=PostprocessSettings)
    batch_size: int = 4
    mode: BlendMode = BlendMode.GAUSSIAN
    sigma_scale: float = 0.125


def segment_volumes(
    volumes: Mapping[Phase, Volume],
    predictor: Predictor,
    spec: SegmentationSpec,
    *,
    reference: Volume | None = None,
    stage: StageTimer | None = None,
) -> tuple[Volume, dict[Phase, Phase]]:
    """Segment a study given as phase volumes on one grid; the labels come back on ``reference``'s grid.

    Parameters
    ----------
    volumes
        The present phases, on one grid (registered to the reference phase).
    predictor
        ``(N, C, z, y, x)`` float32 windows → ``(N, K, z, y, x)`` scores.
    spec
        Resampling, normalisation, window, blending and clean-up.
    reference
        The grid of the returned labels; ``None``: the first of ``volumes``.
    stage
        Times each step (module docstring); ``None`` times nothing.

    Returns
    -------
    labels, duplicated
        ``uint8`` label volume on the reference grid, and ``{missing phase: phase copied into it}``.

    Raises
    ------
    InputError
        No phase, or volumes the preprocessing refuses.
    EngineError
        The predictor failed or returned the wrong shape.
    """
    timed = stage or _untimed
    reference = reference if reference is not None else next(iter(volumes.values()))
    raw, duplicated = network_labels(volumes, predictor, spec, timed)
    with timed("postprocess"):
        return finish_labels(raw, spec.postprocess, reference), duplicated


def network_labels(
    volumes: Mapping[Phase, Volume],
    predictor: Predictor,
    spec: SegmentationSpec,
    stage: StageTimer | None = None,
) -> tuple[Volume, dict[Phase, Phase]]:
    """Steps 1–2 and the argmax: the network's plain labels on the model's grid (no clean-up).

    Returns
    -------
    labels, duplicated
        ``uint8`` label volume on the target grid, and ``{missing phase: phase copied into it}``.
    """
    timed = stage or _untimed
    with timed("resample"):
        prepared = prepare_input(volumes, spec.norm, spec.spacing, spec.order)
    grid, duplicated = prepared.grid, prepared.duplicated
    if duplicated:
        filled = ", ".join(f"{m.value} from {s.value}" for m, s in duplicated.items())
        logger.info("missing phases duplicated: %s", filled)
    with timed("network"):
        scores = sliding_window_inference(
            prepared.image, spec.patch_size, spec.overlap, predictor, batch_size=spec.batch_size,
            mode=spec.mode, sigma_scale=spec.sigma_scale, pad_value=spec.norm.background,
        )
        del prepared  # the network input is not needed any more (memory)
        labels = labels_from_scores(scores)
    return grid.with_array(labels), duplicated


def finish_labels(labels: Volume, settings: PostprocessSettings | None, reference: Volume) -> Volume:
    """Step 3 on :func:`network_labels`' output: clean-up (``None``: none), then onto ``reference``'s grid."""
    array = labels.array if settings is None else clean_labels(labels.array, settings)
    on_grid = labels.with_array(array)
    if not on_grid.same_grid(reference):
        on_grid = resample_like(on_grid, reference, Interpolator.NEAREST, 0)
    return on_grid.with_array(on_grid.array.astype(np.uint8, copy=False))


__all__ = ["SegmentationSpec", "StageTimer", "finish_labels", "network_labels", "segment_volumes"]
