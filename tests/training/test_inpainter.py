"""The FFC inpainter: block shapes, torch.fft vs matmul DFT, ONNX export, volume inpainting, config."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from d4m.dicom_io.errors import InputError
from d4m.training.inpainter import (
    FFC,
    FFCResnetBlock,
    FourierUnit,
    InpainterConfig,
    MatmulDFT,
    TorchFFT,
    build_inpainter,
    fourier_units,
    hu_to_unit,
    inpaint_volume,
    phase_one_hot,
    swap_fft_for_export,
    unit_to_hu,
)

TINY = {"channels": 8, "downsamplings": 2, "blocks": 2, "crop": 32, "disc_layers": 2, "phase_channel": False}


def _randomise(model: nn.Module, seed: int) -> None:
    """Random values for every parameter (spectral 1×1 convs included) and every norm statistic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:
                param.copy_(noise * 0.2 + (1.0 if name.endswith("weight") else 0.0))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 0.5 + 0.75)


@pytest.mark.parametrize("size", [(8, 8), (13, 17), (31, 20), (5, 9)])
def test_ffc_resnet_block_keeps_shape_on_even_and_odd_sizes(size: tuple[int, int]) -> None:
    block = FFCResnetBlock(16, 0.75).eval()
    local, glob = torch.randn(2, 4, *size), torch.randn(2, 12, *size)
    out_local, out_global = block((local, glob))
    assert out_local is not None and out_global is not None
    assert out_local.shape == (2, 4, *size)
    assert out_global.shape == (2, 12, *size)
    # the global branch really goes through the spectrum: it changes when a far-away pixel changes
    shifted = glob.clone()
    shifted[..., 0, 0] += 10.0
    _, moved = block((local, shifted))
    assert moved is not None
    assert (moved - out_global)[..., -1, -1].abs().max() > 0


@pytest.mark.parametrize("size", [(16, 16), (15, 21)])
def test_strided_ffc_halves_rounding_up_and_splits_channels(size: tuple[int, int]) -> None:
    ffc = FFC(8, 16, 3, ratio_in=0.0, ratio_out=0.75, stride=2, padding=1)
    out_local, out_global = ffc((torch.randn(1, 8, *size), None))
    expected = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    assert out_local is not None and out_global is not None
    assert out_local.shape == (1, 4, *expected)
    assert out_global.shape == (1, 12, *expected)


@pytest.mark.parametrize("size", [(64, 64), (61, 77), (40, 33)])
def test_generator_returns_the_input_size(size: tuple[int, int]) -> None:
    model = build_inpainter(InpainterConfig(**TINY)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *size), torch.zeros(2, 1, *size))
    assert out.shape == (2, 1, *size)
    assert float(out.abs().max()) <= 1.0


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (12, 5)])
def test_matmul_dft_matches_torch_fft_both_ways(size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size, dtype=torch.float32)
    fft, mat = TorchFFT(), MatmulDFT(*size)
    for a, b in zip(fft.rfft2(x), mat.rfft2(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    real, imag = torch.randn(2, 3, size[0], size[1] // 2 + 1), torch.randn(2, 3, size[0], size[1] // 2 + 1)
    torch.testing.assert_close(fft.irfft2(real, imag, size), mat.irfft2(real, imag, size), atol=1e-5, rtol=0)
    assert not mat.state_dict(), "the DFT matrices must not enter state dicts"
    with pytest.raises(InputError, match=r"expected a .* feature map .* found 9×9"):
        mat.rfft2(torch.randn(1, 1, 9, 9))


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (29, 35)])
def test_fft_and_matmul_paths_agree_on_random_weights(size: tuple[int, int]) -> None:
    model = build_inpainter(InpainterConfig(**{**TINY, "phase_channel": True}))
    _randomise(model, seed=sum(size))
    model.eval()
    spectral = fourier_units(model)[0].conv.weight
    assert spectral.std() > 0.05, "the spectral 1×1 conv must be randomised too"
    export = swap_fft_for_export(model, *size)
    assert all(isinstance(u.dft, MatmulDFT) for u in fourier_units(export))
    assert all(isinstance(u.dft, TorchFFT) for u in fourier_units(model)), "the original must stay untouched"

    captured: list[torch.Tensor] = []
    hooks = [m.tail[1].register_forward_hook(lambda _m, _i, o: captured.append(o)) for m in (model, export)]
    x = torch.randn(2, 1, *size)
    mask = (torch.rand(2, 1, *size) > 0.6).float()
    phase = torch.cat([phase_one_hot("ART"), phase_one_hot("DEL")])
    with torch.no_grad():
        ref, out = model(x, mask, phase), export(x, mask, phase)
    for hook in hooks:
        hook.remove()
    raw_ref, raw_out = captured
    scale = max(1.0, float(raw_ref.abs().max()))
    assert float((raw_ref - raw_out).abs().max()) <= 1e-4 * scale
    assert float((ref - out).abs().max()) <= 1e-4
    assert float(raw_ref.std()) > 1e-2, "a constant output would make the comparison trivial"


def test_swapped_model_exports_to_onnx_and_runs_in_onnx_runtime() -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build_inpainter(InpainterConfig(**{**TINY, "phase_channel": True}))
    _randomise(model, seed=7)
    model.eval()
    size = (24, 40)
    export = swap_fft_for_export(model, *size)
    x = torch.randn(1, 1, *size)
    mask = (torch.rand(1, 1, *size) > 0.5).float()
    phase = phase_one_hot("PVP")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(export, (x, mask, phase), buffer, input_names=["image", "mask", "phase"],
                          output_names=["prediction"], dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"image": x.numpy(), "mask": mask.numpy(), "phase": phase.numpy()})
    with torch.no_grad():
        ref = model(x, mask, phase).numpy()
    assert onnx_out.shape == ref.shape
    assert np.abs(onnx_out - ref).max() <= 1e-4
    assert ref.std() > 1e-3


