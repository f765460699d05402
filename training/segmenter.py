"""The Multimodal Segmenter (MS): its configuration, presets and networks.

A 4-channel 3D U-shaped network (one channel per contrast phase, in :data:`PHASE_ORDER`)
with 3 outputs (background, liver, tumour), trained with Dice + 0.5·CE on random patches
(Diff4MMLiTS Sec. III-C, IV-B). The backbone is picked from an explicit table of MONAI
networks (DynUNet, nnU-Net-like, by default; U-Net, Attention U-Net, SegResNet and SwinUNETR
as in the paper's Table III); a saved ``config.json`` rebuilds the same network.

Axis conventions: ``patch_size`` is in array order ``(z, y, x)`` voxels; ``spacing`` is in
:class:`~d4m.dicom_io.volume.Volume` order ``(x, y, z)`` millimetres.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from d4m.dicom_io.codes import LABELS, PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.runtime.preprocess import PAPER_HU_WINDOW, Normalization
from d4m.runtime.sliding_window import Predictor
from d4m.training.config import StageConfig

logger = logging.getLogger(__name__)

#: Output classes: background + the labels of :data:`d4m.dicom_io.codes.LABELS`.
NUM_CLASSES = 1 + len(LABELS)


class Backbone(str, Enum):
    """Segmentation networks available to the MS stage."""

    DYNUNET = "dynunet"
    UNET = "unet"
    ATTENTION_UNET = "attention-unet"
    SEGRESNET = "segresnet"
    SWINUNETR = "swinunetr"


class OptimizerKind(str, Enum):
    """Optimizers: AdamW (small presets) or SGD with Nesterov momentum (nnU-Net's choice)."""

    ADAMW = "adamw"
    SGD = "sgd"


class Preset(str, Enum):
    """Named starting points: ``tiny`` (2-core demo), ``cpu`` (a day on a CPU), ``paper``."""

    CUSTOM = "custom"
    TINY = "tiny"
    CPU = "cpu"
    PAPER = "paper"


@dataclasses.dataclass(frozen=True)
class SegmenterConfig(StageConfig):
    """Everything that defines one segmenter training run (saved as ``OUT/config.json``).

    Attributes
    ----------
    data
        A d4m dataset folder: images registered to the PVP grid and a PVP label per case.
    out
        Output folder (``model.safetensors``, ``last.safetensors``, ``config.json``, ...).
    preset
        Which preset the values started from (recorded, not used).
    backbone
        Network family.
    filters
        Feature channels per resolution level (its length is the number of levels).
    phases
        Channel order of the input (recorded so export and runtime stack the same way).
    patch_size
        Training patch and inference window, ``(z, y, x)`` voxels.
    spacing
        Target voxel size ``(x, y, z)`` mm; ``None`` = the median spacing of the training
        cases, measured at the start of training and written into the saved config.
    hu_window
        HU clipping window before the z-score.
    norm_mean, norm_std
        z-score constants; ``None`` until measured on the training foreground, then written
        into the saved config (export reads them from there).
    dice_weight, ce_weight
        Loss = dice_weight · Dice + ce_weight · CE (the paper's γ = 0.5).
    optimizer, lr, weight_decay
        Optimizer; the learning rate decays polynomially (power 0.9) to 0 over ``steps``.
    warmup_steps
        Steps over which the learning rate ramps linearly up to the decayed ``lr`` (0 = none).
    steps
        Optimizer steps (iterations).
    batch_size
        Patches per step and process.
    val_every
        Steps between validations (sliding window on the validation cases); 0 = only at the end.
    overlap
        Sliding-window overlap for validation and inference.
    patches_per_case
        Consecutive patches drawn from one loaded case (amortises reading and resampling).
    sampling
        Fractions of patch centres drawn on tumour, on liver and anywhere.
    synthetic_ratio
        Probability that a training patch is synthetic: synthesized on the fly (``synthesizer``)
        or taken from an offline synthetic dataset (``synthetic_data``).
    synthesizer
        Synthesis config (``config.json`` of ``d4m-train synthesize``, or its folder) for the online route.
    synthetic_data
        A dataset written by ``d4m-train synthesize`` for the offline route; only its cases made
        from this run's training cases are used (``meta["source_case"]``).
    data_fraction
        Fraction of the training cases used (the paper's 10 % ... 100 % study).
    phase_dropout
        Probability that a training patch loses a random non-empty subset of phases, filled
        back with the inference rule (:func:`d4m.runtime.phases_fill.fill_missing_phases`).
    split
        Train / validation / test fractions over the cases (deterministic from ``seed``); a
        case's ``meta["split"]`` overrides it.
    rotate_degrees
        Maximum random in-plane rotation (0 = only flips and 90° rotations).
    cache
        Keep every loaded case in memory (default: only the current one).
    num_workers
        Data-loading worker processes.
    amp
        Mixed precision on CUDA (ignored on CPU).
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    seed
        Seeds the split, the patches, the augmentation and the initial weights.
    init
        Optional ``model.safetensors`` to start from (fine-tuning).
    """

    stage = "segmenter"

    data: Path = Path("data")
    out: Path = Path("runs/segmenter")
    preset: Preset = Preset.CUSTOM
    backbone: Backbone = Backbone.DYNUNET
    filters: tuple[int, ...] = (16, 32, 64, 128)
    phases: tuple[Phase, ...] = PHASE_ORDER
    patch_size: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] | None = None
    hu_window: tuple[float, float] = PAPER_HU_WINDOW
    norm_mean: float | None = None
    norm_std: float | None = None
    dice_weight: float = 1.0
    ce_weight: float = 0.5
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    lr: float = 3e-3
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    steps: int = 1000
    batch_size: int = 2
    val_every: int = 250
    overlap: float = 0.5
    patches_per_case: int = 4
    sampling: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    synthetic_ratio: float = 0.0
    synthesizer: Path | None = None
    synthetic_data: Path | None = None
    data_fraction: float = 1.0
    phase_dropout: float = 0.0
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    rotate_degrees: float = 0.0
    cache: bool = False
    num_workers: int = 0
    amp: bool = True
    device: str = "auto"
    seed: int = 0
    init: Path | None = None

    def __post_init__(self) -> None:
        for name in ("backbone", "optimizer", "preset"):
            kind = {"backbone": Backbone, "optimizer": OptimizerKind, "preset": Preset}[name]
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "phases", tuple(Phase(p) for p in self.phases))
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if sorted(self.phases) != sorted(PHASE_ORDER) or len(self.phases) != len(PHASE_ORDER):
            raise ValueError(f"phases must name each of NC, ART, PVP, DEL once, found {self.phases}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes (z, y, x), found {self.patch_size}")
        if len(self.filters) < 2 or min(self.filters) < 1:
            raise ValueError(f"filters must list at least two positive widths, found {self.filters}")
        divisor = self.size_divisor
        if any(p % divisor or p < 2 * divisor for p in self.patch_size):
            # instance norm needs at least 2 voxels per axis at the coarsest level
            raise ValueError(
                f"patch_size must be multiples of {divisor}, at least {2 * divisor}, for a "
                f"{len(self.filters)}-level {self.backbone.value}, found {self.patch_size}"
            )
        if self.backbone is Backbone.SWINUNETR and self.filters[0] % 12:
            raise ValueError(f"swinunetr needs filters[0] divisible by 12, found {self.filters[0]}")
        if self.backbone is Backbone.SEGRESNET and self.filters[0] % 8:
            raise ValueError(f"segresnet needs filters[0] divisible by 8 (group norm), found {self.filters[0]}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be three positive sizes (x, y, z) mm, found {self.spacing}")
        if (self.norm_mean is None) != (self.norm_std is None):
            raise ValueError("norm_mean and norm_std must be given together")
        if self.norm_mean is not None:
            Normalization(self.hu_window, self.norm_mean, self.norm_std)  # type: ignore[arg-type]
        elif not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must have low < high, found {self.hu_window}")
        _check_ranges(self)

    @property
    def size_divisor(self) -> int:
        """What every patch dimension must be a multiple of for this backbone and depth."""
        if self.backbone is Backbone.SWINUNETR:
            return 32
        return 2 ** (len(self.filters) - 1)

    @property
    def normalization(self) -> Normalization:
        """The z-score constants (only after they were measured).

        Raises
        ------
        ValueError
            ``norm_mean`` / ``norm_std`` are not set yet.
        """
        if self.norm_mean is None or self.norm_std is None:
            raise ValueError("normalization constants are not measured yet (norm_mean/norm_std unset)")
        return Normalization(self.hu_window, self.norm_mean, self.norm_std)


