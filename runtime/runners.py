"""Engine runners: one protocol, two implementations (ONNX Runtime, TensorRT), no torch.

Every runner is a context manager with ``input_names``, ``output_names``, ``providers`` (what
actually ran, e.g. ``("CUDAExecutionProvider", "CPUExecutionProvider")`` or ``("TensorRT",)``)
and ``__call__(dict[str, np.ndarray]) -> dict[str, np.ndarray]``. Inputs are checked against the
model's declared names, ranks, fixed dimensions and dtypes before anything runs, so a mismatch
reads as one clear :class:`~d4m.dicom_io.errors.InputError` instead of an engine stack trace.

Device resolution (``--device``, :func:`resolve_device`)::

    auto      → tensorrt  when the bundle holds a TensorRT engine usable here (TensorRT and
                          cuda-python importable, same TensorRT version, same GPU model);
              → cuda      else, when ONNX Runtime offers the CUDAExecutionProvider
                          (onnxruntime-gpu); a silent CPU fallback is tolerated and reported;
              → cpu       otherwise.
    cpu       → ONNX Runtime, CPUExecutionProvider.
    cuda      → ONNX Runtime, CUDAExecutionProvider; falling back to the CPU is an error
                (onnxruntime-gpu does that silently, FIELD-NOTES), unless allowed.
    tensorrt  → the bundle's TensorRT engine; an unusable engine is an error.

TensorRT runs through the TensorRT 10 Python API (``deserialize_cuda_engine``, named I/O
tensors, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) with device memory
and streams from ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6):
NVIDIA's own binding, a small wheel, no torch and no pycuda context handling. Both are imported
only inside the TensorRT code, through :func:`~d4m.dicom_io.errors.require` (extra ``d4m[gpu]``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from d4m.dicom_io.errors import EngineError, InputError, require

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
#: What a TensorRT runner reports as its provider.
TENSORRT_PROVIDER = "TensorRT"

Dim = int | str | None


class EngineKind(str, Enum):
    """Format of an engine file in a bundle."""

    ONNX = "onnx"
    TENSORRT = "tensorrt"


class Device(str, Enum):
    """Where inference runs (``--device``); ``auto`` follows :func:`resolve_device`."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class GraphOptimization(str, Enum):
    """ONNX Runtime graph optimisation level."""

    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output of an engine as the engine declares it.

    Attributes
    ----------
    name
        Tensor name.
    shape
        Dimensions: an int when fixed, a str (symbolic) or ``None`` when dynamic.
    dtype
        Element type.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def describe(self) -> str:
        """``image: float32[N, 4, 96, 96, 96]``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class ClosingContext:
    """``with obj:`` closes ``obj`` at the end: the context-manager half of runners and bundles."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release what the object holds (subclasses say what)."""


