"""Training data of the segmenter: case split, patch sampling, augmentation, phase dropout.

Every patch is a pure function of ``(seed, global sample index)``: which case it comes from,
where it is centred, how it is augmented and which phases are dropped. The loader is therefore
deterministic whatever the number of workers, resumes exactly after a kill (it restarts at a
step), and shards across DDP processes without a sampler (process ``r`` of ``W`` takes the
samples ``(step · W + r) · batch + b``).

Per sample, in order (HU until normalisation):

1. read the case (lazily; only the current case is kept unless ``cache``), resample to the
   target spacing (images linear, label nearest) — :mod:`d4m.runtime.preprocess`;
2. pick a centre on tumour / liver / anywhere (``sampling``), crop with air padding;
3. the synthesis hook (hybrid real/synthetic training), on a dict of HU patches per phase +
   ``"label"``;
4. window + z-score (the runtime's :func:`~d4m.runtime.preprocess.normalize`);
5. phase dropout: a random non-empty subset of phases is kept and the others are filled by
   :func:`~d4m.runtime.phases_fill.fill_missing_phases`, exactly as at inference;
6. MONAI augmentation: flips on every axis, 90° in-plane rotations, an optional small
   in-plane rotation, intensity scale / shift / noise.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from d4m.dicom_io.codes import LIVER, PHASE_ORDER, TUMOR, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image
from d4m.runtime.phases_fill import fill_missing_phases
from d4m.runtime.preprocess import (
    Interpolator,
    Normalization,
    compute_normalization,
    normalize,
    resample_like,
    resample_to_spacing,
)
from d4m.training.datasets import Case, Dataset
from d4m.training.segmenter import SegmenterConfig

logger = logging.getLogger(__name__)



class SampleTransform(Protocol):
    """A transform of one HU training sample (e.g. :class:`d4m.training.synthesis.OnlineSynthesis`).

    The sample holds ``(z, y, x)`` HU patches keyed by phase value (``"NC"``, ...), the
    ``"label"`` patch, ``"normal_<PHASE>"`` tumour-free patches when the case has them, and
    ``"spacing"`` ``(x, y, z)`` mm. ``rng`` is the sample's own generator: a transform that draws
    from it keeps the loader deterministic. Keys and shapes must come back unchanged.
    """

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]: ...

#: HU used to pad crops that leave the image (air).
AIR_HU = -1024.0

#: At most this many candidate centres are kept per class and case.
_MAX_CENTRES = 20000

SPLITS = ("train", "val", "test")


def split_cases(dataset: Dataset, fractions: Sequence[float], seed: int) -> dict[str, list[Case]]:
    """Split cases into train / val / test, deterministically from ``seed``.

    A case whose ``meta["split"]`` is ``train``, ``val`` or ``test`` goes there; the others
    are shuffled by id with ``seed`` and cut by ``fractions`` (rounded, the training part
    gets at least one case, validation one when there are three cases or more).

    Raises
    ------
    InputError
        A ``meta["split"]`` value other than the three names.
    """
    parts: dict[str, list[Case]] = {name: [] for name in SPLITS}
    free: list[Case] = []
    for case in dataset.cases:
        fixed = case.meta.get("split")
        if fixed is None:
            free.append(case)
        elif fixed in parts:
            parts[fixed].append(case)
        else:
            raise InputError(f"case {case.id}: expected meta split train, val or test, found {fixed!r}")
    free.sort(key=lambda c: c.id)
    order = np.random.default_rng(seed).permutation(len(free))
    shuffled = [free[i] for i in order]
    n = len(shuffled)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3 and fractions[1] > 0:
        n_val = max(n_val, 1)
    n_train = max(n - n_val - n_test, min(n, 1))
    n_val = min(n_val, n - n_train)
    parts["train"] += shuffled[:n_train]
    parts["val"] += shuffled[n_train:n_train + n_val]
    parts["test"] += shuffled[n_train + n_val:]
    return parts


def select_fraction(cases: Sequence[Case], fraction: float, seed: int) -> list[Case]:
    """A deterministic subset of ``ceil(fraction · n)`` cases (at least one)."""
    if fraction >= 1.0:
        return list(cases)
    count = max(1, math.ceil(fraction * len(cases)))
    order = np.random.default_rng(seed + 7919).permutation(len(cases))[:count]
    return [cases[i] for i in sorted(order)]


@dataclass
class CaseArrays:
    """One case on the training grid, in HU, with candidate patch centres.

    Attributes
    ----------
    image
        ``(4, z, y, x)`` float32 HU in :data:`PHASE_ORDER`, missing phases filled.
    label
        ``(z, y, x)`` uint8 label map.
    present
        Phases the case really has.
    centres
        ``{"tumor": (n, 3), "liver": (n, 3)}`` voxel indices usable as patch centres.
    normal
        ``(4, z, y, x)`` tumour-free HU images (missing phases filled), when loaded.
    """

    image: np.ndarray
    label: np.ndarray
    present: tuple[Phase, ...]
    centres: dict[str, np.ndarray] = field(default_factory=dict)
    normal: np.ndarray | None = None


def _on_label_grid(case: Case, phase: Phase, label: Volume, normal: bool = False) -> Volume:
    volume = read_image(case.normal[phase]) if normal else case.image(phase)
    if not volume.same_grid(label):
        logger.info("case %s: %s is not on the label grid; resampling it there", case.id, phase.value)
        volume = resample_like(volume, label, Interpolator.LINEAR, AIR_HU)
    return volume


def _phase_stack(volumes: dict[Phase, Volume], spacing: Sequence[float] | None) -> np.ndarray:
    if spacing is not None:
        volumes = {p: resample_to_spacing(v, spacing, Interpolator.LINEAR, AIR_HU) for p, v in volumes.items()}
    filled, _ = fill_missing_phases({p: v.array for p, v in volumes.items()})
    return np.stack([filled[p].astype(np.float32, copy=False) for p in PHASE_ORDER])


def load_case(case: Case, spacing: Sequence[float] | None, seed: int = 0, normal: bool = False) -> CaseArrays:
    """Read a case, put every phase on its label grid, resample to ``spacing``.

    Parameters
    ----------
    case
        A labelled case.
    spacing
        Target voxel size ``(x, y, z)`` mm (``None`` keeps the label grid).
    seed
        Seeds the subsampling of candidate centres.
    normal
        Also load the case's tumour-free images (for synthesis), when it has all of its phases'.

    Raises
    ------
    InputError
        The case has no label or no image.
    """
    label = case.read_label()
    present = tuple(p for p in PHASE_ORDER if p in case.images)
    image = _phase_stack({p: _on_label_grid(case, p, label) for p in present}, spacing)
    normal_image = None
    if normal and all(p in case.normal for p in present):
        normal_image = _phase_stack({p: _on_label_grid(case, p, label, normal=True) for p in present}, spacing)
    if spacing is not None:
        label = resample_to_spacing(label, spacing, Interpolator.NEAREST, 0)
    labels = label.array.astype(np.uint8)
    rng = np.random.default_rng([seed, 17])
    centres = {}
    for name, mask in (("tumor", labels == TUMOR.value), ("liver", labels == LIVER.value)):
        points = np.argwhere(mask)
        if len(points) > _MAX_CENTRES:
            points = points[np.sort(rng.choice(len(points), _MAX_CENTRES, replace=False))]
        centres[name] = points.astype(np.int32)
    return CaseArrays(image, labels, present, centres, normal_image)


def median_spacing(cases: Sequence[Case]) -> tuple[float, float, float]:
    """Median label-grid spacing ``(x, y, z)`` of the cases (nnU-Net's default target)."""
    if not cases:
        raise InputError("spacing: expected at least one training case, found none")
    spacings = np.array([case.read_label().spacing for case in cases])
    return tuple(round(float(s), 4) for s in np.median(spacings, axis=0))  # type: ignore[return-value]


def measure_normalization(cases: Sequence[Case], window: tuple[float, float]) -> Normalization:
    """z-score constants over the clipped liver + tumour voxels of every phase of ``cases``.

    Reads one phase at a time (nothing is kept), on the label grid.
    """

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for case in cases:
            label = case.read_label()
            mask = label.array > 0
            for phase in PHASE_ORDER:
                if phase in case.images:
                    yield _on_label_grid(case, phase, label).array, mask

    first, second = itertools.tee(pairs())  # zip() keeps them in step: one pair buffered at most
    return compute_normalization((v for v, _ in first), (m for _, m in second), window)


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """Crop ``size`` voxels from ``start`` over the last three axes, padding outside with ``fill``."""
    spatial = array.shape[-3:]
    out = np.full((*array.shape[:-3], *size), fill, dtype=array.dtype)
    src: list[slice] = []
    dst: list[slice] = []
    for begin, length, extent in zip(start, size, spatial, strict=True):
        lo, hi = max(begin, 0), min(begin + length, extent)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    target: tuple[Any, ...] = (Ellipsis, *dst)
    source: tuple[Any, ...] = (Ellipsis, *src)
    out[target] = array[source]
    return out


def patch_start(
    arrays: CaseArrays, patch: Sequence[int], sampling: Sequence[float], rng: np.random.Generator
) -> tuple[list[int], str]:
    """Draw the corner of a patch centred (± patch/4) on a tumour, liver or random voxel.

    Falls back from tumour to liver to random when a case has no such voxel.

    Returns
    -------
    start, kind
        Corner voxel index ``(z, y, x)`` (may lie outside the image) and the kind of centre.
    """
    kind = str(rng.choice(["tumor", "liver", "random"], p=np.asarray(sampling) / np.sum(sampling)))
    if kind == "tumor" and len(arrays.centres.get("tumor", ())) == 0:
        kind = "liver"
    if kind == "liver" and len(arrays.centres.get("liver", ())) == 0:
        kind = "random"
    spatial = arrays.label.shape
    if kind == "random":
        start = [int(rng.integers(0, max(s - p, 0) + 1)) - max(p - s, 0) // 2 for s, p in zip(spatial, patch,
                                                                                              strict=True)]
    else:
        points = arrays.centres[kind]
        centre = points[int(rng.integers(len(points)))]
        jitter = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in patch]
        start = [int(c) + j - p // 2 for c, j, p in zip(centre, jitter, patch, strict=True)]
    return start, kind


def drop_phases(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[Phase, ...]]:
    """Keep a random non-empty proper subset of the four phase channels; fill the rest.

    The subset is uniform over the 14 proper subsets; missing channels are filled with the
    inference rule of :func:`fill_missing_phases`.
    """
    subsets = [tuple(p for i, p in enumerate(PHASE_ORDER) if mask >> i & 1) for mask in range(1, 15)]
    keep = subsets[int(rng.integers(len(subsets)))]
    filled, _ = fill_missing_phases({p: image[PHASE_ORDER.index(p)] for p in keep})
    return np.stack([filled[p] for p in PHASE_ORDER]), keep


def build_augmentation(config: SegmenterConfig) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """MONAI dict transforms on ``{"image": (4, z, y, x), "label": (1, z, y, x)}`` (normalised).

    Flips on each axis, 90° rotations in the axial plane (when ``y == x``), an optional small
    in-plane rotation, intensity scale, shift and Gaussian noise (nnU-Net-like probabilities).
    """
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ("image", "label")
    transforms: list[Any] = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if config.patch_size[1] == config.patch_size[2]:
        transforms.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)))
    if config.rotate_degrees > 0:
        angle = math.radians(config.rotate_degrees)
        transforms.append(RandRotated(keys, range_z=angle, prob=0.2, mode=("bilinear", "nearest"),
                                      padding_mode="border", keep_size=True))
    transforms += [
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.15, std=0.1),
    ]
    return Compose(transforms, lazy=False)


