"""``d4m-export``: trained networks to ONNX / TensorRT engines in a bundle the runtime trusts.

Each command is a thin shell over one library call (STYLE rule 11):

    d4m-export onnx       → d4m.export.bundle_writer.write_onnx_bundle(ExportConfig)
    d4m-export tensorrt   → d4m.export.tensorrt_build.build_tensorrt(TensorRTConfig)
    d4m-export verify     → d4m.export.parity.verify_bundle(bundle, device)
    d4m-export inspect    → d4m.runtime.bundle.load_bundle(bundle), printed

Exit codes: 0 done, 1 a parity gate failed, 2 bad input, 3 bad bundle (tampered, schema,
missing file), 4 engine unavailable or failed (no TensorRT, no GPU, a failed export or build).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from d4m.runtime.console import configure_logging, progress_bar, run_command, stdout, version_callback

app = typer.Typer(
    name="d4m-export",
    help="Export trained d4m networks to ONNX and TensorRT, check parity, pack a bundle.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

_state = {"quiet": False}


class VerifyDevice(str, Enum):
    """Where ``verify`` runs the engines."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


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
    _state["quiet"] = quiet


def _size(text: str) -> tuple[int, int]:
    from d4m.dicom_io.errors import InputError
    from d4m.export.tensorrt_build import parse_shape

    shape = parse_shape(text)
    if len(shape) != 2:
        raise InputError(f"--inpainter-size: expected ROWSxCOLUMNS, found {text!r}")
    return shape[0], shape[1]


