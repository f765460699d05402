"""The MCS latent diffusion model (``d4m-train ldm``): tumour inpainting in the autoencoder's latent.

ε-prediction with the paper's loss ``‖ε − εθ(z_t, y, t)‖²``. The condition ``y`` is concatenated to
the noisy latent: the latent of the masked CT (the tumour region blanked) and the tumour mask
downsampled to the latent grid, as an inpainting diffusion model (DiffTumor's design), so only the
tumour region has to be invented. Two modes, both trained and sampled by the same code:

* ``per-phase`` (the paper): one network for all phases, told the phase by a class embedding;
  each phase is sampled on its own with the same mask.
* ``joint`` (the paper's stated future work): the latents of all phases are stacked as channels
  and denoised together, so the tumour's appearance is consistent across phases.

Training uses DDPM noising; sampling uses DDIM with a configurable number of steps (MONAI
schedulers), anchored RePaint-style: after each step the latent voxels outside the mask are
reset to the (noised) masked-image latent. Without it, a briefly trained model drifted off the data
(sampled latents with 3× the data's spread, decoded tumours at the window's limits); with it the
chain stays on the known anatomy and only the tumour is generated.

Training crops are centred on tumour voxels of real cases; the mask of a phase is its exact
per-phase label when the dataset has one (``truth``), else the PVP tumour label dilated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from scipy import ndimage
from torch import nn

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import write_json
from d4m.training.autoencoder import (
    CaseStore,
    CaseVolumes,
    CTAutoencoder,
    TrainingRunConfig,
    crop_volume,
    hu_to_unit,
    load_autoencoder,
    open_run,
    resolve_device,
    restore_checkpoint,
    split_cases,
    step_generators,
    write_checkpoint,
)
from d4m.training.checkpoints import MetricsLog, load_weights
from d4m.training.datasets import load_dataset

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]

#: Spatial downsampling of the autoencoder (latent voxel = 4³ image voxels).
LATENT_FACTOR = 4


class LDMMode(str, Enum):
    """How the phases are synthesized."""

    PER_PHASE = "per-phase"
    JOINT = "joint"


LDM_PRESETS: dict[str, dict[str, Any]] = {
    # short CPU runs weight the tumour's latent voxels up: they are a few % of a crop
    "tiny": {"crop": (32, 32, 32), "batch_size": 2, "steps": 60, "channels": (16, 32), "res_blocks": 1,
             "learning_rate": 1e-3, "ddim_steps": 10, "val_crops": 4, "checkpoint_every": 30, "mask_weight": 10.0},
    "cpu": {"crop": (48, 48, 48), "batch_size": 2, "steps": 600, "channels": (32, 64), "res_blocks": 1,
            "learning_rate": 5e-4, "ddim_steps": 25, "val_crops": 8, "checkpoint_every": 150, "mask_weight": 10.0},
    # the paper's plain loss
    "paper": {"crop": (96, 96, 96), "batch_size": 4, "steps": 100_000, "channels": (64, 128, 256), "res_blocks": 2,
              "learning_rate": 1e-4, "ddim_steps": 50, "val_crops": 32, "checkpoint_every": 2000, "mask_weight": 1.0},
}


@dataclasses.dataclass(frozen=True)
class LDMConfig(TrainingRunConfig):
    """Configuration of ``d4m-train ldm``.

    Attributes
    ----------
    data
        A d4m dataset of registered cases with tumour labels.
    autoencoder
        The run folder of a trained autoencoder (frozen here).
    out
        The run folder.
    preset
        Name of the preset the values came from (informative).
    mode
        ``per-phase`` (the paper) or ``joint``.
    phases
        The phases, in channel order for ``joint``.
    crop
        Image crop size ``(k, j, i)``; multiples of 4·2^(levels-1).
    channels, res_blocks
        Denoising U-Net width per level and residual blocks per level.
    train_timesteps, schedule, beta_start, beta_end
        The DDPM noise schedule (MONAI names: ``linear_beta``, ``scaled_linear_beta``, ...).
    ddim_steps
        DDIM sampling steps used at synthesis time (and for the validation sample).
    mask_dilation
        Voxels the PVP tumour label is dilated by when a phase has no exact label (misaligned phases).
    mask_weight
        Loss weight of the latent voxels the tumour mask touches (1 = the paper's plain
        ``‖ε − εθ‖²``; larger values make short runs learn the tumour region sooner).
    steps, batch_size, learning_rate, val_fraction, val_crops, checkpoint_every, cache_cases, seed, device
        See :class:`~d4m.training.autoencoder.TrainingRunConfig` (the validation figure is the loss).
    """

    stage = "ldm"
    presets = LDM_PRESETS

    data: Path = Path("data")
    autoencoder: Path = Path("runs/autoencoder")
    out: Path = Path("runs/ldm")
    preset: str = "tiny"
    mode: LDMMode = LDMMode.PER_PHASE
    phases: tuple[Phase, ...] = PHASE_ORDER
    crop: tuple[int, int, int] = (32, 32, 32)
    channels: tuple[int, ...] = (16, 32)
    res_blocks: int = 1
    train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    ddim_steps: int = 10
    mask_dilation: int = 1
    mask_weight: float = 1.0
    steps: int = 60
    checkpoint_every: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", LDMMode(self.mode))
        object.__setattr__(self, "phases", tuple(Phase(p) for p in self.phases))
        if not self.phases or len(set(self.phases)) != len(self.phases):
            raise ValueError(f"phases: expected distinct phases, found {[p.value for p in self.phases]}")
        multiple = LATENT_FACTOR * 2 ** (len(self.channels) - 1)
        if len(self.crop) != 3 or any(c % multiple or c < multiple for c in self.crop):
            raise ValueError(f"crop: expected three multiples of {multiple}, found {self.crop}")
        if not self.channels or any(c % 8 for c in self.channels):
            raise ValueError(f"channels: expected multiples of 8, found {self.channels}")
        if self.schedule not in ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"):
            raise ValueError(f"schedule: expected a MONAI noise schedule name, found '{self.schedule}'")
        if not 1 <= self.ddim_steps <= self.train_timesteps:
            raise ValueError(f"ddim_steps: expected 1..{self.train_timesteps}, found {self.ddim_steps}")
        for name in ("res_blocks", "train_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, found {getattr(self, name)}")
        if self.mask_weight <= 0:
            raise ValueError(f"mask_weight: expected > 0, found {self.mask_weight}")
        if self.mask_dilation < 0:
            raise ValueError(f"mask_dilation: expected >= 0, found {self.mask_dilation}")
        super().__post_init__()


class LatentDenoiser(nn.Module):
    """εθ(z_t, y, t): a MONAI ``DiffusionModelUNet`` on ``[z_t, z_masked, mask]``.

    ``latent_scale`` (a buffer, saved with the weights) maps the autoencoder's latents to unit
    variance, as the latent diffusion paper does.
    """

    latent_scale: torch.Tensor

    def __init__(self, config: LDMConfig, latent_channels: int) -> None:
        super().__init__()
        self.mode = config.mode
        self.phases = config.phases
        self.latent_channels = latent_channels
        self.unet = _DENOISERS[config.mode](config, latent_channels)
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def target_channels(self) -> int:
        """Channels of z (one phase, or all phases stacked)."""
        per = self.latent_channels
        return per if self.mode is LDMMode.PER_PHASE else per * len(self.phases)

    def forward(self, z_t: torch.Tensor, z_masked: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor,
                phase_index: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for ``z_t``; ``phase_index`` (indices into ``PHASE_ORDER``) for ``per-phase``."""
        x = torch.cat([z_t, z_masked, mask], dim=1)
        if self.mode is LDMMode.PER_PHASE:
            if phase_index is None:
                raise InputError("ldm: expected the phase index of each sample in per-phase mode, found none")
            return self.unet(x, timesteps, class_labels=phase_index)
        return self.unet(x, timesteps)


