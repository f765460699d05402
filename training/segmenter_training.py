"""Training the Multimodal Segmenter: Dice + 0.5·CE on patches, sliding-window validation, resume, DDP.

:func:`train_segmenter` writes into ``config.out``:

* ``config.json`` — the run's config with the measured target spacing and z-score constants
  filled in (export and evaluation read them from there);
* ``model.safetensors`` (best validation tumour Dice) and ``last.safetensors``;
* ``metrics.csv`` (one row per checkpoint) and ``metrics.json`` (best and last validation);
* ``postprocess.json`` — the liver-contact rule chosen on the validation cases with the best
  weights (:mod:`d4m.training.postprocess_choice`); evaluation and export use it;
* ``resume.pt`` — step, weights, optimizer, scaler, torch RNG, best score; read back with
  ``weights_only=True``. Data randomness is a function of ``(seed, sample index)`` (see
  :mod:`d4m.training.segmenter_data`), so a run killed after a checkpoint and started again
  ends with the same weights as an uninterrupted one.

Distributed training: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised
from the environment (NCCL on CUDA, gloo on CPU), the model is wrapped in
``DistributedDataParallel``, each process draws its own share of the samples, and only rank 0
validates and writes. Mixed precision (autocast, bf16 where supported) is used on CUDA only.
Validation runs the runtime's own preprocessing, sliding window and post-processing through a
torch predictor, so its scores are what a site will see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from d4m.dicom_io.errors import D4MError, InputError
from d4m.runtime.artifacts import read_json, write_json
from d4m.training.checkpoints import MetricsLog, load_resume, load_weights, save_resume, save_weights
from d4m.training.datasets import Case, load_dataset
from d4m.training.evaluation import evaluate_cases, inference_spec, load_segmenter, summarize
from d4m.training.postprocess_choice import POSTPROCESS_NAME, PostprocessChoice, choose_postprocess, save_choice
from d4m.training.segmenter import SegmenterConfig, build_network, memory_format, resolve_device, torch_predictor
from d4m.training.segmenter_data import (
    PatchDataset,
    SampleTransform,
    measure_normalization,
    median_spacing,
    select_fraction,
    split_cases,
)

logger = logging.getLogger(__name__)

#: ``progress(n)`` is called with the number of steps just completed (``rich`` ``advance``).
Progress = Callable[[int], None]

METRICS = ("step", "loss", "lr", "val_tumor_dice", "val_liver_dice", "val_lesion_f1", "seconds")

#: Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({"data", "out", "device", "num_workers", "cache", "init", "val_every"})

#: Gradient-norm clip (nnU-Net's value).
_CLIP = 12.0


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this process validates and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group described by ``torchrun``'s environment, if ``WORLD_SIZE`` > 1.

    Raises
    ------
    InputError
        ``WORLD_SIZE`` / ``RANK`` are not integers.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise InputError(f"environment: expected integer WORLD_SIZE/RANK/LOCAL_RANK, found {exc}") from exc
    if world <= 1:
        return Distributed()
    owns = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        owns = True
    logger.info("distributed training: rank %d of %d (%s)", rank, world, torch.distributed.get_backend())
    return Distributed(rank, world, local_rank, owns)


def poly_lr(base: float, step: int, steps: int, power: float = 0.9, warmup: int = 0) -> float:
    """nnU-Net's polynomial decay from ``base`` at step 0 towards 0 at ``steps``, ramped up linearly
    over the first ``warmup`` steps."""
    return base * (1.0 - step / steps) ** power * min(1.0, (step + 1) / warmup if warmup else 1.0)


def build_optimizer(config: SegmenterConfig, parameters: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net)."""
    if config.optimizer.value == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=0.99, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def build_loss(config: SegmenterConfig) -> nn.Module:
    """MONAI ``DiceCELoss`` on logits and integer labels: dice_weight · Dice + ce_weight · CE.

    The Dice term covers liver and tumour (not background, as nnU-Net's ``do_bg=False``) and
    is computed per sample, so a DDP run equals one process with the combined batch.
    """
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False,
                      lambda_dice=config.dice_weight, lambda_ce=config.ce_weight)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: expected an output folder, found a file")
    if out.is_dir() and not (out / "resume.pt").exists() and any(out.iterdir()):
        raise InputError(f"{out}: expected a new or empty output folder (or one holding resume.pt), found other files")
    out.mkdir(parents=True, exist_ok=True)


