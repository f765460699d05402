"""``d4m-infer``: a DICOM study folder in, a DICOM-SEG, a report and a QC picture out. No PyTorch."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from d4m.dicom_io.codes import SegType
from d4m.runtime.console import configure_logging, run_command, stderr, stdout, version_callback
from d4m.runtime.runners import Device

if TYPE_CHECKING:
    from d4m.runtime.infer import BatchResult, InferResult

@contextlib.contextmanager
def stage_status(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A rich spinner on stderr naming the running stage; yields ``show(text)``."""
    if quiet:
        yield lambda text: None
        return
    with stderr.status("starting") as status:
        yield lambda text: status.update(f"d4m-infer: {text}")


def render_result(result: InferResult, console: Console) -> None:
    """Summarise a finished run (no patient data)."""
    report = result.report
    phases, seg = report["phases"], report["segmentation"]
    duplicated = ", ".join(f"{m}←{s}" for m, s in phases["duplicated"].items()) or "none"
    console.print(f"[bold green]done[/]: {', '.join(result.files)} in {result.out}")
    console.print(f"phases used {'+'.join(phases['used'])} (reference {phases['reference']}), duplicated {duplicated}; "
                  f"engine {report['engine']['file']} on {', '.join(report['engine']['providers'])}")
    console.print(f"liver {seg['liver_ml']:.1f} ml, {seg['tumor_count']} tumor(s), "
                  f"burden {seg['tumor_burden_ml']:.1f} ml; {report['timing']['total_seconds']:.1f} s, "
                  f"peak {report['memory']['peak_rss_mib'] or 0:.0f} MiB")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)


def render_batch(result: BatchResult, console: Console) -> None:
    """The summary table of a batch."""
    table = Table(title=f"{len(result.items)} studies, {len(result.failed)} failed")
    for column in ("study folder", "status", "exit", "tumors", "warnings", "seconds", "message"):
        table.add_column(column)
    for item in result.items:
        status = "[green]ok[/]" if item.ok else "[red]failed[/]"
        message = "" if item.ok else item.message.splitlines()[0][:160]
        tumors = "-" if item.tumor_count is None else str(item.tumor_count)
        table.add_row(item.folder, status, str(item.exit_code), tumors, str(item.warnings), f"{item.seconds:.1f}",
                      message)
    console.print(table)


app = typer.Typer(
    name="d4m-infer",
    help="Segment liver and liver tumors in a multiphase CT study (DICOM in, DICOM-SEG out).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Errors only.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Segment liver and liver tumors in a multiphase CT study (DICOM in, DICOM-SEG out)."""
    configure_logging(verbose, quiet)


@app.command()
def inspect(
    folder: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Folder of DICOM files (nested, any names).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """List the studies and CT series found, and what was skipped and why. Loads no model."""
    from d4m.runtime.study import describe_folder, render_description

    def action() -> None:
        description = describe_folder(folder)
        if as_json:
            stdout.print_json(json.dumps(description))
        else:
            render_description(description, stdout)

    run_command(action)


@app.command()
def run(  # noqa: PLR0913 - one parameter per command-line option (Typer)
    folder: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=False, help="Study folder of DICOM files (with --batch: a folder of "
                                                          "study folders)."),
    ],
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle: a folder or .zip written by d4m-export.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (with --batch: one sub-folder per study).")],
    phase: Annotated[
        list[str] | None,
        typer.Option("--phase", metavar="PHASE=SERIES",
                     help="Force a series (number or UID) for a phase, e.g. --phase PVP=5; repeatable."),
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="Where the network runs.")] = Device.AUTO,
    seg_format: Annotated[
        SegType, typer.Option("--seg-format", help="binary: every frame (viewers); labelmap: compact.")
    ] = SegType.BINARY,
    nifti: Annotated[bool, typer.Option("--nifti", help="Also write the labels as seg.nii.gz.")] = False,
    study: Annotated[
        str | None, typer.Option("--study", metavar="UID", help="StudyInstanceUID when the folder holds several.")
    ] = None,
    batch: Annotated[bool, typer.Option("--batch", help="FOLDER holds one sub-folder per study.")] = False,
    allow_resample: Annotated[
        bool, typer.Option("--allow-resample", help="Resample series with missing slices, uneven spacing, gantry "
                                                    "tilt or mixed sizes instead of refusing them.")
    ] = False,
    include_phi: Annotated[
        bool, typer.Option("--include-phi", help="Put patient identifiers into report.json (off by default).")
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="ONNX Runtime threads (default: one per core).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Segment liver and tumors: DICOM-SEG, report.json and qc.png into --out. Exit 2/3/4: input/bundle/engine."""
    from d4m.runtime.infer import InferConfig, run_batch
    from d4m.runtime.infer import run as run_study

    quiet = logging.getLogger().getEffectiveLevel() >= logging.ERROR

    def action() -> int:
        config = InferConfig(
            input=folder, bundle=bundle, out=out, phases=tuple(phase or ()), device=device, seg_format=seg_format,
            nifti=nifti, study=study, allow_resample=allow_resample, include_phi=include_phi, threads=threads,
            overwrite=overwrite,
        )
        with stage_status(quiet) as show:
            if batch:
                result = run_batch(config, progress=lambda name, stage: show(f"{name}: {stage}"))
                render_batch(result, stdout)
                return result.exit_code
            single = run_study(config, progress=show)
        render_result(single, stdout)
        return 0

    code = run_command(action)
    if code:
        raise typer.Exit(code=code)
