"""Segmenter timings on one NVIDIA GPU, all in one run (part of ``bench/gpu_check.sh``).

For each preset network (random weights, so no engine can shortcut zeros) it prints:

* one patch, inference: torch-CUDA FP32, TF32, autocast BF16 and FP16 (batch 1 and 2), then ONNX
  Runtime with the CUDA provider and TensorRT when the bundle folder given holds those engines and
  the packages are installed (else the reason they were not timed);
* one training step (forward, Dice + 0.5·CE, backward, SGD) in FP32 and autocast BF16;
* a full 4-phase sliding window (MONAI ``sliding_window_inference``, Gaussian, overlap 0.5,
  batch 2) in autocast BF16 on a volume of ``--volume`` voxels;
* the peak CUDA memory of each, and the achieved TFLOP/s of the BF16 patch against the GPU's
  peak measured in the same run by an 8192³ BF16 matrix product.

Usage: ``python bench/gpu_timings.py [--presets paper cpu] [--bundle DIR] [--volume 4 160 320 320]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from d4m.export.parity import randomize_weights
from d4m.training.segmenter import build_network, segmenter_preset
from d4m.training.segmenter_training import build_loss


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median milliseconds of ``call`` after two warm-ups, and the peak CUDA memory in GiB."""
    call()
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), torch.cuda.max_memory_allocated() / 2**30


def matmul_peak() -> float:
    """BF16 TFLOP/s of an 8192³ matrix product (the GPU's practical peak)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = timed(lambda: a @ b, 10)
    return 2 * 8192**3 / (ms / 1000) / 1e12


def conv_flops(network: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Forward FLOPs (2 × multiply-adds) of every 3-D convolution for an input of ``shape``."""
    total = 0.0

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = int(np.prod(module.kernel_size))
        if isinstance(module, torch.nn.ConvTranspose3d):
            total += 2.0 * inputs[0].numel() * kernel * module.out_channels / module.groups
        else:
            total += 2.0 * output.numel() * kernel * module.in_channels / module.groups

    handles = [m.register_forward_hook(hook) for m in network.modules()
               if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)]
    with torch.inference_mode():
        network(torch.zeros(shape, device="cuda"))
    for handle in handles:
        handle.remove()
    return total


def patch_rows(preset: str, repeat: int) -> list[tuple[str, float, float]]:
    """Inference and training timings of one preset's network."""
    config = segmenter_preset(preset)
    network = randomize_weights(build_network(config), seed=0).cuda().eval()
    rows: list[tuple[str, float, float]] = []
    for batch in (1, 2):
        x = torch.randn(batch, 4, *config.patch_size, device="cuda")
        for name, dtype, tf32 in (("FP32", None, False), ("TF32", None, True),
                                  ("autocast BF16", torch.bfloat16, False), ("autocast FP16", torch.float16, False)):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32

            def infer(x: torch.Tensor = x, dtype: torch.dtype | None = dtype) -> None:
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                    network(x).float()

            ms, gib = timed(infer, repeat)
            rows.append((f"{preset} patch {tuple(config.patch_size)} batch {batch}: torch {name}", ms, gib))
    torch.backends.cudnn.allow_tf32 = True
    loss_fn = build_loss(config)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(config.batch_size, 4, *config.patch_size, device="cuda")
    y = torch.randint(0, 3, (config.batch_size, 1, *config.patch_size), device="cuda")
    network.train()
    for name, dtype in (("FP32", None), ("autocast BF16", torch.bfloat16)):
        def step(dtype: torch.dtype | None = dtype) -> None:
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = network(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        ms, gib = timed(step, max(3, repeat // 2))
        rows.append((f"{preset} training step batch {config.batch_size}: {name}", ms, gib))
    return rows


def sliding_window_row(preset: str, volume: tuple[int, ...]) -> tuple[str, float, float]:
    """A full 4-phase sliding window in autocast BF16."""
    from monai.inferers import sliding_window_inference

    config = segmenter_preset(preset)
    network = randomize_weights(build_network(config), seed=0).cuda().eval()
    image = torch.randn(1, *volume, device="cuda")

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            sliding_window_inference(image, config.patch_size, 2, network, overlap=0.5, mode="gaussian").argmax(1)

    ms, gib = timed(infer, 3)
    return f"{preset} sliding window {tuple(volume)}: torch autocast BF16", ms, gib


def engine_rows(bundle: Path, repeat: int) -> list[tuple[str, float, float] | tuple[str, str]]:
    """ONNX Runtime CUDA and TensorRT on the bundle's segmenter engines, or why they were not timed."""
    from d4m.dicom_io.errors import D4MError
    from d4m.runtime.bundle import load_bundle
    from d4m.runtime.runners import OnnxRuntimeRunner, TensorRTRunner

    rows: list[tuple[str, float, float] | tuple[str, str]] = []
    with load_bundle(bundle) as loaded:
        patch = loaded.manifest.sliding_window.patch_size
        x = np.random.default_rng(0).standard_normal((2, 4, *patch)).astype(np.float32)
        for entry in loaded.manifest.engines:
            if entry.name != "segmenter":
                continue
            try:
                runner = (TensorRTRunner(loaded.path(entry)) if entry.format.value == "tensorrt"
                          else OnnxRuntimeRunner(loaded.path(entry), device="cuda"))
                with runner:
                    name = runner.input_names[0]
                    start = time.perf_counter()
                    for _ in range(repeat):
                        runner({name: x})
                    ms = 1000 * (time.perf_counter() - start) / repeat
                    rows.append((f"bundle {entry.file} batch 2 on {runner.providers[0]}", ms, float("nan")))
            except D4MError as exc:
                rows.append((f"bundle {entry.file}", f"not timed: {exc}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["paper", "cpu"])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--volume", nargs=4, type=int, default=[4, 160, 320, 320])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA device: nothing to time here")
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()} · torch {torch.__version__} · cuDNN {torch.backends.cudnn.version()}")
    peak = matmul_peak()
    print(f"BF16 matmul 8192³: {peak:.0f} TFLOP/s\n")
    print("| what | median ms | peak GiB |\n|---|---|---|")
    for preset in args.presets:
        rows = patch_rows(preset, args.repeat)
        for name, ms, gib in rows:
            print(f"| {name} | {ms:.2f} | {gib:.2f} |", flush=True)
        config = segmenter_preset(preset)
        network = build_network(config).cuda().eval()
        gflop = conv_flops(network, (1, 4, *config.patch_size)) / 1e9
        bf16_ms = next(ms for name, ms, _ in rows if name.endswith("batch 1: torch autocast BF16"))
        print(f"| {preset}: {gflop:.0f} GFLOP per patch → {gflop / bf16_ms:.1f} TFLOP/s in BF16 "
              f"({100 * gflop / bf16_ms / peak:.1f} % of the matmul peak) | | |")
        name, ms, gib = sliding_window_row(preset, tuple(args.volume))
        print(f"| {name} | {ms:.0f} | {gib:.2f} |", flush=True)
        del network
        torch.cuda.empty_cache()
    if args.bundle is not None:
        for row in engine_rows(args.bundle, args.repeat):
            print(f"| {row[0]} | {row[1]} | |" if len(row) == 2 else f"| {row[0]} | {row[1]:.2f} | |")


if __name__ == "__main__":
    main()
