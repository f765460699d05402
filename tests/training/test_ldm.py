"""The latent diffusion model: loss and gradients in both modes, DDIM sampling, masks, training and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.training.autoencoder import AutoencoderConfig, CaseVolumes, train_autoencoder
from d4m.training.checkpoints import read_weights
from d4m.training.datasets import Case, Dataset
from d4m.training.ldm import (
    LatentDenoiser,
    LDMConfig,
    LDMMode,
    downsample_mask,
    ldm_loss,
    load_ldm,
    phase_mask,
    sample_latent,
    sampling_scheduler,
    train_ldm,
    training_scheduler,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomized(denoiser: LatentDenoiser) -> LatentDenoiser:
    """MONAI zero-initialises the output layer: randomise every parameter so outputs depend on inputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return denoiser


def inputs(mode: LDMMode, batch: int = 2, latent: int = 4) -> tuple[torch.Tensor, ...]:
    phases = 1 if mode is LDMMode.PER_PHASE else 4
    z0 = torch.randn(batch, phases * latent, 4, 4, 4)
    zc = torch.randn(batch, phases * latent, 4, 4, 4)
    image_mask = torch.zeros(batch, 1, 16, 16, 16)
    image_mask[:, :, 5:11, 4:12, 6:10] = 1.0  # a tumour touching 2×2×2..3 latent voxels
    mask = downsample_mask(image_mask)
    return z0, zc, mask


