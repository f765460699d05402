"""``d4m-train``: the paper's four stages, the phantom cohort, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from d4m.dicom_io.errors import InputError
from d4m.runtime.console import configure_logging, progress_bar, run_command, stderr, version_callback

app = typer.Typer(
    name="d4m-train",
    help="Train the Diff4MMLiTS stages on multiphase liver CT, and make the synthetic phantom cohort.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

_QUIET = {"quiet": False}


@app.callback()
def main(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Errors only, no progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Train the Diff4MMLiTS stages on multiphase liver CT, and make the synthetic phantom cohort."""
    configure_logging(verbose, quiet)
    _QUIET["quiet"] = quiet


@app.command()
def phantom(  # noqa: PLR0913 - one parameter per command-line option (Typer)
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    cases: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same cohort.")] = 0,
    size: Annotated[str, typer.Option(help="small (tests), medium (demo) or full (512×512 benchmarks).")] = "small",
    preview: Annotated[bool, typer.Option(help="Also write preview.png: one slice per phase with labels.")] = False,
    dicom: Annotated[bool, typer.Option(help="Write each study as DICOM too.")] = True,
    min_tumor_mm: Annotated[float, typer.Option(help="Smallest tumour diameter (mm).")] = 5.0,
    max_tumor_mm: Annotated[float, typer.Option(help="Largest tumour diameter (mm).")] = 60.0,
    max_tumors: Annotated[int, typer.Option(help="At most this many tumours per study (1..20).")] = 5,
    tumor_free_fraction: Annotated[float, typer.Option(help="Share of studies without a tumour.")] = 0.15,
    tumor_kinds: Annotated[list[str] | None, typer.Option(
        "--tumor-kind", help="Tumour kinds that may occur: hcc, metastasis, cyst (repeat; default all).")] = None,
    noise_scale: Annotated[float, typer.Option(help="Factor on the CT noise SD (a noisier site: 1.6).")] = 1.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Generate a synthetic multiphase liver-CT cohort (DICOM, NIfTI, labels, dataset.json)."""
    from d4m.training.phantom import PhantomConfig, generate_case, render_preview, write_cohort

    def action() -> None:
        kinds = {"tumor_kinds": tuple(tumor_kinds)} if tumor_kinds else {}
        config = PhantomConfig(cases=cases, seed=seed, size=size, write_dicom=dicom, min_tumor_mm=min_tumor_mm,
                               max_tumor_mm=max_tumor_mm, max_tumors=max_tumors,
                               tumor_free_fraction=tumor_free_fraction, noise_scale=noise_scale, **kinds)
        if out.exists() and not overwrite:
            raise InputError(f"{out}: expected a new output folder, found an existing one (use --overwrite)")
        with progress_bar("phantom studies", cases, _QUIET["quiet"]) as advance:
            dataset = write_cohort(out, config, progress=advance)
        stderr.print(f"wrote {len(dataset)} studies to {out}/dataset.json")
        if preview:
            render_preview(generate_case(0, config), out / "preview.png")
            stderr.print(f"preview: {out / 'preview.png'}")

    run_command(action)


@app.command()
def register(
    data: Annotated[Path, typer.Option(exists=True, help="Dataset folder (with dataset.json) to register.")],
    out: Annotated[Path, typer.Option(help="Output dataset folder: every phase on the PVP grid.")],
    seed: Annotated[int, typer.Option(help="Registration sampling seed.")] = 0,
    bspline: Annotated[bool, typer.Option(help="Add a coarse B-spline stage after rigid and affine.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo a folder made with another configuration.")] = False,
) -> None:
    """Stage 1: register NC, ART and DEL to the portal-venous phase (liver-focused, rigid then affine)."""
    from d4m.runtime.registration import RegistrationSettings
    from d4m.training.datasets import load_dataset
    from d4m.training.prealignment import RegistrationConfig, register_dataset

    def action() -> None:
        settings = RegistrationSettings(bspline=bspline)
        config = RegistrationConfig(data=data, out=out, settings=settings, seed=seed, overwrite=overwrite)
        with progress_bar("registration", len(load_dataset(data)), _QUIET["quiet"]) as advance:
            dataset = register_dataset(config, progress=advance)
        stderr.print(f"registered {len(dataset)} cases: {out}/dataset.json, summary {out}/registration_summary.json")

    run_command(action)


@app.command()
def inpainter(
    data: Annotated[Path, typer.Option(exists=True, help="Registered dataset folder (with dataset.json) to train on.")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, config.json, metrics.csv, resume.pt.")],
    preset: Annotated[str, typer.Option(help="tiny (demo), cpu (minutes here) or paper (near LaMa-Fourier).")] = "cpu",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimisation steps (default: the preset's).")] = None,
    holdout: Annotated[str, typer.Option(help="Comma-separated case ids kept out of training.")] = "",
    init: Annotated[
        Path | None, typer.Option(exists=True, help="Local checkpoint (model.safetensors or its folder) to start from.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of every random choice: the same seed gives the same weights.")] = 0,
) -> None:
    """Stage 2a: train the Normal CT Generator's FFC inpainter (resumes a killed run in the same folder)."""
    from d4m.training.inpainter import InpainterConfig
    from d4m.training.inpainter_training import train_inpainter

    def action() -> None:
        changes: dict[str, object] = {
            "data": data, "out": out, "holdout": tuple(i.strip() for i in holdout.split(",") if i.strip()),
            "init": init, "device": device, "seed": seed,
        }
        if steps is not None:
            changes["steps"] = steps
        config = InpainterConfig.from_preset(preset, **changes)
        with progress_bar("inpainter steps", config.steps, _QUIET["quiet"]) as advance:
            run = train_inpainter(config, progress=advance)
        stderr.print(f"inpainter: {run}/model.safetensors after {config.steps} steps, losses in {run}/metrics.csv")

    run_command(action)


@app.command()
def normalize(
    data: Annotated[Path, typer.Option(exists=True, help="Registered dataset folder (every phase on the PVP grid).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder: normal (tumour-free) images and hole masks.")],
    inpainter: Annotated[str, typer.Option(help="ffc (the trained inpainter), median or mean (baselines).")],
    model: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Inpainter run folder (required for ffc).")
    ] = None,
    closing: Annotated[int, typer.Option(help="Closing kernel side applied per slice to the PVP tumour mask.")] = 5,
    dilation: Annotated[int, typer.Option(help="Kernel side of the one dilation after the closing.")] = 3,
    overwrite: Annotated[bool, typer.Option(help="Redo a folder made with another configuration.")] = False,
) -> None:
    """Stage 2b: erase the tumours from every registered phase (the paper's Normal CT Generator)."""
    from d4m.training.datasets import load_dataset
    from d4m.training.normal_ct import NormalizeConfig, normalize_dataset

    def action() -> None:
        config = NormalizeConfig(data=data, out=out, inpainter=inpainter, model=model, closing=closing,  # type: ignore[arg-type]
                                 dilation=dilation, overwrite=overwrite)
        with progress_bar("normal CTs", len(load_dataset(data)), _QUIET["quiet"]) as advance:
            dataset = normalize_dataset(config, progress=advance)
        stderr.print(f"normalised {len(dataset)} cases ({config.inpainter.value}): {out}/dataset.json")

    run_command(action)


