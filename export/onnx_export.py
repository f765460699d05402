"""torch → ONNX: export, checker and shape inference, optional simplification, FP16 variants.

Export uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): DynUNet, the
autoencoder and MONAI's diffusion U-Net export with it (FIELD-NOTES), it needs no onnxscript,
and the FFC inpainter goes through its matmul-DFT copy
(:func:`d4m.training.inpainter.swap_fft_for_export`) because this exporter has no FFT.
Every exported file passes :func:`onnx.checker.check_model` and strict shape inference, and
is saved with the inferred shapes.

``simplify``: ONNX Runtime's *basic* offline graph optimisation (constant folding, redundant
node elimination, semantics-preserving fusions onto standard ONNX ops), saved as a plain ONNX
file. Basic-level rewrites run before provider assignment, so the file stays portable to any
execution provider and to TensorRT; onnx-simplifier is not needed.

FP16 variants (:func:`convert_to_fp16`): onnxconverter-common's ``convert_float_to_float16``
is not a dependency of d4m, so the cast insertion is implemented here with ``onnx``:

1. shape inference gives the element type of every value;
2. every node computes in FP16 except the ops in ``keep_fp32`` (normalisation layers:
   FP16 InstanceNorm loses accuracy in TensorRT and ONNX Runtime CUDA, FIELD-NOTES) and ops
   whose float output comes from an attribute we cannot retype;
3. float initializers and ``Constant`` tensors used only by FP16 nodes are stored in FP16
   (clipped to ±65504), the others stay FP32; ``Cast(to=FLOAT)`` inside FP16 regions becomes
   ``Cast(to=FLOAT16)``; ``Resize``'s ``roi``/``scales`` stay FP32 as the standard requires;
4. a ``Cast`` is inserted wherever a value's type differs from what its consumer computes in,
   one per (value, type); graph inputs and outputs keep FP32, so the runtime feeds the same
   arrays to both variants.

Graphs with control flow (``If``, ``Loop``, ``Scan``) are refused: their subgraphs would
need the same treatment and none of d4m's networks has one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from d4m.dicom_io.errors import EngineError
from d4m.runtime.manifest import Precision, TensorEntry

logger = logging.getLogger(__name__)

#: Default opset: supported by ONNX Runtime ≥ 1.17 and TensorRT 10 alike.
DEFAULT_OPSET = 17
#: Ops kept in FP32 in FP16 variants.
NORMALIZATION_OPS: tuple[str, ...] = ("InstanceNormalization", "GroupNormalization", "LayerNormalization",
                                      "BatchNormalization")
#: (op, input index) pairs that the ONNX standard types as float32 whatever the data type.
_FLOAT32_INPUTS = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1)})
#: Ops that make float tensors from attributes we do not retype: always computed in FP32.
_ATTRIBUTE_TYPED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike",
                              "Multinomial", "Bernoulli"})
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_FP16_MAX = float(np.finfo(np.float16).max)
_ONNX_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
    TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.INT16: "int16", TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool",
}  # fmt: skip


@dataclass(frozen=True)
class OnnxModel:
    """An exported ONNX file and what the manifest says about it.

    Attributes
    ----------
    path
        The file.
    inputs, outputs
        Names, shapes (ints fixed, names dynamic) and dtypes, in graph order.
    opset
        Default-domain opset of the file.
    precision
        ``fp32``, or ``fp16`` for a converted variant.
    """

    path: Path
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    opset: int
    precision: Precision = Precision.FP32


def graph_tensors(model: onnx.ModelProto) -> tuple[tuple[TensorEntry, ...], tuple[TensorEntry, ...]]:
    """The graph's inputs (initializers excluded) and outputs as manifest entries.

    Raises
    ------
    EngineError
        A tensor of an element type the manifest does not know.
    """
    initializers = {t.name for t in model.graph.initializer}

    def entry(value: onnx.ValueInfoProto) -> TensorEntry:
        tensor = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise EngineError(f"ONNX tensor '{value.name}': expected one of {sorted(_ONNX_DTYPES.values())}, "
                              f"found element type {tensor.elem_type}")
        dims: list[int | str] = []
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or f"{value.name}_{axis}")
        return TensorEntry(value.name, tuple(dims), dtype)

    inputs = tuple(entry(v) for v in model.graph.input if v.name not in initializers)
    return inputs, tuple(entry(v) for v in model.graph.output)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset of a model."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_and_infer(path: Path) -> onnx.ModelProto:
    """Run the ONNX checker and strict shape inference; save the model with the inferred shapes.

    Raises
    ------
    EngineError
        The checker or shape inference rejects the model.
    """
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=False)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, OSError, ValueError) as exc:
        raise EngineError(f"{path.name}: expected a model that passes the ONNX checker and shape inference, "
                          f"found {type(exc).__name__}: {_first_line(exc)}") from exc
    onnx.save(inferred, str(path))
    return inferred


def export_module(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxModel:
    """Export a module with the TorchScript exporter, then check it and infer its shapes.

    Parameters
    ----------
    module
        The network, put in eval mode here.
    example
        Example inputs, one tensor per input name.
    path
        The ``.onnx`` file to write.
    input_names, output_names
        Graph tensor names, in ``forward`` order.
    dynamic_axes
        ``{tensor name: {axis: dimension name}}`` for dynamic dimensions; the rest is fixed.
    opset
        ONNX opset.

    Returns
    -------
    OnnxModel

    Raises
    ------
    EngineError
        The exporter, the checker or shape inference fails.
    """
    if len(example) != len(input_names):
        raise EngineError(f"{path.name}: expected one example tensor per input {list(input_names)}, "
                          f"found {len(example)}")
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: dict(axes) for name, axes in (dynamic_axes or {}).items()}
    with warnings.catch_warnings():
        # the legacy exporter announces itself, and InstanceNorm always uses input statistics
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding - Only steps=1.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, tuple(example), str(path), input_names=list(input_names),
                    output_names=list(output_names), dynamic_axes=axes or None, opset_version=opset,
                    do_constant_folding=True, dynamo=False,
                )
        except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as exc:
            raise EngineError(f"{path.name}: expected the TorchScript ONNX exporter to succeed, found "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
    model = check_and_infer(path)
    inputs, outputs = graph_tensors(model)
    logger.info("exported %s (opset %d, %d nodes, %.1f MB)", path.name, opset, len(model.graph.node),
                path.stat().st_size / 1e6)
    return OnnxModel(path, inputs, outputs, opset_of(model))


def describe(path: Path) -> OnnxModel:
    """Read an ONNX file's tensors, opset and precision (FP16 when its weights are mostly FP16).

    Raises
    ------
    EngineError
        The file cannot be read.
    """
    try:
        model = onnx.load(str(path))
    except (OSError, ValueError, DecodeError) as exc:
        raise EngineError(f"{path}: expected an ONNX model, found {type(exc).__name__}") from exc
    inputs, outputs = graph_tensors(model)
    halves = sum(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    singles = sum(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    precision = Precision.FP16 if halves > singles else Precision.FP32
    return OnnxModel(path, inputs, outputs, opset_of(model), precision)


def simplify(path: Path, out: Path | None = None) -> OnnxModel:
    """Constant-fold and clean a model with ONNX Runtime's basic (portable) offline optimisation.

    Parameters
    ----------
    path
        The model.
    out
        Where to write; ``path`` itself (replaced) when ``None``.

    Raises
    ------
    EngineError
        ONNX Runtime cannot load the model, or the result fails the checker.
    """
    import onnxruntime as ort

    target = out or path
    tmp = target.with_name(f".{target.name}.simplified")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3
    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    try:
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except (RuntimeError, ValueError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"{path.name}: expected ONNX Runtime to load the model for simplification, found "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc
    tmp.replace(target)
    model = check_and_infer(target)
    logger.info("simplified %s: %d → %d nodes", path.name, before, len(model.graph.node))
    inputs, outputs = graph_tensors(model)
    return OnnxModel(target, inputs, outputs, opset_of(model))


# --------------------------------------------------------------------------- precise normalisation


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def instance_norm_as_layer_norm(src: Path, dst: Path | None = None) -> OnnxModel:
    """Rewrite ``InstanceNormalization`` as ``LayerNormalization`` over the flattened spatial axes.

    ONNX Runtime's CPU InstanceNormalization sums in float32 and loses accuracy when a
    channel's mean is large against its spread (measured: 1.7e-5 max error at mean/std = 10,
    1e-3 at 1000, 16–22× torch's; on the golden phantom patch the tiny DynUNet's logits were
    3.1e-4 off). Its LayerNormalization kernel is accurate (4e-6 / 3e-5 in the same test), and
    ``InstanceNorm(x) = LayerNorm(x.reshape(N, C, -1), axis=-1).reshape(x.shape) * γ + β``
    (γ, β per channel). TensorRT maps both ops to its normalisation layer; the FP16 converter
    keeps both in FP32. Cost on ONNX Runtime CPU: about 10–20 % (``bench/onnx_vs_torch.py``).

    Parameters
    ----------
    src
        A shape-inferred model (:func:`check_and_infer`).
    dst
        Where to write; ``src`` itself when ``None``.

    Raises
    ------
    EngineError
        The result fails the checker.
    """
    target = dst or src
    model = onnx.load(str(src))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    dropped: set[str] = set()
    shared = {"flat": "__d4m_norm_flat_shape", "one": "__d4m_norm_one", "zero": "__d4m_norm_zero"}
    rewritten = 0
    for index, node in enumerate(graph.node):
        rank = _rank(model, node.input[0]) if node.op_type == "InstanceNormalization" else None
        if (node.op_type != "InstanceNormalization" or rank is None or rank < 3
                or node.input[1] not in initializers or node.input[2] not in initializers):
            nodes.append(node)
            continue
        x, scale, bias = node.input
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        prefix = f"{node.name or 'instance_norm'}__{index}"
        per_channel = (-1,) + (1,) * (rank - 2)
        for name in (scale, bias):
            array = numpy_helper.to_array(initializers[name]).astype(np.float32).reshape(per_channel)
            added.append(numpy_helper.from_array(array, f"{prefix}/{name}_per_channel"))
            consumers[name] -= 1
            if consumers[name] == 0:
                dropped.add(name)
        nodes += [
            helper.make_node("Reshape", [x, shared["flat"]], [f"{prefix}/flat"], name=f"{prefix}/reshape"),
            helper.make_node("LayerNormalization", [f"{prefix}/flat", shared["one"], shared["zero"]],
                             [f"{prefix}/normalized"], axis=-1, epsilon=epsilon, name=f"{prefix}/layer_norm"),
            helper.make_node("Shape", [x], [f"{prefix}/shape"], name=f"{prefix}/shape"),
            helper.make_node("Reshape", [f"{prefix}/normalized", f"{prefix}/shape"], [f"{prefix}/restored"],
                             name=f"{prefix}/restore"),
            helper.make_node("Mul", [f"{prefix}/restored", f"{prefix}/{scale}_per_channel"], [f"{prefix}/scaled"],
                             name=f"{prefix}/scale"),
            helper.make_node("Add", [f"{prefix}/scaled", f"{prefix}/{bias}_per_channel"], [node.output[0]],
                             name=f"{prefix}/shift"),
        ]
        rewritten += 1
    if rewritten:
        added += [numpy_helper.from_array(np.array([0, 0, -1], np.int64), shared["flat"]),
                  numpy_helper.from_array(np.ones(1, np.float32), shared["one"]),
                  numpy_helper.from_array(np.zeros(1, np.float32), shared["zero"])]
        kept = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept + added)
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.value_info[:]
    onnx.save(model, str(target))
    checked = check_and_infer(target)
    logger.info("%s: %d InstanceNormalization nodes as LayerNormalization", target.name, rewritten)
    inputs, outputs = graph_tensors(checked)
    return OnnxModel(target, inputs, outputs, opset_of(checked))


# --------------------------------------------------------------------------- FP16


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the (shape-inferred) graph."""
    graph = model.graph
    types: dict[str, int] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _fp16_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    clipped = int(np.count_nonzero(np.abs(array) > _FP16_MAX))
    if clipped:
        logger.warning("%s: %d values beyond the FP16 range were clipped to ±%g", tensor.name, clipped, _FP16_MAX)
    return numpy_helper.from_array(np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16), tensor.name)


