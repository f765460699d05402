"""ONNX Runtime vs torch on the CPU for the segmenter: one patch and a full 4-phase sliding window.

Everything is measured in one run, each configuration in a fresh subprocess (so that its peak
resident memory, ``ru_maxrss``, is its own; ONNX Runtime workers never import torch, as at a
site). Printed per preset network (``tiny``, ``cpu``):

* one patch: torch (batch 1 and 2) against ONNX Runtime with each graph optimisation level,
  1 and 2 intra-op threads, the InstanceNorm-as-LayerNorm graph d4m exports against ONNX's
  native InstanceNormalization, and an FP32 model with fused operators (ONNX Runtime's
  ``ORT_ENABLE_ALL`` graph saved to disk and loaded back);
* a full 4-phase sliding window (Gaussian blending, overlap 0.5, batch 2) through
  ``d4m.runtime.sliding_window`` with each engine as the predictor;
* ratios torch / ONNX Runtime, peak memory, and the achieved GFLOP/s of each patch run (the
  network's convolution FLOPs over the time) against the machine's float32 peak measured in the
  same run by a large matrix multiplication.

Usage: ``.venv/bin/python bench/onnx_vs_torch.py [--presets tiny cpu] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Study sizes (phases, z, y, x) of the sliding-window runs: a few windows per axis for each patch.
STUDY = {"tiny": (4, 48, 128, 128), "cpu": (4, 64, 144, 144)}
THREADS = 2


# --------------------------------------------------------------------------- workers (subprocesses)


def _export(preset: str, folder: Path) -> dict[str, Any]:
    """Build the preset network with random weights, export it three ways, count its FLOPs."""
    import onnxruntime as ort

    from d4m.export.onnx_export import export_segmenter, instance_norm_as_layer_norm
    from d4m.export.parity import randomize_weights
    from d4m.training.checkpoints import save_weights
    from d4m.training.segmenter import build_network, segmenter_preset

    config = segmenter_preset(preset)
    network = randomize_weights(build_network(config), seed=0).eval()
    save_weights(network, folder / f"{preset}.safetensors")
    native = export_segmenter(network, 4, config.patch_size, folder / f"{preset}.native.onnx", precise_norm=False)
    instance_norm_as_layer_norm(native.path, folder / f"{preset}.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / f"{preset}.fused.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(folder / f"{preset}.onnx"), options, providers=["CPUExecutionProvider"])
    return {"patch": list(config.patch_size), "params": sum(p.numel() for p in network.parameters()),
            "gflop": conv_flops(native.path, (1, 4, *config.patch_size)) / 1e9}


def conv_flops(path: Path, shape: tuple[int, ...]) -> float:
    """Multiply-adds × 2 of every Conv and ConvTranspose for an input of ``shape``."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, shape, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = size
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    flops = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weights[node.input[1]]
        kernel = float(np.prod(w[2:]))
        if node.op_type == "Conv":  # w: (out, in/groups, k...), per output voxel
            flops += 2.0 * w[0] * w[1] * kernel * float(np.prod(shapes[node.output[0]][2:])) * shape[0]
        else:  # w: (in, out/groups, k...), per input voxel
            flops += 2.0 * w[0] * w[1] * kernel * float(np.prod(shapes[node.input[0]][2:])) * shape[0]
    return flops


