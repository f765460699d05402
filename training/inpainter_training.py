"""Training the NCG inpainter: LaMa's losses, a slice bank of all phases, a resumable loop.

Losses follow LaMa (Suvorov et al. 2021):

* L1 between prediction and slice, weighted ``l1_known`` outside and ``l1_hole`` inside the hole;
* non-saturating adversarial loss with a patch discriminator; the discriminator treats the hole
  of a fake as fake and its known part as real (LaMa's ``mask_as_fake_target``), with an R1
  gradient penalty on real slices;
* feature matching between the discriminator's features of the prediction and of the slice;
* optionally a perceptual loss on the features of a ResNet read from a local safetensors file
  (LaMa uses an ADE20k ResNet-50; nothing is downloaded here).

:func:`train_inpainter` reads every phase of every labelled case, keeps a bounded number of
axial slices through the liver, draws training holes that avoid tumour voxels, and writes
``model.safetensors``, ``config.json``, ``metrics.csv`` and ``resume.pt`` into ``config.out``.
Every random choice of step ``s`` comes from ``numpy.random.default_rng([seed, s])`` and the
weights, optimizers and torch RNG are checkpointed, so a run killed after a checkpoint and
started again ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from torch import nn

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import D4MError, InputError
from d4m.dicom_io.volume import Volume, read_image
from d4m.training.checkpoints import MetricsLog, load_resume, load_weights, read_weights, save_resume, save_weights
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.inpainter import (
    FFCResNetGenerator,
    InpainterConfig,
    build_discriminator,
    build_inpainter,
    hu_to_unit,
    inpaint_volume,
)
from d4m.training.inpainting_masks import MaskSpec, training_mask, tumor_hole

logger = logging.getLogger(__name__)

#: ``progress(n)`` is called with the number of steps just completed (``rich`` ``advance``).
Progress = Callable[[int], None]

METRICS = ("step", "loss_g", "l1_known", "l1_hole", "adversarial", "feature_matching", "perceptual",
           "loss_d", "r1", "hole_mae_hu", "seconds")

#: Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "log_every", "device", "out", "data", "init"})

#: Fraction of training holes centred on tumour-free liver (the rest on any body tissue).
_LIVER_CENTRED = 0.75
_BODY_HU = -500.0


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------

def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, known: float, hole: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """LaMa's masked L1: mean absolute error weighted ``known`` outside and ``hole`` inside the hole.

    Returns
    -------
    tuple of torch.Tensor
        The weighted known-region and hole terms (each a mean over all pixels).
    """
    error = (pred - target).abs()
    return (error * (1 - mask)).mean() * known, (error * mask).mean() * hole


def _logit_mask(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.interpolate(mask, size=logits.shape[-2:], mode="area")


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))``, averaged over patches."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss; the known part of a fake counts as real (LaMa)."""
    hole = _logit_mask(mask, fake_logits)
    fake = hole * F.softplus(fake_logits) + (1 - hole) * F.softplus(-fake_logits)
    return F.softplus(-real_logits).mean() + fake.mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1: squared gradient norm of ``D`` at real slices, averaged over the batch (``real`` needs grad)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(dim=1).mean()


