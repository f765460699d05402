"""``d4m-infer``: a DICOM study folder in, a DICOM-SEG, a report and a QC picture out. No PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from d4m.runtime.console import configure_logging, run_command, stdout, version_callback

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