def _node_computes_fp16(node: onnx.NodeProto, keep_fp32: frozenset[str]) -> bool:
    return node.op_type not in keep_fp32 and node.op_type not in _ATTRIBUTE_TYPED and node.domain in ("", "ai.onnx")


def _retype_node(node: onnx.NodeProto) -> None:
    """Make an FP16 node's attribute-typed float outputs FP16 (Cast targets, ConstantOfShape values)."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        if node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_fp16_tensor(attr.t))


def convert_to_fp16(src: Path, dst: Path, keep_fp32: Sequence[str] = NORMALIZATION_OPS) -> OnnxModel:
    """Write an FP16 variant of an FP32 model, keeping ``keep_fp32`` ops and the graph I/O in FP32.

    Parameters
    ----------
    src
        The FP32 model (shape inference must type every value, as :func:`check_and_infer` does).
    dst
        The FP16 file to write.
    keep_fp32
        Op types computed in FP32 (inputs cast up, outputs cast down).

    Returns
    -------
    OnnxModel
        With ``precision`` fp16 and the same inputs and outputs as ``src``.

    Raises
    ------
    EngineError
        Control flow in the graph, an untyped value, or a result that fails the checker.
    """
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)), strict_mode=True)
    graph = model.graph
    # one list of node objects: protobuf may hand out new wrappers on each iteration (ids unstable)
    graph_nodes = list(graph.node)
    flow = sorted({n.op_type for n in graph_nodes if n.op_type in _CONTROL_FLOW})
    if flow:
        raise EngineError(f"{src.name}: expected a graph without control flow for FP16 conversion, found {flow}")
    blocked = frozenset(keep_fp32)
    types = _value_types(model)
    float_t, half_t = TensorProto.FLOAT, TensorProto.FLOAT16
    fp16_nodes = {id(n) for n in graph_nodes if n.op_type != "Constant" and _node_computes_fp16(n, blocked)}

    def wanted(node: onnx.NodeProto, index: int) -> int:
        fp16 = id(node) in fp16_nodes and (node.op_type, index) not in _FLOAT32_INPUTS
        return half_t if fp16 else float_t

    # what each float value's consumers compute in
    demands: dict[str, set[int]] = {}
    for node in graph_nodes:
        for index, name in enumerate(node.input):
            if name and types.get(name) == float_t:
                demands.setdefault(name, set()).add(wanted(node, index))
    outputs = {v.name for v in graph.output}
    for name in outputs:
        demands.setdefault(name, set()).add(float_t)

    # home type of each float value: where it is produced
    home: dict[str, int] = {v.name: float_t for v in graph.input}
    initializers = []
    for tensor in graph.initializer:
        if tensor.data_type == float_t and demands.get(tensor.name) == {half_t}:
            tensor = _fp16_tensor(tensor)
        home[tensor.name] = tensor.data_type
        initializers.append(tensor)
    for node in graph_nodes:
        if node.op_type == "Constant":
            name = node.output[0]
            if types.get(name) == float_t and demands.get(name) == {half_t}:
                for attr in node.attribute:
                    if attr.name == "value":
                        attr.t.CopyFrom(_fp16_tensor(attr.t))
                home[name] = half_t
            continue
        if id(node) in fp16_nodes:
            _retype_node(node)
        for name in node.output:
            if types.get(name) == float_t:
                home[name] = half_t if id(node) in fp16_nodes else float_t
    untyped = sorted(n for n in demands if n not in home and types.get(n) == float_t)
    if untyped:
        raise EngineError(f"{src.name}: expected every float value typed by shape inference, found {untyped[:5]}")

    # rename FP16-produced graph outputs so that a final Cast can keep the public name in FP32
    renamed = {name: f"{name}__fp16" for name in outputs if home.get(name) == half_t}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if to == half_t else 'fp32'}"
            nodes.append(helper.make_node("Cast", [renamed.get(name, name)], [casts[key]], to=to,
                                          name=f"{casts[key]}__cast"))
        return casts[key]

    for node in graph_nodes:
        for index, name in enumerate(node.input):
            if not name or types.get(name) != float_t:
                continue
            need = wanted(node, index) if node.op_type != "Constant" else float_t
            node.input[index] = renamed.get(name, name) if home.get(name, float_t) == need else cast(name, need)
        for index, name in enumerate(node.output):
            if name in renamed:
                node.output[index] = renamed[name]
        nodes.append(node)
    for name, internal in renamed.items():
        nodes.append(helper.make_node("Cast", [internal], [name], to=float_t, name=f"{name}__to_fp32"))

    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    checked = check_and_infer(dst)
    inputs, outs = graph_tensors(checked)
    kept = sum(n.op_type in blocked for n in checked.graph.node)
    logger.info("FP16 variant %s: %d casts inserted, %d nodes kept in FP32 (%s)", dst.name, len(casts) + len(renamed),
                kept, ", ".join(sorted(blocked)))
    return OnnxModel(dst, inputs, outs, opset_of(checked), Precision.FP16)


def fp32_islands(path: Path, ops: Sequence[str] = NORMALIZATION_OPS) -> dict[str, int]:
    """Element type (ONNX enum) of the first input of every ``ops`` node, keyed by node name (for checks)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = _value_types(model)
    return {node.name or f"{node.op_type}#{i}": types.get(node.input[0], 0)
            for i, node in enumerate(model.graph.node) if node.op_type in ops}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"