def _check_resumable(saved: SegmenterConfig, ours: SegmenterConfig, path: Path) -> None:
    a, b = saved.to_dict(), ours.to_dict()
    measured = {"spacing", "norm_mean", "norm_std"}
    changed = sorted(
        k for k in (set(a) | set(b)) - _RESUMABLE_CHANGES
        if a.get(k) != b.get(k) and not (k in measured and b.get(k) is None)
    )
    if changed:
        raise InputError(f"{path}: expected a resume file of the same training config, found other values of "
                         f"{changed} (use a new output folder)")


def resolve_config(config: SegmenterConfig, train_cases: Sequence[Case]) -> SegmenterConfig:
    """Fill the target spacing and z-score constants (measured on the training cases) when unset."""
    changes: dict[str, Any] = {}
    if config.spacing is None:
        changes["spacing"] = median_spacing(train_cases)
        logger.info("target spacing (median of %d cases): %s mm", len(train_cases), changes["spacing"])
    if config.norm_mean is None:
        norm = measure_normalization(train_cases, config.hu_window)
        changes.update(norm_mean=norm.mean, norm_std=norm.std)
    return config.replace(**changes) if changes else config


@dataclass
class _Run:
    config: SegmenterConfig
    network: nn.Module
    model: nn.Module  # the network, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    dist: Distributed
    best: float = -math.inf
    best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def _resume_state(run: _Run, step: int) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": step,
        "config": json.dumps(run.config.to_dict()),
        "model": run.network.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "best": run.best,
        "best_metrics": json.dumps(run.best_metrics),
    }
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    return state


def _restore(run: _Run, path: Path) -> int:
    state = load_resume(path)
    try:
        _check_resumable(SegmenterConfig.from_dict(json.loads(state["config"]), str(path)), run.config, path)
        run.network.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler is not None and "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if run.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], run.device)
        run.best = float(state["best"])
        run.best_metrics = json.loads(state["best_metrics"])
        return int(state["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: expected a complete segmenter resume file, found {exc!r}") from exc


def _autocast(run: _Run) -> contextlib.AbstractContextManager[Any]:
    if run.device.type != "cuda" or not run.config.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _train_step(run: _Run, batch: dict[str, torch.Tensor], loss_fn: nn.Module, lr: float) -> float:
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    image = batch["image"].to(run.device, non_blocking=True).contiguous(memory_format=memory_format(run.device))
    label = batch["label"].to(run.device, non_blocking=True)
    run.model.train()
    with _autocast(run):
        logits = run.model(image)
    loss = loss_fn(logits.float(), label)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.network.parameters(), _CLIP)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.network.parameters(), _CLIP)
        run.optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise D4MError(f"segmenter training: expected a finite loss, found {value}; lower the learning rate")
    return value


def validate(run: _Run, cases: Sequence[Case]) -> dict[str, float]:
    """Sliding-window validation of the current weights on ``cases``, post-processed.

    The model is given the phases every validation case has, the others duplicated as at
    inference (all four on a complete dataset, PVP alone on a PVP-only one).
    """
    predictor = torch_predictor(run.network, run.device, run.config.amp)
    try:
        rows = evaluate_cases(cases, predictor, inference_spec(run.config))
    finally:
        run.network.train()
    return summarize(rows)


def _write_metrics_json(out: Path, run: _Run, last: dict[str, float], step: int) -> None:
    def clean(values: dict[str, float]) -> dict[str, float | None]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}

    write_json(out / "metrics.json", {
        "schema_version": 1, "stage": "segmenter", "step": step,
        "best": clean(run.best_metrics), "last": clean(last),
    })


