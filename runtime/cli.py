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


@app.command()
def serve(  # noqa: PLR0913 - one parameter per command-line option (Typer)
    spool: Annotated[Path, typer.Option("--spool", help="Spool folder: received instances, study states, results.")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle: a folder or .zip written by d4m-export.")],
    send_to: Annotated[
        str | None, typer.Option("--send-to", metavar="AE@HOST:PORT", help="Send each SEG here by C-STORE.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also (or instead) write each result to OUT/<study key>/.")
    ] = None,
    ae_title: Annotated[str, typer.Option("--ae-title", help="Our AE title.")] = "D4M",
    port: Annotated[int, typer.Option("--port", help="DICOM port to listen on.")] = 11112,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "0.0.0.0",  # noqa: S104
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", metavar="AE", help="Calling AE title allowed to send; repeatable (default: any)."),
    ] = None,
    max_associations: Annotated[int, typer.Option("--max-associations", help="Associations at once.")] = 4,
    quiet_time: Annotated[
        float, typer.Option("--quiet-time", help="Seconds without a new instance before a study starts.")
    ] = 30.0,
    workers: Annotated[int, typer.Option("--workers", help="Studies segmented at once.")] = 1,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Studies waiting for a worker at most.")] = 8,
    retries: Annotated[int, typer.Option("--retries", help="C-STORE attempts per SEG (back-off doubles).")] = 5,
    retry_delay: Annotated[float, typer.Option("--retry-delay", help="Seconds before the first retry.")] = 2.0,
    max_runs: Annotated[
        int, typer.Option("--max-runs", help="Runs of a study interrupted by crashes before it is marked failed.")
    ] = 3,
    keep_hours: Annotated[
        float, typer.Option("--keep-hours", help="Remove finished studies from the spool after this many hours "
                                                 "(0: keep them).")
    ] = 168.0,
    device: Annotated[Device, typer.Option("--device", help="Where the network runs.")] = Device.AUTO,
    seg_format: Annotated[
        SegType, typer.Option("--seg-format", help="binary: every frame (viewers); labelmap: compact.")
    ] = SegType.BINARY,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="ONNX Runtime threads (default: one per core).")
    ] = None,
) -> None:
    """Listen for CT studies (DICOM C-STORE), segment each one, send the SEG back. Stops on SIGTERM/Ctrl-C."""
    import signal

    from d4m.runtime.delivery import Destination, RetryPolicy
    from d4m.runtime.listener import ListenerConfig
    from d4m.runtime.service import ServeConfig, Service
    from d4m.runtime.service import serve as serve_spool

    # pynetdicom's own INFO/DEBUG lines describe every PDU; ours say what matters without identifiers.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def on_start(service: Service) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: service.request_stop())
        stderr.print(f"d4m-infer serve: listening as {service.config.listener.ae_title} on port "
                     f"{service.listener.port}; spool {service.config.spool}", highlight=False)

    def action() -> None:
        listener = ListenerConfig(ae_title=ae_title, port=port, host=host, allowed=tuple(allow or ()),
                                  max_associations=max_associations)
        destination = None if send_to is None else Destination.parse(send_to, calling_ae=listener.ae_title)
        config = ServeConfig(spool=spool, bundle=bundle, listener=listener, destination=destination, output=out,
                             quiet_seconds=quiet_time, workers=workers, queue_size=queue_size,
                             retry=RetryPolicy(attempts=retries, first_delay=retry_delay,
                                               max_delay=max(60.0, retry_delay)),
                             max_runs=max_runs, keep_hours=keep_hours, device=device, threads=threads,
                             seg_format=seg_format)
        serve_spool(config, on_start=on_start)

    run_command(action)


@app.command()
def status(
    spool: Annotated[Path, typer.Option("--spool", help="The spool folder of d4m-infer serve.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    health: Annotated[
        bool, typer.Option("--health", help="Exit 0 when the listener's heartbeat is fresh, else 1 (Docker "
                                            "HEALTHCHECK).")
    ] = False,
    max_age: Annotated[float, typer.Option("--max-age", help="With --health: oldest acceptable heartbeat, s.")] = 30.0,
) -> None:
    """Studies in the spool: received, queued, running, done (delivered or not), failed."""
    from d4m.runtime.spool import Spool

    store = Spool(spool)
    if health:
        ok, why = store.healthy(max_age)
        (stdout if ok else stderr).print(f"{'healthy' if ok else 'unhealthy'}: {why}", highlight=False)
        if not ok:
            raise typer.Exit(code=1)
        return

    def action() -> None:
        summary = store.status()
        if as_json:
            stdout.print_json(json.dumps(summary))
            return
        counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
        age = summary["heartbeat_age_seconds"]
        stdout.print(f"{counts}; {summary['delivered']} delivered; listener heartbeat "
                     f"{'none' if age is None else f'{age:.0f} s ago'}", highlight=False)
        table = Table()
        table.add_column("study", no_wrap=True)
        for column in ("state", "instances", "runs", "sent", "tumors", "seconds", "error"):
            table.add_column(column)
        for row in summary["studies"]:
            error = (row.get("error") or "").splitlines()[0][:120] if row.get("error") else ""
            table.add_row(row["study"], row["state"], str(row.get("instances", "")), str(row.get("runs", "")),
                          ", ".join(row.get("sent") or []) or "-",
                          "-" if row.get("tumor_count") is None else str(row["tumor_count"]),
                          "-" if row.get("seconds") is None else f"{row['seconds']:.1f}", error)
        stdout.print(table)

    run_command(action)
