"""What the three command-line tools share: logging setup, progress bars, error-to-exit-code mapping.

Only the ``cli.py`` modules use this; library code logs through ``logging`` and raises
:class:`~d4m.dicom_io.errors.D4MError` subclasses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from d4m.dicom_io.errors import D4MError

T = TypeVar("T")

stderr = Console(stderr=True)
stdout = Console()


def version() -> str:
    """The installed d4m version."""
    try:
        return metadata.version("d4m")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr through rich: warnings by default, info with ``-v``, debug with ``-vv``."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def version_callback(value: bool) -> None:
    """Typer callback for ``--version``."""
    if value:
        stdout.print(f"d4m {version()}")
        raise typer.Exit()


def run_command(action: Callable[[], T]) -> T:
    """Run a command's library call; turn a :class:`D4MError` into its message and exit code.

    Tracebacks are not shown for expected errors: they may hold local values from the data. The
    message is printed soft-wrapped (rich inserts no line breaks at the console width), so a path
    in it stays whole for copying and for scripts that read stderr.
    """
    try:
        return action()
    except D4MError as exc:
        stderr.print(Text.assemble(("error", "bold red"), f" ({type(exc).__name__}): {exc}"), highlight=False,
                     soft_wrap=True)
        raise typer.Exit(code=exc.exit_code) from None


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)``."""
    if quiet:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