def _checkpoint(run: _Run, out: Path, step: int, val: dict[str, float]) -> None:
    meta = {"stage": "segmenter", "step": str(step), "backbone": run.config.backbone.value}
    save_weights(run.network, out / "last.safetensors", meta)
    score = val.get("tumor_dice", math.nan)
    # no validation cases: the last weights are the best ones
    if math.isnan(score) or score > run.best or not (out / "model.safetensors").exists():
        if not math.isnan(score):
            run.best = score
        run.best_metrics = {**val, "step": float(step)}
        save_weights(run.network, out / "model.safetensors", meta)
        logger.info("step %d: new best model (validation tumour Dice %.4f)", step, score)
    _write_metrics_json(out, run, {**val, "step": float(step)}, step)
    save_resume(out / "resume.pt", _resume_state(run, step))


def _make_loader(dataset: PatchDataset, config: SegmenterConfig) -> DataLoader:
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, drop_last=True,
        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
    )


def synthesis_hook(config: SegmenterConfig) -> SampleTransform | None:
    """The on-the-fly synthesis transform for ``synthetic_ratio`` > 0 (else ``None``).

    ``config.synthesizer`` is a synthesis config JSON (stage ``synthesize``, as used by
    ``d4m-train synthesize``: the ``ldm`` synthesizer with its autoencoder and LDM runs, or the
    ``rules`` baseline), or a folder holding it as ``config.json``.

    Raises
    ------
    InputError
        The synthesis config is missing or invalid, or its runs cannot be loaded.
    """
    if config.synthetic_ratio <= 0 or config.synthesizer is None:
        return None
    from d4m.training.synthesis import OnlineSynthesis, SynthesisConfig, build_synthesizer

    path = config.synthesizer / "config.json" if config.synthesizer.is_dir() else config.synthesizer
    synthesis = SynthesisConfig.load(path)
    painter = build_synthesizer(synthesis)
    logger.info("hybrid training: %.0f %% of patches synthesized on the fly (%s)", 100 * config.synthetic_ratio,
                getattr(painter, "name", type(painter).__name__))
    return OnlineSynthesis(painter, p=config.synthetic_ratio, masks=synthesis.mask_config(),
                           spacing=config.spacing or (1.0, 1.0, 1.0), seed=config.seed)


def synthetic_cases(config: SegmenterConfig, train_cases: Sequence[Case]) -> list[Case]:
    """The offline synthetic cases of ``config.synthetic_data`` made from the training cases (none without it).

    Raises
    ------
    InputError
        The dataset has no synthetic case made from a training case.
    """
    if config.synthetic_data is None or config.synthetic_ratio <= 0:
        return []
    train = {c.id for c in train_cases}
    dataset = load_dataset(config.synthetic_data)
    kept = [c for c in dataset.cases if c.meta.get("source_case") in train]
    if not kept:
        raise InputError(f"{config.synthetic_data}: expected synthetic cases (d4m-train synthesize) made from the "
                         f"{len(train)} training cases, found none of {len(dataset.cases)}")
    logger.info("hybrid training: %.0f %% of patches from %d offline synthetic cases (%d left out: not made from a "
                "training case)", 100 * config.synthetic_ratio, len(kept), len(dataset.cases) - len(kept))
    return kept


def _choose_postprocess(run: _Run, cases: Sequence[Case]) -> PostprocessChoice:
    """The clean-up of the best weights, chosen on the validation cases (:mod:`~d4m.training.postprocess_choice`)."""
    _, predictor, spec = load_segmenter(run.config.out, device=str(run.device))
    return choose_postprocess(cases, predictor, spec)