def _check_ranges(config: SegmenterConfig) -> None:
    positive = {"steps": config.steps, "batch_size": config.batch_size, "patches_per_case": config.patches_per_case,
                "lr": config.lr}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, found {value}")
    probabilities = {"synthetic_ratio": config.synthetic_ratio, "phase_dropout": config.phase_dropout}
    for name, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], found {value}")
    if not 0.0 < config.data_fraction <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1], found {config.data_fraction}")
    if not 0.0 <= config.overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), found {config.overlap}")
    if len(config.sampling) != 3 or min(config.sampling) < 0 or not math.isclose(sum(config.sampling), 1.0,
                                                                                  abs_tol=1e-6):
        raise ValueError(f"sampling must be three fractions (tumour, liver, random) summing to 1, "
                         f"found {config.sampling}")
    if len(config.split) != 3 or min(config.split) < 0 or config.split[0] <= 0 or not math.isclose(
            sum(config.split), 1.0, abs_tol=1e-6):
        raise ValueError(f"split must be three fractions (train, val, test) summing to 1, found {config.split}")
    if min(config.val_every, config.num_workers, config.weight_decay, config.rotate_degrees, config.warmup_steps) < 0:
        raise ValueError("val_every, num_workers, weight_decay, rotate_degrees and warmup_steps must be >= 0")
    if config.dice_weight < 0 or config.ce_weight < 0 or config.dice_weight + config.ce_weight == 0:
        raise ValueError(f"loss weights must be >= 0 and not both 0, found {config.dice_weight}, {config.ce_weight}")
    if config.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, found {config.device!r}")
    if config.synthetic_ratio > 0 and (config.synthesizer is None) == (config.synthetic_data is None):
        raise ValueError("synthetic_ratio > 0 needs either a synthesizer (online) or synthetic_data (offline), "
                         f"found {config.synthesizer} and {config.synthetic_data}")


