"""The MCS autoencoder (``d4m-train autoencoder``): one 3D CT autoencoder shared by every phase.

The paper uses a VQGAN-style autoencoder (after DiffTumor) that maps a CT crop to a latent 4×
smaller per axis. It is trained on single-phase crops around the liver, from the tumour-free
(``normal``) images and the real images of all four phases, with an L1 loss, a patch
discriminator (least-squares GAN) and, optionally, a perceptual loss whose feature network is
read from a local file (nothing is downloaded). Intensities are clipped to an HU window and mapped
to [-1, 1] (DiffTumor: [-175, 250]).

The run folder holds ``model.safetensors``, ``config.json``, ``metrics.csv``, ``metrics.json``
(held-out reconstruction MAE in HU inside the liver) and ``resume.pt`` (optimizer state, step;
loaded with ``weights_only=True``). Training is deterministic for a seed: each step draws its
crops and noise from generators seeded by ``(seed, step)``, so a resumed run repeats exactly
what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import VQVAE, AutoencoderKL, PatchDiscriminator, resnet10
from torch import nn

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import read_image
from d4m.runtime.artifacts import write_json
from d4m.training.checkpoints import MetricsLog, load_resume, load_weights, save_resume, save_weights
from d4m.training.config import StageConfig
from d4m.training.datasets import Case, Dataset, load_dataset

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


class AutoencoderKind(str, Enum):
    """Autoencoder families: a VQ-GAN (the paper, via MONAI ``VQVAE``) or a KL autoencoder."""

    VQGAN = "vqgan"
    KL = "kl"


#: Field values of the named presets; ``AutoencoderConfig.preset(name)`` applies them.
AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # tests and the 2-core demo: tens of steps on 32³ crops
    "tiny": {"crop": (32, 32, 32), "batch_size": 2, "steps": 40, "channels": (8, 16), "res_layers": 1,
             "latent_channels": 4, "codebook_size": 256, "disc_channels": 8, "disc_layers": 2,
             "adversarial_start": 20, "learning_rate": 1e-3, "val_crops": 4, "checkpoint_every": 20},
    # a CPU run of minutes on 48³ crops
    "cpu": {"crop": (48, 48, 48), "batch_size": 2, "steps": 400, "channels": (16, 32), "res_layers": 1,
            "latent_channels": 4, "codebook_size": 512, "disc_channels": 16, "disc_layers": 2,
            "adversarial_start": 200, "learning_rate": 5e-4, "val_crops": 16, "checkpoint_every": 100},
    # DiffTumor-sized, for a GPU: 96³ crops, 8 latent channels, a 16384-code book
    "paper": {"crop": (96, 96, 96), "batch_size": 2, "steps": 100_000, "channels": (64, 128), "res_layers": 2,
              "latent_channels": 8, "codebook_size": 16384, "disc_channels": 64, "disc_layers": 3,
              "adversarial_start": 10_000, "learning_rate": 1e-4, "val_crops": 64, "checkpoint_every": 2000},
}

_SOURCES = ("images", "normal")


R = TypeVar("R", bound="TrainingRunConfig")


@dataclasses.dataclass(frozen=True)
class TrainingRunConfig(StageConfig):
    """The optimisation and run options that the autoencoder and LDM stages share, validated once.

    Subclasses set ``presets`` (name → field values) and may redeclare a field to change its default.

    Attributes
    ----------
    steps, batch_size, learning_rate
        Optimisation.
    val_fraction, val_crops
        Share of cases held out (at least one when there are two or more) and number of
        held-out crops for the validation figure.
    checkpoint_every
        Steps between checkpoints (weights, resume state, validation).
    cache_cases
        Cases kept in memory at once.
    seed
        Seed of every random draw.
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    steps: int = 40
    batch_size: int = 2
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    val_crops: int = 4
    checkpoint_every: int = 20
    cache_cases: int = 8
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_crops", "checkpoint_every", "cache_cases"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, found {getattr(self, name)}")
        if self.learning_rate <= 0 or not 0 <= self.val_fraction < 1:
            raise ValueError("learning_rate > 0 and val_fraction in [0, 1) expected")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, found {self.device}")

    @classmethod
    def from_preset(cls: type[R], name: str, **overrides: Any) -> R:
        """A config from a named preset (``tiny``, ``cpu``, ``paper``), with overrides."""
        if name not in cls.presets:
            raise InputError(f"{cls.stage} preset: expected one of {sorted(cls.presets)}, found '{name}'")
        return cls(**{**cls.presets[name], "preset": name, **overrides})


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(TrainingRunConfig):
    """Configuration of ``d4m-train autoencoder``.

    Attributes
    ----------
    data
        A d4m dataset of registered cases (``images`` and/or ``normal`` on the label grid).
    out
        The run folder.
    preset
        Name of the preset the values came from (informative).
    kind
        ``vqgan`` (the paper) or ``kl``.
    phases
        Phases whose crops are used (one shared network).
    sources
        Which images to crop: ``images`` (real), ``normal`` (tumour-free), or both.
    window
        HU window mapped to [-1, 1].
    crop
        Crop size ``(k, j, i)`` in voxels; multiples of 4.
    channels
        Channels per level; the last two levels halve the resolution (4× in all), earlier
        levels keep it (``vqgan``); ``kl`` takes exactly three levels.
    res_layers
        Residual blocks per level.
    latent_channels
        Channels of the latent.
    codebook_size
        VQ codebook entries (``vqgan``).
    l1_weight, adversarial_weight, perceptual_weight, regularization_weight
        Loss weights; the regularisation is the VQ commitment loss or the KL divergence.
    adversarial_start
        Step from which the discriminator trains and the adversarial term counts.
    disc_channels, disc_layers
        Patch discriminator width and depth.
    perceptual_weights
        Optional safetensors file with the weights of a MONAI 3D ResNet-10 (1 input channel,
        no classifier) used as a perceptual feature network; ``None`` disables the term.
    steps, batch_size, learning_rate, val_fraction, val_crops, checkpoint_every, cache_cases, seed, device
        See :class:`TrainingRunConfig` (the validation figure is the reconstruction MAE).
    """

    stage = "autoencoder"
    presets = AUTOENCODER_PRESETS

    data: Path = Path("data")
    out: Path = Path("runs/autoencoder")
    preset: str = "tiny"
    kind: AutoencoderKind = AutoencoderKind.VQGAN
    phases: tuple[Phase, ...] = PHASE_ORDER
    sources: tuple[str, ...] = _SOURCES
    window: tuple[float, float] = (-175.0, 250.0)
    crop: tuple[int, int, int] = (32, 32, 32)
    channels: tuple[int, ...] = (8, 16)
    res_layers: int = 1
    latent_channels: int = 4
    codebook_size: int = 256
    l1_weight: float = 1.0
    adversarial_weight: float = 0.01
    perceptual_weight: float = 0.001
    regularization_weight: float = 1.0
    adversarial_start: int = 20
    disc_channels: int = 8
    disc_layers: int = 2
    perceptual_weights: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", AutoencoderKind(self.kind))
        object.__setattr__(self, "phases", tuple(Phase(p) for p in self.phases))
        if not self.phases:
            raise ValueError("phases: expected at least one phase, found none")
        if not self.sources or set(self.sources) - set(_SOURCES):
            raise ValueError(f"sources: expected a non-empty subset of {list(_SOURCES)}, found {list(self.sources)}")
        if self.window[1] <= self.window[0]:
            raise ValueError(f"window: expected low < high, found {self.window}")
        if len(self.crop) != 3 or any(c < 8 or c % 4 for c in self.crop):
            raise ValueError(f"crop: expected three multiples of 4 (>= 8), found {self.crop}")
        if self.kind is AutoencoderKind.VQGAN and len(self.channels) < 2:
            raise ValueError(f"channels: expected >= 2 levels for a vqgan, found {self.channels}")
        if self.kind is AutoencoderKind.KL and len(self.channels) != 3:
            raise ValueError(f"channels: expected exactly 3 levels for a kl autoencoder, found {self.channels}")
        if self.kind is AutoencoderKind.KL and any(c % _groups(c) for c in self.channels):
            raise ValueError(f"channels: expected multiples of 8 for a kl autoencoder, found {self.channels}")
        for name in ("res_layers", "latent_channels", "codebook_size", "disc_channels", "disc_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, found {getattr(self, name)}")
        super().__post_init__()


