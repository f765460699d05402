"""ONNX → TensorRT engines in a bundle (``d4m-export tensorrt``), with the TensorRT 10 Python API.

Build once, load elsewhere (Polygraphy's ``EngineFromNetwork`` + ``SaveEngine`` vs
``EngineFromBytes``): this module builds serialized engines (``.plan``) from the bundle's FP32
ONNX segmenter and records them in the manifest with what they are tied to — GPU name, compute
capability and TensorRT version — so that :mod:`d4m.runtime.bundle` refuses them elsewhere.

Build settings:

* an optimisation profile for the sliding-window patch: ``min``/``opt``/``max`` shapes,
  batch 1 / 2 / 4 at the patch size by default (the spatial dims of a dynamic ONNX file are
  pinned to the patch: the runtime always feeds whole patches);
* FP32 engines clear ``TF32`` (TensorRT enables it by default on Ampere and later; it would
  break the FP32 parity gate); FP16 engines keep normalisation layers in FP32
  (``OBEY_PRECISION_CONSTRAINTS`` on every ``NORMALIZATION`` layer, FIELD-NOTES);
* a timing cache (``--timing-cache``; by default one file per GPU and TensorRT version in the
  user's cache folder) so rebuilding is fast;
* after the build, the engine runs the bundle's golden input through
  :class:`~d4m.runtime.runners.TensorRTRunner` and must pass its precision's parity gate
  before the manifest lists it; ``parity.json`` gains the row.

TensorRT is imported lazily through :func:`~d4m.dicom_io.errors.require` (extra ``d4m[gpu]``):
without it, or without a GPU, :func:`build_tensorrt` raises :class:`EngineError` (exit code 4).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from d4m.dicom_io.errors import BundleError, EngineError, InputError, require
from d4m.export.parity import PARITY_NAME, ParityError, ParityRow, check_outputs, golden_arrays, time_runner
from d4m.runtime.artifacts import read_json, write_json
from d4m.runtime.bundle import Bundle, file_ref, load_bundle, write_manifest
from d4m.runtime.manifest import SEGMENTER, EngineEntry, Precision
from d4m.runtime.runners import EngineKind, GpuEnvironment, TensorRTRunner, gpu_environment

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
#: Default batch sizes of the optimisation profile (min, opt, max).
DEFAULT_BATCHES = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class TensorRTConfig:
    """What ``d4m-export tensorrt`` builds.

    Attributes
    ----------
    bundle
        The bundle folder (engines are added to it; a zip is refused).
    fp16
        Build an FP16 engine (normalisation in FP32) instead of an FP32 one.
    min_shape, opt_shape, max_shape
        Optimisation profile of the segmenter input ``(N, C, z, y, x)``; ``None`` = batch
        1 / 2 / 4 at the bundle's patch size.
    workspace_mib
        Builder workspace limit.
    timing_cache
        Timing cache file; ``None`` = ``$XDG_CACHE_HOME/d4m`` (or ``~/.cache/d4m``).
    """

    bundle: Path
    fp16: bool = False
    min_shape: Shape | None = None
    opt_shape: Shape | None = None
    max_shape: Shape | None = None
    workspace_mib: int = 4096
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        if self.workspace_mib < 64:
            raise InputError(f"tensorrt: expected a workspace of at least 64 MiB, found {self.workspace_mib}")
        given = [s for s in (self.min_shape, self.opt_shape, self.max_shape) if s is not None]
        if given and len(given) != 3:
            raise InputError("tensorrt: expected --min-shape, --opt-shape and --max-shape together, found "
                             f"{len(given)} of them")


def parse_shape(text: str) -> Shape:
    """``"1x4x64x96x96"`` (or comma-separated) → ``(1, 4, 64, 96, 96)``.

    Raises
    ------
    InputError
        Not positive integers separated by ``x`` or ``,``.
    """
    parts = [p for p in re.split(r"[x,×]", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"shape: expected positive integers like 1x4x64x96x96, found {text!r}")
    return tuple(int(p) for p in parts)


def profile_shapes(entry: EngineEntry, patch_size: Sequence[int], config: TensorRTConfig) -> tuple[Shape, Shape,
                                                                                                   Shape]:
    """The (min, opt, max) shapes of the segmenter input, checked against the ONNX file's fixed dims.

    Raises
    ------
    InputError
        Wrong rank, min > opt > max, or a shape that contradicts a fixed dimension.
    """
    declared = entry.inputs[0].shape
    if config.min_shape is None or config.opt_shape is None or config.max_shape is None:
        channels = declared[1] if isinstance(declared[1], int) else 4
        shapes = tuple((b, channels, *patch_size) for b in DEFAULT_BATCHES)
    else:
        shapes = (config.min_shape, config.opt_shape, config.max_shape)
    low, opt, high = (tuple(int(d) for d in s) for s in shapes)
    for name, shape in (("min", low), ("opt", opt), ("max", high)):
        if len(shape) != len(declared):
            raise InputError(f"tensorrt: expected a {len(declared)}-d {name} shape for {entry.inputs[0].name} "
                             f"{list(declared)}, found {list(shape)}")
        for axis, (want, got) in enumerate(zip(declared, shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise InputError(f"tensorrt: expected {name} shape axis {axis} = {want} (fixed in "
                                 f"{entry.file}), found {got}")
    if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise InputError(f"tensorrt: expected min <= opt <= max per axis, found {list(low)}, {list(opt)}, "
                         f"{list(high)}")
    return low, opt, high


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: ``"NVIDIA H100 80GB HBM3"`` → ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_timing_cache(environment: GpuEnvironment) -> Path:
    """One timing cache per GPU model and TensorRT version, in the user's cache folder."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d4m"
    return root / f"tensorrt-{environment.tensorrt_version}-{gpu_slug(environment.gpu_name)}.timing"