_PRESETS: dict[Preset, dict[str, Any]] = {
    # Two CPU cores, a few minutes, on the small phantom cohort (native 2.8 × 2.8 × 5 mm grid).
    # 800 steps: 400 left the validation Dice still climbing; 32×48×48 patches: a step 2.2× faster
    # than 32×64×64 for 3 points less held-out tumour Dice (docs/results.md, "Post-processing chosen
    # on the validation cases").
    Preset.TINY: {
        "filters": (8, 16, 32, 64), "patch_size": (32, 48, 48), "spacing": None,
        "steps": 800, "batch_size": 2, "val_every": 200, "lr": 1e-2, "patches_per_case": 8,
        "optimizer": OptimizerKind.ADAMW, "cache": True,
    },
    # A CPU workstation over a day.
    Preset.CPU: {
        "filters": (16, 32, 64, 128, 192), "patch_size": (64, 96, 96), "spacing": (1.0, 1.0, 2.0),
        "steps": 20000, "batch_size": 2, "val_every": 1000, "lr": 2e-3, "rotate_degrees": 10.0,
        "optimizer": OptimizerKind.ADAMW,
    },
    # Diff4MMLiTS on a GPU: 96³ patches, nnU-Net-like DynUNet, SGD, 1000 epochs × 250 steps.
    Preset.PAPER: {
        "filters": (32, 64, 128, 256, 320, 320), "patch_size": (96, 96, 96), "spacing": None,
        "steps": 250_000, "batch_size": 2, "val_every": 5000, "lr": 1e-2, "weight_decay": 3e-5,
        "optimizer": OptimizerKind.SGD, "rotate_degrees": 15.0, "num_workers": 4,
    },
}


#: A preset's values that differ for one backbone. With the tiny preset's widths (8 filters at full resolution),
#: SegResNet (group norm, residual blocks) often never learnt the tumour class: in 0 of 2 runs at AdamW 1e-2,
#: 3 of 6 at 1e-3; neither a warm-up, leaky ReLU, batch Dice nor 1600 steps made it reliable. Twice the widths
#: did (docs/results.md, "SegResNet: width, not schedule").
_BACKBONE_PRESETS: dict[tuple[Preset, Backbone], dict[str, Any]] = {
    (Preset.TINY, Backbone.SEGRESNET): {"filters": (16, 32, 64, 128), "lr": 1e-3},
    # SwinUNETR: the feature size (filters[0]) a multiple of 12 and patches a multiple of 32, at least 64
    # (the encoder halves five times; instance norm needs 2 voxels at the bottom). Only filters[0] is used.
    # A transformer: its usual recipes warm AdamW up to 1e-4; 800 steps need more, so 1e-3 after 80 steps.
    (Preset.TINY, Backbone.SWINUNETR): {"filters": (12, 24, 48, 96), "patch_size": (64, 64, 64), "lr": 1e-3,
                                         "warmup_steps": 80},
    (Preset.CPU, Backbone.SWINUNETR): {"filters": (24, 48, 96, 192, 384)},
    (Preset.PAPER, Backbone.SWINUNETR): {"filters": (48, 96, 192, 384, 768)},
}