def _groups(channels: int) -> int:
    return 8 if channels >= 8 else 1


def hu_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to the window and map it linearly to [-1, 1] (float32)."""
    low, high = window
    return ((np.clip(hu, low, high) - low) / (high - low) * 2.0 - 1.0).astype(np.float32)


def unit_to_hu(unit: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` (values outside [-1, 1] are clipped first)."""
    low, high = window
    return ((np.clip(unit, -1.0, 1.0) + 1.0) / 2.0 * (high - low) + low).astype(np.float32)


class CTAutoencoder(nn.Module):
    """A single-channel 3D autoencoder with a 4× smaller latent.

    ``encode`` gives the continuous latent the diffusion model works on (the VQ encoder output
    before quantisation, as DiffTumor does, or the KL mean); ``decode`` quantises (VQ) and decodes.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.kind = config.kind
        self.net: VQVAE | AutoencoderKL = _AUTOENCODERS[config.kind](config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], ``(B, 1, D, H, W)`` → latent ``(B, C, D/4, H/4, W/4)``."""
        if isinstance(self.net, VQVAE):
            return self.net.encode(x)
        mu, _ = self.net.encode(x)
        return mu

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent → image in (about) [-1, 1]."""
        if isinstance(self.net, VQVAE):
            quantized, _ = self.net.quantize(z)
            return self.net.decode(quantized)
        return self.net.decode(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and regularisation loss (VQ commitment or KL divergence)."""
        if isinstance(self.net, VQVAE):
            reconstruction, commitment = self.net(x)
            return reconstruction, commitment.mean()
        reconstruction, mu, sigma = self.net(x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1).sum(dim=(1, 2, 3, 4)).mean()
        return reconstruction, kl * 1e-6