def _keep_norms_fp32(trt: ModuleType, network: Any) -> int:
    """Pin every normalisation layer (and InstanceNorm plugin) to FP32; return how many."""
    kept = 0
    plugin_types = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
                    if hasattr(trt.LayerType, n)}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        is_norm = layer.type == trt.LayerType.NORMALIZATION
        if layer.type in plugin_types and "norm" in layer.name.lower():
            is_norm = True
        if is_norm:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            kept += 1
    return kept


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """One engine build: the ONNX file, where the plan goes, its precision and profile."""

    onnx: Path
    plan: Path
    precision: Precision
    input_name: str
    shapes: tuple[Shape, Shape, Shape]
    workspace_mib: int
    timing_cache: Path


def build_engine(request: BuildRequest, progress: Callable[[int], None] | None = None) -> Path:
    """Build and serialize one TensorRT engine from an ONNX file.

    Raises
    ------
    EngineError
        TensorRT is missing, the parser rejects the model, or the build fails.
    """
    trt = require("tensorrt", "TensorRT engine builds", "gpu")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(request.onnx.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{request.onnx.name}: expected the TensorRT ONNX parser to accept the model, "
                          f"found {errors or 'an unspecified error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_mib * 1024**2)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32 (TF32 is on by default on Ampere+)
    if request.precision == Precision.FP16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = _keep_norms_fp32(trt, network)
        logger.info("%s: %d normalisation layers kept in FP32", request.onnx.name, kept)
    profile = builder.create_optimization_profile()
    profile.set_shape(request.input_name, *request.shapes)
    config.add_optimization_profile(profile)
    cache_bytes = request.timing_cache.read_bytes() if request.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    logger.info("building %s (%s, profile %s)", request.plan.name, request.precision.value,
                " / ".join("x".join(map(str, s)) for s in request.shapes))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{request.onnx.name}: expected TensorRT to build a {request.precision.value} engine, "
                          f"found a failed build (see the TensorRT log above)")
    request.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    request.timing_cache.write_bytes(bytes(memoryview(cache.serialize())))
    tmp = request.plan.with_name(f".{request.plan.name}.partial")
    tmp.write_bytes(bytes(memoryview(serialized)))
    tmp.replace(request.plan)
    if progress is not None:
        progress(1)
    return request.plan


def _engine_parity(bundle: Bundle, entry: EngineEntry) -> ParityRow:
    inputs, reference = golden_arrays(bundle, entry)
    with TensorRTRunner(bundle.path(entry)) as runner:
        outputs, latency = time_runner(runner, inputs)
    return check_outputs(entry, reference, outputs, runner.providers[0], latency)


