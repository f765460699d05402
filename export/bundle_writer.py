"""A training run in, a bundle the runtime can trust out (``d4m-export onnx``).

:func:`write_onnx_bundle` reads the segmenter run folder (``config.json`` with the measured
target spacing and z-score constants, ``model.safetensors``, ``metrics.json``/``metrics.csv``),
exports the network to ONNX (plus FP16 and synthesis networks when asked), and writes::

    manifest.json                 schema of d4m.runtime.manifest; preprocessing constants are
                                  the run's own (the numbers training used)
    segmenter.onnx                FP32, dynamic batch and spatial axes (or a fixed patch)
    segmenter.fp16.onnx           optional FP16 variant, normalisation in FP32, FP32 I/O
    golden/input.npy              a real input: a phantom study's patch, normalised like training
    golden/output.npy             the torch network's logits on it
    golden/<network>.npz          synthesis networks' golden inputs and torch outputs
    synthesizer/*.onnx            optional: inpainter (matmul DFT), encoder, decoder, denoiser
    synthesizer/synthesizer.json  their windows, latent scale, noise schedule and configs
    parity.json                   every engine against its golden reference (parity.py)

Nothing is written unless every ONNX file passes its parity gate: the bundle is assembled in a
temporary sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d4m.dicom_io.codes import LABELS, PHASE_ORDER, TUMOR, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.export.onnx_export import (
    DEFAULT_OPSET,
    SEGMENTER_INPUT,
    SEGMENTER_OUTPUT,
    NetworkPart,
    OnnxModel,
    autoencoder_parts,
    convert_to_fp16,
    denoiser_part,
    export_segmenter,
    inpainter_part,
    simplify,
)
from d4m.export.parity import (
    PARITY_NAME,
    ParityError,
    ParityRow,
    check_outputs,
    golden_file,
    parity_document,
    predictor_agreement,
    time_runner,
)
from d4m.runtime.artifacts import atomic_dir, read_json, write_json
from d4m.runtime.bundle import file_ref, write_manifest
from d4m.runtime.manifest import SEGMENTER, EngineEntry, FileRef, Golden, Manifest, Preprocessing, SlidingWindow
from d4m.runtime.preprocess import Interpolator, prepare_input, resample_like
from d4m.runtime.runners import EngineKind, OnnxRuntimeRunner, as_predictor
from d4m.training.config import StageConfig
from d4m.training.postprocess_choice import run_postprocess
from d4m.training.segmenter import SegmenterConfig, build_network, torch_predictor

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
SYNTHESIZER_SETTINGS = "synthesizer/synthesizer.json"
_VERSIONED = ("d4m", "torch", "monai", "onnx", "onnxruntime", "numpy", "SimpleITK")


@dataclasses.dataclass(frozen=True)
class ExportConfig(StageConfig):
    """What ``d4m-export onnx`` does (recorded in the manifest's provenance).

    Attributes
    ----------
    run
        Segmenter run folder (``config.json`` + weights).
    out
        Bundle folder to write.
    weights
        Weights file inside ``run``.
    opset
        ONNX opset (14–20).
    fp16
        Also write FP16 variants (normalisation layers kept in FP32).
    fixed_patch
        Fix the segmenter's spatial dims to the patch size (batch stays dynamic).
    simplify
        Constant-fold and clean the graphs (ONNX Runtime basic offline optimisation).
    precise_norm
        Write the segmenter's InstanceNormalization as LayerNormalization, which ONNX Runtime
        computes as accurately as torch (see :func:`~d4m.export.onnx_export.instance_norm_as_layer_norm`).
    synthesizer
        Run folders of synthesis networks to export too (inpainter, autoencoder, LDM; any subset).
    inpainter_size
        Slice size ``(rows, columns)`` the inpainter is exported for (its DFT is fixed-size).
    study_parity
        Also segment a whole phantom study with torch and ONNX Runtime and record the Dice.
    golden_seed
        Seed of the phantom study the golden input is cut from.
    overwrite
        Replace an existing bundle folder.
    """

    stage = "export"

    run: Path = Path("runs/segmenter")
    out: Path = Path("bundle")
    weights: str = "model.safetensors"
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    fixed_patch: bool = False
    simplify: bool = False
    precise_norm: bool = True
    synthesizer: tuple[Path, ...] = ()
    inpainter_size: tuple[int, int] = (512, 512)
    study_parity: bool = False
    golden_seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "synthesizer", tuple(Path(p) for p in self.synthesizer))
        if not 14 <= self.opset <= 20:
            raise InputError(f"export config: expected opset in 14..20, found {self.opset}")
        if len(self.inpainter_size) != 2 or min(self.inpainter_size) < 16:
            raise InputError(f"export config: expected inpainter_size (rows, columns) >= 16, "
                             f"found {self.inpainter_size}")
        if not self.weights or "/" in self.weights or "\\" in self.weights:
            raise InputError(f"export config: expected a weights file name inside the run, found {self.weights!r}")


@dataclasses.dataclass(frozen=True)
class SegmenterRun:
    """A loaded segmenter run.

    Attributes
    ----------
    folder
        The run folder.
    config
        Its config, with measured spacing and z-score constants.
    network
        The network with the run's weights, in eval mode on the CPU.
    """

    folder: Path
    config: SegmenterConfig
    network: torch.nn.Module


def load_segmenter_run(folder: Path, weights: str = "model.safetensors") -> SegmenterRun:
    """Rebuild the trained segmenter of a run folder.

    Raises
    ------
    InputError
        No or an invalid ``config.json``, a config without measured spacing or normalisation,
        missing or mismatching weights.
    """
    from d4m.training.checkpoints import load_weights

    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: expected the config.json of a segmenter run, found nothing")
    config = SegmenterConfig.load(path)
    if config.norm_mean is None or config.norm_std is None or config.spacing is None:
        raise InputError(f"{path}: expected measured norm_mean/norm_std and spacing (written when training "
                         f"starts), found none")
    network = build_network(config)
    load_weights(network, folder / weights)
    return SegmenterRun(folder, config, network.eval())


# --------------------------------------------------------------------------- golden data


@dataclasses.dataclass(frozen=True)
class PhantomStudy:
    """A phantom study prepared exactly as the runtime prepares a real one.

    Attributes
    ----------
    image
        ``(phases, z, y, x)`` float32 on the run's target grid, windowed and z-scored.
    labels
        The true label map on that grid (uint8).
    pvp
        The PVP volume in HU on its own grid (synthesis golden inputs are cut from it).
    pvp_label
        The true labels on the PVP grid.
    """

    image: np.ndarray
    labels: np.ndarray
    pvp: Volume
    pvp_label: Volume


def phantom_study(config: SegmenterConfig, seed: int = 0) -> PhantomStudy:
    """Generate a small phantom study (with tumours) and prepare it with the run's constants."""
    from d4m.training.phantom import PhantomConfig, PhantomSize, generate_case

    case = generate_case(0, PhantomConfig(cases=1, seed=seed, size=PhantomSize.SMALL, tumor_free_fraction=0.0,
                                          write_dicom=False))
    label = case.label
    volumes = {p: v if v.same_grid(label) else resample_like(v, label, Interpolator.LINEAR, -1024.0)
               for p, v in case.images.items()}
    prepared = prepare_input(volumes, config.normalization, config.spacing, config.phases)
    labels = label if label.same_grid(prepared.grid) else resample_like(label, prepared.grid, Interpolator.NEAREST, 0)
    return PhantomStudy(prepared.image, labels.array.astype(np.uint8), case.images[Phase.PVP], label)


def centre_of(mask: np.ndarray, fallback: np.ndarray | None = None) -> tuple[int, ...]:
    """Voxel centroid of a mask (of ``fallback`` when empty, else the array centre)."""
    for candidate in (mask, fallback):
        if candidate is not None and candidate.any():
            return tuple(int(round(float(c.mean()))) for c in np.nonzero(candidate))
    return tuple(s // 2 for s in mask.shape)


def crop_around(array: np.ndarray, centre: tuple[int, ...], size: tuple[int, ...], fill: float) -> np.ndarray:
    """A ``size`` crop of the last ``len(size)`` axes centred on ``centre``, padded with ``fill``."""
    from d4m.training.segmenter_data import crop

    if len(size) == 2:
        return crop(array[..., None, :, :], (0, *(c - s // 2 for c, s in zip(centre, size, strict=True))),
                    (1, *size), fill)[..., 0, :, :]
    return crop(array, tuple(c - s // 2 for c, s in zip(centre, size, strict=True)), size, fill)


def golden_patch(study: PhantomStudy, config: SegmenterConfig, background: float) -> np.ndarray:
    """``(1, phases, pz, py, px)``: the patch around the tumours (else the liver) of the prepared study."""
    centre = centre_of(study.labels == TUMOR.value, study.labels > 0)
    return crop_around(study.image, centre, tuple(config.patch_size), background)[None].astype(np.float32)


# --------------------------------------------------------------------------- engines and parity


def engine_entry(name: str, bundle_dir: Path, model: OnnxModel) -> EngineEntry:
    """The manifest entry of an ONNX file written into ``bundle_dir``."""
    ref = file_ref(bundle_dir, model.path.relative_to(bundle_dir).as_posix())
    return EngineEntry(name, ref.file, EngineKind.ONNX, model.precision, model.inputs, model.outputs, ref.sha256,
                       opset=model.opset)


def onnx_parity(bundle_dir: Path, entry: EngineEntry, inputs: dict[str, np.ndarray],
                reference: dict[str, np.ndarray]) -> ParityRow:
    """Run an ONNX file of the bundle on the CPU and compare it with the torch reference."""
    with OnnxRuntimeRunner(bundle_dir / entry.file, device="cpu") as runner:
        outputs, latency = time_runner(runner, inputs)
        provider = runner.providers[0]
    row = check_outputs(entry, reference, outputs, provider, latency)
    worst = max(c.max_abs for c in row.comparisons)
    logger.info("parity %s (%s): max |error| %.3g, %s", entry.file, entry.precision.value, worst,
                "pass" if row.passed else "FAIL")
    return row


def _onnx_variants(bundle_dir: Path, model: OnnxModel, config: ExportConfig) -> list[OnnxModel]:
    if config.simplify:
        model = simplify(model.path)
    models = [model]
    if config.fp16:
        models.append(convert_to_fp16(model.path, model.path.with_name(model.path.stem + ".fp16.onnx")))
    return models


def _export_part(bundle_dir: Path, part: NetworkPart, config: ExportConfig) -> tuple[list[EngineEntry],
                                                                                     list[ParityRow], FileRef]:
    """Export one synthesis network, save its golden arrays, check every variant."""
    reference = part.reference()
    inputs = {k: v.cpu().numpy() for k, v in part.inputs.items()}
    golden = bundle_dir / golden_file(part.name)
    golden.parent.mkdir(parents=True, exist_ok=True)
    np.savez(golden, **{f"input.{k}": v for k, v in inputs.items()}, **{f"output.{k}": v for k, v in reference.items()})
    model = part.export(bundle_dir / "synthesizer" / f"{part.name}.onnx", config.opset)
    entries, rows = [], []
    for variant in _onnx_variants(bundle_dir, model, config):
        entry = engine_entry(part.name, bundle_dir, variant)
        entries.append(entry)
        rows.append(onnx_parity(bundle_dir, entry, inputs, reference))
    return entries, rows, file_ref(bundle_dir, golden_file(part.name))


# --------------------------------------------------------------------------- synthesis networks


def _stage_of(folder: Path) -> str:
    data = read_json(folder / "config.json")
    stage = data.get("stage") if isinstance(data, dict) else None
    if stage not in ("inpainter", "autoencoder", "ldm"):
        raise InputError(f"{folder / 'config.json'}: expected a synthesis run (stage inpainter, autoencoder or "
                         f"ldm), found stage {stage!r}")
    return str(stage)


def synthesis_parts(folders: tuple[Path, ...], study: PhantomStudy, inpainter_size: tuple[int, int],
                    seed: int = 0) -> tuple[list[NetworkPart], dict[str, Any]]:
    """Load synthesis runs and build their exportable parts with golden inputs cut from the phantom.

    Parameters
    ----------
    folders
        Run folders, any order; each is recognised by its ``config.json`` stage.
    study
        The phantom study (PVP in HU and its labels).
    inpainter_size
        Slice size of the exported inpainter.
    seed
        Seed of the random latent fed to the denoiser.

    Returns
    -------
    parts, settings
        Networks to export, and what the runtime needs around them (windows, latent scale,
        noise schedule, sizes, configs).

    Raises
    ------
    InputError
        A folder is not a synthesis run, a stage appears twice, or an LDM without a readable autoencoder.
    """
    from d4m.training.autoencoder import hu_to_unit as ae_unit
    from d4m.training.autoencoder import load_autoencoder
    from d4m.training.inpainter import hu_to_unit as inp_unit
    from d4m.training.inpainter import load_inpainter, phase_one_hot
    from d4m.training.ldm import LATENT_FACTOR, LDMMode, load_ldm

    runs: dict[str, Path] = {}
    for folder in folders:
        stage = _stage_of(folder)
        if stage in runs:
            raise InputError(f"{folder}: expected one {stage} run, found a second one (first: {runs[stage]})")
        runs[stage] = folder
    parts: list[NetworkPart] = []
    settings: dict[str, Any] = {"schema_version": 1}
    pvp, labels = study.pvp.array.astype(np.float32), study.pvp_label.array
    centre = centre_of(labels == TUMOR.value, labels > 0)
    hole = np.zeros(labels.shape, bool)
    hole[labels == TUMOR.value] = True
    if "inpainter" in runs:
        model, inp_config = load_inpainter(runs["inpainter"])
        rows, cols = inpainter_size
        image = crop_around(inp_unit(pvp[centre[0]], inp_config.window), centre[1:], (rows, cols), -1.0)
        mask = crop_around(hole[centre[0]].astype(np.float32), centre[1:], (rows, cols), 0.0)
        phase = phase_one_hot(Phase.PVP) if inp_config.phase_channel else None
        parts.append(inpainter_part(model, torch.from_numpy(image)[None, None], torch.from_numpy(mask)[None, None],
                                    phase))
        settings["inpainter"] = {"size": [rows, cols], "window": list(inp_config.window),
                                 "phase_channel": inp_config.phase_channel, "config": _portable(inp_config.to_dict())}
    autoencoder = None
    if "autoencoder" in runs:
        autoencoder, ae_config = load_autoencoder(runs["autoencoder"])
    elif "ldm" in runs:
        ldm_config_path = Path(str(read_json(runs["ldm"] / "config.json").get("autoencoder", "")))
        if not (ldm_config_path / "config.json").is_file():
            raise InputError(f"{runs['ldm']}: expected its autoencoder run (pass it with --with-synthesizer), "
                             f"found nothing at {ldm_config_path}")
        autoencoder, ae_config = load_autoencoder(ldm_config_path)
    if autoencoder is not None:
        crop = tuple(ae_config.crop)
        ae_image = torch.from_numpy(crop_around(ae_unit(pvp, ae_config.window), centre, crop, -1.0))[None, None]
        encoder, decoder = autoencoder_parts(autoencoder, ae_image)
        if "autoencoder" in runs:
            parts += [encoder, decoder]
        settings["autoencoder"] = {"window": list(ae_config.window), "latent_channels": ae_config.latent_channels,
                                   "factor": LATENT_FACTOR, "config": _portable(ae_config.to_dict())}
    if "ldm" in runs and autoencoder is not None:
        denoiser, ldm_config = load_ldm(runs["ldm"], ae_config.latent_channels)
        crop = tuple(ldm_config.crop)
        latent_crop = tuple(c // LATENT_FACTOR for c in crop)
        with torch.no_grad():
            ldm_image = torch.from_numpy(crop_around(ae_unit(pvp, ae_config.window), centre, crop, -1.0))[None, None]
            hole_crop = torch.from_numpy(crop_around(hole.astype(np.float32), centre, crop, 0.0))[None, None]
            scale = denoiser.latent_scale
            z_masked = autoencoder.encode(ldm_image * (1 - hole_crop)) * scale
            latent_mask = torch.nn.functional.avg_pool3d(hole_crop, LATENT_FACTOR)
        per_phase = ldm_config.mode is LDMMode.PER_PHASE
        repeat = 1 if per_phase else len(ldm_config.phases)
        z_masked = z_masked.repeat(1, repeat, 1, 1, 1)
        generator = torch.Generator().manual_seed(seed)
        inputs = {"z_t": torch.randn(z_masked.shape, generator=generator), "z_masked": z_masked, "mask": latent_mask,
                  "timesteps": torch.tensor([ldm_config.train_timesteps // 2], dtype=torch.long)}
        if per_phase:
            inputs["phase_index"] = torch.tensor([PHASE_ORDER.index(Phase.PVP)], dtype=torch.long)
        parts.append(denoiser_part(denoiser, inputs))
        settings["ldm"] = {"mode": ldm_config.mode.value, "latent_scale": float(denoiser.latent_scale),
                           "latent_crop": list(latent_crop), "train_timesteps": ldm_config.train_timesteps,
                           "schedule": ldm_config.schedule, "beta_start": ldm_config.beta_start,
                           "beta_end": ldm_config.beta_end, "ddim_steps": ldm_config.ddim_steps,
                           "phases": [p.value for p in ldm_config.phases], "config": _portable(ldm_config.to_dict())}
    return parts, settings


# --------------------------------------------------------------------------- provenance


def _portable(value: Any) -> Any:
    """JSON values with absolute paths reduced to their last component (no site paths in a bundle)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or value.startswith("~") or "\\" in value):
        return Path(value).name
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def package_versions() -> dict[str, str]:
    """Versions of the packages that shaped the bundle, and Python's."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def data_summary(config: SegmenterConfig) -> dict[str, Any]:
    """Cases and phases of the training dataset, when its ``dataset.json`` is still readable."""
    path = config.data / "dataset.json" if config.data.suffix != ".json" else config.data
    summary: dict[str, Any] = {"dataset": config.data.name, "data_fraction": config.data_fraction,
                               "split": list(config.split), "synthetic_ratio": config.synthetic_ratio}
    if not path.is_file():
        summary["found"] = False
        return summary
    data = read_json(path)
    cases = data.get("cases", []) if isinstance(data, dict) else []
    source = data.get("source", {}) if isinstance(data, dict) else {}
    summary.update(found=True, cases=len(cases), phases=data.get("phases"),
                   generator=source.get("generator") if isinstance(source, dict) else None)
    return summary


def run_metrics(folder: Path) -> dict[str, Any]:
    """``metrics.json`` (best and last validation) and the last ``metrics.csv`` row of a run."""
    metrics: dict[str, Any] = {}
    if (folder / "metrics.json").is_file():
        metrics["summary"] = read_json(folder / "metrics.json")
    if (folder / "metrics.csv").is_file():
        with (folder / "metrics.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            metrics["last_row"] = {k: _number(v) for k, v in rows[-1].items()}
            metrics["rows"] = len(rows)
    return _portable(metrics)


def _number(text: str) -> float | str | None:
    try:
        value = float(text)
    except ValueError:
        return text or None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- the bundle


def write_onnx_bundle(config: ExportConfig, progress: Progress | None = None) -> Path:
    """Export a segmenter run (and optional synthesis runs) into a verified ONNX bundle.

    Parameters
    ----------
    config
        What to export and where.
    progress
        Called with 1 after each step (export, golden, each variant's parity, synthesis, manifest).

    Returns
    -------
    pathlib.Path
        The bundle folder.

    Raises
    ------
    InputError
        A run folder that cannot be loaded, an existing output without ``overwrite``.
    EngineError
        The ONNX export or its checks fail.
    ParityError
        An exported file is outside its precision's tolerance (nothing is written).
    """
    tick = progress or (lambda n: None)
    run = load_segmenter_run(config.run, config.weights)
    seg = run.config
    with atomic_dir(config.out, overwrite=config.overwrite) as tmp:
        model = export_segmenter(run.network, len(seg.phases), seg.patch_size, tmp / "segmenter.onnx",
                                 config.fixed_patch, config.opset, config.precise_norm)
        tick(1)
        study = phantom_study(seg, config.golden_seed)
        background = seg.normalization.background
        golden_in = golden_patch(study, seg, background)
        reference = {SEGMENTER_OUTPUT: torch_predictor(run.network, "cpu")(golden_in)}
        (tmp / "golden").mkdir()
        np.save(tmp / "golden" / "input.npy", golden_in)
        np.save(tmp / "golden" / "output.npy", reference[SEGMENTER_OUTPUT])
        tick(1)
        engines: list[EngineEntry] = []
        rows: list[ParityRow] = []
        for variant in _onnx_variants(tmp, model, config):
            entry = engine_entry(SEGMENTER, tmp, variant)
            engines.append(entry)
            rows.append(onnx_parity(tmp, entry, {SEGMENTER_INPUT: golden_in}, reference))
            tick(1)
        files: list[FileRef] = []
        if config.synthesizer:
            parts, settings = synthesis_parts(config.synthesizer, study, config.inpainter_size, config.golden_seed)
            for part in parts:
                part_engines, part_rows, golden_ref = _export_part(tmp, part, config)
                engines += part_engines
                rows += part_rows
                files.append(golden_ref)
                tick(1)
            write_json(tmp / SYNTHESIZER_SETTINGS, _portable(settings))
            files.append(file_ref(tmp, SYNTHESIZER_SETTINGS))
        study_result = None
        if config.study_parity:
            with OnnxRuntimeRunner(tmp / "segmenter.onnx", device="cpu") as runner:
                study_result = predictor_agreement(study.image, torch_predictor(run.network, "cpu"),
                                                   as_predictor(runner), seg.patch_size, seg.overlap, background)
            logger.info("study parity: Dice %s", study_result["dice"])
            tick(1)
        failures = [f"{r.file}: {c.output} max |error| {c.max_abs:.3g} (bound {r.tolerance.bound(c.reference_max):.3g})"
                    f", Dice {c.dice}" for r in rows for c in r.comparisons if not c.passes(r.tolerance)]
        if study_result is not None and min(study_result["dice"].values()) < 0.999:
            failures.append(f"phantom study: expected Dice >= 0.999 per label, found {study_result['dice']}")
        if failures:
            raise ParityError("parity: expected every exported network within its tolerance, found "
                              + "; ".join(failures))
        write_json(tmp / PARITY_NAME, parity_document(rows, study_result, {"golden": "phantom patch, seed "
                                                                                     f"{config.golden_seed}"}))
        files.insert(0, file_ref(tmp, PARITY_NAME))
        manifest = Manifest(
            phases=tuple(seg.phases),
            preprocessing=Preprocessing(seg.hu_window, float(seg.norm_mean), float(seg.norm_std),  # type: ignore[arg-type]
                                        tuple(seg.spacing)),  # type: ignore[arg-type]
            sliding_window=SlidingWindow(tuple(seg.patch_size), overlap=seg.overlap),  # type: ignore[arg-type]
            engines=tuple(engines),
            labels=tuple(LABELS.values()),
            postprocessing=run_postprocess(config.run),
            golden=Golden(file_ref(tmp, "golden/input.npy"), file_ref(tmp, "golden/output.npy")),
            files=tuple(files),
            provenance={
                "training": _portable(seg.to_dict()),
                "data": _portable(data_summary(seg)),
                "metrics": run_metrics(config.run),
                "export": _portable(config.to_dict()),
                "versions": package_versions(),
            },
        )
        write_manifest(tmp, manifest)
        tick(1)
    logger.info("bundle written: %s (%d engines)", config.out, len(engines))
    return config.out


def export_steps(config: ExportConfig) -> int:
    """How many times :func:`write_onnx_bundle` calls ``progress`` (for a progress bar's total)."""
    synthesis = {_stage_of(f) for f in config.synthesizer}
    parts = len(synthesis & {"inpainter", "ldm"}) + 2 * ("autoencoder" in synthesis)
    return 3 + (1 + config.fp16) * 1 + parts + config.study_parity