def _build_vqgan(config: AutoencoderConfig) -> VQVAE:
    levels = len(config.channels)
    down = tuple((2, 4, 1, 1) if i >= levels - 2 else (1, 3, 1, 1) for i in range(levels))
    up = tuple((2, 4, 1, 1, 0) if i < 2 else (1, 3, 1, 1, 0) for i in range(levels))
    return VQVAE(
        spatial_dims=3, in_channels=1, out_channels=1, channels=config.channels, num_res_layers=config.res_layers,
        num_res_channels=config.channels, downsample_parameters=down, upsample_parameters=up,
        num_embeddings=config.codebook_size, embedding_dim=config.latent_channels, decay=0.9, ddp_sync=False,
    )


def _build_kl(config: AutoencoderConfig) -> AutoencoderKL:
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=(config.res_layers,) * 3,
        channels=config.channels, attention_levels=(False, False, False), latent_channels=config.latent_channels,
        norm_num_groups=_groups(min(config.channels)), with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


#: The explicit table that rebuilds a network from its config (no class-name lookup).
_AUTOENCODERS: dict[AutoencoderKind, Callable[[AutoencoderConfig], VQVAE | AutoencoderKL]] = {
    AutoencoderKind.VQGAN: _build_vqgan,
    AutoencoderKind.KL: _build_kl,
}


def build_discriminator(config: AutoencoderConfig) -> nn.Module:
    """The patch discriminator of the adversarial term."""
    return PatchDiscriminator(
        spatial_dims=3, channels=config.disc_channels, in_channels=1, num_layers_d=config.disc_layers
    )