@pytest.mark.parametrize("mode", [LDMMode.PER_PHASE, LDMMode.JOINT])
def test_loss_computes_and_backpropagates(mode: LDMMode) -> None:
    config = LDMConfig(mode=mode, crop=(16, 16, 16))
    torch.manual_seed(0)
    denoiser = LatentDenoiser(config, latent_channels=4)
    z0, zc, mask = inputs(mode)
    assert mask.shape == (2, 1, 4, 4, 4) and float(mask.min()) == 0 and 0 < float(mask.max()) <= 1
    phase = torch.tensor([0, 2]) if mode is LDMMode.PER_PHASE else None
    loss = ldm_loss(denoiser, training_scheduler(config), z0, zc, mask, phase, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    grads = [p.grad for p in denoiser.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    expected_in = 2 * 4 + 1 if mode is LDMMode.PER_PHASE else 2 * 16 + 1
    assert denoiser.unet.conv_in.conv.in_channels == expected_in


def test_mask_weight_one_is_the_plain_loss_and_other_weights_reweight() -> None:
    config = LDMConfig(mode=LDMMode.JOINT, crop=(16, 16, 16))
    torch.manual_seed(0)
    denoiser = randomized(LatentDenoiser(config, latent_channels=4)).eval()
    z0, zc, mask = inputs(LDMMode.JOINT)
    scheduler = training_scheduler(config)
    generator = torch.Generator().manual_seed(0)  # the draws ldm_loss makes, in its order
    noise = torch.randn(z0.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (2,), generator=generator)
    with torch.no_grad():
        error = (denoiser(scheduler.add_noise(z0, noise, timesteps), zc, mask, timesteps) - noise).pow(2)
        weight = torch.where(mask > 0, 10.0, 1.0).expand_as(error)

        def loss(w: float) -> float:
            return float(ldm_loss(denoiser, scheduler, z0, zc, mask, None, torch.Generator().manual_seed(0), w))

        assert loss(1.0) == pytest.approx(float(error.mean()), rel=1e-5)
        assert loss(10.0) == pytest.approx(float((error * weight).sum() / weight.sum()), rel=1e-5)
    with pytest.raises(ValueError, match="mask_weight"):
        LDMConfig(mask_weight=0.0)


def test_per_phase_needs_the_phase_and_uses_it() -> None:
    config = LDMConfig(crop=(16, 16, 16))
    torch.manual_seed(0)
    denoiser = randomized(LatentDenoiser(config, latent_channels=4)).eval()
    z0, zc, mask = inputs(LDMMode.PER_PHASE, batch=1)
    t = torch.tensor([500])
    with pytest.raises(InputError, match="phase index"):
        denoiser(z0, zc, mask, t)
    with torch.no_grad():
        nc = denoiser(z0, zc, mask, t, torch.tensor([0]))
        art = denoiser(z0, zc, mask, t, torch.tensor([1]))
    assert not torch.allclose(nc, art)  # the phase embedding changes the prediction


@pytest.mark.parametrize("mode", [LDMMode.PER_PHASE, LDMMode.JOINT])
def test_ddim_sampling_shape_and_determinism(mode: LDMMode) -> None:
    config = LDMConfig(mode=mode, crop=(16, 16, 16), ddim_steps=5)
    torch.manual_seed(0)
    denoiser = randomized(LatentDenoiser(config, latent_channels=4)).eval()
    scheduler = sampling_scheduler(config)
    assert len(scheduler.timesteps) == 5
    _, zc, mask = inputs(mode)
    phase = torch.tensor([1, 3]) if mode is LDMMode.PER_PHASE else None

    def draw(seed: int) -> torch.Tensor:
        return sample_latent(denoiser, scheduler, zc, mask, phase, torch.Generator().manual_seed(seed))

    first = draw(3)
    assert first.shape == zc.shape and torch.isfinite(first).all()
    assert torch.equal(first, draw(3))
    assert not torch.equal(first, draw(4))
    known = (mask == 0).expand_as(first)
    assert torch.equal(first[known], zc[known])          # anchored: the known anatomy is kept
    assert not torch.equal(first[~known], zc[~known])    # the tumour region is generated
    free = sample_latent(denoiser, scheduler, zc, mask, phase, torch.Generator().manual_seed(3), anchor=False)
    assert known.any() and not torch.equal(free[known], zc[known])


def test_phase_mask_prefers_exact_truth_and_dilates_otherwise() -> None:
    label = np.zeros((9, 9, 9), np.uint8)
    label[1:8, 1:8, 1:8] = 1
    label[4, 4, 4] = 2
    shifted = label.copy()
    shifted[4, 4, 4] = 1
    shifted[4, 4, 5] = 2
    case = CaseVolumes("c", {}, {}, {Phase.ART: shifted}, label, (1.0, 1.0, 1.0))
    assert np.argwhere(phase_mask(case, Phase.ART, 1)).tolist() == [[4, 4, 5]]
    assert phase_mask(case, Phase.NC, 1).sum() == 7  # the PVP tumour dilated by a 6-neighbourhood
    assert phase_mask(case, Phase.NC, 0).sum() == 1


def test_config_validation_and_presets() -> None:
    assert LDMConfig.from_preset("paper").channels == (64, 128, 256)
    with pytest.raises(ValueError, match="multiples of 8"):
        LDMConfig(crop=(12, 16, 16))
    with pytest.raises(ValueError, match="ddim_steps"):
        LDMConfig(ddim_steps=0)
    with pytest.raises(ValueError):
        LDMConfig(mode="both")


def write_cases(root: Path, n: int = 2, shape: tuple[int, int, int] = (20, 32, 32), tumor: bool = True) -> Path:
    rng = np.random.default_rng(1)
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cases = []
    for c in range(n):
        folder = root / f"case_{c}"
        inside = ((k - 10) / 7) ** 2 + ((j - 16) / 11) ** 2 + ((i - 16 + c) / 11) ** 2 <= 1
        lesion = (((k - 10) / 2.5) ** 2 + ((j - 15) / 4) ** 2 + ((i - 17) / 4) ** 2 <= 1) & inside & tumor
        label = inside.astype(np.uint8) + lesion
        images = {}
        for phase in PHASE_ORDER:
            array = np.where(inside, 90.0, 40.0) + np.where(lesion, 40.0, 0.0) + rng.normal(0, 6, shape)
            images[phase] = folder / f"{phase.value}.nii.gz"
            write_image(Volume(array.astype(np.float32), (1.5, 1.5, 2.5), (0.0, 0.0, 0.0)), images[phase])
        write_image(Volume(label, (1.5, 1.5, 2.5), (0.0, 0.0, 0.0)), folder / "label.nii.gz")
        cases.append(Case(f"case_{c}", images, folder / "label.nii.gz"))
    Dataset(root, tuple(cases)).save()
    return root


def test_joint_training_resumes_exactly_after_a_kill(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data")
    autoencoder = train_autoencoder(AutoencoderConfig.from_preset(
        "tiny", data=data, out=tmp_path / "ae", crop=(16, 16, 16), steps=1, batch_size=1, val_crops=1, device="cpu"))

    def config(out: str) -> LDMConfig:
        return LDMConfig.from_preset("tiny", data=data, autoencoder=autoencoder, out=tmp_path / out,
                                     mode="joint", crop=(16, 16, 16), steps=3, checkpoint_every=2, val_crops=1,
                                     batch_size=1, device="cpu")

    straight = train_ldm(config("straight"))
    calls = []

    def kill_at_three(n: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ldm(config("resumed"), progress=kill_at_three)
    resumed = train_ldm(config("resumed"))
    a, b = read_weights(straight / "model.safetensors"), read_weights(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["latent_scale"]) > 0
    denoiser, loaded = load_ldm(resumed, latent_channels=4)
    assert loaded.mode is LDMMode.JOINT and denoiser.target_channels == 16
    with pytest.raises(InputError, match="expected the .* tensors of a LatentDenoiser"):
        load_ldm(resumed, latent_channels=8)


def test_training_needs_tumour_cases(tmp_path: Path) -> None:
    data = write_cases(tmp_path / "data", n=1, tumor=False)
    autoencoder = train_autoencoder(AutoencoderConfig.from_preset(
        "tiny", data=data, out=tmp_path / "ae", crop=(16, 16, 16), steps=1, batch_size=1, val_crops=1, device="cpu"))
    with pytest.raises(InputError, match=r"expected cases with a tumour label \(2\)"):
        train_ldm(LDMConfig.from_preset("tiny", data=data, autoencoder=autoencoder, out=tmp_path / "ldm",
                                        crop=(16, 16, 16), device="cpu"))