def _unet(config: LDMConfig, in_channels: int, out_channels: int, class_embeds: int | None) -> nn.Module:
    return DiffusionModelUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=config.channels,
        num_res_blocks=config.res_blocks, attention_levels=(False,) * len(config.channels),
        norm_num_groups=8, num_class_embeds=class_embeds,
    )


def _build_per_phase(config: LDMConfig, latent: int) -> nn.Module:
    return _unet(config, 2 * latent + 1, latent, len(PHASE_ORDER))


def _build_joint(config: LDMConfig, latent: int) -> nn.Module:
    n = len(config.phases)
    return _unet(config, 2 * n * latent + 1, n * latent, None)


#: The explicit table that rebuilds a denoiser from its config (no class-name lookup).
_DENOISERS: dict[LDMMode, Callable[[LDMConfig, int], nn.Module]] = {
    LDMMode.PER_PHASE: _build_per_phase,
    LDMMode.JOINT: _build_joint,
}


def training_scheduler(config: LDMConfig) -> DDPMScheduler:
    """The DDPM scheduler that noises latents for training."""
    return DDPMScheduler(num_train_timesteps=config.train_timesteps, schedule=config.schedule,
                         beta_start=config.beta_start, beta_end=config.beta_end, clip_sample=False)


def sampling_scheduler(config: LDMConfig, steps: int | None = None) -> DDIMScheduler:
    """The DDIM scheduler for sampling, set to ``steps`` (default ``config.ddim_steps``)."""
    scheduler = DDIMScheduler(num_train_timesteps=config.train_timesteps, schedule=config.schedule,
                              beta_start=config.beta_start, beta_end=config.beta_end, clip_sample=False)
    scheduler.set_timesteps(steps or config.ddim_steps)
    return scheduler


