"""Training the inpainter: a tiny run, exact resume after a kill, refusal of bad inputs, the losses."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.training.checkpoints import read_weights, save_weights
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.inpainter import InpainterConfig, load_inpainter
from d4m.training.inpainter_training import (
    METRICS,
    PerceptualLoss,
    ResNetFeatures,
    build_slice_bank,
    discriminator_loss,
    evaluate_tumor_holes,
    masked_l1,
    median_fill,
    r1_penalty,
    train_inpainter,
)
from d4m.training.inpainting_masks import MaskSpec

LIVER_HU = {Phase.NC: 55.0, Phase.ART: 70.0, Phase.PVP: 110.0, Phase.DEL: 90.0}
GRID = {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0)}


def _write_case(root: Path, name: str, rng: np.random.Generator, label: bool = True) -> Case:
    z, y, x = np.mgrid[0:6, 0:40, 0:40]
    body = ((y - 20) / 18) ** 2 + ((x - 20) / 18) ** 2 < 1
    liver = ((y - 18) / 9) ** 2 + ((x - 15) / 11) ** 2 < 1
    tumor = ((y - 18) / 3) ** 2 + ((x - 15) / 3) ** 2 + ((z - 3) / 2) ** 2 < 1
    labels = np.zeros(z.shape, np.uint8)
    labels[liver] = 1
    labels[tumor] = 2
    images, normal = {}, {}
    for phase, hu in LIVER_HU.items():
        array = np.full(z.shape, -1000.0, np.float32)
        array[body] = 30.0
        array[liver] = hu
        array += rng.normal(0, 5, array.shape).astype(np.float32)
        normal[phase] = root / name / f"{phase.value}_normal.nii.gz"
        write_image(Volume(array.copy(), **GRID), normal[phase])
        array[tumor] = hu - 40.0
        images[phase] = root / name / f"{phase.value}.nii.gz"
        write_image(Volume(array, **GRID), images[phase])
    label_path = None
    if label:
        label_path = root / name / "label.nii.gz"
        write_image(Volume(labels, **GRID), label_path)
    return Case(name, images, label=label_path, normal=normal)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inpainting-data")
    rng = np.random.default_rng(0)
    Dataset(root, (_write_case(root, "c0", rng), _write_case(root, "c1", rng))).save()
    return root


def _config(data: Path, out: Path, **changes: object) -> InpainterConfig:
    values: dict[str, object] = {
        "data": data, "out": out, "preset": "custom", "channels": 8, "downsamplings": 1, "blocks": 1,
        "crop": 16, "batch_size": 2, "disc_channels": 8, "disc_layers": 2, "steps": 3,
        "checkpoint_every": 2, "log_every": 1, "slices_per_volume": 3, "seed": 3,
    }
    values.update(changes)
    return InpainterConfig(**values)  # type: ignore[arg-type]


class _Kill(Exception):
    pass


def test_tiny_run_writes_checkpoints_and_resume_after_kill_is_exact(dataset_root: Path, tmp_path: Path) -> None:
    full = train_inpainter(_config(dataset_root, tmp_path / "full"))
    for name in ("model.safetensors", "config.json", "metrics.csv", "resume.pt"):
        assert (full / name).is_file(), name
    with (full / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert tuple(rows[0]) == METRICS
    assert all(np.isfinite(float(r[k])) for r in rows for k in METRICS)
    model, config = load_inpainter(full)
    assert config.steps == 3 and not model.training

    calls: list[int] = []

    def kill_at_two(n: int) -> None:
        calls.append(n)
        if sum(calls) == 2:
            raise _Kill

    killed = tmp_path / "killed"
    with pytest.raises(_Kill):
        train_inpainter(_config(dataset_root, killed), progress=kill_at_two)
    calls.clear()
    train_inpainter(_config(dataset_root, killed), progress=calls.append)
    assert calls == [2, 1], "the resumed run reports the restored steps, then the rest"
    a, b = read_weights(full / "model.safetensors"), read_weights(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3]

    # the same output folder with another architecture is refused, not silently mixed
    with pytest.raises(InputError, match=r"expected a resume file of the same training config.*channels"):
        train_inpainter(_config(dataset_root, killed, channels=4, steps=6))

    # --init: start a new run from the finished weights
    tuned = train_inpainter(_config(dataset_root, tmp_path / "tuned", init=full, steps=1))
    assert (tuned / "model.safetensors").is_file()


def test_bad_inputs_are_refused_with_clear_messages(dataset_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"expected a local inpainter checkpoint \(model.safetensors\), found nothing"):
        train_inpainter(_config(dataset_root, tmp_path / "a", init=tmp_path / "nowhere.safetensors"))

    root = tmp_path / "unlabelled"
    Dataset(root, (_write_case(root, "u0", np.random.default_rng(1), label=False),)).save()
    with pytest.raises(InputError, match=r"case u0: expected a label .* found none"):
        train_inpainter(_config(root, tmp_path / "b"))
    bank = build_slice_bank(load_dataset(root), _config(root, tmp_path / "c", allow_unlabelled=True))
    assert len(bank) == 4 * 3

    shifted = tmp_path / "shifted"
    case = _write_case(shifted, "s0", np.random.default_rng(2))
    write_image(Volume(np.zeros((6, 40, 40), np.float32), (1.0, 1.0, 2.0), (0.0, 0.0, 50.0)), case.images[Phase.ART])
    Dataset(shifted, (case,)).save()
    with pytest.raises(InputError, match=r"case s0 ART image: expected the label grid"):
        train_inpainter(_config(shifted, tmp_path / "d"))

    with pytest.raises(InputError, match=r"expected holdout case ids from the dataset, found unknown \['zz'\]"):
        train_inpainter(_config(dataset_root, tmp_path / "e", holdout=("zz",)))

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="expected a new or empty output folder"):
        train_inpainter(_config(dataset_root, occupied))


def test_slice_bank_samples_holes_off_tumours(dataset_root: Path, tmp_path: Path) -> None:
    config = _config(dataset_root, tmp_path / "x", tumor_margin=1)
    bank = build_slice_bank(load_dataset(dataset_root), config)
    assert len(bank) == 2 * 4 * 3
    assert set(bank.phases) == {0, 1, 2, 3}
    batch = bank.sample(np.random.default_rng(0), 6, 32, MaskSpec())
    again = bank.sample(np.random.default_rng(0), 6, 32, MaskSpec())
    assert torch.equal(batch.image, again.image) and torch.equal(batch.mask, again.mask)
    assert batch.image.shape == (6, 1, 32, 32) and batch.phase.sum(1).eq(1).all()
    assert batch.mask.sum() > 0
    for index in range(len(bank)):
        assert not (bank.liver[index] & bank.forbidden[index]).any()
    assert any(f.any() for f in bank.forbidden), "tumour slices are marked forbidden"


def test_losses_behave_as_lama() -> None:
    pred, target = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    known, hole = masked_l1(pred, target, mask, known=10.0, hole=2.0)
    assert float(known) == pytest.approx(5.0) and float(hole) == pytest.approx(1.0)
    # a confident, correct discriminator has a small loss; the known part of a fake counts as real
    logits = torch.full((1, 1, 2, 2), 8.0)
    fake = torch.tensor([[[[-8.0, -8.0], [8.0, 8.0]]]])
    assert float(discriminator_loss(logits, fake, mask)) < 0.01
    assert float(discriminator_loss(logits, -fake, mask)) > 5
    # R1 of D(x) = sum(3x) is |grad|² = 9 per pixel
    real = torch.randn(2, 1, 3, 3, requires_grad=True)
    assert float(r1_penalty((3 * real).sum(dim=(1, 2, 3)), real)) == pytest.approx(81.0)


def test_perceptual_loss_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ResNetFeatures((1, 1, 1, 1))
    path = tmp_path / "resnet.safetensors"
    save_weights(net, path)
    loss = PerceptualLoss(path)
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, -x)) > 0
    save_weights(nn.Linear(2, 2), tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="expected a bottleneck ResNet"):
        PerceptualLoss(tmp_path / "other.safetensors")


def test_median_fill_and_evaluation_against_truth(dataset_root: Path, tmp_path: Path) -> None:
    image = np.full((12, 12), 50.0)
    image[4:8, 4:8] = 500.0  # a bright "tumour"
    hole = np.zeros((12, 12), bool)
    hole[3:9, 3:9] = True
    filled = median_fill(image, hole, size=5)
    np.testing.assert_allclose(filled[hole], 50.0)
    np.testing.assert_array_equal(filled[~hole], image[~hole])
    with pytest.raises(InputError, match="positive odd window"):
        median_fill(image, hole, size=4)

    out = train_inpainter(_config(dataset_root, tmp_path / "eval", steps=1, holdout=("c1",), phase_channel=False))
    model, config = load_inpainter(out)
    score = evaluate_tumor_holes(model, config, load_dataset(dataset_root), ["c1"], phases=[Phase.PVP])
    assert score.slices > 0 and score.voxels > 0
    assert np.isfinite(score.model) and score.median < 20.0
