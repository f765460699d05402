"""Fixtures of the export tests: a segmenter run folder made without training, and its bundle."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

#: z-score constants of the fixture run (the clipped liver of the phantom is about this).
NORM_MEAN, NORM_STD = 104.5, 38.25
#: The small phantom's grid spacing: the fixture run works on it without resampling.
SPACING = (2.8, 2.8, 5.0)


def make_segmenter_run(folder: Path, seed: int = 0) -> Path:
    """A run folder in the format of ``train_segmenter``: tiny preset, randomised weights, no training.

    ``config.json`` (measured spacing and normalisation filled in), ``model.safetensors``,
    ``metrics.csv``, ``metrics.json`` and ``postprocess.json`` (a liver-contact rule of 0.75, not
    the default), written with the segmenter helper's own functions.
    """
    from d4m.export.parity import randomize_weights
    from d4m.runtime.artifacts import write_json
    from d4m.runtime.postprocess import PostprocessSettings
    from d4m.training.checkpoints import MetricsLog, save_weights
    from d4m.training.postprocess_choice import PostprocessChoice, save_choice
    from d4m.training.segmenter import build_network, segmenter_preset
    from d4m.training.segmenter_training import METRICS

    config = segmenter_preset("tiny", data=folder.parent / "data", out=folder, spacing=SPACING,
                              norm_mean=NORM_MEAN, norm_std=NORM_STD, seed=seed)
    network = randomize_weights(build_network(config), seed=seed)
    folder.mkdir(parents=True)
    config.save(folder / "config.json")
    save_weights(network, folder / "model.safetensors", {"stage": "segmenter", "step": "300"})
    MetricsLog(folder / "metrics.csv", METRICS).append(
        {"step": 300, "loss": 0.42, "lr": 1e-4, "val_tumor_dice": 0.61, "val_liver_dice": 0.93,
         "val_lesion_f1": math.nan, "seconds": 12.5})
    write_json(folder / "metrics.json", {"schema_version": 1, "stage": "segmenter", "step": 300,
                                         "best": {"tumor_dice": 0.61, "step": 300.0}, "last": {"tumor_dice": 0.61}})
    save_choice(folder, PostprocessChoice(PostprocessSettings(min_liver_contact=0.75), {0.25: 0.5, 0.75: 0.61}, 1))
    return folder


@pytest.fixture(scope="session")
def segmenter_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset segmenter run folder with randomised weights."""
    return make_segmenter_run(tmp_path_factory.mktemp("runs") / "segmenter")


@pytest.fixture(scope="session")
def fp16_bundle(segmenter_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle of ``segmenter_run`` with FP32 and FP16 ONNX files (treat as read-only; copy to change)."""
    from d4m.export.bundle_writer import ExportConfig, write_onnx_bundle

    out = tmp_path_factory.mktemp("bundles") / "bundle"
    return write_onnx_bundle(ExportConfig(run=segmenter_run, out=out, fp16=True))


def make_synthesis_runs(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Inpainter, autoencoder and LDM run folders (smallest presets, randomised weights, no training)."""
    from d4m.export.parity import randomize_weights
    from d4m.training.autoencoder import AutoencoderConfig, CTAutoencoder
    from d4m.training.checkpoints import save_weights
    from d4m.training.inpainter import InpainterConfig, build_inpainter
    from d4m.training.ldm import LatentDenoiser, LDMConfig

    inpainter_dir, autoencoder_dir, ldm_dir = root / "inpainter", root / "autoencoder", root / "ldm"
    inpainter = InpainterConfig.from_preset("cpu", out=inpainter_dir, channels=8, blocks=2)
    autoencoder = AutoencoderConfig.from_preset("tiny", out=autoencoder_dir)
    ldm = LDMConfig.from_preset("tiny", out=ldm_dir, autoencoder=autoencoder_dir)
    networks = (
        (inpainter_dir, inpainter, build_inpainter(inpainter)),
        (autoencoder_dir, autoencoder, CTAutoencoder(autoencoder)),
        (ldm_dir, ldm, LatentDenoiser(ldm, autoencoder.latent_channels)),
    )
    for folder, config, network in networks:
        folder.mkdir(parents=True)
        config.save(folder / "config.json")
        save_weights(randomize_weights(network, seed=seed), folder / "model.safetensors")
    return inpainter_dir, autoencoder_dir, ldm_dir


@pytest.fixture
def synthesis_runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Inpainter, autoencoder and LDM run folders with randomised weights."""
    return make_synthesis_runs(tmp_path / "synthesis")