def test_inpaint_volume_changes_only_the_hole() -> None:
    torch.manual_seed(0)
    model = build_inpainter(InpainterConfig(**TINY))
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1500, size=(5, 30, 27)).astype(np.int16)
    hole = np.zeros(volume.shape, bool)
    hole[1, 5:12, 6:14] = True
    hole[3, 20:25, 1:4] = True
    model.train()
    out = inpaint_volume(model, volume, hole, (-160.0, 240.0), batch=1)
    assert model.training, "the model's mode is restored"
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_array_equal(out[~hole], volume[~hole].astype(np.float32))
    assert out[hole].min() >= -160.0 - 1e-3 and out[hole].max() <= 240.0 + 1e-3
    assert not np.array_equal(out[hole], volume[hole])
    with pytest.raises(InputError, match="hole of the same shape"):
        inpaint_volume(model, volume, hole[:, :10], (-160.0, 240.0))
    with pytest.raises(InputError, match="low < high"):
        inpaint_volume(model, volume, hole, (240.0, -160.0))
    phased = build_inpainter(InpainterConfig(**{**TINY, "phase_channel": True}))
    with pytest.raises(InputError, match="expected the volume's phase"):
        inpaint_volume(phased, volume, hole, (-160.0, 240.0))
    assert inpaint_volume(phased, volume, hole, (-160.0, 240.0), phase="NC").shape == volume.shape


def test_generator_refuses_bad_inputs() -> None:
    model = build_inpainter(InpainterConfig(**{**TINY, "phase_channel": True}))
    with pytest.raises(InputError, match=r"expected image and mask of shape \(N, 1, H, W\)"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), phase_one_hot("NC"))
    with pytest.raises(InputError, match=r"expected a one-hot phase of shape \(N, 4\), found None"):
        model(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))


def test_window_round_trip_and_clipping() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    unit = hu_to_unit(hu, (-160.0, 240.0))
    np.testing.assert_allclose(unit, [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(unit_to_hu(unit, (-160.0, 240.0)), [-160, -160, 40, 240, 240])


def test_presets_and_config_validation() -> None:
    paper = InpainterConfig.from_preset("paper")
    assert (paper.channels, paper.blocks, paper.global_ratio, paper.crop) == (64, 9, 0.75, 256)
    cpu = InpainterConfig.from_preset("cpu", steps=10)
    assert cpu.steps == 10 and cpu.channels <= 32 and cpu.crop <= 128
    assert InpainterConfig.from_dict(cpu.to_dict()) == cpu
    assert sum(p.numel() for p in build_inpainter(cpu).parameters()) < 1_000_000
    with pytest.raises(InputError, match="expected one of"):
        InpainterConfig.from_preset("huge")
    with pytest.raises(InputError, match="expected crop >= 16 and a multiple of 4"):
        InpainterConfig(crop=30)
    with pytest.raises(InputError, match=r"expected global_ratio in \[0, 1\)"):
        InpainterConfig(global_ratio=1.0)
    with pytest.raises(InputError, match="expected perceptual_weights as a local weights file"):
        InpainterConfig(perceptual=1.0)
    with pytest.raises(InputError, match="expected window"):
        InpainterConfig(window=(100.0, 0.0))


def test_fourier_unit_uses_the_swapped_transform() -> None:
    unit = FourierUnit(4, 4).eval()
    x = torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        ref = unit(x)
        unit.dft = MatmulDFT(6, 10)
        torch.testing.assert_close(unit(x), ref, atol=1e-5, rtol=1e-5)