def feature_matching_loss(fake: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over discriminator layers of the MSE between fake and real features."""
    return torch.stack([F.mse_loss(f, r) for f, r in zip(fake, real, strict=True)]).mean()


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetFeatures(nn.Module):
    """The trunk of a bottleneck ResNet (ResNet-50/101/152) with torchvision's parameter names.

    ``forward`` returns the outputs of ``layer1`` … ``layer4``; the classifier is not built.

    Parameters
    ----------
    layers
        Bottleneck blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    """

    def __init__(self, layers: Sequence[int]) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise InputError(f"perceptual network: expected four stages of >= 1 blocks, found {tuple(layers)}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            stage = [_Bottleneck(inplanes, planes, stride, True)]
            inplanes = planes * 4
            stage += [_Bottleneck(inplanes, planes, 1, False) for _ in range(blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats.append(x)
        return feats


class PerceptualLoss(nn.Module):
    """MSE between ResNet features of prediction and target; weights from a local safetensors file.

    The file holds a torchvision-layout bottleneck ResNet state dict (``fc.*`` keys are ignored);
    the block counts are read from its keys. Slices in ``[-1, 1]`` are mapped to ``[0, 1]``,
    repeated to three channels and normalised with the ImageNet statistics.

    Raises
    ------
    InputError
        The file is missing, unreadable or not a bottleneck ResNet.
    """

    _MEAN = (0.485, 0.456, 0.406)
    _STD = (0.229, 0.224, 0.225)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, path: Path) -> None:
        super().__init__()
        tensors = read_weights(path)
        counts = []
        for stage in range(1, 5):
            blocks = {int(m.group(1)) for k in tensors if (m := re.match(rf"layer{stage}\.(\d+)\.conv3\.", k))}
            counts.append(len(blocks))
        if min(counts) < 1:
            raise InputError(f"{path}: expected a bottleneck ResNet state dict (layer1-4 with conv3), found {counts}")
        self.net = ResNetFeatures(counts)
        trunk = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
        own = self.net.state_dict()
        missing = sorted(set(own) - set(trunk))
        unexpected = sorted(set(trunk) - set(own))
        if missing or unexpected:
            raise InputError(f"{path}: expected a torchvision ResNet state dict, found missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.net.load_state_dict(trunk)
        self.net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self._MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """The feature network always stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def prepare(x: torch.Tensor) -> torch.Tensor:
            return ((x + 1) / 2).repeat(1, 3, 1, 1).sub(self.mean).div(self.std)

        feats_pred, feats_target = self.net(prepare(pred)), self.net(prepare(target))
        return torch.stack([F.mse_loss(p, t) for p, t in zip(feats_pred, feats_target, strict=True)]).sum()


# --------------------------------------------------------------------------------------------
# training data: a bank of windowed axial slices of every phase
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """One training batch: slices and holes ``(B, 1, S, S)``, one-hot phases ``(B, 4)``."""

    image: torch.Tensor
    mask: torch.Tensor
    phase: torch.Tensor


@dataclass(frozen=True)
class SliceBank:
    """Windowed axial slices (float16) with their tumour-free liver, body and forbidden masks."""

    images: tuple[np.ndarray, ...]
    liver: tuple[np.ndarray, ...]
    body: tuple[np.ndarray, ...]
    forbidden: tuple[np.ndarray, ...]
    phases: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, rng: np.random.Generator, batch_size: int, crop: int, spec: MaskSpec) -> Batch:
        """Random crops and training holes, entirely determined by ``rng``."""
        images = np.empty((batch_size, 1, crop, crop), np.float32)
        masks = np.empty_like(images)
        phases = np.zeros((batch_size, len(PHASE_ORDER)), np.float32)
        for row in range(batch_size):
            index = int(rng.integers(len(self)))
            corner = _window(self.images[index].shape, rng, crop, self.liver[index])
            image = _cut(self.images[index], corner, crop, -1.0)
            liver, body, forbidden = (_cut(a[index], corner, crop, 0) for a in (self.liver, self.body, self.forbidden))
            region = liver if (rng.random() < _LIVER_CENTRED and liver.any()) else body
            images[row, 0] = image
            masks[row, 0] = training_mask((crop, crop), rng, spec, region=region, forbidden=forbidden)
            phases[row, self.phases[index]] = 1.0
        return Batch(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(phases))