def train_segmenter(
    config: SegmenterConfig,
    progress: Progress | None = None,
    synthesis: SampleTransform | None = None,
) -> Path:
    """Train the segmenter, or continue a run from ``config.out/resume.pt``.

    Parameters
    ----------
    config
        The stage config.
    progress
        Called with the number of steps just completed (first with the resumed step count).
    synthesis
        Hook applied to each HU training sample (hybrid real / synthetic training); by default
        built from ``config.synthesizer`` when ``synthetic_ratio`` > 0.

    Returns
    -------
    pathlib.Path
        ``config.out``.

    Raises
    ------
    InputError
        A bad dataset, an output folder of another run, a resume file of another config.
    D4MError
        A loss that became infinite or NaN.
    """
    device = resolve_device(config.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    out = config.out
    try:
        if dist.main:
            _prepare_out(out)
        dist.barrier()
        dataset = load_dataset(config.data)
        splits = split_cases(dataset, config.split, config.seed)
        train_cases = select_fraction(splits["train"], config.data_fraction, config.seed)
        resuming = (out / "resume.pt").exists()
        if resuming and (out / "config.json").exists():
            saved = SegmenterConfig.from_dict(read_json(out / "config.json"), str(out / "config.json"))
            _check_resumable(saved, config, out / "config.json")
            config = config.replace(spacing=saved.spacing, norm_mean=saved.norm_mean, norm_std=saved.norm_std)
        config = resolve_config(config, train_cases)
        logger.info("segmenter: %d training, %d validation cases (data fraction %.2f)", len(train_cases),
                    len(splits["val"]), config.data_fraction)
        return _train(config, dist, device, (train_cases, splits["val"]), progress, synthesis)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _train(
    config: SegmenterConfig,
    dist: Distributed,
    device: torch.device,
    cases: tuple[list[Case], list[Case]],
    progress: Progress | None,
    synthesis: SampleTransform | None,
) -> Path:
    out = config.out
    train_cases, val_cases = cases
    synthesis = synthesis if synthesis is not None else synthesis_hook(config)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cuda":  # CPU kernels are deterministic already; the switch costs seconds of imports
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(config.seed)
        network = build_network(config).to(device, memory_format=memory_format(device))
        scaler = None
        if device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported():
            scaler = torch.amp.GradScaler("cuda")
        run = _Run(config, network, network, build_optimizer(config, network.parameters()), scaler, device, dist)
        metrics = MetricsLog(out / "metrics.csv", METRICS)
        start = 0
        if (out / "resume.pt").exists():
            start = _restore(run, out / "resume.pt")
            if dist.main:
                metrics.truncate(start)
            logger.info("%s: resuming at step %d of %d", out, start, config.steps)
        elif config.init is not None:
            init = config.init / "model.safetensors" if config.init.is_dir() else config.init
            load_weights(network, init)
            logger.info("%s: initialised from %s", out, init)
        if dist.main:
            config.save(out / "config.json")
        if dist.world > 1:
            run.model = nn.parallel.DistributedDataParallel(
                network, device_ids=[device.index] if device.type == "cuda" else None
            )
        if progress is not None and start:
            progress(min(start, config.steps))
        data = PatchDataset(train_cases, config, config.normalization, config.spacing, synthesis,
                            shard=(dist.rank, dist.world, start), synthetic=synthetic_cases(config, train_cases))
        loss_fn = build_loss(config)
        clock, losses = time.perf_counter(), []
        for step, batch in zip(range(start, config.steps), _make_loader(data, config), strict=False):
            lr = poly_lr(config.lr, step, config.steps, warmup=config.warmup_steps)
            losses.append(_train_step(run, batch, loss_fn, lr))
            done = step + 1
            if done == config.steps or (config.val_every and done % config.val_every == 0):
                val = validate(run, val_cases) if dist.main and val_cases else {}
                if dist.main:
                    metrics.append({
                        "step": done, "loss": float(np.mean(losses)), "lr": lr,
                        "val_tumor_dice": val.get("tumor_dice", math.nan),
                        "val_liver_dice": val.get("liver_dice", math.nan),
                        "val_lesion_f1": val.get("lesion_f1", math.nan),
                        "seconds": round(time.perf_counter() - clock, 3),
                    })
                    _checkpoint(run, out, done, val)
                    logger.info("step %d/%d: loss %.4f, validation tumour Dice %s", done, config.steps,
                                np.mean(losses), val.get("tumor_dice"))
                losses = []
                dist.barrier()
            if progress is not None:
                progress(1)
        if dist.main and not (out / "model.safetensors").exists():
            _checkpoint(run, out, max(start, config.steps), {})
        if dist.main and (start < config.steps or not (out / POSTPROCESS_NAME).exists()):
            save_choice(out, _choose_postprocess(run, val_cases))
    finally:
        if device.type == "cuda":
            torch.use_deterministic_algorithms(was_deterministic)
    return out