# ------------------------------------------------------------------------------- conditioning


@dataclasses.dataclass(frozen=True)
class TumorBatch:
    """Training crops: images in [-1, 1] ``(B, P, D, H, W)``, masks alike (float 0/1), phase indices ``(B,)``.

    ``P`` is 1 in ``per-phase`` mode, the number of phases in ``joint`` mode.
    """

    images: torch.Tensor
    masks: torch.Tensor
    phase_index: torch.Tensor


def phase_mask(case: CaseVolumes, phase: Phase, dilation: int) -> np.ndarray:
    """The tumour mask of one phase: its exact label when known, else the PVP tumour dilated."""
    if phase in case.truth:
        return case.truth[phase] == 2
    tumor = case.label == 2
    return ndimage.binary_dilation(tumor, iterations=dilation) & (case.label > 0) if dilation else tumor


def _usable(case: CaseVolumes, config: LDMConfig) -> bool:
    present = [p for p in config.phases if p in case.images]
    if not case.has_tumor or not present:
        return False
    return config.mode is LDMMode.PER_PHASE or len(present) == len(config.phases)


def sample_tumor_crops(store: CaseStore, case_ids: list[str], config: LDMConfig, n: int,
                       rng: np.random.Generator, window: tuple[float, float]) -> TumorBatch:
    """``n`` crops centred on random tumour voxels, with the masks of their phases."""
    images, masks, phases = [], [], []
    for _ in range(n):
        case = store.get(case_ids[int(rng.integers(len(case_ids)))])
        centre = case.random_tumor_voxel(rng)
        if centre is None:  # not reached: case_ids hold only cases with tumours
            raise InputError(f"case {case.id}: expected a tumour label (2), found none")
        if config.mode is LDMMode.PER_PHASE:
            present = [p for p in config.phases if p in case.images]
            chosen = [present[int(rng.integers(len(present)))]]
            mask_list = [phase_mask(case, chosen[0], config.mask_dilation)]
        else:
            chosen = list(config.phases)
            union = np.logical_or.reduce([phase_mask(case, p, config.mask_dilation) for p in chosen])
            mask_list = [union] * len(chosen)
        images.append(np.stack([hu_to_unit(crop_volume(case.images[p], centre, config.crop, window[0]), window)
                                for p in chosen]))
        masks.append(np.stack([crop_volume(m, centre, config.crop, False) for m in mask_list]).astype(np.float32))
        phases.append(PHASE_ORDER.index(chosen[0]))
    return TumorBatch(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)),
                      torch.tensor(phases, dtype=torch.long))


