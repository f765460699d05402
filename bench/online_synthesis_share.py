"""Share of a segmenter training step spent in online tumour synthesis, measured in one run.

For the given dataset and segmenter preset it times, in one process with one torch thread:

* drawing one training sample (crop, augmentation, z-score) without synthesis;
* the same with every sample synthesized (``p = 1``) by each synthesis config given
  (``rules``, ``ldm``: the config files ``segmenter --synthesizer`` reads);
* one optimisation step of the preset's network on a batch (forward, Dice + CE, backward, step).

and prints, for each synthesizer and the ratios p = 0.25 and 0.5, the share of a whole step
(``batch`` samples + the optimisation) that synthesis takes, with data loading in the main process
(``num_workers = 0``, the worst case: workers overlap it with the optimisation).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/online_synthesis_share.py --data DATASET \\
        --synthesizer rules=RULES.json ldm=LDM.json [--preset tiny] [--samples 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d4m.training.datasets import load_dataset
from d4m.training.segmenter import build_network, segmenter_preset
from d4m.training.segmenter_data import PatchDataset, split_cases
from d4m.training.segmenter_training import build_loss, build_optimizer, resolve_config, synthesis_hook


def sample_ms(dataset: PatchDataset, samples: int) -> float:
    """Median milliseconds per sample over ``samples`` draws after one warm-up (cases cached)."""
    dataset[0]
    times = []
    for index in range(1, samples + 1):
        start = time.perf_counter()
        dataset[index]
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--synthesizer", nargs="+", default=[], metavar="NAME=CONFIG")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="d4m-share-"))
    base = segmenter_preset(args.preset, data=args.data, out=out, num_workers=0)
    cases = split_cases(load_dataset(args.data), base.split, base.seed)["train"]
    config = resolve_config(base, cases)

    plain = sample_ms(PatchDataset(cases, config, config.normalization, config.spacing), args.samples)
    synthesized = {}
    for item in args.synthesizer:
        name, path = item.split("=", 1)
        hooked = config.replace(synthetic_ratio=1.0, synthesizer=Path(path))
        dataset = PatchDataset(cases, hooked, config.normalization, config.spacing, synthesis_hook(hooked))
        synthesized[name] = sample_ms(dataset, args.samples)

    network = build_network(config)
    loss_fn, optimizer = build_loss(config), build_optimizer(config, network.parameters())
    loader = PatchDataset(cases, config, config.normalization, config.spacing)
    batch = [loader[i] for i in range(config.batch_size)]
    image = torch.stack([torch.as_tensor(b["image"]) for b in batch])
    label = torch.stack([torch.as_tensor(b["label"]) for b in batch])
    step_times = []
    for _ in range(4):
        start = time.perf_counter()
        loss = loss_fn(network(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    step = 1000 * float(np.median(step_times[1:]))

    batch_size = config.batch_size
    print(f"preset {args.preset}: patch {config.patch_size}, batch {batch_size}, {len(cases)} training cases, "
          f"1 torch thread, data in the main process")
    print(f"one sample without synthesis: {plain:.0f} ms; one optimisation step: {step:.0f} ms")
    print("\n| synthesizer | sample ms at p = 1 | synthesis ms per sample | share of a step at p = 0.25 | at p = 0.5 |")
    print("|---|---|---|---|---|")
    for name, ms in synthesized.items():
        extra = max(ms - plain, 0.0)
        shares = []
        for p in (0.25, 0.5):
            whole = step + batch_size * (plain + p * extra)
            shares.append(100 * batch_size * p * extra / whole)
        print(f"| {name} | {ms:.0f} | {extra:.0f} | {shares[0]:.1f} % | {shares[1]:.1f} % |")


if __name__ == "__main__":
    main()