def _study(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full(shape, -3.0, np.float32)  # air after the window, a body of soft tissue inside
    z, y, x = shape[-3:]
    body = (..., slice(z // 8, z - z // 8), slice(y // 6, y - y // 6), slice(x // 6, x - x // 6))
    image[body] = rng.normal(0.2, 0.8, image[body].shape)
    return image


def _time(call: Any, repeat: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    folder, preset, repeat = Path(job["folder"]), job["preset"], job["repeat"]
    patch = tuple(job["patch"])
    batch = job.get("batch", 1)
    x = _study((batch, 4, *patch)) if job["what"] == "patch" else _study(STUDY[preset])
    if job["engine"] == "torch":
        import torch

        from d4m.training.checkpoints import load_weights
        from d4m.training.segmenter import build_network, segmenter_preset

        torch.set_num_threads(job["threads"])
        network = build_network(segmenter_preset(preset)).eval()
        load_weights(network, folder / f"{preset}.safetensors")

        def predict(batch_array: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return network(torch.from_numpy(batch_array)).numpy()
    else:
        from d4m.runtime.runners import OnnxRuntimeRunner, as_predictor

        runner = OnnxRuntimeRunner(folder / job["model"], threads=job["threads"], graph_optimization=job["level"])
        predict = as_predictor(runner)
    if job["what"] == "patch":
        seconds = _time(lambda: predict(x), repeat) / batch
    else:
        from d4m.runtime.sliding_window import sliding_window_inference

        seconds = _time(lambda: sliding_window_inference(x, patch, 0.5, predict, batch_size=2, pad_value=-3.0),
                        max(1, repeat // 2))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak_mib}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def matmul_peak(size: int = 4096, repeat: int = 3) -> float:
    """float32 GFLOP/s of a large matrix product (numpy's BLAS, all cores)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    seconds = _time(lambda: a @ b, repeat)
    return 2.0 * size**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(_export(job["preset"], Path(job["folder"])) if job["what"] == "export" else _worker(job)))
        return
    import onnxruntime

    print(f"CPU: {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}; intra-op threads {THREADS} "
          f"unless stated; inter-op 1; times are medians of {args.repeat} after a warm-up")
    peak = matmul_peak()
    print(f"float32 peak (4096² matmul, numpy BLAS): {peak:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="d4m-bench-") as tmp:
        for preset in args.presets:
            info = _run({"what": "export", "preset": preset, "folder": tmp, "threads": THREADS})
            base = {"folder": tmp, "preset": preset, "repeat": args.repeat, "patch": info["patch"]}
            print(f"\n== {preset}: DynUNet {info['params'] / 1e6:.2f} M parameters, patch {info['patch']}, "
                  f"{info['gflop']:.1f} GFLOP per patch (convolutions)")
            rows: list[tuple[str, dict[str, Any]]] = []
            configs = [
                ("torch batch 1", {"engine": "torch", "threads": THREADS}),
                ("torch batch 2", {"engine": "torch", "threads": THREADS, "batch": 2}),
                ("torch batch 1, 1 thread", {"engine": "torch", "threads": 1}),
            ]
            for level in ("disable", "basic", "extended", "all"):
                configs.append((f"ORT {level}", {"engine": "ort", "model": f"{preset}.onnx", "level": level,
                                                 "threads": THREADS}))
            configs += [
                ("ORT all, batch 2", {"engine": "ort", "model": f"{preset}.onnx", "level": "all", "threads": THREADS,
                                      "batch": 2}),
                ("ORT all, 1 thread", {"engine": "ort", "model": f"{preset}.onnx", "level": "all", "threads": 1}),
                ("ORT all, native InstanceNorm", {"engine": "ort", "model": f"{preset}.native.onnx", "level": "all",
                                                  "threads": THREADS}),
                ("ORT fused FP32 model (saved)", {"engine": "ort", "model": f"{preset}.fused.onnx", "level": "all",
                                                  "threads": THREADS}),
            ]
            for label, extra in configs:
                rows.append((label, _run({**base, **extra, "what": "patch"})))
            torch_time = rows[0][1]["seconds"]
            print(f"{'one patch':34s} {'s/patch':>9s} {'torch/this':>10s} {'GFLOP/s':>8s} {'% peak':>7s} "
                  f"{'peak MiB':>9s}")
            for label, result in rows:
                gflops = info["gflop"] / result["seconds"]
                print(f"{label:34s} {result['seconds']:9.3f} {torch_time / result['seconds']:10.2f} {gflops:8.1f} "
                      f"{100 * gflops / peak:6.1f}% {result['peak_mib']:9.0f}")
            shape = STUDY[preset]
            window = {
                "torch (batch 2)": _run({**base, "what": "window", "engine": "torch", "threads": THREADS}),
                "ORT all": _run({**base, "what": "window", "engine": "ort", "model": f"{preset}.onnx",
                                 "level": "all", "threads": THREADS}),
                "ORT all, native InstanceNorm": _run({**base, "what": "window", "engine": "ort",
                                                      "model": f"{preset}.native.onnx", "level": "all",
                                                      "threads": THREADS}),
            }
            torch_window = window["torch (batch 2)"]["seconds"]
            print(f"sliding window over {shape} (overlap 0.5, batch 2):")
            for label, result in window.items():
                print(f"  {label:32s} {result['seconds']:8.2f} s  torch/this {torch_window / result['seconds']:5.2f}"
                      f"  peak {result['peak_mib']:6.0f} MiB")


if __name__ == "__main__":
    main()