def _window(shape: tuple[int, int], rng: np.random.Generator, crop: int, liver: np.ndarray) -> tuple[int, int]:
    """Top-left corner of a crop centred near a liver pixel (anywhere without liver)."""
    height, width = shape
    if liver.any():
        points = np.argwhere(liver)
        centre = points[rng.integers(len(points))] + rng.integers(-crop // 4, crop // 4 + 1, size=2)
    else:
        centre = np.array([rng.integers(height), rng.integers(width)])
    top = int(np.clip(centre[0] - crop // 2, 0, max(height - crop, 0)))
    left = int(np.clip(centre[1] - crop // 2, 0, max(width - crop, 0)))
    return top, left


def _cut(array: np.ndarray, corner: tuple[int, int], crop: int, fill: float) -> np.ndarray:
    top, left = corner
    piece = array[top:top + crop, left:left + crop]
    if piece.shape != (crop, crop):
        padded = np.full((crop, crop), fill, dtype=array.dtype)
        padded[:piece.shape[0], :piece.shape[1]] = piece
        piece = padded
    return piece


def _read_label(case: Case, config: InpainterConfig) -> Volume | None:
    if case.label is None:
        if config.allow_unlabelled:
            return None
        raise InputError(
            f"case {case.id}: expected a label (1 liver, 2 tumour) to place training holes on tumour-free "
            f"tissue, found none (allow_unlabelled accepts tumour-free cohorts without labels)"
        )
    return case.read_label()


def _slice_indices(label: np.ndarray | None, depth: int, config: InpainterConfig) -> np.ndarray:
    low, high = 0, depth - 1
    if label is not None:
        organ = np.flatnonzero((label > 0).reshape(depth, -1).any(axis=1))
        if len(organ):
            low = max(int(organ.min()) - config.slice_margin, 0)
            high = min(int(organ.max()) + config.slice_margin, depth - 1)
    count = min(config.slices_per_volume, high - low + 1)
    return np.unique(np.rint(np.linspace(low, high, count)).astype(int))


def build_slice_bank(dataset: Dataset, config: InpainterConfig) -> SliceBank:
    """Windowed slices of every phase of every training case, with the masks that steer holes.

    Raises
    ------
    InputError
        Holdout ids not in the dataset, no training case left, a case without a label (unless
        ``allow_unlabelled``), or a phase image not on its label's grid.
    """
    ids = {c.id for c in dataset.cases}
    unknown = sorted(set(config.holdout) - ids)
    if unknown:
        raise InputError(f"{dataset.root}: expected holdout case ids from the dataset, found unknown {unknown}")
    cases = [c for c in dataset.cases if c.id not in config.holdout]
    if not cases:
        raise InputError(f"{dataset.root}: expected at least one training case outside the holdout, found none")
    images: list[np.ndarray] = []
    livers: list[np.ndarray] = []
    bodies: list[np.ndarray] = []
    forbiddens: list[np.ndarray] = []
    phases: list[int] = []
    for case in cases:
        label_volume = _read_label(case, config)
        label = None if label_volume is None else np.asarray(label_volume.array)
        forbidden = np.zeros(1, bool) if label is None else label == 2
        if label is not None and config.tumor_margin and forbidden.any():
            forbidden = ndimage.binary_dilation(forbidden, np.ones((3, 3, 3), bool), iterations=config.tumor_margin)
        for phase in PHASE_ORDER:
            if phase not in case.images:
                continue
            volume = case.image(phase)
            if label_volume is not None and not volume.same_grid(label_volume):
                raise InputError(
                    f"case {case.id} {phase.value} image: expected the label grid (shape {label_volume.shape}, "
                    f"spacing {label_volume.spacing}), found shape {volume.shape}, spacing {volume.spacing} "
                    f"(register and resample the phases to the label first)"
                )
            hu = np.asarray(volume.array)
            for k in _slice_indices(label, hu.shape[0], config):
                no_go = forbidden[k] if label is not None else np.zeros(hu.shape[1:], bool)
                images.append(hu_to_unit(hu[k], config.window).astype(np.float16))
                livers.append((label[k] == 1) & ~no_go if label is not None else np.zeros(hu.shape[1:], bool))
                bodies.append((hu[k] > _BODY_HU) & ~no_go)
                forbiddens.append(no_go)
                phases.append(PHASE_ORDER.index(phase))
    if not images:
        raise InputError(f"{dataset.root}: expected axial slices to train on, found none")
    megabytes = sum(a.nbytes * 2.5 for a in images) / 2**20
    logger.info("slice bank: %d slices from %d cases (%.0f MiB)", len(images), len(cases), megabytes)
    return SliceBank(tuple(images), tuple(livers), tuple(bodies), tuple(forbiddens), tuple(phases))


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything one training run updates."""

    config: InpainterConfig
    generator: FFCResNetGenerator
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    perceptual: PerceptualLoss | None
    device: torch.device


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("inpainter config: expected a CUDA GPU for device 'cuda', found none")
    return torch.device(name)


def _init_file(path: Path) -> Path:
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: expected a local inpainter checkpoint (model.safetensors), found nothing")
    return file


def _step(run: _Run, batch: Batch) -> dict[str, float]:
    """One generator and one discriminator update; returns the loss values."""
    config, gen, disc = run.config, run.generator, run.discriminator
    image, mask = batch.image.to(run.device), batch.mask.to(run.device)
    phase = batch.phase.to(run.device) if config.phase_channel else None
    pred = gen(image, mask, phase)

    disc.requires_grad_(False)
    fake_out = disc(pred)
    with torch.no_grad():
        real_feats = disc(image)[:-1]
    l1_known, l1_hole = masked_l1(pred, image, mask, config.l1_known, config.l1_hole)
    adversarial = generator_adversarial_loss(fake_out[-1]) * config.adversarial
    matching = feature_matching_loss(fake_out[:-1], real_feats) * config.feature_matching
    perceptual = run.perceptual(pred, image) * config.perceptual if run.perceptual is not None else pred.new_zeros(())
    loss_g = l1_known + l1_hole + adversarial + matching + perceptual
    run.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    run.opt_g.step()

    disc.requires_grad_(True)
    real = image.detach().requires_grad_(True)
    real_logits = disc(real)[-1]
    fake_logits = disc(pred.detach())[-1]
    r1 = r1_penalty(real_logits, real) if config.r1 > 0 else real_logits.new_zeros(())
    loss_d = discriminator_loss(real_logits, fake_logits, mask) + config.r1 * r1
    run.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    run.opt_d.step()

    with torch.no_grad():
        area = mask.sum().clamp_min(1.0)
        hole_mae = float(((pred - image).abs() * mask).sum() / area) * (config.window[1] - config.window[0]) / 2
    terms = {
        "loss_g": loss_g, "l1_known": l1_known, "l1_hole": l1_hole, "adversarial": adversarial,
        "feature_matching": matching, "perceptual": perceptual, "loss_d": loss_d, "r1": r1,
    }
    values = {k: float(v.detach()) for k, v in terms.items()}
    values["hole_mae_hu"] = hole_mae
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise D4MError(f"inpainter training: expected finite losses, found {bad}; lower the learning rates")
    return values


def _resume_state(run: _Run, step: int) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": step,
        "config": json.dumps(run.config.to_dict()),
        "generator": run.generator.state_dict(),
        "discriminator": run.discriminator.state_dict(),
        "opt_g": run.opt_g.state_dict(),
        "opt_d": run.opt_d.state_dict(),
        "torch_rng": torch.get_rng_state(),
        # numpy draws of step s come from default_rng([seed, s]): nothing else to keep
        "numpy_seed": [run.config.seed, step],
    }
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    return state


def _restore(run: _Run, path: Path) -> int:
    state = load_resume(path)
    try:
        saved = json.loads(state["config"])
        ours = run.config.to_dict()
        keys = (set(saved) | set(ours)) - _RESUMABLE_CHANGES
        changed = sorted(k for k in keys if saved.get(k) != ours.get(k))
        if changed:
            raise InputError(
                f"{path}: expected a resume file of the same training config, found other values of {changed} "
                f"(use a new output folder)"
            )
        run.generator.load_state_dict(state["generator"])
        run.discriminator.load_state_dict(state["discriminator"])
        run.opt_g.load_state_dict(state["opt_g"])
        run.opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["torch_rng"])
        if run.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], run.device)
        return int(state["step"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: expected a complete inpainter resume file, found {exc!r}") from exc


def _checkpoint(run: _Run, out: Path, step: int) -> None:
    save_weights(run.generator, out / "model.safetensors", {"stage": "inpainter", "step": str(step)})
    save_resume(out / "resume.pt", _resume_state(run, step))


def _prepare_out(config: InpainterConfig) -> Path:
    if config.data is None or config.out is None:
        raise InputError(f"inpainter config: expected data and out folders, found data={config.data}, out={config.out}")
    out = config.out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: expected an output folder, found a file")
    if out.is_dir() and not (out / "resume.pt").exists() and any(out.iterdir()):
        raise InputError(f"{out}: expected a new or empty output folder (or one holding resume.pt), found other files")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train_inpainter(config: InpainterConfig, progress: Progress | None = None) -> Path:
    """Train the NCG inpainter, or continue a run from ``config.out/resume.pt``.

    Parameters
    ----------
    config
        The stage config (``data`` and ``out`` set).
    progress
        Called with the number of steps just completed (first with the resumed step count).

    Returns
    -------
    pathlib.Path
        ``config.out``, holding ``model.safetensors``, ``config.json``, ``metrics.csv``, ``resume.pt``.

    Raises
    ------
    InputError
        A bad dataset (see :func:`build_slice_bank`), a missing ``init`` or perceptual weights file,
        an output folder holding another run, a resume file of another config.
    D4MError
        Losses that became infinite or NaN.
    """
    out = _prepare_out(config)
    device = _device(config.device)
    init = _init_file(config.init) if config.init is not None else None
    dataset = load_dataset(config.data)  # type: ignore[arg-type]
    bank = build_slice_bank(dataset, config)
    spec = MaskSpec(*config.mask_odds, max_fraction=config.max_hole_fraction)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        torch.manual_seed(config.seed)
        generator = build_inpainter(config).to(device).train()
        discriminator = build_discriminator(config).to(device).train()
        run = _Run(
            config, generator, discriminator,
            torch.optim.Adam(generator.parameters(), lr=config.lr_generator, betas=(0.9, 0.999)),
            torch.optim.Adam(discriminator.parameters(), lr=config.lr_discriminator, betas=(0.9, 0.999)),
            PerceptualLoss(config.perceptual_weights).to(device) if config.perceptual_weights else None,
            device,
        )
        metrics = MetricsLog(out / "metrics.csv", METRICS)
        start = 0
        if (out / "resume.pt").exists():
            start = _restore(run, out / "resume.pt")
            metrics.truncate(start)
            logger.info("%s: resuming at step %d of %d", out, start, config.steps)
        elif init is not None:
            load_weights(generator, init)
            logger.info("%s: generator initialised from %s", out, init)
        config.save(out / "config.json")
        if progress is not None and start:
            progress(min(start, config.steps))
        clock = time.perf_counter()
        for step in range(start, config.steps):
            batch = bank.sample(np.random.default_rng([config.seed, step]), config.batch_size, config.crop, spec)
            values = _step(run, batch)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                metrics.append({"step": done, **values, "seconds": round(time.perf_counter() - clock, 3)})
            if done % config.checkpoint_every == 0 or done == config.steps:
                _checkpoint(run, out, done)
            if progress is not None:
                progress(1)
        if start >= config.steps and not (out / "model.safetensors").exists():
            _checkpoint(run, out, start)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return out


# --------------------------------------------------------------------------------------------
# evaluation: hole MAE against tumour-free truth, and the median-filter baseline
# --------------------------------------------------------------------------------------------

def median_fill(image: np.ndarray, hole: np.ndarray, size: int = 7) -> np.ndarray:
    """Fill a 2D hole from the outside in with the median of the known pixels around each one.

    Each pass fills the hole pixels touching known ones with the median of the known pixels in
    a ``size``² window, until the hole is filled (the paper's median-filter inpainter, without
    letting the hole's own content into the median).

    Raises
    ------
    InputError
        Arrays that are not 2D of one shape, or an even or non-positive size.
    """
    if image.ndim != 2 or hole.shape != image.shape:
        raise InputError(f"median fill: expected a 2D image and hole of one shape, found {image.shape}, {hole.shape}")
    if size < 1 or size % 2 == 0:
        raise InputError(f"median fill: expected a positive odd window size, found {size}")
    out = np.asarray(image, np.float64).copy()
    todo = hole.astype(bool).copy()
    known = ~todo
    if not known.any():
        return out
    pad = size // 2
    ring = np.ones((3, 3), bool)
    while todo.any():
        front = todo & ndimage.binary_dilation(known, ring)
        padded = np.pad(np.where(known, out, np.nan), pad, constant_values=np.nan)
        windows = sliding_window_view(padded, (size, size))[front]
        out[front] = np.nanmedian(windows.reshape(len(windows), -1), axis=1)
        known |= front
        todo &= ~front
    return out


@dataclass(frozen=True)
class HoleScore:
    """Mean absolute error in HU inside the holes, against the tumour-free truth.

    Attributes
    ----------
    slices, voxels
        How many slices and hole voxels were scored.
    model
        MAE of the inpainter.
    median
        MAE of :func:`median_fill`.
    median_filter
        MAE of a plain ``scipy.ndimage.median_filter`` of the slice, read inside the hole.
    """

    slices: int
    voxels: int
    model: float
    median: float
    median_filter: float


def evaluate_tumor_holes(  # noqa: PLR0913 - evaluation knobs
    model: FFCResNetGenerator,
    config: InpainterConfig,
    dataset: Dataset,
    case_ids: Sequence[str],
    median_size: int = 7,
    phases: Sequence[Phase] = PHASE_ORDER,
) -> HoleScore:
    """Inpaint the paper's tumour holes of held-out cases and compare with their ``normal`` images.

    Raises
    ------
    InputError
        A case without label or ``normal`` images, or no tumour hole at all.
    """
    errors: dict[str, list[np.ndarray]] = {"model": [], "median": [], "median_filter": []}
    slices = 0
    for case_id in case_ids:
        case = dataset.case(case_id)
        label = case.read_label().array
        hole = tumor_hole(label == 2)
        for phase in phases:
            if phase not in case.images:
                continue
            if phase not in case.normal:
                raise InputError(f"case {case_id}: expected a tumour-free {phase.value} 'normal' image, found none")
            image = np.asarray(case.image(phase).array, np.float32)
            truth = np.asarray(read_normal(case, phase), np.float32)
            filled = inpaint_volume(model, image, hole, config.window, phase=phase)
            for k in np.flatnonzero(hole.reshape(len(hole), -1).any(axis=1)):
                h = hole[k]
                errors["model"].append(np.abs(filled[k][h] - truth[k][h]))
                errors["median"].append(np.abs(median_fill(image[k], h, median_size)[h] - truth[k][h]))
                plain = ndimage.median_filter(image[k], size=median_size)
                errors["median_filter"].append(np.abs(plain[h] - truth[k][h]))
                slices += 1
    if not slices:
        raise InputError(f"{dataset.root}: expected tumour holes in the evaluation cases {list(case_ids)}, found none")
    flat = {k: np.concatenate(v) for k, v in errors.items()}
    return HoleScore(slices, int(flat["model"].size), *(float(flat[k].mean()) for k in ("model", "median",
                                                                                        "median_filter")))


def read_normal(case: Case, phase: Phase) -> np.ndarray:
    """The tumour-free image of one phase (phantom truth)."""
    return read_image(case.normal[phase]).array
