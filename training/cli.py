"""``d4m-train``: the paper's four stages, the phantom cohort, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
def phantom(
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    cases: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same cohort.")] = 0,
    size: Annotated[str, typer.Option(help="small (tests), medium (demo) or full (512×512 benchmarks).")] = "small",
    preview: Annotated[bool, typer.Option(help="Also write preview.png: one slice per phase with labels.")] = False,
    dicom: Annotated[bool, typer.Option(help="Write each study as DICOM too.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Generate a synthetic multiphase liver-CT cohort (DICOM, NIfTI, labels, dataset.json)."""
    from d4m.training.phantom import PhantomConfig, generate_case, render_preview, write_cohort

    def action() -> None:
        config = PhantomConfig(cases=cases, seed=seed, size=size, write_dicom=dicom)
        if out.exists() and not overwrite:
            from d4m.dicom_io.errors import InputError

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