@app.command()
def autoencoder(
    data: Annotated[Path, typer.Option(exists=True, help="Registered dataset (all phases on the PVP grid).")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, config.json, metrics.csv.")],
    preset: Annotated[str, typer.Option(help="tiny (demo), cpu (minutes) or paper (GPU).")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the preset's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Stage 3a: train the 3D autoencoder shared by the four phases (resumes from resume.pt)."""
    from d4m.training.autoencoder import AutoencoderConfig, train_autoencoder

    def action() -> None:
        changes = {"data": data, "out": out, "seed": seed, "device": device}
        config = AutoencoderConfig.from_preset(preset, **changes, **({"steps": steps} if steps else {}))
        with progress_bar("autoencoder steps", config.steps, _QUIET["quiet"]) as advance:
            run = train_autoencoder(config, progress=advance)
        stderr.print(f"autoencoder: {run}")

    run_command(action)


@app.command()
def ldm(
    data: Annotated[Path, typer.Option(exists=True, help="Registered dataset with normal (tumor-free) images.")],
    autoencoder_run: Annotated[Path, typer.Option("--autoencoder", exists=True, help="Autoencoder run folder.")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors, config.json, metrics.csv.")],
    mode: Annotated[str, typer.Option(help="per-phase (the paper) or joint (four phases denoised together).")] = (
        "per-phase"
    ),
    preset: Annotated[str, typer.Option(help="tiny (demo), cpu (minutes) or paper (GPU).")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the preset's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Stage 3b: train the mask-conditioned latent diffusion model (resumes from resume.pt)."""
    from d4m.training.ldm import LDMConfig, train_ldm

    def action() -> None:
        changes = {"data": data, "autoencoder": autoencoder_run, "out": out, "mode": mode, "seed": seed,
                   "device": device}
        config = LDMConfig.from_preset(preset, **changes, **({"steps": steps} if steps else {}))
        with progress_bar("diffusion steps", config.steps, _QUIET["quiet"]) as advance:
            run = train_ldm(config, progress=advance)
        stderr.print(f"latent diffusion model: {run}")

    run_command(action)


@app.command()
def synthesize(  # noqa: PLR0913 - one parameter per command-line option (Typer)
    data: Annotated[Path, typer.Option(exists=True, help="Dataset with normal (tumor-free) images and liver labels.")],
    out: Annotated[Path, typer.Option(help="Output dataset of synthetic cases with exact labels.")],
    synthesizer: Annotated[str, typer.Option(help="ldm (autoencoder + diffusion) or rules (no learning).")] = "ldm",
    autoencoder_run: Annotated[Path | None, typer.Option("--autoencoder", help="Autoencoder run (ldm).")] = None,
    ldm_run: Annotated[Path | None, typer.Option("--ldm", help="Latent diffusion run (ldm).")] = None,
    copies: Annotated[int, typer.Option(min=1, help="Synthetic cases per input case.")] = 1,
    ddim_steps: Annotated[int | None, typer.Option(min=1, help="DDIM sampling steps (default: the LDM run's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Stage 3c: paint random tumors into normal CTs, the same mask in all four phases."""
    from d4m.training.datasets import load_dataset
    from d4m.training.synthesis import SynthesisConfig, synthesize_dataset

    def action() -> None:
        config = SynthesisConfig(data=data, out=out, synthesizer=synthesizer, autoencoder=autoencoder_run,
                                 ldm=ldm_run, copies=copies, ddim_steps=ddim_steps, seed=seed, device=device,
                                 overwrite=overwrite)
        with progress_bar("synthetic cases", len(load_dataset(data)) * copies, _QUIET["quiet"]) as advance:
            dataset = synthesize_dataset(config, progress=advance)
        stderr.print(f"wrote {len(dataset)} synthetic cases to {out}/dataset.json")

    run_command(action)


@app.command()
def segmenter(  # noqa: PLR0913 - one parameter per command-line option (Typer)
    data: Annotated[Path, typer.Option(exists=True, help="Registered dataset (real cases, PVP-grid labels).")],
    out: Annotated[Path, typer.Option(help="Run folder: model.safetensors (best), last, config.json, metrics.csv.")],
    preset: Annotated[str, typer.Option(help="tiny (demo), cpu or paper (96³ patches, GPU).")] = "tiny",
    backbone: Annotated[str, typer.Option(help="dynunet, unet, attention-unet, segresnet or swinunetr.")] = "dynunet",
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the preset's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the preset's).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(
        help="Steps of linear learning-rate warm-up (default: the preset's).")] = None,
    synthetic_ratio: Annotated[float, typer.Option(help="Share of synthetic samples (online or offline).")] = 0.0,
    synthesizer: Annotated[Path | None, typer.Option(
        help="Online: a synthesis config.json or d4m-train synthesize folder (with --synthetic-ratio).")] = None,
    synthetic_data: Annotated[Path | None, typer.Option(
        exists=True, help="Offline: a dataset written by d4m-train synthesize (with --synthetic-ratio).")] = None,
    data_fraction: Annotated[float, typer.Option(help="Share of the real training cases used.")] = 1.0,
    phase_dropout: Annotated[float, typer.Option(help="Probability of dropping phases (then duplicated).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Stage 4: train the 4-channel segmenter on real (+ synthetic) cases (resumes from resume.pt)."""
    from d4m.training.segmenter import segmenter_preset
    from d4m.training.segmenter_training import train_segmenter

    def action() -> None:
        changes = {"data": data, "out": out, "backbone": backbone, "synthetic_ratio": synthetic_ratio,
                   "synthesizer": synthesizer, "synthetic_data": synthetic_data, "data_fraction": data_fraction,
                   "phase_dropout": phase_dropout,
                   "seed": seed, "device": device}
        optional = {"steps": steps, "lr": lr, "warmup_steps": warmup_steps}
        changes.update({k: v for k, v in optional.items() if v is not None})
        try:
            config = segmenter_preset(preset, **changes)
        except ValueError as exc:
            raise InputError(f"segmenter options: expected valid values, found {exc}") from exc
        with progress_bar("segmenter steps", config.steps, _QUIET["quiet"]) as advance:
            run = train_segmenter(config, progress=advance)
        stderr.print(f"segmenter: {run}")

    run_command(action)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(exists=True, help="Segmenter run folder.")],
    out: Annotated[Path, typer.Option(help="Folder for results.md, results.csv, results.json.")],
    data: Annotated[Path | None, typer.Option(help="Dataset (default: the one the model was trained on).")] = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    every_subset: Annotated[bool, typer.Option(help="Also each missing-phase combination (duplication).")] = False,
    phases: Annotated[list[str] | None, typer.Option(
        "--phases", help="A phase set given to the model, e.g. PVP or ART+PVP (repeatable; default: the "
                         "phases every case has, all 4 on a complete dataset).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Evaluate a segmenter: tumor DSC, Jaccard, sensitivity, precision, liver DSC, lesion F1, HD95."""
    from d4m.training.evaluation import EvaluationConfig
    from d4m.training.evaluation import evaluate as run_evaluation

    def action() -> None:
        phase_sets = tuple(tuple(p.strip().upper() for p in item.split("+")) for item in phases or ())
        try:
            config = EvaluationConfig(model=model, out=out, data=data, split=split, every_subset=every_subset,
                                      phase_sets=phase_sets, device=device)
        except ValueError as exc:
            raise InputError(f"--phases: expected sets of NC, ART, PVP, DEL joined by '+', found {phases} ({exc})") \
                from exc
        run_evaluation(config)
        stderr.print(f"results: {out / 'results.md'}")

    run_command(action)


@app.command()
def postprocess(
    model: Annotated[Path, typer.Option(exists=True, help="Segmenter run folder.")],
    data: Annotated[Path | None, typer.Option(help="Dataset (default: the one the model was trained on).")] = None,
    split: Annotated[str, typer.Option(help="train, val or all (default: the run's validation cases).")] = "val",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Choose the liver-contact rule on labelled cases; write RUN/postprocess.json (training does it itself)."""
    from d4m.training.postprocess_choice import choose_for_run

    def action() -> None:
        if split not in ("train", "val", "all"):
            raise InputError(f"--split: expected train, val or all (never the test cases), found {split!r}")
        stderr.print(f"post-processing: {choose_for_run(model, data, split, device)}")

    run_command(action)


@app.command(name="all")
def all_stages(
    data: Annotated[Path, typer.Option(exists=True, help="Input dataset (dataset.json folder), not registered.")],
    out: Annotated[Path, typer.Option(help="Run folder: one sub-folder per stage and pipeline.json.")],
    preset: Annotated[str, typer.Option(help="tiny (demo, minutes on 2 cores), cpu or paper (GPU).")] = "tiny",
    synthetic_ratio: Annotated[
        float | None, typer.Option(help="Share of segmenter patches synthesized online (default: the preset's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every stage and of the train/val/test split.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Redo stages whose configuration changed (and the later ones) instead of refusing.")
    ] = False,
) -> None:
    """All stages: register → inpainter → normalize → autoencoder → ldm → segmenter → evaluate (resumable)."""
    from d4m.training.pipeline import PipelineConfig, run_pipeline

    def action() -> None:
        config = PipelineConfig(data=data, out=out, preset=preset, synthetic_ratio=synthetic_ratio, seed=seed,
                                device=device, overwrite=overwrite)
        record = run_pipeline(config, progress=lambda name, total: progress_bar(name, total, _QUIET["quiet"]))
        for stage in record["stages"]:
            state = "skipped (done before)" if stage.get("skipped") else f"{stage['seconds']:.1f} s"
            stderr.print(f"{stage['folder']:<16} {state}")
        stderr.print(f"pipeline: {out / 'pipeline.json'}; results: {out / '08-evaluate' / 'results.md'}",
                     soft_wrap=True)

    run_command(action)