@app.command()
def onnx(  # noqa: PLR0913 - one parameter per command-line option
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Segmenter run folder (config.json + "
                                      "model.safetensors).")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Bundle folder to write.")],
    opset: Annotated[int, typer.Option(min=14, max=20, help="ONNX opset.")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write FP16 variants (normalisation kept in FP32).")]
    = False,
    fixed_patch: Annotated[bool, typer.Option("--fixed-patch", help="Fix the spatial dims to the patch size "
                                              "(batch stays dynamic).")] = False,
    with_synthesizer: Annotated[list[Path] | None, typer.Option(
        "--with-synthesizer", exists=True, file_okay=False,
        help="A synthesis run folder to export too (inpainter, autoencoder, ldm); repeat the option.")] = None,
    simplify: Annotated[bool, typer.Option("--simplify", help="Constant-fold and clean the graphs.")] = False,
    native_instance_norm: Annotated[bool, typer.Option(
        "--native-instance-norm", help="Keep ONNX InstanceNormalization (faster on CPU, less accurate in ONNX "
        "Runtime) instead of the LayerNormalization form.")] = False,
    study_parity: Annotated[bool, typer.Option("--study-parity", help="Also segment a phantom study with torch "
                                               "and ONNX Runtime and gate the Dice (slow on big networks).")]
    = False,
    inpainter_size: Annotated[str, typer.Option(help="Slice size the inpainter is exported for, ROWSxCOLUMNS.")]
    = "512x512",
    weights: Annotated[str, typer.Option(help="Weights file inside the run folder.")] = "model.safetensors",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle folder.")] = False,
) -> None:
    """Export a segmenter run (and synthesis runs) to an ONNX bundle, gated by parity on a golden patch."""

    def action() -> None:
        from d4m.export.bundle_writer import ExportConfig, export_steps, write_onnx_bundle

        config = ExportConfig(run=run, out=out, weights=weights, opset=opset, fp16=fp16, fixed_patch=fixed_patch,
                              simplify=simplify, precise_norm=not native_instance_norm,
                              synthesizer=tuple(with_synthesizer or ()), inpainter_size=_size(inpainter_size),
                              study_parity=study_parity, overwrite=overwrite)
        with progress_bar("export", export_steps(config), quiet=_state["quiet"]) as advance:
            folder = write_onnx_bundle(config, progress=advance)
        _print_parity(folder)

    run_command(action)


@app.command()
def tensorrt(
    bundle: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Bundle folder to add the engine to.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Build an FP16 engine (normalisation in FP32).")] = False,
    min_shape: Annotated[str | None, typer.Option(help="Profile minimum, e.g. 1x4x64x96x96.")] = None,
    opt_shape: Annotated[str | None, typer.Option(help="Profile optimum (default batch 2 at the patch size).")]
    = None,
    max_shape: Annotated[str | None, typer.Option(help="Profile maximum (default batch 4 at the patch size).")]
    = None,
    workspace: Annotated[int, typer.Option(min=64, help="Builder workspace in MiB.")] = 4096,
    timing_cache: Annotated[Path | None, typer.Option(dir_okay=False, help="Timing cache file.")] = None,
) -> None:
    """Build a TensorRT engine of the bundle's segmenter on this GPU, check it, list it in the manifest."""

    def action() -> None:
        from d4m.export.tensorrt_build import TensorRTConfig, build_tensorrt, parse_shape, tensorrt_environment

        tensorrt_environment()  # before any progress bar: without TensorRT or a GPU, one line and exit 4
        shapes = [parse_shape(s) if s else None for s in (min_shape, opt_shape, max_shape)]
        config = TensorRTConfig(bundle, fp16, shapes[0], shapes[1], shapes[2], workspace, timing_cache)
        with progress_bar("tensorrt", 2, quiet=_state["quiet"]) as advance:
            build_tensorrt(config, progress=advance)
        _print_parity(bundle)

    run_command(action)


@app.command()
def verify(
    bundle: Annotated[Path, typer.Option(exists=True, help="Bundle folder or .zip.")],
    device: Annotated[VerifyDevice, typer.Option(help="cpu / cuda: the ONNX files through ONNX Runtime; "
                                                 "tensorrt: the engines.")] = VerifyDevice.CPU,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads.")] = None,
    as_json: Annotated[Path | None, typer.Option("--json", dir_okay=False, help="Also write the report here.")]
    = None,
) -> None:
    """Run every engine on the golden input; table of errors, Dice and latency; exit 1 when a gate fails."""

    def action() -> None:
        from d4m.export.parity import ParityError, verify_bundle
        from d4m.runtime.artifacts import write_json

        report = verify_bundle(bundle, device.value, threads)
        stdout.print(_parity_table([r.to_dict() for r in report.rows], f"verify on {device.value}"))
        if as_json is not None:
            write_json(as_json, report.to_dict())
        if not report.passed:
            raise ParityError("; ".join(report.failures()))

    run_command(action)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(exists=True, help="Bundle folder or .zip.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print the manifest: preprocessing, labels, engines and where they can run, provenance. Runs nothing."""

    def action() -> None:
        from d4m.runtime.bundle import load_bundle

        with load_bundle(bundle) as loaded:
            if as_json:
                stdout.print_json(json.dumps({**loaded.manifest.to_dict(), "usable": loaded.describe()}))
                return
            _print_manifest(loaded)

    run_command(action)


# --------------------------------------------------------------------------- rendering


def _print_parity(folder: Path) -> None:
    from d4m.export.parity import PARITY_NAME
    from d4m.runtime.artifacts import read_json

    path = folder / PARITY_NAME
    if path.is_file() and not _state["quiet"]:
        document = read_json(path)
        stdout.print(_parity_table(document.get("engines", []), f"parity ({folder.name})"))
        study = document.get("study")
        if study:
            stdout.print(f"phantom study {study['shape']}: argmax Dice {study['dice']}, max |error| "
                         f"{study['max_abs']:.3g}")


def _parity_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("engine", "prec.", "provider", "max |err|", "mean |err|", "bound", "argmax Dice", "ms", "gate"):
        table.add_column(column, justify="right" if "err" in column or column in ("bound", "ms") else "left")
    for row in rows:
        tolerance = row["tolerance"]
        for output in row["outputs"]:
            bound = tolerance["atol"] + tolerance["rtol"] * output["reference_max"]
            name = row["file"] if len(row["outputs"]) == 1 else f"{row['file']}:{output['output']}"
            dice = " / ".join(f"{v:.4f}" for v in output["dice"].values()) or "-"
            table.add_row(name, row["precision"], row["provider"].removesuffix("ExecutionProvider"),
                          f"{output['max_abs']:.1e}", f"{output['mean_abs']:.1e}",
                          f"{bound:.1e} {tolerance['statistic']}", dice, f"{row['latency_ms']:.0f}",
                          "[green]pass[/]" if row["passed"] else "[red]FAIL[/]")
    return table


def _print_manifest(bundle: Any) -> None:
    manifest = bundle.manifest
    pre, window = manifest.preprocessing, manifest.sliding_window
    summary = Table(title=f"bundle {bundle.source.name}", show_header=False)
    summary.add_column("key")
    summary.add_column("value")
    for key, value in (
        ("sha256", bundle.sha256),
        ("phases", ", ".join(p.value for p in manifest.phases)),
        ("HU window", f"{pre.hu_window[0]:g} .. {pre.hu_window[1]:g}"),
        ("z-score", f"mean {pre.mean:.4g}, std {pre.std:.4g}"),
        ("target spacing (x, y, z)", " × ".join(f"{s:g}" for s in pre.target_spacing) + " mm"),
        ("patch (z, y, x)", " × ".join(map(str, window.patch_size))),
        ("overlap / blending", f"{window.overlap:g} / {window.mode.value} (σ {window.sigma_scale:g})"),
        ("post-processing", ", ".join(f"{k}={v}" for k, v in manifest.postprocessing.to_dict().items())),
        ("golden", "-" if manifest.golden is None else f"{manifest.golden.input.file}, {manifest.golden.output.file}"),
        ("other files", ", ".join(f.file for f in manifest.files) or "-"),
    ):
        summary.add_row(key, value)
    stdout.print(summary)
    labels = Table(title="labels")
    for column in ("value", "name", "SNOMED CT", "meaning", "region"):
        labels.add_column(column)
    for label in manifest.labels:
        labels.add_row(str(label.value), label.name, f"{label.property_type.scheme} {label.property_type.value}",
                       label.property_type.meaning, label.anatomic_region.meaning)
    stdout.print(labels)
    engines = Table(title="engines")
    for column in ("file", "network", "format", "precision", "inputs", "outputs", "built for", "usable here"):
        engines.add_column(column)
    for status in bundle.status:
        entry = status.entry
        built = (f"opset {entry.opset}" if entry.format.value == "onnx"
                 else f"{entry.gpu_name} ({entry.compute_capability}), TensorRT {entry.tensorrt_version}")
        tensors = [", ".join(f"{t.name} {t.dtype}[{', '.join(map(str, t.shape))}]" for t in group)
                   for group in (entry.inputs, entry.outputs)]
        engines.add_row(entry.file, entry.name, entry.format.value, entry.precision.value, tensors[0], tensors[1],
                        built, "yes" if status.usable else f"no: {status.reason}")
    stdout.print(engines)
    provenance = manifest.provenance
    if provenance:
        facts = Table(title="provenance", show_header=False)
        facts.add_column("key")
        facts.add_column("value")
        training = provenance.get("training", {})
        if training:
            facts.add_row("training", f"{training.get('backbone')} {training.get('filters')}, preset "
                                      f"{training.get('preset')}, {training.get('steps')} steps")
        best = provenance.get("metrics", {}).get("summary", {}).get("best", {})
        if best:
            facts.add_row("best validation", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in best.items()))
        data = provenance.get("data", {})
        if data:
            facts.add_row("data", ", ".join(f"{k} {v}" for k, v in data.items()))
        versions = provenance.get("versions", {})
        if versions:
            facts.add_row("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))
        stdout.print(facts)