# --------------------------------------------------------------------------- d4m's networks

#: Tensor names of the segmenter in every bundle.
SEGMENTER_INPUT = "image"
SEGMENTER_OUTPUT = "logits"


def export_segmenter(
    network: nn.Module,
    channels: int,
    patch_size: Sequence[int],
    path: Path,
    fixed_patch: bool = False,
    opset: int = DEFAULT_OPSET,
    precise_norm: bool = True,
) -> OnnxModel:
    """Export the segmenter: ``image (N, channels, z, y, x)`` → ``logits (N, classes, z, y, x)``.

    Parameters
    ----------
    network
        The trained network.
    channels
        Input channels (phases).
    patch_size
        Sliding-window patch ``(z, y, x)``: the example size, and the fixed size with ``fixed_patch``.
    path
        File to write.
    fixed_patch
        Fix the spatial dims to ``patch_size`` (only the batch stays dynamic); otherwise batch and
        the three spatial dims are dynamic (``N``, ``Z``, ``Y``, ``X``).
    opset
        ONNX opset.
    precise_norm
        Rewrite InstanceNormalization for accuracy in ONNX Runtime
        (:func:`instance_norm_as_layer_norm`).

    Raises
    ------
    EngineError
        The export or its checks fail.
    """
    axes = {0: "N"} if fixed_patch else {0: "N", 2: "Z", 3: "Y", 4: "X"}
    example = torch.zeros(1, channels, *patch_size)
    model = export_module(network, (example,), path, (SEGMENTER_INPUT,), (SEGMENTER_OUTPUT,),
                          {SEGMENTER_INPUT: axes, SEGMENTER_OUTPUT: axes}, opset)
    return instance_norm_as_layer_norm(model.path) if precise_norm else model


