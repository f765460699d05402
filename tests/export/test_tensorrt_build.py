"""TensorRT builds: shapes and profiles here; the build itself on a GPU machine (skipped elsewhere)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from d4m.dicom_io.errors import EngineError, InputError
from d4m.export.tensorrt_build import (
    TensorRTConfig,
    build_tensorrt,
    default_timing_cache,
    gpu_slug,
    parse_shape,
    profile_shapes,
)
from d4m.runtime.manifest import EngineEntry, TensorEntry
from d4m.runtime.runners import GpuEnvironment, gpu_environment

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
DYNAMIC = EngineEntry("segmenter", "segmenter.onnx", "onnx", "fp32", (TensorEntry("image", ("N", 4, "Z", "Y", "X")),),
                      (TensorEntry("logits", ("N", 3, "Z", "Y", "X")),), "0" * 64, opset=17)


def test_parse_shape() -> None:
    assert parse_shape("1x4x64x96x96") == (1, 4, 64, 96, 96) and parse_shape("2,4,8") == (2, 4, 8)
    for bad in ("", "1x0x3", "ax4", "1x-4"):
        with pytest.raises(InputError, match="expected positive integers like 1x4x64x96x96"):
            parse_shape(bad)


def test_default_profile_is_batch_1_2_4_at_the_patch() -> None:
    shapes = profile_shapes(DYNAMIC, (32, 64, 64), TensorRTConfig(Path("b")))
    assert shapes == ((1, 4, 32, 64, 64), (2, 4, 32, 64, 64), (4, 4, 32, 64, 64))


def test_profile_is_checked_against_the_onnx_file() -> None:
    def config(*shapes: str) -> TensorRTConfig:
        low, opt, high = (parse_shape(s) for s in shapes)
        return TensorRTConfig(Path("b"), min_shape=low, opt_shape=opt, max_shape=high)

    assert profile_shapes(DYNAMIC, (32, 64, 64), config("1x4x32x64x64", "1x4x64x64x64", "2x4x64x96x96"))[2] == (
        2, 4, 64, 96, 96)
    with pytest.raises(InputError, match=r"expected max shape axis 1 = 4 \(fixed in segmenter.onnx\), found 3"):
        profile_shapes(DYNAMIC, (32, 64, 64), config("1x4x8x8x8", "1x4x8x8x8", "1x3x8x8x8"))
    with pytest.raises(InputError, match="expected min <= opt <= max per axis"):
        profile_shapes(DYNAMIC, (32, 64, 64), config("2x4x8x8x8", "1x4x8x8x8", "2x4x8x8x8"))
    with pytest.raises(InputError, match=r"expected a 5-d opt shape"):
        profile_shapes(DYNAMIC, (32, 64, 64), config("1x4x8x8x8", "1x4x8x8", "1x4x8x8x8"))
    with pytest.raises(InputError, match="expected --min-shape, --opt-shape and --max-shape together"):
        TensorRTConfig(Path("b"), min_shape=(1, 4, 8, 8, 8))


def test_engine_names_and_timing_cache_follow_the_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = default_timing_cache(GpuEnvironment("10.3.0", "NVIDIA A10", "8.6"))
    assert cache == tmp_path / "d4m" / "tensorrt-10.3.0-nvidia-a10.timing"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the unavailable path cannot be shown")
def test_without_tensorrt_the_build_is_an_engine_error(fp16_bundle: Path) -> None:
    with pytest.raises(EngineError, match=r"expected the optional dependency 'tensorrt' \(pip install 'd4m\[gpu\]'\)"):
        build_tensorrt(TensorRTConfig(fp16_bundle))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT or gpu_environment() is None, reason="needs TensorRT, cuda-python and a GPU")
def test_build_fp32_and_fp16_engines_and_verify(fp16_bundle: Path, tmp_path: Path) -> None:
    from d4m.export.parity import verify_bundle
    from d4m.runtime.bundle import load_bundle

    bundle = Path(shutil.copytree(fp16_bundle, tmp_path / "bundle"))
    cache = tmp_path / "timing.cache"
    fp32 = build_tensorrt(TensorRTConfig(bundle, fp16=False, timing_cache=cache))[0]
    fp16 = build_tensorrt(TensorRTConfig(bundle, fp16=True, timing_cache=cache))[0]
    assert cache.stat().st_size > 0 and fp32.file.endswith(".fp32.plan") and fp16.file.endswith(".fp16.plan")
    with load_bundle(bundle) as loaded:
        assert loaded.select("auto")[1] == fp16  # TensorRT FP16 is what auto picks on this GPU
    report = verify_bundle(bundle, "tensorrt")
    assert report.passed, report.failures()
    assert {r.provider for r in report.rows} == {"TensorRT"}