class DeclaredTensors(ClosingContext):
    """What both runners expose about their engine's tensors (set ``_inputs`` and ``_outputs``)."""

    _inputs: tuple[TensorSpec, ...]
    _outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        """Declared input names, in model order."""
        return tuple(s.name for s in self._inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Declared output names, in model order."""
        return tuple(s.name for s in self._outputs)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Declared inputs: names, shapes (``None`` or a name for dynamic dimensions), dtypes."""
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Declared outputs: names, shapes (``None`` or a name for dynamic dimensions), dtypes."""
        return self._outputs


@runtime_checkable
class Runner(Protocol):
    """What the sliding window and the parity checks call (STYLE rule 14)."""

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def output_names(self) -> tuple[str, ...]: ...

    @property
    def providers(self) -> tuple[str, ...]: ...

    def __enter__(self) -> Runner: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_inputs(source: str, specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check arrays against declared inputs; return them C-contiguous, in declaration order.

    Parameters
    ----------
    source
        How messages name the engine (its file name).
    specs
        The engine's declared inputs.
    inputs
        Name → array given by the caller.

    Raises
    ------
    InputError
        Missing or unknown names, wrong rank, a fixed dimension or the dtype differs.
    """
    expected = [s.name for s in specs]
    if set(inputs) != set(expected):
        missing = sorted(set(expected) - set(inputs))
        unknown = sorted(set(inputs) - set(expected))
        raise InputError(f"{source}: expected the inputs {expected}, found {sorted(inputs)} "
                         f"(missing {missing}, unknown {unknown})")
    checked = {}
    for spec in specs:
        array = np.asarray(inputs[spec.name])
        if array.ndim != len(spec.shape):
            raise InputError(f"{source}: expected input {spec.describe()} (rank {len(spec.shape)}), "
                             f"found rank {array.ndim} with shape {array.shape}")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise InputError(f"{source}: expected input {spec.describe()}, found shape {array.shape} "
                                 f"(axis {axis}: {got} instead of {want})")
        if array.dtype != spec.dtype:
            raise InputError(f"{source}: expected input '{spec.name}' of dtype {spec.dtype}, found {array.dtype}")
        checked[spec.name] = np.ascontiguousarray(array)
    return checked


def as_predictor(runner: Runner, output: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Adapt a single-input runner to the sliding window's predictor (array in, array out).

    Parameters
    ----------
    runner
        An open runner with exactly one input.
    output
        Output to return; the first one when ``None``.

    Raises
    ------
    EngineError
        The runner has several inputs, or no output of that name.
    """
    if len(runner.input_names) != 1:
        raise EngineError(f"predictor: expected a runner with one input, found {list(runner.input_names)}")
    name = runner.output_names[0] if output is None else output
    if name not in runner.output_names:
        raise EngineError(f"predictor: expected an output in {list(runner.output_names)}, found '{name}'")
    (input_name,) = runner.input_names

    def predict(batch: np.ndarray) -> np.ndarray:
        return runner({input_name: batch})[name]

    return predict


# --------------------------------------------------------------------------- ONNX Runtime

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}  # fmt: skip


def _ort() -> ModuleType:
    """onnxruntime (a dependency of d4m; onnxruntime-gpu provides the same module)."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise EngineError(f"ONNX engines: expected onnxruntime (pip install d4m, or 'd4m[gpu]' for "
                          f"onnxruntime-gpu), found it missing ({exc})") from exc


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they do not share a base below ``Exception``)."""
    state = importlib.import_module("onnxruntime.capi.onnxruntime_pybind11_state")
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, OSError, ValueError)


def onnx_cuda_available() -> bool:
    """Whether ONNX Runtime offers the CUDA provider (onnxruntime-gpu; says nothing about a GPU)."""
    try:
        return CUDA_PROVIDER in _ort().get_available_providers()
    except EngineError:
        return False


class OnnxRuntimeRunner(DeclaredTensors):
    """Run an ONNX model with ONNX Runtime on the CPU or CUDA provider.

    Parameters
    ----------
    path
        The ``.onnx`` file.
    device
        ``cpu`` or ``cuda`` (``auto`` means ``cuda`` with the CPU fallback allowed).
    threads
        Intra-op threads; ``None`` leaves ONNX Runtime's default (one per physical core).
    graph_optimization
        Graph optimisation level.
    allow_cpu_fallback
        With ``device="cuda"``: log a warning instead of raising when only the CPU provider is active.

    Raises
    ------
    EngineError
        The model cannot be loaded, the CUDA provider is not installed, or CUDA was asked for
        and ONNX Runtime fell back to the CPU (unless allowed).
    """

    def __init__(
        self,
        path: Path,
        device: Device | str = Device.CPU,
        threads: int | None = None,
        graph_optimization: GraphOptimization | str = GraphOptimization.ALL,
        allow_cpu_fallback: bool = False,
    ) -> None:
        self.path = Path(path)
        device = _enum(Device, device, "device")
        if device == Device.TENSORRT:
            raise EngineError(f"{self.path.name}: expected device cpu or cuda for an ONNX model, found tensorrt")
        if device == Device.AUTO:
            device, allow_cpu_fallback = Device.CUDA if onnx_cuda_available() else Device.CPU, True
        level = _enum(GraphOptimization, graph_optimization, "graph optimization")
        if threads is not None and threads < 1:
            raise EngineError(f"{self.path.name}: expected threads >= 1 or None, found {threads}")
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = {
            GraphOptimization.DISABLE: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        options.log_severity_level = 3  # errors only: the library does not write to stderr
        requested = [CPU_PROVIDER]
        if device == Device.CUDA:
            available = list(ort.get_available_providers())
            if CUDA_PROVIDER in available:
                requested = [CUDA_PROVIDER, CPU_PROVIDER]
            elif not allow_cpu_fallback:
                raise EngineError(
                    f"{self.path.name}: expected ONNX Runtime with {CUDA_PROVIDER} (pip install 'd4m[gpu]', "
                    f"which installs onnxruntime-gpu), found only {available}"
                )
        if not self.path.is_file():
            raise EngineError(f"{self.path}: expected an ONNX model file, found nothing")
        try:
            self._session: Any = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        except _ort_errors() as exc:
            raise EngineError(f"{self.path.name}: expected a loadable ONNX model, found {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc
        self.device = device
        self._providers = tuple(self._session.get_providers())
        if device == Device.CUDA and CUDA_PROVIDER not in self._providers:
            message = (f"{self.path.name}: expected {CUDA_PROVIDER} to be active, found only "
                       f"{list(self._providers)} (no usable GPU or CUDA libraries)")
            if not allow_cpu_fallback:
                raise EngineError(message)
            logger.warning("%s; running on the CPU", message)
        self._inputs = tuple(_ort_spec(a) for a in self._session.get_inputs())
        self._outputs = tuple(_ort_spec(a) for a in self._session.get_outputs())
        logger.info("%s: ONNX Runtime on %s (%s threads, optimisation %s)", self.path.name,
                    ", ".join(self._providers), threads or "default", level.value)

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers of the session, as ONNX Runtime reports them."""
        return self._providers

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession`` (for options and profiling).

        Raises
        ------
        EngineError
            The runner was closed.
        """
        if self._session is None:
            raise EngineError(f"{self.path.name}: expected an open runner, found it closed")
        return self._session

    def close(self) -> None:
        """Release the session."""
        self._session = None

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model.

        Raises
        ------
        InputError
            The arrays do not match the declared inputs.
        EngineError
            The runner is closed or ONNX Runtime failed.
        """
        session = self.session
        feed = check_inputs(self.path.name, self._inputs, inputs)
        try:
            results = session.run(list(self.output_names), feed)
        except _ort_errors() as exc:
            raise EngineError(f"{self.path.name}: expected a successful run, found {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc
        return dict(zip(self.output_names, results, strict=True))


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise EngineError(f"model tensor '{arg.name}': expected one of {sorted(_ORT_DTYPES)}, found {arg.type}")
    shape = tuple(d if isinstance(d, int | str) or d is None else str(d) for d in arg.shape)
    return TensorSpec(arg.name, shape, np.dtype(dtype))


# --------------------------------------------------------------------------- TensorRT


@dataclass(frozen=True)
class GpuEnvironment:
    """The TensorRT version and GPU of this machine, to match engines against.

    Attributes
    ----------
    tensorrt_version
        ``tensorrt.__version__``.
    gpu_name
        CUDA device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
    compute_capability
        ``"major.minor"``, e.g. ``"9.0"``.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def _cudart() -> ModuleType:
    """cuda-python's runtime API module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return require("cuda.cudart", "TensorRT engines (CUDA memory through cuda-python)", "gpu")


def _cuda_call(cudart: ModuleType, what: str, result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising :class:`EngineError` on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA {what}: expected cudaSuccess, found {err}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_environment(device_index: int = 0) -> GpuEnvironment | None:
    """TensorRT version and GPU of this machine, or ``None`` when TensorRT, cuda-python or a GPU is missing."""
    try:
        trt = require("tensorrt", "TensorRT engines", "gpu")
        cudart = _cudart()
        count = _cuda_call(cudart, "cudaGetDeviceCount", cudart.cudaGetDeviceCount())
        if count <= device_index:
            return None
        props = _cuda_call(cudart, "cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device_index))
    except EngineError as exc:
        logger.debug("no TensorRT environment: %s", exc)
        return None
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuEnvironment(str(trt.__version__), name.strip(), f"{props.major}.{props.minor}")


class TensorRTRunner(DeclaredTensors):
    """Run a serialized TensorRT 10 engine (``.plan``) on one GPU.

    Buffers are allocated per call for the actual input shapes (dynamic shapes within the
    engine's optimisation profile 0 are supported) and reused while the sizes fit.

    Parameters
    ----------
    path
        The engine file.
    device_index
        CUDA device to run on.

    Raises
    ------
    EngineError
        TensorRT or cuda-python is not installed, no GPU, or the engine does not deserialize
        (another TensorRT version or GPU).
    """

    def __init__(self, path: Path, device_index: int = 0) -> None:
        self.path = Path(path)
        self._trt = require("tensorrt", "TensorRT engines", "gpu")
        self._cudart = _cudart()
        trt, cudart = self._trt, self._cudart
        if not self.path.is_file():
            raise EngineError(f"{self.path}: expected a TensorRT engine file, found nothing")
        _cuda_call(cudart, "cudaSetDevice", cudart.cudaSetDevice(device_index))
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._trt_logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineError(f"{self.path.name}: expected an engine built for TensorRT {trt.__version__} on this "
                              f"GPU, found one that does not deserialize (other version or GPU?)")
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{self.path.name}: expected an execution context, found none (GPU memory?)")
        self._stream = _cuda_call(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = tuple(int(d) for d in engine.get_tensor_shape(name))
            spec = TensorSpec(name, tuple(None if d < 0 else d for d in dims),
                              np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        self._inputs, self._outputs = tuple(inputs), tuple(outputs)
        logger.info("%s: TensorRT %s, inputs %s", self.path.name, trt.__version__,
                    [s.describe() for s in self._inputs])

    @property
    def providers(self) -> tuple[str, ...]:
        """Always ``("TensorRT",)``: an engine runs on its GPU or not at all."""
        return (TENSORRT_PROVIDER,)

    def close(self) -> None:
        """Free device buffers and the stream, release the engine."""
        cudart = self._cudart
        for pointer, _ in self._buffers.values():
            cudart.cudaFree(pointer)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for tensor ``name`` (reallocated when too small)."""
        cudart = self._cudart
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _cuda_call(cudart, "cudaFree", cudart.cudaFree(pointer))
            pointer = int(_cuda_call(cudart, "cudaMalloc", cudart.cudaMalloc(max(nbytes, 1))))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0))
        if len(low) == len(shape) and not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)):
            raise InputError(f"{self.path.name}: expected input '{name}' within the engine's profile "
                             f"{list(low)}..{list(high)}, found shape {list(shape)}")

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine.

        Raises
        ------
        InputError
            The arrays do not match the declared inputs or the optimisation profile.
        EngineError
            The runner is closed, a CUDA call or the execution failed.
        """
        if self._context is None:
            raise EngineError(f"{self.path.name}: expected an open runner, found it closed")
        cudart, context = self._cudart, self._context
        feed = check_inputs(self.path.name, self._inputs, inputs)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in feed.items():
            if any(d is None for d in next(s for s in self._inputs if s.name == name).shape):
                self._check_profile(name, array.shape)
            if not context.set_input_shape(name, array.shape):
                raise InputError(f"{self.path.name}: expected a shape the engine accepts for '{name}', "
                                 f"found {list(array.shape)}")
            pointer = self._buffer(name, array.nbytes)
            _cuda_call(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(
                pointer, array.ctypes.data, array.nbytes, h2d, self._stream))
            context.set_tensor_address(name, pointer)
        results = {}
        for spec in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.path.name}: expected a resolved shape for output '{spec.name}', "
                                  f"found {list(shape)}")
            results[spec.name] = np.empty(shape, dtype=spec.dtype)
            context.set_tensor_address(spec.name, self._buffer(spec.name, results[spec.name].nbytes))
        if not context.execute_async_v3(int(self._stream)):
            raise EngineError(f"{self.path.name}: expected execute_async_v3 to succeed, found a failure "
                              "(see the TensorRT log)")
        for name, array in results.items():
            _cuda_call(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(
                array.ctypes.data, self._buffers[name][0], array.nbytes, d2h, self._stream))
        _cuda_call(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self._stream))
        return results


# --------------------------------------------------------------------------- selection


def tensorrt_importable() -> bool:
    """Whether ``tensorrt`` and cuda-python import (a GPU may still be missing)."""
    try:
        require("tensorrt", "TensorRT engines", "gpu")
        _cudart()
    except EngineError:
        return False
    return True


def resolve_device(device: Device | str, tensorrt_usable: bool) -> Device:
    """Turn ``auto`` into a concrete device (module docstring); other values pass through.

    Parameters
    ----------
    device
        What the user asked for.
    tensorrt_usable
        Whether a TensorRT engine usable on this machine is at hand (see ``Bundle.usable``).
    """
    asked: Device = _enum(Device, device, "device")
    if asked != Device.AUTO:
        return asked
    if tensorrt_usable:
        return Device.TENSORRT
    return Device.CUDA if onnx_cuda_available() else Device.CPU


def open_runner(
    kind: EngineKind | str,
    path: Path,
    device: Device | str = Device.CPU,
    threads: int | None = None,
    graph_optimization: GraphOptimization | str = GraphOptimization.ALL,
) -> OnnxRuntimeRunner | TensorRTRunner:
    """Open the runner for an engine file.

    Parameters
    ----------
    kind
        ``onnx`` or ``tensorrt``.
    path
        The engine file.
    device
        For ONNX: ``cpu``, ``cuda`` (strict) or ``auto`` (CUDA when offered, CPU fallback
        tolerated). Ignored for TensorRT, which always runs on the GPU.
    threads, graph_optimization
        ONNX Runtime session options (ignored for TensorRT).

    Raises
    ------
    EngineError
        Unknown kind, or the runner cannot open (see the runner classes).
    """
    kind = _enum(EngineKind, kind, "engine kind")
    if kind == EngineKind.TENSORRT:
        return TensorRTRunner(path)
    return OnnxRuntimeRunner(path, device=device, threads=threads, graph_optimization=graph_optimization)


def _enum(cls: type[Any], value: Any, what: str) -> Any:
    try:
        return cls(value.value if isinstance(value, Enum) else str(value).lower())
    except ValueError as exc:
        raise EngineError(f"{what}: expected one of {[m.value for m in cls]}, found {value!r}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
