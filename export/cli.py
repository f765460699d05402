"""``d4m-export``: trained networks to ONNX / TensorRT engines in a bundle the runtime trusts."""

from __future__ import annotations

from typing import Annotated

import typer

from d4m.runtime.console import configure_logging, version_callback

app = typer.Typer(
    name="d4m-export",
    help="Export trained d4m networks to ONNX and TensorRT, check parity, pack a bundle.",
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
    """Export trained d4m networks to ONNX and TensorRT, check parity, pack a bundle."""
    configure_logging(verbose, quiet)