def tensorrt_environment() -> GpuEnvironment:
    """TensorRT's version and the GPU it builds for.

    Raises
    ------
    EngineError
        TensorRT, cuda-python or an NVIDIA GPU is missing.
    """
    require("tensorrt", "TensorRT engine builds", "gpu")
    environment = gpu_environment()
    if environment is None:
        raise EngineError("TensorRT engine builds: expected an NVIDIA GPU with cuda-python (pip install "
                          "'d4m[gpu]'), found none")
    return environment


def build_tensorrt(config: TensorRTConfig, progress: Callable[[int], None] | None = None) -> list[EngineEntry]:
    """Build a TensorRT engine of the bundle's segmenter, check it, and add it to the manifest.

    Parameters
    ----------
    config
        Bundle and build settings.
    progress
        Called with 1 after the build and after the parity check.

    Returns
    -------
    list[EngineEntry]
        The added engines.

    Raises
    ------
    BundleError
        The bundle is tampered, zipped, or has no FP32 ONNX segmenter.
    EngineError
        TensorRT, cuda-python or a GPU is missing; the build or the engine fails.
    ParityError
        The engine is outside its precision's tolerance (it is not added).
    """
    environment = tensorrt_environment()
    folder = config.bundle
    if not folder.is_dir():
        raise BundleError(f"{folder}: expected a bundle folder (engines are added to it), found "
                          f"{'a file' if folder.exists() else 'nothing'}")
    precision = Precision.FP16 if config.fp16 else Precision.FP32
    with load_bundle(folder, environment=environment) as bundle:
        manifest = bundle.manifest
        sources = [e for e in manifest.engines if e.name == SEGMENTER and e.format == EngineKind.ONNX
                   and e.precision == Precision.FP32]
        if not sources:
            raise BundleError(f"{folder}: expected an FP32 ONNX segmenter to build from, found "
                              f"{[e.file for e in manifest.engines]}")
        source = sources[0]
        shapes = profile_shapes(source, manifest.sliding_window.patch_size, config)
        plan_name = f"{SEGMENTER}.{gpu_slug(environment.gpu_name)}.{precision.value}.plan"
        request = BuildRequest(bundle.path(source), folder / plan_name, precision, source.inputs[0].name, shapes,
                               config.workspace_mib, config.timing_cache or default_timing_cache(environment))
        build_engine(request, progress)
        ref = file_ref(folder, plan_name)
        entry = EngineEntry(SEGMENTER, plan_name, EngineKind.TENSORRT, precision, source.inputs, source.outputs,
                            ref.sha256, gpu_name=environment.gpu_name,
                            compute_capability=environment.compute_capability,
                            tensorrt_version=environment.tensorrt_version)
        row = _engine_parity(bundle, entry)
        if progress is not None:
            progress(1)
        if not row.passed:
            (folder / plan_name).unlink(missing_ok=True)
            raise ParityError(f"{plan_name}: expected {precision.value} parity with the golden output, found "
                              + "; ".join(f"max |error| {c.max_abs:.3g}, Dice {c.dice}" for c in row.comparisons))
        engines = tuple(e for e in manifest.engines if e.file != plan_name) + (entry,)
        parity_path = folder / PARITY_NAME
        parity: dict[str, Any] = read_json(parity_path) if parity_path.is_file() else {}
        rows: list[dict[str, Any]] = [r for r in parity.get("engines", []) if r.get("file") != plan_name]
        rows.append(row.to_dict())
        parity.update(schema_version=parity.get("schema_version", 1), engines=rows,
                      passed=all(r.get("passed", False) for r in rows))
        write_json(parity_path, parity)
        files = tuple(file_ref(folder, f.file) if f.file == PARITY_NAME else f for f in manifest.files)
        if PARITY_NAME not in {f.file for f in files}:
            files += (file_ref(folder, PARITY_NAME),)
        write_manifest(folder, dataclasses.replace(manifest, engines=engines, files=files))
    logger.info("added %s (%s, %s, TensorRT %s): max |error| %.3g", plan_name, environment.gpu_name,
                precision.value, environment.tensorrt_version, max(c.max_abs for c in row.comparisons))
    return [entry]