@dataclass(frozen=True)
class NetworkPart:
    """A synthesis network ready to export: a module taking named tensors, and example inputs.

    Attributes
    ----------
    name
        Engine name in the manifest (``inpainter``, ``encoder``, ``decoder``, ``denoiser``).
    module
        Takes the inputs positionally in ``inputs`` order.
    inputs
        Name → example tensor (also the golden input when it holds real data).
    outputs
        Output names.
    dynamic_axes
        Dynamic dimensions per tensor name.
    """

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]

    def reference(self) -> dict[str, np.ndarray]:
        """The torch outputs on the example inputs (float32 numpy)."""
        with torch.no_grad():
            result = self.module.eval()(*self.inputs.values())
        values = result if isinstance(result, tuple) else (result,)
        return {name: v.float().cpu().numpy() for name, v in zip(self.outputs, values, strict=True)}

    def export(self, path: Path, opset: int = DEFAULT_OPSET) -> OnnxModel:
        """Export with :func:`export_module`."""
        return export_module(self.module, tuple(self.inputs.values()), path, tuple(self.inputs), self.outputs,
                             self.dynamic_axes, opset)


class _Call(nn.Module):
    """Expose one method of a network as ``forward`` (encode, decode, the raw generator)."""

    def __init__(self, network: nn.Module, method: str) -> None:
        super().__init__()
        self.network = network
        self.method = method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.network, self.method)(*args)


