"""Segmenter training step and inference window on the CPU: memory layout, patch size, threads.

Everything is measured in one run on the ``tiny`` preset network (random input, the real loss
and optimizer), for each patch size, thread count and memory layout:

* one training step (forward, Dice + CE loss, backward, AdamW step) on a batch of two patches;
* one inference call on four windows (no gradients), as in validation and ``d4m-train evaluate``.

It prints seconds per call and the ratio default layout / ``channels_last_3d``; d4m trains and
validates on the CPU in ``channels_last_3d`` (:func:`d4m.training.segmenter.memory_format`).

Usage: ``.venv/bin/python bench/segmenter_step.py [--patches 32x64x64 32x48x48] [--repeat 16]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from d4m.training.segmenter import build_network, segmenter_preset
from d4m.training.segmenter_training import build_loss, build_optimizer

LAYOUTS = {"default": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def _seconds(call: object, repeat: int) -> float:
    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        call()  # type: ignore[operator]
    start = time.perf_counter()
    for _ in range(repeat):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / repeat


def measure(patch: tuple[int, int, int], layout: torch.memory_format, repeat: int) -> tuple[float, float]:
    """Seconds per training step (batch 2) and per inference call (4 windows)."""
    torch.manual_seed(0)
    config = segmenter_preset("tiny", patch_size=patch, norm_mean=0.0, norm_std=1.0)
    network = build_network(config).to(memory_format=layout)
    loss_fn, optimizer = build_loss(config), build_optimizer(config, network.parameters())
    image = torch.randn(config.batch_size, 4, *patch).contiguous(memory_format=layout)
    label = torch.randint(0, 3, (config.batch_size, 1, *patch))
    windows = torch.randn(4, 4, *patch).contiguous(memory_format=layout)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(network(image), label).backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode():
            network(windows)

    network.train()
    train = _seconds(step, repeat)
    network.eval()
    return train, _seconds(infer, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", nargs="+", default=["32x64x64", "32x48x48"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=16)
    args = parser.parse_args()
    print("| patch | threads | layout | train step (s) | infer 4 windows (s) |")
    print("|---|---:|---|---:|---:|")
    ratios = []
    for text in args.patches:
        patch = tuple(int(v) for v in text.split("x"))
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = {name: measure(patch, layout, args.repeat) for name, layout in LAYOUTS.items()}  # type: ignore[arg-type]
            for name, (train, infer) in times.items():
                print(f"| {text} | {threads} | {name} | {train:.3f} | {infer:.3f} |")
            base, fast = times["default"], times["channels_last_3d"]
            ratios.append(f"{text}, {threads} thread(s): default / channels_last_3d = "
                          f"{base[0] / fast[0]:.2f}× (train), {base[1] / fast[1]:.2f}× (infer)")
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