class PerceptualFeatures(nn.Module):
    """Perceptual distance on the features of a local MONAI 3D ResNet-10 (LPIPS-style).

    Features are unit-normalised over channels, and the mean squared difference is averaged.
    The weights come from a safetensors file given by the user: nothing is downloaded.
    """

    def __init__(self, weights: Path) -> None:
        super().__init__()
        self.net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B")
        load_weights(self.net, weights)
        self.net.eval()
        for parameter in self.net.parameters():
            parameter.requires_grad = False

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def features(x: torch.Tensor) -> torch.Tensor:
            net = self.net
            x = net.maxpool(net.act(net.bn1(net.conv1(x))))
            x = net.layer2(net.layer1(x))
            return x / (x.norm(dim=1, keepdim=True) + 1e-8)

        return (features(prediction) - features(target)).pow(2).sum(dim=1).mean()


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: expected a CUDA GPU for device 'cuda', found none")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def step_generators(seed: int, step: int, stream: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """Numpy and torch generators for one training step, seeded by ``(seed, step, stream)``."""
    np_rng = np.random.default_rng([seed, step, stream])
    torch_seed = int(np_rng.integers(0, 2**62))
    torch.manual_seed(torch_seed)
    return np_rng, torch.Generator().manual_seed(torch_seed)


# -------------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class CaseVolumes:
    """One case read into memory: HU images per phase on the label grid, labels and liver indices.

    Attributes
    ----------
    id
        The case id.
    images, normal
        Real and tumour-free images per phase (float32 HU), where the dataset lists them.
    truth
        Per-phase label maps where the dataset lists them (the phantom's exact labels).
    label
        The label map on the PVP grid: 0 background, 1 liver, 2 tumour.
    spacing
        Voxel size in mm ``(x, y, z)``.
    """

    id: str
    images: dict[Phase, np.ndarray]
    normal: dict[Phase, np.ndarray]
    truth: dict[Phase, np.ndarray]
    label: np.ndarray
    spacing: tuple[float, float, float]

    liver_index: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    tumor_index: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "liver_index", np.flatnonzero(self.label > 0))
        object.__setattr__(self, "tumor_index", np.flatnonzero(self.label == 2))

    @property
    def liver(self) -> np.ndarray:
        """The liver including its tumours (bool)."""
        return self.label > 0

    @property
    def has_tumor(self) -> bool:
        """Whether the label holds a tumour (2)."""
        return bool(self.tumor_index.size)

    def random_liver_voxel(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A uniformly drawn voxel of the liver (a crop centred there always holds liver)."""
        return self._draw(self.liver_index, rng)

    def random_tumor_voxel(self, rng: np.random.Generator) -> tuple[int, int, int] | None:
        """A uniformly drawn tumour voxel, or ``None`` for a tumour-free case."""
        return self._draw(self.tumor_index, rng) if self.tumor_index.size else None

    def _draw(self, index: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
        flat = int(index[int(rng.integers(index.size))])
        k, j, i = np.unravel_index(flat, self.label.shape)
        return int(k), int(j), int(i)


def read_case(case: Case, phases: tuple[Phase, ...] = PHASE_ORDER) -> CaseVolumes:
    """Read a case's images, normal images, per-phase truths and label into memory.

    Raises
    ------
    InputError
        No label, a label without liver, or an image whose grid differs from the label's.
    """
    if case.label is None:
        raise InputError(f"case {case.id}: expected a label with the liver (1), found no label")
    label_volume = case.read_label()
    label = np.asarray(label_volume.array).astype(np.uint8)
    if not (label > 0).any():
        raise InputError(f"case {case.id}: expected a liver label (1) in {case.label.name}, found no liver voxel")

    def read(files: dict[Phase, Path], what: str, dtype: type) -> dict[Phase, np.ndarray]:
        arrays: dict[Phase, np.ndarray] = {}
        for phase in phases:
            if phase not in files:
                continue
            array: np.ndarray = np.asarray(read_image(files[phase]).array).astype(dtype)
            if array.shape != label.shape:
                raise InputError(
                    f"case {case.id}: expected the {phase.value} {what} on the label grid {label.shape}, "
                    f"found shape {array.shape} (register and resample the phases first)"
                )
            arrays[phase] = array
        return arrays

    spacing = tuple(float(s) for s in label_volume.spacing)
    return CaseVolumes(case.id, read(case.images, "image", np.float32), read(case.normal, "normal image", np.float32),
                       read(case.truth, "truth label", np.uint8), label, (spacing[0], spacing[1], spacing[2]))


class CaseStore:
    """Cases of a dataset read on demand, at most ``max_cases`` kept in memory (least recently used out)."""

    def __init__(self, dataset: Dataset, max_cases: int = 8, phases: tuple[Phase, ...] = PHASE_ORDER) -> None:
        self.dataset = dataset
        self.ids = [c.id for c in dataset.cases]
        self.max_cases = max_cases
        self.phases = phases
        self._cache: dict[str, CaseVolumes] = {}

    def get(self, case_id: str) -> CaseVolumes:
        """The case, read if not cached."""
        if case_id in self._cache:
            self._cache[case_id] = self._cache.pop(case_id)
            return self._cache[case_id]
        volumes = read_case(self.dataset.case(case_id), self.phases)
        self._cache[case_id] = volumes
        while len(self._cache) > self.max_cases:
            self._cache.pop(next(iter(self._cache)))
        return volumes


def crop_volume(volume: np.ndarray, centre: tuple[int, int, int], size: tuple[int, int, int],
                fill: float) -> np.ndarray:
    """The ``size`` crop whose centre voxel is ``centre``, padded with ``fill`` beyond the volume."""
    out = np.full(size, fill, dtype=volume.dtype)
    src, dst = [], []
    for c, s, n in zip(centre, size, volume.shape, strict=True):
        lo = c - s // 2
        a, b = max(lo, 0), min(lo + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def split_cases(ids: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Training and held-out case ids: the last ``ceil(fraction·n)`` of the sorted ids are held out.

    With a single case, it serves both (and a warning says so).
    """
    ordered = sorted(ids)
    if len(ordered) < 2:
        logger.warning("only %d case: the held-out metrics use the training case", len(ordered))
        return ordered, ordered
    held = min(max(1, int(np.ceil(fraction * len(ordered)))), len(ordered) - 1) if fraction > 0 else 0
    if held == 0:
        return ordered, ordered
    return ordered[:-held], ordered[-held:]


# --------------------------------------------------------------------------------------- runs


_RUN_FILES = ("model.safetensors", "config.json", "metrics.csv", "resume.pt")
#: Config fields that may change between a run and its resumption.
_RESUMABLE = {"steps", "out", "checkpoint_every", "cache_cases", "device", "ddim_steps"}


def open_run(config: StageConfig, out: Path) -> dict[str, Any] | None:
    """Prepare a run folder; return the resume state when ``out`` holds an unfinished run.

    Raises
    ------
    InputError
        ``out`` holds a run of another configuration (other than the step count).
    """
    config_file = out / "config.json"
    resume_file = out / "resume.pt"
    if config_file.exists():
        previous = type(config).load(config_file).to_dict()
        current = config.to_dict()
        changed = sorted(k for k in current if k not in _RESUMABLE and previous.get(k) != current[k])
        if changed:
            raise InputError(f"{config_file}: expected the same configuration to resume, found changes in {changed}")
    out.mkdir(parents=True, exist_ok=True)
    config.save(config_file)
    if resume_file.exists():
        state = load_resume(resume_file)
        logger.info("%s: resuming at step %d", out, int(state["step"]))
        return state
    return None


def write_checkpoint(out: Path, step: int, modules: dict[str, nn.Module], optimizers: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (the ``"model"`` module) and ``resume.pt`` (everything)."""
    save_weights(modules["model"], out / "model.safetensors", metadata={"step": str(step)})
    state: dict[str, Any] = {"step": step}
    for name, module in modules.items():
        state[f"module.{name}"] = module.state_dict()
    for name, optimizer in optimizers.items():
        state[f"optimizer.{name}"] = optimizer.state_dict()
    save_resume(out / "resume.pt", state)


def restore_checkpoint(state: dict[str, Any], modules: dict[str, nn.Module], optimizers: dict[str, Any]) -> int:
    """Load a :func:`write_checkpoint` state; returns the step it was written at."""
    for name, module in modules.items():
        module.load_state_dict(state[f"module.{name}"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state[f"optimizer.{name}"])
    return int(state["step"])


# ----------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class CropBatch:
    """Crops in [-1, 1] ``(B, 1, D, H, W)``, their liver masks ``(B, D, H, W)`` and HU originals."""

    images: torch.Tensor
    liver: torch.Tensor
    hu: np.ndarray


def sample_crops(store: CaseStore, case_ids: list[str], config: AutoencoderConfig, n: int,
                 rng: np.random.Generator) -> CropBatch:
    """``n`` single-phase crops centred on random liver voxels of random cases, phases and sources."""
    images, livers, hus = [], [], []
    for _ in range(n):
        case = store.get(case_ids[int(rng.integers(len(case_ids)))])
        choices = [(s, p) for s in config.sources for p in config.phases if p in getattr(case, s)]
        source, phase = choices[int(rng.integers(len(choices)))]
        centre = case.random_liver_voxel(rng)
        hu = crop_volume(getattr(case, source)[phase], centre, config.crop, fill=config.window[0])
        liver = crop_volume(case.liver, centre, config.crop, fill=0)
        images.append(hu_to_unit(hu, config.window))
        livers.append(liver)
        hus.append(hu)
    return CropBatch(torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(livers)), np.stack(hus))


def _usable_cases(store: CaseStore, config: AutoencoderConfig) -> list[str]:
    usable = []
    for case_id in store.ids:
        case = store.get(case_id)
        if any(p in getattr(case, s) for s in config.sources for p in config.phases):
            usable.append(case_id)
    if not usable:
        raise InputError(
            f"{config.data}: expected cases with {list(config.sources)} images of {[p.value for p in config.phases]}, "
            "found none"
        )
    return usable


def reconstruction_mae(model: CTAutoencoder, batch: CropBatch, window: tuple[float, float],
                       device: torch.device, chunk: int = 2) -> tuple[float, float]:
    """Mean absolute error in HU of the reconstructions: inside the liver, and over the whole crops.

    The reference is the crop clipped to the window (the autoencoder only sees the window). Crops
    go through the model ``chunk`` at a time: the VQ codebook distances of a whole validation set
    at once need tens of GiB (64 crops of 96³ against 16384 codes: 54 GiB).
    """
    model.eval()
    with torch.no_grad():
        parts = [model.decode(model.encode(images.to(device))).cpu() for images in batch.images.split(chunk)]
        reconstruction = torch.cat(parts).numpy()[:, 0]
    error = np.abs(unit_to_hu(reconstruction, window) - np.clip(batch.hu, *window))
    liver = batch.liver.numpy() > 0
    return float(error[liver].mean()), float(error.mean())


def train_autoencoder(config: AutoencoderConfig, progress: Progress | None = None) -> Path:
    """Train (or resume) the shared CT autoencoder; returns the run folder.

    Parameters
    ----------
    config
        The stage configuration; ``config.out`` receives the run files.
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
        Unreadable dataset, a case without a liver label, images off the label grid, or a run
        folder of another configuration.
    """
    out = config.out
    device = resolve_device(config.device)
    dataset = load_dataset(config.data)
    store = CaseStore(dataset, max_cases=config.cache_cases)
    train_ids, val_ids = split_cases(_usable_cases(store, config), config.val_fraction)
    logger.info("autoencoder: %d training and %d held-out cases", len(train_ids), len(val_ids))
    val_batch = sample_crops(store, val_ids, config, config.val_crops, np.random.default_rng([config.seed, 0, 99]))

    torch.manual_seed(config.seed)
    model = CTAutoencoder(config).to(device)
    discriminator = build_discriminator(config).to(device)
    perceptual = PerceptualFeatures(config.perceptual_weights).to(device) if config.perceptual_weights else None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.learning_rate)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    modules = {"model": model, "discriminator": discriminator}
    optimizers = {"model": optimizer, "discriminator": disc_optimizer}

    state = open_run(config, out)
    start = restore_checkpoint(state, modules, optimizers) if state else 0
    log = MetricsLog(out / "metrics.csv", ("step", "loss", "l1", "regularization", "generator", "discriminator",
                                             "perceptual", "val_mae_liver_hu", "val_mae_hu", "seconds"))
    log.truncate(start)
    if start >= config.steps:
        logger.info("%s: already trained for %d steps", out, start)
    began = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        rng, _ = step_generators(config.seed, step)
        batch = sample_crops(store, train_ids, config, config.batch_size, rng)
        x = batch.images.to(device)
        model.train()
        reconstruction, regularization = model(x)
        l1 = (reconstruction - x).abs().mean()
        loss = config.l1_weight * l1 + config.regularization_weight * regularization
        row: dict[str, float | int | str] = {"step": step, "l1": l1.item(), "regularization": regularization.item()}
        if perceptual is not None:
            term = perceptual(reconstruction, x)
            loss = loss + config.perceptual_weight * term
            row["perceptual"] = term.item()
        adversarial_on = step > config.adversarial_start
        if adversarial_on:
            logits = discriminator(reconstruction)[-1]
            generator_term = adversarial(logits, target_is_real=True, for_discriminator=False)
            loss = loss + config.adversarial_weight * generator_term
            row["generator"] = generator_term.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if adversarial_on:
            fake = adversarial(discriminator(reconstruction.detach())[-1], target_is_real=False, for_discriminator=True)
            real = adversarial(discriminator(x)[-1], target_is_real=True, for_discriminator=True)
            disc_loss = 0.5 * (fake + real)
            disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            disc_optimizer.step()
            row["discriminator"] = disc_loss.item()
        row["loss"] = loss.item()
        row["seconds"] = round(time.perf_counter() - began, 3)
        if step % config.checkpoint_every == 0 or step == config.steps:
            mae_liver, mae = reconstruction_mae(model, val_batch, config.window, device, config.batch_size)
            row.update(val_mae_liver_hu=mae_liver, val_mae_hu=mae)
            write_checkpoint(out, step, modules, optimizers)
        log.append(row)
        if progress is not None:
            progress(1)

    mae_liver, mae = reconstruction_mae(model, val_batch, config.window, device, config.batch_size)
    write_json(out / "metrics.json", {
        "schema_version": 1, "stage": "autoencoder", "steps": max(start, config.steps),
        "held_out_cases": len(val_ids), "held_out_crops": config.val_crops,
        "val_mae_liver_hu": round(mae_liver, 3), "val_mae_hu": round(mae, 3),
    })
    logger.info("autoencoder: held-out reconstruction MAE %.1f HU inside the liver (%.1f HU overall)", mae_liver, mae)
    return out


def load_autoencoder(run: Path, device: torch.device | str = "cpu") -> tuple[CTAutoencoder, AutoencoderConfig]:
    """Rebuild a trained autoencoder from its run folder (``config.json`` + ``model.safetensors``).

    Raises
    ------
    InputError
        Missing or mismatching files.
    """
    config = AutoencoderConfig.load(run / "config.json")
    model = CTAutoencoder(config)
    load_weights(model, run / "model.safetensors")
    return model.to(device).eval(), config