def segmenter_preset(preset: Preset | str, **overrides: Any) -> SegmenterConfig:
    """A config from a named preset, with some fields overridden (e.g. ``data``, ``out``).

    The preset's values for the chosen backbone (:data:`_BACKBONE_PRESETS`) come before the overrides.

    Raises
    ------
    ValueError
        Unknown preset or backbone, or invalid resulting values.
    """
    preset = Preset(preset)
    backbone = Backbone(overrides.get("backbone", Backbone.DYNUNET))
    values = {**_PRESETS.get(preset, {}), **_BACKBONE_PRESETS.get((preset, backbone), {}), "preset": preset,
              **overrides}
    return SegmenterConfig(**values)


def _dynunet(config: SegmenterConfig) -> nn.Module:
    from monai.networks.nets import DynUNet

    levels = len(config.filters)
    strides = [1] + [2] * (levels - 1)
    return DynUNet(
        spatial_dims=3, in_channels=len(config.phases), out_channels=NUM_CLASSES,
        kernel_size=[3] * levels, strides=strides, upsample_kernel_size=strides[1:],
        filters=list(config.filters), norm_name=("INSTANCE", {"affine": True}), res_block=False,
    )


def _unet(config: SegmenterConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3, in_channels=len(config.phases), out_channels=NUM_CLASSES,
        channels=config.filters, strides=(2,) * (len(config.filters) - 1), num_res_units=2, norm="INSTANCE",
    )


def _attention_unet(config: SegmenterConfig) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(
        spatial_dims=3, in_channels=len(config.phases), out_channels=NUM_CLASSES,
        channels=config.filters, strides=(2,) * (len(config.filters) - 1),
    )


def _segresnet(config: SegmenterConfig) -> nn.Module:
    from monai.networks.nets import SegResNet

    levels = len(config.filters)
    blocks_down = tuple([1, 2, 2, 4, 4, 4][:levels]) if levels <= 6 else (1,) + (2,) * (levels - 1)
    return SegResNet(
        spatial_dims=3, init_filters=config.filters[0], in_channels=len(config.phases),
        out_channels=NUM_CLASSES, blocks_down=blocks_down, blocks_up=(1,) * (levels - 1),
    )


def _swinunetr(config: SegmenterConfig) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=len(config.phases), out_channels=NUM_CLASSES, feature_size=config.filters[0], spatial_dims=3,
    )


#: Backbone → factory. The only way a saved config turns into a network.
NETWORKS: dict[Backbone, Callable[[SegmenterConfig], nn.Module]] = {
    Backbone.DYNUNET: _dynunet,
    Backbone.UNET: _unet,
    Backbone.ATTENTION_UNET: _attention_unet,
    Backbone.SEGRESNET: _segresnet,
    Backbone.SWINUNETR: _swinunetr,
}


def build_network(config: SegmenterConfig) -> nn.Module:
    """Build the segmentation network of a config (4 phase channels in, 3 classes out)."""
    network = NETWORKS[config.backbone](config)
    count = sum(p.numel() for p in network.parameters())
    logger.info("%s with filters %s: %.2f M parameters", config.backbone.value, config.filters, count / 1e6)
    return network


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is refused.

    Raises
    ------
    InputError
        ``cuda`` asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device: expected a CUDA GPU for '{name}', found none")
    return torch.device(name)


def memory_format(device: torch.device) -> torch.memory_format:
    """How the segmenter's tensors are laid out on ``device``.

    ``channels_last_3d`` on CPU, where oneDNN's 3D convolutions make a training step 1.15–1.5×
    faster in that layout and an inference window up to 1.15× (``bench/segmenter_step.py``); the
    default layout elsewhere (not measured on CUDA).
    """
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def torch_predictor(network: nn.Module, device: str | torch.device = "auto", amp: bool = True) -> Predictor:
    """Wrap a network as a numpy predictor for :func:`~d4m.runtime.sliding_window.sliding_window_inference`.

    The network is put in eval mode on ``device`` (in that device's :func:`memory_format`);
    each call runs without gradients (and under autocast on CUDA when ``amp``) and returns
    float32 logits.
    """
    target = device if isinstance(device, torch.device) else resolve_device(device)
    layout = memory_format(target)
    network = network.to(target, memory_format=layout).eval()
    autocast = amp and target.type == "cuda"

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cuda", enabled=autocast):
            logits = network(torch.from_numpy(batch).to(target).contiguous(memory_format=layout))
        return logits.float().cpu().numpy()

    return predict