def inpainter_part(
    model: nn.Module, image: torch.Tensor, mask: torch.Tensor, phase: torch.Tensor | None
) -> NetworkPart:
    """The FFC inpainter for one slice size, with its FFTs as matrix products (TorchScript-exportable).

    Parameters
    ----------
    model
        A :class:`~d4m.training.inpainter.FFCResNetGenerator`.
    image, mask
        ``(N, 1, H, W)`` example slice in [-1, 1] and hole mask: H × W is the exported size.
    phase
        ``(N, 4)`` one-hot phase when the model takes one, else ``None``.
    """
    from d4m.training.inpainter import swap_fft_for_export

    export = swap_fft_for_export(model, int(image.shape[-2]), int(image.shape[-1]))
    inputs = {"image": image, "mask": mask}
    if getattr(model, "phase_channel", False):
        if phase is None:
            raise EngineError("inpainter: expected an example phase for a model trained with phases, found none")
        inputs["phase"] = phase
    axes = {name: {0: "N"} for name in (*inputs, "prediction")}
    return NetworkPart("inpainter", _Call(export, "forward"), inputs, ("prediction",), axes)


def autoencoder_parts(model: nn.Module, image: torch.Tensor) -> tuple[NetworkPart, NetworkPart]:
    """Encoder (image in [-1, 1] → continuous latent) and decoder (latent → image), dynamic batch and size.

    Parameters
    ----------
    model
        A :class:`~d4m.training.autoencoder.CTAutoencoder`.
    image
        ``(N, 1, D, H, W)`` example crop; its latent is the decoder's example.
    """
    encoder = _Call(model, "encode").eval()
    with torch.no_grad():
        latent = encoder(image)
    spatial = {0: "N", 2: "D", 3: "H", 4: "W"}
    latent_axes = {0: "N", 2: "d", 3: "h", 4: "w"}
    return (
        NetworkPart("encoder", encoder, {"image": image}, ("latent",), {"image": spatial, "latent": latent_axes}),
        NetworkPart("decoder", _Call(model, "decode"), {"latent": latent}, ("image_out",),
                    {"latent": latent_axes, "image_out": spatial}),
    )


def denoiser_part(denoiser: nn.Module, inputs: Mapping[str, torch.Tensor]) -> NetworkPart:
    """The LDM's εθ(z_t, z_masked, mask, t[, phase_index]) with its integer timestep input.

    Parameters
    ----------
    denoiser
        A :class:`~d4m.training.ldm.LatentDenoiser`.
    inputs
        ``z_t``, ``z_masked``, ``mask`` (float), ``timesteps`` (int64, ``(N,)``) and, in per-phase
        mode, ``phase_index`` (int64, ``(N,)``), in this order.
    """
    latent_axes = {0: "N", 2: "d", 3: "h", 4: "w"}
    axes: dict[str, dict[int, str]] = {name: dict(latent_axes) for name in ("z_t", "z_masked", "mask", "epsilon")}
    axes.update({name: {0: "N"} for name in ("timesteps", "phase_index") if name in inputs})
    return NetworkPart("denoiser", denoiser, dict(inputs), ("epsilon",), axes)
