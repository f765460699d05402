"""Engine runners: a tiny 3D conv through ONNX Runtime against numpy, input checks, providers, TensorRT on GPUs."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from d4m.dicom_io.errors import EngineError, InputError
from d4m.runtime.runners import (
    Device,
    EngineKind,
    OnnxRuntimeRunner,
    Runner,
    TensorRTRunner,
    as_predictor,
    gpu_environment,
    open_runner,
    resolve_device,
    tensorrt_importable,
)
from d4m.runtime.sliding_window import sliding_window_inference

onnx = pytest.importorskip("onnx")
helper, numpy_helper = onnx.helper, onnx.numpy_helper

RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((3, 4, 3, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(3).astype(np.float32)


def write_conv_model(path: Path, patch: int | str = 8) -> Path:
    """A 3D convolution 4 → 3 channels (kernel 3, padding 1); batch dynamic, channels fixed."""
    dims = ["N", 4, patch, patch, patch]
    out_dims = ["N", 3, patch, patch, patch]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["scores"], kernel_shape=[3, 3, 3], pads=[1] * 6)],
        "conv3d",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, out_dims)],
        [numpy_helper.from_array(WEIGHT, "weight"), numpy_helper.from_array(BIAS, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def reference(batch: np.ndarray) -> np.ndarray:
    """The same convolution in numpy/scipy (ONNX Conv is a cross-correlation, zero padded)."""
    out = np.empty((batch.shape[0], 3, *batch.shape[2:]), np.float64)
    for n, o in np.ndindex(batch.shape[0], 3):
        out[n, o] = BIAS[o] + sum(
            ndimage.correlate(batch[n, c].astype(np.float64), WEIGHT[o, c].astype(np.float64), mode="constant")
            for c in range(4)
        )
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conv_model(tmp_path_factory.mktemp("onnx") / "conv.onnx")


def test_onnx_runtime_matches_numpy(model: Path) -> None:
    batch = RNG.standard_normal((2, 4, 8, 8, 8)).astype(np.float32)
    with OnnxRuntimeRunner(model, device="cpu", threads=1) as runner:
        assert isinstance(runner, Runner)
        assert runner.input_names == ("image",) and runner.output_names == ("scores",)
        assert runner.providers == ("CPUExecutionProvider",)
        assert runner.inputs[0].shape == ("N", 4, 8, 8, 8)
        out = runner({"image": batch})
    assert set(out) == {"scores"} and out["scores"].dtype == np.float32
    np.testing.assert_allclose(out["scores"], reference(batch), atol=1e-4, rtol=1e-5)


def test_session_options_are_applied(model: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    with OnnxRuntimeRunner(model, threads=2, graph_optimization="disable") as runner:
        options = runner.session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with OnnxRuntimeRunner(model) as runner:
        assert runner.session.get_session_options().graph_optimization_level == (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"img": np.zeros((1, 4, 8, 8, 8), np.float32)}, r"expected the inputs \['image'\], found \['img'\]"),
    ({"image": np.zeros((4, 8, 8, 8), np.float32)}, r"expected input image: float32\[N, 4, 8, 8, 8\] \(rank 5\), "
                                                     r"found rank 4"),
    ({"image": np.zeros((1, 5, 8, 8, 8), np.float32)}, r"expected input image: .*found shape \(1, 5, 8, 8, 8\) "
                                                       r"\(axis 1: 5 instead of 4\)"),
    ({"image": np.zeros((1, 4, 8, 8, 8), np.float64)}, r"expected input 'image' of dtype float32, found float64"),
])  # fmt: skip
def test_wrong_inputs_give_clear_errors(model: Path, inputs: dict, message: str) -> None:
    with OnnxRuntimeRunner(model) as runner, pytest.raises(InputError, match=rf"conv\.onnx: {message}"):
        runner(inputs)


def test_closed_missing_and_corrupt(model: Path, tmp_path: Path) -> None:
    runner = OnnxRuntimeRunner(model)
    runner.close()
    with pytest.raises(EngineError, match="found it closed"):
        runner({"image": np.zeros((1, 4, 8, 8, 8), np.float32)})
    with pytest.raises(EngineError, match="expected an ONNX model file, found nothing"):
        OnnxRuntimeRunner(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(EngineError, match="junk.onnx: expected a loadable ONNX model"):
        OnnxRuntimeRunner(tmp_path / "junk.onnx")
    with pytest.raises(EngineError, match=r"device: expected one of \['auto', 'cpu', 'cuda', 'tensorrt'\]"):
        OnnxRuntimeRunner(model, device="gpu")


def test_cuda_asked_without_cuda(model: Path, caplog: pytest.LogCaptureFixture) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CPU-only behaviour cannot be shown here")
    with pytest.raises(EngineError, match="expected ONNX Runtime with CUDAExecutionProvider"):
        OnnxRuntimeRunner(model, device="cuda")
    with caplog.at_level(logging.WARNING), OnnxRuntimeRunner(model, device="cuda", allow_cpu_fallback=True) as r:
        assert r.providers == ("CPUExecutionProvider",)
    assert "expected CUDAExecutionProvider to be active" in caplog.text
    with OnnxRuntimeRunner(model, device="auto") as runner:  # auto tolerates the fallback
        assert runner.providers == ("CPUExecutionProvider",)


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import d4m.runtime.runners as runners

    assert resolve_device("auto", tensorrt_usable=True) == Device.TENSORRT
    assert resolve_device(Device.CPU, tensorrt_usable=True) == Device.CPU
    monkeypatch.setattr(runners, "onnx_cuda_available", lambda: True)
    assert resolve_device("auto", tensorrt_usable=False) == Device.CUDA
    monkeypatch.setattr(runners, "onnx_cuda_available", lambda: False)
    assert resolve_device("AUTO", tensorrt_usable=False) == Device.CPU


def test_factory_and_predictor(model: Path) -> None:
    with open_runner(EngineKind.ONNX, model, device="cpu") as runner:
        assert isinstance(runner, OnnxRuntimeRunner)
        image = RNG.standard_normal((4, 10, 9, 8)).astype(np.float32)
        scores = sliding_window_inference(image, (8, 8, 8), 0.5, as_predictor(runner), batch_size=2)
    assert scores.shape == (3, 10, 9, 8) and np.isfinite(scores).all()
    with pytest.raises(EngineError, match="engine kind: expected one of"):
        open_runner("pytorch", model)


@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed: the missing-dependency path cannot be shown")
def test_tensorrt_missing_names_the_extra(model: Path) -> None:
    with pytest.raises(EngineError, match=r"TensorRT engines: expected the optional dependency .*d4m\[gpu\]"):
        TensorRTRunner(model)
    assert gpu_environment() is None


def test_runtime_modules_never_import_torch() -> None:
    code = ("import sys, d4m.runtime.runners, d4m.runtime.bundle, d4m.runtime.phases; "
            "print(','.join(m for m in ('torch', 'monai', 'tensorrt', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.gpu
def test_tensorrt_engine_matches_numpy(model: Path, tmp_path: Path) -> None:
    """Build an engine from the ONNX model with the TensorRT 10 builder, run it through the runner."""
    if not tensorrt_importable() or gpu_environment() is None:
        pytest.skip("needs TensorRT, cuda-python and an NVIDIA GPU (pip install 'd4m[gpu]')")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 4, 8, 8, 8), (2, 4, 8, 8, 8), (4, 4, 8, 8, 8))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    path = tmp_path / "conv.plan"
    path.write_bytes(bytes(plan))
    batch = RNG.standard_normal((3, 4, 8, 8, 8)).astype(np.float32)
    with open_runner("tensorrt", path) as runner:
        assert runner.providers == ("TensorRT",)
        assert runner.input_names == ("image",) and runner.output_names == ("scores",)
        out = runner({"image": batch})
        np.testing.assert_allclose(out["scores"], reference(batch), atol=1e-2, rtol=1e-3)  # TF32 allowed
        with pytest.raises(InputError, match="within the engine's profile"):
            runner({"image": np.zeros((5, 4, 8, 8, 8), np.float32)})