def downsample_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` mask → the fraction of each latent voxel it covers."""
    return F.avg_pool3d(mask, kernel_size=LATENT_FACTOR)


@torch.no_grad()
def encode_phases(autoencoder: CTAutoencoder, images: torch.Tensor) -> torch.Tensor:
    """Encode ``(B, P, D, H, W)`` single-phase images → latents stacked per phase ``(B, P·C, d, h, w)``."""
    b, p = images.shape[:2]
    z = autoencoder.encode(images.reshape(b * p, 1, *images.shape[2:]))
    return z.reshape(b, p * z.shape[1], *z.shape[2:])


@torch.no_grad()
def condition(autoencoder: CTAutoencoder, images: torch.Tensor, masks: torch.Tensor,
              scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target latent, masked-image latent (both scaled) and latent-grid mask for a batch.

    The masked image keeps the crop outside the mask and sets the mask to 0 (mid-window), as
    DiffTumor does; the mask channel is the union over phases.
    """
    z0 = encode_phases(autoencoder, images) * scale
    masked = images * (1.0 - masks)
    zc = encode_phases(autoencoder, masked) * scale
    mask_latent = downsample_mask(masks.amax(dim=1, keepdim=True))
    return z0, zc, mask_latent


def ldm_loss(denoiser: LatentDenoiser, scheduler: DDPMScheduler, z0: torch.Tensor, z_masked: torch.Tensor,
             mask_latent: torch.Tensor, phase_index: torch.Tensor | None, generator: torch.Generator,
             mask_weight: float = 1.0) -> torch.Tensor:
    """The paper's loss ``‖ε − εθ(z_t, y, t)‖²`` for random timesteps and noise from ``generator``.

    With ``mask_weight`` ≠ 1 the squared error of latent voxels touched by the mask is weighted
    by it (normalised, so 1 gives exactly the mean squared error).
    """
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (z0.shape[0],), generator=generator).to(z0.device)
    z_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
    prediction = denoiser(z_t, z_masked, mask_latent, timesteps, phase_index)
    if mask_weight == 1.0:
        return F.mse_loss(prediction, noise)
    weight = 1.0 + (mask_weight - 1.0) * (mask_latent > 0).to(prediction.dtype)
    return ((prediction - noise).pow(2) * weight).mean() / weight.mean()


@torch.no_grad()
def sample_latent(denoiser: LatentDenoiser, scheduler: DDIMScheduler, z_masked: torch.Tensor,
                  mask_latent: torch.Tensor, phase_index: torch.Tensor | None,
                  generator: torch.Generator, anchor: bool = True) -> torch.Tensor:
    """DDIM sampling (η = 0, deterministic given ``generator``) of a scaled latent.

    With ``anchor`` (RePaint-style), after every step the latent voxels the mask does not touch
    are replaced by the masked-image latent noised to the same level, so the chain stays on
    known content outside the tumour and only the tumour region is generated.
    """
    shape = (z_masked.shape[0], denoiser.target_channels, *z_masked.shape[2:])
    z = torch.randn(shape, generator=generator).to(z_masked.device)
    known = (mask_latent == 0).expand(shape) if anchor else None
    stride = scheduler.num_train_timesteps // scheduler.num_inference_steps
    for t in scheduler.timesteps:
        timesteps = torch.full((shape[0],), int(t), dtype=torch.long, device=z.device)
        eps = denoiser(z, z_masked, mask_latent, timesteps, phase_index)
        z, _ = scheduler.step(eps, int(t), z)
        if known is not None:
            previous = int(t) - stride  # the level DDIM just stepped to
            target = z_masked
            if previous >= 0:
                noise = torch.randn(shape, generator=generator).to(z.device)
                target = scheduler.add_noise(z_masked, noise, torch.full_like(timesteps, previous))
            z = torch.where(known, target, z)
    return z


# ----------------------------------------------------------------------------------- training


def _latent_scale(autoencoder: CTAutoencoder, batch: TumorBatch, device: torch.device) -> torch.Tensor:
    z = encode_phases(autoencoder, batch.images.to(device))
    return 1.0 / z.flatten().std().clamp_min(1e-6)


def train_ldm(config: LDMConfig, progress: Progress | None = None) -> Path:
    """Train (or resume) the tumour-inpainting latent diffusion model; returns the run folder.

    Parameters
    ----------
    config
        The stage configuration; ``config.autoencoder`` must hold a trained autoencoder.
    progress
        Called with the number of steps done since the last call.

    Returns
    -------
    Path
        ``config.out``, holding ``model.safetensors``, ``config.json``, ``metrics.csv``,
        ``metrics.json`` and ``resume.pt``.

    Raises
    ------
    InputError
        No case with a tumour label (and, for ``joint``, all phases), a case without liver, an
        unusable autoencoder run, or a run folder of another configuration.
    """
    out = config.out
    device = resolve_device(config.device)
    autoencoder, ae_config = load_autoencoder(config.autoencoder, device)
    for parameter in autoencoder.parameters():
        parameter.requires_grad = False
    window = ae_config.window
    store = CaseStore(load_dataset(config.data), max_cases=config.cache_cases, phases=config.phases)
    usable = [i for i in store.ids if _usable(store.get(i), config)]
    if not usable:
        need = "all of " + ", ".join(p.value for p in config.phases) if config.mode is LDMMode.JOINT else "an image"
        raise InputError(f"{config.data}: expected cases with a tumour label (2) and {need}, found none")
    train_ids, val_ids = split_cases(usable, config.val_fraction)
    logger.info("ldm (%s): %d training and %d held-out cases", config.mode.value, len(train_ids), len(val_ids))

    torch.manual_seed(config.seed)
    denoiser = LatentDenoiser(config, ae_config.latent_channels).to(device)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.learning_rate)
    scheduler = training_scheduler(config)
    modules: dict[str, nn.Module] = {"model": denoiser}
    optimizers = {"model": optimizer}
    state = open_run(config, out)
    if state:
        start = restore_checkpoint(state, modules, optimizers)
    else:
        start = 0
        scale_batch = sample_tumor_crops(store, train_ids, config, max(4, config.batch_size),
                                         np.random.default_rng([config.seed, 0, 98]), window)
        denoiser.latent_scale.fill_(float(_latent_scale(autoencoder, scale_batch, device)))
    val_rng = np.random.default_rng([config.seed, 0, 99])
    val_batch = sample_tumor_crops(store, val_ids, config, config.val_crops, val_rng, window)
    val_condition = condition(autoencoder, val_batch.images.to(device), val_batch.masks.to(device),
                              denoiser.latent_scale)
    log = MetricsLog(out / "metrics.csv", ("step", "loss", "val_loss", "seconds"))
    log.truncate(start)
    began = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        rng, generator = step_generators(config.seed, step, stream=1)
        batch = sample_tumor_crops(store, train_ids, config, config.batch_size, rng, window)
        z0, zc, mask_latent = condition(autoencoder, batch.images.to(device), batch.masks.to(device),
                                        denoiser.latent_scale)
        denoiser.train()
        loss = ldm_loss(denoiser, scheduler, z0, zc, mask_latent, batch.phase_index.to(device), generator,
                        config.mask_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row: dict[str, float | int | str] = {"step": step, "loss": loss.item(),
                                             "seconds": round(time.perf_counter() - began, 3)}
        if step % config.checkpoint_every == 0 or step == config.steps:
            row["val_loss"] = _validation_loss(denoiser, scheduler, val_condition, val_batch, config)
            write_checkpoint(out, step, modules, optimizers)
        log.append(row)
        if progress is not None:
            progress(1)
    val_loss = _validation_loss(denoiser, scheduler, val_condition, val_batch, config)
    write_json(out / "metrics.json", {"schema_version": 1, "stage": "ldm", "mode": config.mode.value,
                                      "steps": max(start, config.steps), "held_out_cases": len(val_ids),
                                      "val_loss": round(val_loss, 5),
                                      "latent_scale": round(float(denoiser.latent_scale), 5)})
    logger.info("ldm: held-out noise-prediction loss %.4f", val_loss)
    return out


def _validation_loss(denoiser: LatentDenoiser, scheduler: DDPMScheduler,
                     conditioned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch: TumorBatch,
                     config: LDMConfig) -> float:
    """Held-out loss with fixed noise and timesteps (comparable across steps)."""
    denoiser.eval()
    z0, zc, mask_latent = conditioned
    with torch.no_grad():
        generator = torch.Generator().manual_seed(config.seed + 7)
        return float(ldm_loss(denoiser, scheduler, z0, zc, mask_latent, batch.phase_index.to(z0.device), generator,
                              config.mask_weight))


def load_ldm(run: Path, latent_channels: int, device: torch.device | str = "cpu") -> tuple[LatentDenoiser, LDMConfig]:
    """Rebuild a trained denoiser from its run folder (``config.json`` + ``model.safetensors``).

    Raises
    ------
    InputError
        Missing files, or weights that do not fit (another autoencoder's latent width).
    """
    config = LDMConfig.load(run / "config.json")
    denoiser = LatentDenoiser(config, latent_channels)
    load_weights(denoiser, run / "model.safetensors")
    return denoiser.to(device).eval(), config