class PatchDataset(TorchDataset):
    """Map-style dataset of training patches for one process (see the module docstring).

    Parameters
    ----------
    cases
        Training cases.
    config
        The run's config (patch size, sampling, dropout, augmentation, seed, ...).
    norm
        z-score constants.
    spacing
        Target spacing ``(x, y, z)`` mm (``None`` keeps each case's grid).
    synthesis
        Optional hook applied to the HU sample (hybrid real / synthetic training, online).
    shard
        ``(rank, world_size, first_step)``: this process's share, from which step.
    synthetic
        Offline synthetic cases: a group of ``patches_per_case`` samples comes from one of them
        with probability ``config.synthetic_ratio`` (hybrid training, offline).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        config: SegmenterConfig,
        norm: Normalization,
        spacing: Sequence[float] | None,
        synthesis: SampleTransform | None = None,
        shard: tuple[int, int, int] = (0, 1, 0),
        synthetic: Sequence[Case] = (),
    ) -> None:
        if not cases:
            raise InputError(f"{config.data}: expected at least one training case, found none")
        self.real = len(cases)
        self.cases = [*cases, *synthetic]
        self.config = config
        self.norm = norm
        self.spacing = None if spacing is None else tuple(spacing)
        self.synthesis = synthesis
        self.rank, self.world, self.first_step = shard
        self._loaded: dict[int, CaseArrays] = {}
        self._augment = build_augmentation(config)

    def __len__(self) -> int:
        return max(self.config.steps - self.first_step, 0) * self.config.batch_size

    def global_index(self, index: int) -> int:
        """The run-wide sample number of this process's ``index``-th sample."""
        step = self.first_step + index // self.config.batch_size
        return (step * self.world + self.rank) * self.config.batch_size + index % self.config.batch_size

    def case_index(self, sample: int) -> int:
        """Which case a run-wide sample comes from (``patches_per_case`` in a row share one).

        Indices from ``len(cases)`` on are the offline synthetic cases.
        """
        group = sample // self.config.patches_per_case
        rng = np.random.default_rng([self.config.seed, 1, group])
        synthetic = len(self.cases) - self.real
        if synthetic and rng.random() < self.config.synthetic_ratio:
            return self.real + int(rng.integers(synthetic))
        return int(rng.integers(self.real))

    def arrays(self, index: int) -> CaseArrays:
        """The loaded case ``index`` (kept in memory if ``cache``, else only the latest)."""
        if index not in self._loaded:
            if not self.config.cache:
                self._loaded.clear()
            self._loaded[index] = load_case(self.cases[index], self.spacing, self.config.seed,
                                            normal=self.synthesis is not None)
        return self._loaded[index]

    def sample(self, sample: int) -> dict[str, torch.Tensor]:
        """Build the run-wide sample ``sample``: ``image`` (C, z, y, x), ``label`` (1, z, y, x)."""
        config = self.config
        rng = np.random.default_rng([config.seed, 2, sample])
        arrays = self.arrays(self.case_index(sample))
        start, _ = patch_start(arrays, config.patch_size, config.sampling, rng)
        image = crop(arrays.image, start, config.patch_size, AIR_HU)
        label = crop(arrays.label, start, config.patch_size, 0)
        if self.synthesis is not None:
            item: dict[str, Any] = {p.value: image[i] for i, p in enumerate(PHASE_ORDER)}
            item["label"] = label
            if arrays.normal is not None:
                normal = crop(arrays.normal, start, config.patch_size, AIR_HU)
                item.update({f"normal_{p.value}": normal[i] for i, p in enumerate(PHASE_ORDER)})
            if self.spacing is not None:
                item["spacing"] = self.spacing
            item = self.synthesis(item, rng)
            image = np.stack([np.asarray(item[p.value], dtype=np.float32) for p in PHASE_ORDER])
            label = np.asarray(item["label"]).astype(np.uint8)
        image = normalize(image, self.norm)
        if config.phase_dropout > 0 and rng.random() < config.phase_dropout:
            image, _ = drop_phases(image, rng)
        order = [PHASE_ORDER.index(p) for p in config.phases]
        image = np.ascontiguousarray(image[order])
        self._augment.set_random_state(seed=int(rng.integers(2**31 - 1)))  # type: ignore[attr-defined]
        out = self._augment({"image": torch.from_numpy(image), "label": torch.from_numpy(label[None])})
        return {
            "image": _plain(out["image"]).to(torch.float32).contiguous(),
            "label": _plain(out["label"]).to(torch.int64).contiguous(),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(self.global_index(index))


def _plain(value: Any) -> torch.Tensor:
    """A plain tensor from a MONAI output (``MetaTensor``, tensor or array)."""
    tensor = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, torch.Tensor) else tensor
