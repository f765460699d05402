"""The Normal CT Generator's inpainter (paper III-A): a 2D FFC ResNet generator after LaMa.

Input: one axial CT slice windowed to ``[-1, 1]``, its hole mask (1 = to fill) and, if the config
asks for it, the phase as four one-hot planes. The slice is masked (``image * (1 - mask)``),
concatenated with the mask, downsampled by strided convolutions, passed through Fast Fourier
Convolution residual blocks and upsampled back; the output (``tanh``, same range as the input) is
used only inside the hole.

An FFC splits its channels into a *local* part (ordinary 3×3 convolutions) and a *global* part
whose :class:`SpectralTransform` works in the frequency domain: real 2D FFT, a 1×1 convolution on
the stacked real/imaginary parts, inverse FFT. One such layer sees the whole slice.

Two implementations of the 2D real DFT, interchangeable because neither has parameters:

* :class:`TorchFFT` — ``torch.fft.rfft2`` / ``irfft2`` (``norm="ortho"``), any input size; used
  for training and in PyTorch inference.
* :class:`MatmulDFT` — the same transform as matrix products with fixed cos/sin buffers built for
  one height × width. The TorchScript ONNX exporter has no FFT, and ONNX ``DFT`` was slower in
  ONNX Runtime (FIELD-NOTES), so :func:`swap_fft_for_export` returns a copy of a model whose
  Fourier units use matmuls, **for one static slice size**: export one ONNX file per slice size.

LaMa's local Fourier unit (LFU) is left out, as in LaMa's own big-lama configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator
from torch import nn

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.training.checkpoints import load_weights
from d4m.training.config import StageConfig

logger = logging.getLogger(__name__)

#: Number of one-hot phase planes appended to the input when ``phase_channel`` is set.
N_PHASES = len(PHASE_ORDER)

FFCPair = tuple[torch.Tensor | None, torch.Tensor | None]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

_PRESETS: dict[str, dict[str, object]] = {
    # the 2-core demo (``d4m-train all --preset tiny``): a few dozen steps, the plumbing more than the fill
    "tiny": {
        "channels": 8, "downsamplings": 2, "blocks": 1, "global_ratio": 0.75, "crop": 48,
        "batch_size": 4, "disc_channels": 8, "disc_layers": 2, "steps": 60,
        "checkpoint_every": 30, "log_every": 10, "slices_per_volume": 8,
    },
    # trains on two CPU cores in minutes: ~0.1 M generator parameters, 64 px crops
    "cpu": {
        "channels": 16, "downsamplings": 2, "blocks": 3, "global_ratio": 0.75, "crop": 64,
        "batch_size": 8, "disc_channels": 16, "disc_layers": 2, "steps": 1500,
        "checkpoint_every": 100, "log_every": 10, "slices_per_volume": 16,
    },
    # near LaMa-Fourier: 64 channels, 3 downsamplings, 9 FFC blocks, global ratio 0.75, 256 px
    "paper": {
        "channels": 64, "downsamplings": 3, "blocks": 9, "global_ratio": 0.75, "crop": 256,
        "batch_size": 10, "disc_channels": 64, "disc_layers": 3, "steps": 50_000,
        "checkpoint_every": 1000, "log_every": 50, "slices_per_volume": 48,
    },
}

_NORMS = ("batch", "instance")
_DEVICES = ("cpu", "cuda", "auto")


@dataclasses.dataclass(frozen=True)
class InpainterConfig(StageConfig):
    """Everything that defines an inpainter and its training run; saved as ``config.json``.

    Attributes
    ----------
    data
        Dataset folder (or ``dataset.json``) with the training cases.
    out
        Output folder: ``model.safetensors``, ``config.json``, ``metrics.csv``, ``resume.pt``.
    preset
        Name of the preset the values came from (informational).
    network
        Generator architecture, a key of :data:`NETWORKS`.
    channels
        Width of the first layer (LaMa: 64); doubled at each downsampling.
    downsamplings
        Strided convolutions before the FFC blocks (LaMa: 3); slices are padded to a multiple
        of ``2**downsamplings``.
    blocks
        FFC residual blocks (LaMa: 9 for LaMa-Fourier, 18 for big-lama).
    global_ratio
        Share of channels in the global (spectral) branch of the FFC blocks (LaMa: 0.75).
    max_channels
        Cap on the channel count.
    norm
        ``"batch"`` (LaMa) or ``"instance"``.
    phase_channel
        Give the phase to the generator as four one-hot input planes (chosen by measurement on
        the phantom cohort: lower hole MAE than without, most of all for NC and ART).
    window
        HU window mapped to ``[-1, 1]`` (values outside are clipped).
    crop
        Side of the square training crops (a multiple of ``2**downsamplings``).
    batch_size
        Crops per step.
    steps
        Optimisation steps in total (a resumed run stops at the same step).
    lr_generator, lr_discriminator
        Adam learning rates (LaMa: 1e-3 and 1e-4).
    l1_known, l1_hole
        L1 weights outside and inside the hole. LaMa uses 10 and 0 and relies on a pretrained
        segmentation network's perceptual loss for the hole; without such weights the hole needs
        its own L1 term.
    adversarial
        Weight of the non-saturating adversarial loss (LaMa: 10).
    r1
        Weight of the R1 gradient penalty on real slices (LaMa: 0.001).
    feature_matching
        Weight of the discriminator feature-matching loss (LaMa: 100).
    perceptual
        Weight of the optional perceptual loss (0 disables it).
    perceptual_weights
        Local safetensors file of a torchvision-layout ResNet (bottleneck blocks) for the
        perceptual loss; nothing is ever downloaded.
    disc_channels, disc_layers
        Width and depth of the patch discriminator.
    mask_odds
        Relative odds of strokes, boxes and tumour-like blobs as training holes.
    max_hole_fraction
        Largest share of a crop that a training hole may cover.
    tumor_margin
        Pixels by which tumour voxels (label 2) are dilated before they are excluded from
        training holes (covers the rough alignment of the non-PVP phases).
    slices_per_volume
        Axial slices kept per phase volume, evenly spread through the liver (bounds memory).
    slice_margin
        Slices above and below the liver that may also be sampled.
    holdout
        Case ids kept out of training (for evaluation).
    allow_unlabelled
        Accept cases without a label (tumour-free cohorts): holes are then placed on any tissue.
    init
        Local checkpoint (``model.safetensors`` or a folder holding one) to start from.
    seed
        Seed of every random choice: the same seed gives the same weights.
    checkpoint_every
        Steps between checkpoints (``model.safetensors`` + ``resume.pt``).
    log_every
        Steps between rows of ``metrics.csv``.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    stage: ClassVar[str] = "inpainter"

    data: Path | None = None
    out: Path | None = None
    preset: str = "cpu"
    network: str = "ffc_resnet"
    channels: int = 16
    downsamplings: int = 2
    blocks: int = 3
    global_ratio: float = 0.75
    max_channels: int = 1024
    norm: str = "batch"
    phase_channel: bool = True
    window: tuple[float, float] = (-160.0, 240.0)
    crop: int = 64
    batch_size: int = 8
    steps: int = 1500
    lr_generator: float = 1e-3
    lr_discriminator: float = 1e-4
    l1_known: float = 10.0
    l1_hole: float = 10.0
    adversarial: float = 10.0
    r1: float = 0.001
    feature_matching: float = 100.0
    perceptual: float = 0.0
    perceptual_weights: Path | None = None
    disc_channels: int = 16
    disc_layers: int = 2
    mask_odds: tuple[float, float, float] = (0.3, 0.2, 0.5)
    max_hole_fraction: float = 0.4
    tumor_margin: int = 3
    slices_per_volume: int = 16
    slice_margin: int = 2
    holdout: tuple[str, ...] = ()
    allow_unlabelled: bool = False
    init: Path | None = None
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "cpu"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> InputError:
            return InputError(f"inpainter config: expected {name} {expected}, found {getattr(self, name)!r}")

        if self.network not in NETWORKS:
            raise bad("network", f"one of {sorted(NETWORKS)}")
        if self.preset not in (*_PRESETS, "custom"):
            raise bad("preset", f"one of {[*_PRESETS, 'custom']}")
        for name in ("channels", "max_channels", "batch_size", "steps", "checkpoint_every", "log_every",
                     "disc_channels", "disc_layers", "slices_per_volume"):
            if int(getattr(self, name)) < 1:
                raise bad(name, ">= 1")
        for name in ("blocks", "slice_margin", "tumor_margin", "downsamplings"):
            if int(getattr(self, name)) < 0:
                raise bad(name, ">= 0")
        if self.downsamplings > 6:
            raise bad("downsamplings", "<= 6")
        if not 0.0 <= self.global_ratio < 1.0:
            raise bad("global_ratio", "in [0, 1)")
        if self.norm not in _NORMS:
            raise bad("norm", f"one of {list(_NORMS)}")
        if self.device not in _DEVICES:
            raise bad("device", f"one of {list(_DEVICES)}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise bad("window", "as (low, high) HU with low < high")
        multiple = 2**self.downsamplings
        if self.crop < 16 or self.crop % multiple:
            raise bad("crop", f">= 16 and a multiple of {multiple} (2**downsamplings)")
        if self.crop // 2**self.disc_layers < 3:
            raise bad("disc_layers", f"small enough that a {self.crop} px crop keeps >= 3 px (crop / 2**layers)")
        for name in ("lr_generator", "lr_discriminator"):
            if not getattr(self, name) > 0:
                raise bad(name, "> 0")
        for name in ("l1_known", "l1_hole", "adversarial", "r1", "feature_matching", "perceptual"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.l1_known + self.l1_hole + self.adversarial + self.perceptual == 0:
            raise bad("l1_known", "or another generator loss weight > 0")
        if self.perceptual > 0 and self.perceptual_weights is None:
            raise bad("perceptual_weights", "as a local weights file when perceptual > 0")
        if len(self.mask_odds) != 3 or min(self.mask_odds) < 0 or sum(self.mask_odds) <= 0:
            raise bad("mask_odds", "as three non-negative odds (strokes, boxes, blobs) with a positive sum")
        if not 0 < self.max_hole_fraction <= 1:
            raise bad("max_hole_fraction", "in (0, 1]")

    @property
    def input_channels(self) -> int:
        """Generator input planes: masked slice, mask and (optionally) one-hot phase."""
        return 2 + (N_PHASES if self.phase_channel else 0)

    @classmethod
    def from_preset(cls, name: str, **changes: object) -> InpainterConfig:
        """A config from a named preset (``"tiny"``, ``"cpu"`` or ``"paper"``) with some fields changed.

        Raises
        ------
        InputError
            An unknown preset name or an invalid value.
        """
        if name not in _PRESETS:
            raise InputError(f"inpainter preset: expected one of {sorted(_PRESETS)}, found {name!r}")
        values = {**_PRESETS[name], "preset": name, **changes}
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InputError(f"inpainter preset {name}: expected known config fields, found {exc}") from exc


# --------------------------------------------------------------------------------------------
# the 2D real DFT, two ways
# --------------------------------------------------------------------------------------------

class TorchFFT(nn.Module):
    """Orthonormal 2D real DFT with ``torch.fft`` (any size; not exportable by TorchScript ONNX)."""

    def rfft2(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of ``rfft2(x)`` over the last two axes, shape ``(..., H, W//2+1)``."""
        spectrum = torch.fft.rfft2(x, norm="ortho")
        return spectrum.real, spectrum.imag

    def irfft2(self, real: torch.Tensor, imag: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`rfft2` for an output of ``size`` = (H, W)."""
        return torch.fft.irfft2(torch.complex(real, imag), s=size, norm="ortho")


def _angles(rows: int, cols: int, period: int) -> np.ndarray:
    """``2π (r·c mod period) / period`` for every r < rows, c < cols, in float64."""
    product = np.outer(np.arange(rows), np.arange(cols)) % period
    return 2.0 * np.pi * product / period


class MatmulDFT(nn.Module):
    """The same transform as :class:`TorchFFT`, as matrix products for one fixed H × W.

    ``rfft2``: along W, ``x @ (C_W − i S_W)`` (W → W//2+1); along H, ``(C_H − i S_H) @ ·``.
    ``irfft2``: along H, ``(C_H + i S_H) @ ·``; along W, the Hermitian half-spectrum is summed
    with weights 1 (DC, Nyquist) or 2 (others) against cos/sin. Both are scaled by 1/√(HW)
    (``norm="ortho"``). The matrices are built in float64 and kept as non-persistent buffers,
    so state dicts are the same with either transform.

    Parameters
    ----------
    height, width
        The only input size this module accepts.
    """

    cos_h: torch.Tensor
    sin_h: torch.Tensor
    cos_w: torch.Tensor
    msin_w: torch.Tensor
    icos_w: torch.Tensor
    imsin_w: torch.Tensor

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        if height < 1 or width < 1:
            raise InputError(f"matmul DFT: expected a positive size, found {height}×{width}")
        self.height, self.width = height, width
        half = width // 2 + 1
        scale_h, scale_w = 1.0 / math.sqrt(height), 1.0 / math.sqrt(width)
        ang_h = _angles(height, height, height)
        ang_w = _angles(width, half, width)  # (W, W//2+1)
        weights = np.full(half, 2.0)
        weights[0] = 1.0
        if width % 2 == 0:
            weights[-1] = 1.0
        buffers = {
            "cos_h": np.cos(ang_h) * scale_h,
            "sin_h": np.sin(ang_h) * scale_h,
            "cos_w": np.cos(ang_w) * scale_w,
            "msin_w": -np.sin(ang_w) * scale_w,
            "icos_w": (np.cos(ang_w) * weights).T * scale_w,  # (W//2+1, W)
            "imsin_w": (-np.sin(ang_w) * weights).T * scale_w,
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.from_numpy(value.astype(np.float32)), persistent=False)

    def _check(self, size: tuple[int, int]) -> None:
        if tuple(size) != (self.height, self.width):
            raise InputError(
                f"matmul DFT: expected a {self.height}×{self.width} feature map (the size it was built for), "
                f"found {size[0]}×{size[1]}; rebuild it with swap_fft_for_export for this slice size"
            )

    def rfft2(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of the orthonormal ``rfft2(x)``."""
        self._check((int(x.shape[-2]), int(x.shape[-1])))
        a_re = torch.matmul(x, self.cos_w)
        a_im = torch.matmul(x, self.msin_w)
        real = torch.matmul(self.cos_h, a_re) + torch.matmul(self.sin_h, a_im)
        imag = torch.matmul(self.cos_h, a_im) - torch.matmul(self.sin_h, a_re)
        return real, imag

    def irfft2(self, real: torch.Tensor, imag: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`rfft2` (``size`` must be the built size)."""
        self._check(size)
        b_re = torch.matmul(self.cos_h, real) - torch.matmul(self.sin_h, imag)
        b_im = torch.matmul(self.cos_h, imag) + torch.matmul(self.sin_h, real)
        return torch.matmul(b_re, self.icos_w) + torch.matmul(b_im, self.imsin_w)


# --------------------------------------------------------------------------------------------
# Fast Fourier Convolution blocks
# --------------------------------------------------------------------------------------------

def _norm(kind: str, channels: int) -> nn.Module:
    if channels == 0:
        return nn.Identity()
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


class FourierUnit(nn.Module):
    """Real FFT → 1×1 conv (+ norm, ReLU) on stacked real/imaginary parts → inverse FFT."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels * 2, out_channels * 2, kernel_size=1, bias=False)
        self.norm = _norm(norm, out_channels * 2)
        self.act = nn.ReLU(inplace=True)
        self.dft: TorchFFT | MatmulDFT = TorchFFT()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        real, imag = self.dft.rfft2(x)
        # (B, C, H, W') -> (B, C, 2, H, W') -> (B, 2C, H, W'), real/imag interleaved per channel as in LaMa
        stacked = torch.stack((real, imag), dim=2).reshape(batch, channels * 2, height, real.shape[-1])
        stacked = self.act(self.norm(self.conv(stacked)))
        out_channels = stacked.shape[1] // 2
        stacked = stacked.reshape(batch, out_channels, 2, height, real.shape[-1])
        return self.dft.irfft2(stacked[:, :, 0], stacked[:, :, 1], (int(height), int(width)))


class SpectralTransform(nn.Module):
    """LaMa's global branch: 1×1 conv halves the channels, a Fourier unit, residual, 1×1 conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        hidden = max(out_channels // 2, 1)
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2) if stride == 2 else nn.Identity()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False), _norm(norm, hidden), nn.ReLU(inplace=True)
        )
        self.fourier = FourierUnit(hidden, hidden, norm)
        self.conv2 = nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.downsample(x))
        return self.conv2(x + self.fourier(x))


class FFC(nn.Module):
    """Fast Fourier Convolution: local↔local, local↔global convolutions and a global spectral path.

    Parameters
    ----------
    in_channels, out_channels
        Total channels (local + global) in and out.
    kernel_size, stride, padding
        Of the spatial convolutions (reflect padding, as LaMa).
    ratio_in, ratio_out
        Global share of the input and output channels.
    norm
        Normalisation inside the spectral transform.
    """

    def __init__(  # noqa: PLR0913 - mirrors Conv2d's signature plus the two ratios
        self, in_channels: int, out_channels: int, kernel_size: int, ratio_in: float, ratio_out: float,
        stride: int = 1, padding: int = 0, norm: str = "batch",
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise InputError(f"FFC: expected stride 1 or 2, found {stride}")
        self.in_global = int(in_channels * ratio_in)
        self.in_local = in_channels - self.in_global
        self.out_global = int(out_channels * ratio_out)
        self.out_local = out_channels - self.out_global

        def conv(cin: int, cout: int) -> nn.Module | None:
            if cin == 0 or cout == 0:
                return None
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False, padding_mode="reflect")

        self.l2l = conv(self.in_local, self.out_local)
        self.l2g = conv(self.in_local, self.out_global)
        self.g2l = conv(self.in_global, self.out_local)
        self.g2g = (
            SpectralTransform(self.in_global, self.out_global, stride, norm)
            if self.in_global and self.out_global else None
        )

    def forward(self, x: FFCPair) -> FFCPair:
        x_local, x_global = x
        out_local = out_global = None
        if self.out_local:
            parts = [m(t) for m, t in ((self.l2l, x_local), (self.g2l, x_global)) if m is not None and t is not None]
            out_local = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if self.out_global:
            parts = [m(t) for m, t in ((self.l2g, x_local), (self.g2g, x_global)) if m is not None and t is not None]
            out_global = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return out_local, out_global


class FFCNormAct(nn.Module):
    """An :class:`FFC` followed by normalisation and activation on each branch."""

    def __init__(  # noqa: PLR0913 - FFC's parameters plus the activation
        self, in_channels: int, out_channels: int, kernel_size: int, ratio_in: float, ratio_out: float,
        stride: int = 1, padding: int = 0, norm: str = "batch",
    ) -> None:
        super().__init__()
        self.ffc = FFC(in_channels, out_channels, kernel_size, ratio_in, ratio_out, stride, padding, norm)
        self.norm_local = _norm(norm, self.ffc.out_local)
        self.norm_global = _norm(norm, self.ffc.out_global)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: FFCPair) -> FFCPair:
        x_local, x_global = self.ffc(x)
        if x_local is not None:
            x_local = self.act(self.norm_local(x_local))
        if x_global is not None:
            x_global = self.act(self.norm_global(x_global))
        return x_local, x_global


class FFCResnetBlock(nn.Module):
    """Two 3×3 FFC layers with a residual connection on both branches (shape-preserving)."""

    def __init__(self, channels: int, ratio: float, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = FFCNormAct(channels, channels, 3, ratio, ratio, padding=1, norm=norm)
        self.conv2 = FFCNormAct(channels, channels, 3, ratio, ratio, padding=1, norm=norm)

    def forward(self, x: FFCPair) -> FFCPair:
        y_local, y_global = self.conv2(self.conv1(x))
        x_local, x_global = x
        out_local = y_local if x_local is None or y_local is None else x_local + y_local
        out_global = y_global if x_global is None or y_global is None else x_global + y_global
        return out_local, out_global


class FFCResNetGenerator(nn.Module):
    """LaMa's FFC ResNet generator for one-channel CT slices.

    ``forward(image, mask, phase)`` returns the raw prediction for the whole slice; use
    :meth:`inpaint` (or ``mask * pred + (1 - mask) * image``) to keep the known pixels.
    Any slice size works: it is padded (replicate) to a multiple of ``2**downsamplings`` and
    the output is cropped back.
    """

    def __init__(self, config: InpainterConfig) -> None:
        super().__init__()
        self.phase_channel = config.phase_channel
        self.multiple = 2**config.downsamplings
        ngf, cap, norm = config.channels, config.max_channels, config.norm
        self.head = nn.Sequential(nn.ReflectionPad2d(3))
        self.stem = FFCNormAct(config.input_channels, ngf, 7, 0.0, 0.0, norm=norm)
        down = []
        for i in range(config.downsamplings):
            ratio_out = config.global_ratio if i == config.downsamplings - 1 else 0.0
            down.append(FFCNormAct(min(cap, ngf * 2**i), min(cap, ngf * 2 ** (i + 1)), 3, 0.0, ratio_out,
                                   stride=2, padding=1, norm=norm))
        self.down = nn.ModuleList(down)
        width = min(cap, ngf * 2**config.downsamplings)
        ratio = config.global_ratio if config.downsamplings else 0.0
        self.blocks = nn.ModuleList(FFCResnetBlock(width, ratio, norm) for _ in range(config.blocks))
        up: list[nn.Module] = []
        for i in range(config.downsamplings):
            cin = min(cap, ngf * 2 ** (config.downsamplings - i))
            cout = min(cap, ngf * 2 ** (config.downsamplings - i - 1))
            up += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1),
                   _norm(norm, cout), nn.ReLU(inplace=True)]
        self.up = nn.Sequential(*up)
        self.tail = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, 1, kernel_size=7), nn.Tanh())

    def _inputs(self, image: torch.Tensor, mask: torch.Tensor, phase: torch.Tensor | None) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != 1 or mask.shape != image.shape:
            raise InputError(
                f"inpainter: expected image and mask of shape (N, 1, H, W), found {tuple(image.shape)} "
                f"and {tuple(mask.shape)}"
            )
        parts = [image * (1 - mask), mask]
        if self.phase_channel:
            if phase is None or phase.shape != (image.shape[0], N_PHASES):
                found = None if phase is None else tuple(phase.shape)
                raise InputError(f"inpainter: expected a one-hot phase of shape (N, {N_PHASES}), found {found}")
            parts.append(phase[:, :, None, None].expand(-1, -1, image.shape[2], image.shape[3]))
        return torch.cat(parts, dim=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        x = self._inputs(image, mask, phase)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        pair: FFCPair = self.stem((self.head(x), None))
        for layer in self.down:
            pair = layer(pair)
        for block in self.blocks:
            pair = block(pair)
        feats = torch.cat([t for t in pair if t is not None], dim=1)
        out = self.tail(self.up(feats))
        return out[:, :, :height, :width]

    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction inside the hole, the input outside it."""
        return mask * self(image, mask, phase) + (1 - mask) * image


#: Generator architectures by config name (never looked up by class name).
NETWORKS: dict[str, type[FFCResNetGenerator]] = {"ffc_resnet": FFCResNetGenerator}


def build_inpainter(config: InpainterConfig) -> FFCResNetGenerator:
    """The generator described by ``config`` (fresh weights)."""
    return NETWORKS[config.network](config)


def build_discriminator(config: InpainterConfig) -> PatchDiscriminator:
    """MONAI's 2D patch discriminator; its forward returns the features, the logits last."""
    return PatchDiscriminator(
        spatial_dims=2, channels=config.disc_channels, in_channels=1, out_channels=1,
        num_layers_d=config.disc_layers, norm="BATCH" if config.norm == "batch" else "INSTANCE",
    )


def load_inpainter(folder: Path) -> tuple[FFCResNetGenerator, InpainterConfig]:
    """Rebuild a trained inpainter from ``folder/config.json`` and ``folder/model.safetensors``.

    Raises
    ------
    InputError
        A missing or invalid config, or weights that do not fit it.
    """
    config = InpainterConfig.load(folder / "config.json")
    model = build_inpainter(config)
    load_weights(model, folder / "model.safetensors")
    return model.eval(), config


def fourier_units(model: nn.Module) -> list[FourierUnit]:
    """Every Fourier unit inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, FourierUnit)]


def swap_fft_for_export(model: FFCResNetGenerator, height: int, width: int) -> FFCResNetGenerator:
    """An eval-mode copy of ``model`` whose Fourier units use :class:`MatmulDFT` for H × W slices.

    ONNX needs static shapes per export here: the copy accepts only ``(N, 1, height, width)``
    inputs (any N). The sizes each Fourier unit sees are measured by one forward pass.

    Raises
    ------
    InputError
        A non-positive size.
    """
    if height < 1 or width < 1:
        raise InputError(f"export size: expected a positive slice size, found {height}×{width}")
    export = copy.deepcopy(model).eval()
    units = fourier_units(export)
    sizes: dict[int, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes[id(module)] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    hooks = [unit.register_forward_pre_hook(record) for unit in units]
    device = next(export.parameters()).device
    probe = torch.zeros(1, 1, height, width, device=device)
    phase = torch.zeros(1, N_PHASES, device=device) if export.phase_channel else None
    try:
        with torch.no_grad():
            export(probe, probe, phase)
    finally:
        for hook in hooks:
            hook.remove()
    for unit in units:
        unit.dft = MatmulDFT(*sizes[id(unit)]).to(device)
    return export


# --------------------------------------------------------------------------------------------
# inference on volumes
# --------------------------------------------------------------------------------------------

def hu_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU → ``[-1, 1]`` through ``window`` (clipped), float32."""
    low, high = window
    return np.clip((np.asarray(hu, np.float32) - low) / (high - low) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def unit_to_hu(unit: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``[-1, 1]`` → HU through ``window``, float32."""
    low, high = window
    return ((np.asarray(unit, np.float32) + 1.0) / 2.0 * (high - low) + low).astype(np.float32)


def phase_one_hot(phase: Phase | str, count: int = 1) -> torch.Tensor:
    """One-hot phase rows ``(count, 4)`` in :data:`~d4m.dicom_io.codes.PHASE_ORDER`."""
    row = torch.zeros(count, N_PHASES)
    row[:, PHASE_ORDER.index(Phase(phase))] = 1.0
    return row


def inpaint_volume(  # noqa: PLR0913 - the phase is optional and the batch a tuning knob
    model: FFCResNetGenerator,
    volume_hu: np.ndarray,
    hole: np.ndarray,
    window: tuple[float, float],
    batch: int = 8,
    phase: Phase | str | None = None,
) -> np.ndarray:
    """Inpaint a CT volume slice by slice (axial), changing only the voxels in ``hole``.

    Parameters
    ----------
    model
        A trained generator (put in eval mode for the call, its mode restored after).
    volume_hu
        HU array ``(slices, rows, columns)``.
    hole
        Boolean array of the same shape; ``True`` voxels are replaced.
    window
        The HU window the model was trained with (``config.window``).
    batch
        Slices per forward pass.
    phase
        The volume's phase; required when the model was trained with ``phase_channel``.

    Returns
    -------
    numpy.ndarray
        A copy of ``volume_hu`` (float32, or float64 if the input was) where hole voxels hold the
        prediction in HU and every other voxel is bit-identical to the input.

    Raises
    ------
    InputError
        Shapes that differ or are not 3D, a bad window or batch, a missing phase.
    """
    volume_hu = np.asarray(volume_hu)
    hole = np.asarray(hole).astype(bool)
    if volume_hu.ndim != 3 or hole.shape != volume_hu.shape:
        raise InputError(
            f"inpaint volume: expected a 3D volume and a hole of the same shape, found {volume_hu.shape} "
            f"and {hole.shape}"
        )
    if len(window) != 2 or not window[0] < window[1]:
        raise InputError(f"inpaint volume: expected a window (low, high) with low < high, found {window}")
    if batch < 1:
        raise InputError(f"inpaint volume: expected batch >= 1, found {batch}")
    if model.phase_channel and phase is None:
        raise InputError("inpaint volume: expected the volume's phase (the model was trained with phases), found none")
    out = volume_hu.astype(np.result_type(volume_hu.dtype, np.float32), copy=True)
    todo = np.flatnonzero(hole.reshape(len(hole), -1).any(axis=1))
    if not len(todo):
        return out
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(todo), batch):
                index = todo[start:start + batch]
                image = torch.from_numpy(hu_to_unit(volume_hu[index], window)[:, None]).to(device)
                mask = torch.from_numpy(hole[index, None].astype(np.float32)).to(device)
                one_hot = phase_one_hot(phase, len(index)).to(device) if model.phase_channel and phase else None
                pred = unit_to_hu(model(image, mask, one_hot)[:, 0].cpu().numpy(), window)
                for row, k in enumerate(index):
                    out[k][hole[k]] = pred[row][hole[k]]
    finally:
        model.train(was_training)
    return out
