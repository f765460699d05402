"""The shared CT autoencoder: shapes, windowing, training files, exact resume, clear input errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import resnet10

from d4m.dicom_io.codes import PHASE_ORDER
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.training.autoencoder import (
    AutoencoderConfig,
    AutoencoderKind,
    CTAutoencoder,
    PerceptualFeatures,
    crop_volume,
    hu_to_unit,
    load_autoencoder,
    train_autoencoder,
    unit_to_hu,
)
from d4m.training.checkpoints import read_weights, save_weights
from d4m.training.datasets import Case, Dataset

LIVER_HU = {"NC": 55.0, "ART": 75.0, "PVP": 115.0, "DEL": 95.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_cases(root: Path, n: int = 3, shape: tuple[int, int, int] = (20, 32, 32), liver: bool = True) -> Path:
    """A tiny registered 4-phase dataset: ellipsoid liver with one tumour, normal images, truths."""
    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cases = []
    for c in range(n):
        folder = root / f"case_{c}"
        inside = ((k - 10) / 7) ** 2 + ((j - 16 - c) / 11) ** 2 + ((i - 16) / 11) ** 2 <= 1 if liver else k < 0
        tumor = (((k - 10) / 2.5) ** 2 + ((j - 15) / 4) ** 2 + ((i - 17) / 4) ** 2 <= 1) & inside
        label = inside.astype(np.uint8) + tumor
        images, normal, truth = {}, {}, {}
        for phase in PHASE_ORDER:
            base = np.where(inside, LIVER_HU[phase.value], 40.0) + rng.normal(0, 6, shape)
            for name, array, files in (("normal", base, normal),
                                       ("image", np.where(tumor, base + 40.0, base), images),
                                       ("truth", label, truth)):
                files[phase] = folder / f"{name}_{phase.value}.nii.gz"
                write_image(Volume(array.astype(np.float32 if name != "truth" else np.uint8), (1.5, 1.5, 2.5),
                                   (0.0, 0.0, 0.0)), files[phase])
        write_image(Volume(label, (1.5, 1.5, 2.5), (0.0, 0.0, 0.0)), folder / "label.nii.gz")
        cases.append(Case(f"case_{c}", images, folder / "label.nii.gz", truth=truth, normal=normal))
    Dataset(root, tuple(cases)).save()
    return root


def tiny(data: Path, out: Path, **changes: object) -> AutoencoderConfig:
    values: dict[str, object] = {"data": data, "out": out, "crop": (16, 16, 16), "batch_size": 1, "steps": 4,
                                 "checkpoint_every": 2, "adversarial_start": 1, "val_crops": 2, "device": "cpu"}
    values.update(changes)
    return AutoencoderConfig.from_preset("tiny", **values)


@pytest.mark.parametrize("kind", [AutoencoderKind.VQGAN, AutoencoderKind.KL])
def test_forward_shapes_downsample_four_times(kind: AutoencoderKind) -> None:
    channels = (8, 16) if kind is AutoencoderKind.VQGAN else (8, 8, 16)
    torch.manual_seed(0)
    model = CTAutoencoder(AutoencoderConfig(kind=kind, channels=channels, crop=(16, 24, 32))).eval()
    x = torch.rand(2, 1, 16, 24, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 4, 6, 8)
    assert model.decode(z).shape == x.shape
    reconstruction, regularization = model(x)
    assert reconstruction.shape == x.shape and regularization.ndim == 0


def test_window_round_trip_and_padding_crop() -> None:
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0])
    unit = hu_to_unit(hu, (-175.0, 250.0))
    assert unit.tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    assert unit_to_hu(unit, (-175.0, 250.0)).tolist() == pytest.approx([-175.0, -175.0, 37.5, 250.0, 250.0])
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    crop = crop_volume(volume, (0, 0, 0), (4, 4, 4), fill=-5.0)
    assert crop[2, 2, 2] == volume[0, 0, 0] and crop[0, 0, 0] == -5.0 and crop[3, 3, 3] == volume[1, 1, 1]


def test_presets_and_validation() -> None:
    assert AutoencoderConfig.from_preset("cpu").crop == (48, 48, 48)
    assert AutoencoderConfig.from_preset("paper").latent_channels == 8
    with pytest.raises(InputError, match="expected one of"):
        AutoencoderConfig.from_preset("huge")
    with pytest.raises(ValueError, match="multiples of 4"):
        AutoencoderConfig(crop=(30, 32, 32))
    with pytest.raises(ValueError, match="exactly 3 levels"):
        AutoencoderConfig(kind="kl", channels=(8, 16))


def test_training_writes_run_files_and_resumes_exactly(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data")
    straight = train_autoencoder(tiny(data, tmp_path / "straight"))
    for name in ("model.safetensors", "config.json", "metrics.csv", "metrics.json", "resume.pt"):
        assert (straight / name).is_file()
    summary = json.loads((straight / "metrics.json").read_text())
    assert summary["held_out_cases"] == 1 and 0 < summary["val_mae_liver_hu"] < 425

    class Killed(Exception):
        pass

    steps_seen = []

    def kill_at_three(n: int) -> None:
        steps_seen.append(n)
        if len(steps_seen) == 3:
            raise Killed  # after step 3, which came after the step-2 checkpoint

    with pytest.raises(Killed):
        train_autoencoder(tiny(data, tmp_path / "resumed"), progress=kill_at_three)
    resumed = train_autoencoder(tiny(data, tmp_path / "resumed"))
    a, b = read_weights(straight / "model.safetensors"), read_weights(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with (resumed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4]
    model, config = load_autoencoder(resumed)
    assert config == tiny(data, tmp_path / "resumed") and not model.training


def test_other_config_in_the_run_folder_is_refused(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data", n=1)
    train_autoencoder(tiny(data, tmp_path / "run", steps=1, adversarial_start=5))
    with pytest.raises(InputError, match=r"found changes in \['learning_rate'\]"):
        train_autoencoder(tiny(data, tmp_path / "run", steps=1, adversarial_start=5, learning_rate=0.5))


def test_case_without_liver_or_label_is_a_clear_error(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data", n=1, liver=False)
    with pytest.raises(InputError, match="case_0: expected a liver label"):
        train_autoencoder(tiny(data, tmp_path / "run"))
    dataset = Dataset(tmp_path / "data", (Case("nolabel", {p: tmp_path / "data/case_0/image_NC.nii.gz"
                                                           for p in PHASE_ORDER[:1]}),))
    dataset.save()
    with pytest.raises(InputError, match="nolabel: expected a label with the liver"):
        train_autoencoder(tiny(tmp_path / "data", tmp_path / "run2"))


def test_perceptual_term_reads_a_local_feature_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "resnet10.safetensors"
    save_weights(resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B"), weights)
    perceptual = PerceptualFeatures(weights)
    x = torch.rand(1, 1, 16, 16, 16)
    assert float(perceptual(x, x)) == 0.0 and float(perceptual(x, torch.rand_like(x))) > 0
    assert not any(p.requires_grad for p in perceptual.parameters())
    data = write_cases(tmp_path / "data", n=1)
    run = train_autoencoder(tiny(data, tmp_path / "run", steps=1, perceptual_weights=weights))
    with (run / "metrics.csv").open() as handle:
        assert float(next(csv.DictReader(handle))["perceptual"]) > 0
    with pytest.raises(InputError, match="expected a safetensors weights file, found nothing"):
        train_autoencoder(tiny(data, tmp_path / "run2", perceptual_weights=tmp_path / "missing.safetensors"))
