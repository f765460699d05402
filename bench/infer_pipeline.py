"""``d4m-infer run`` end to end on a full-size 4-phase phantom study, against a plain reference pipeline.

Run: ``.venv/bin/python bench/infer_pipeline.py [--size full] [--slices 30,60]``.

Each pipeline runs in a fresh interpreter (what a site pays: imports, first-call set-ups, the
whole run), one after the other, on the same files. Both use the same weights (a seeded MONAI
DynUNet, ``--filters``; its tumour logit lowered by ``--tumor-bias`` so that random weights give
a realistic handful of tumour components for post-processing and measurement, not thousands),
exported to ONNX for d4m, and the same target spacing, patch, overlap and Gaussian blending:

* **d4m**: ``d4m-infer run`` — scan, phase assignment, reading with geometry checks,
  registration of NC/ART/DEL to PVP, resampling, sliding window on ONNX Runtime,
  post-processing, DICOM-SEG + report + QC written atomically. Per-stage times and peak RSS come
  from its ``report.json``.
* **reference**: SimpleITK ``ImageSeriesReader`` per phase (phases known from the folder names),
  the other phases resampled onto PVP without registration, resampling to the target spacing
  and z-score in numpy, MONAI ``sliding_window_inference`` with the torch network, argmax and
  the largest connected component (scipy; MONAI's transform needs scikit-image), labels back
  to the PVP grid with SimpleITK, a binary highdicom ``Segmentation`` on the PVP datasets read
  with pydicom.

Prints the stage table (times and peak RSS from inside each process), the end-to-end wall times
and their ratio (also without d4m's registration, which the reference does not do), the
network's share of d4m's time, the Dice between the two label maps, and d4m's wall time against
the number of slices (the study cropped to ``--slices``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from pydicom.sr.codedict import codes
from scipy import ndimage

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.volume import Volume
from d4m.runtime.bundle import sha256_file, write_manifest
from d4m.runtime.manifest import EngineEntry, Manifest, Preprocessing, SlidingWindow, TensorEntry
from d4m.training.phantom import PhantomConfig, generate_case
from d4m.training.phantom_acquisition import write_dicom_study

WINDOW = (-21.0, 189.0)
MEAN, STD = 100.0, 50.0


def _peak_reset() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    return float("nan")


class Stages:
    """Wall time and peak RSS per stage of the reference pipeline."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _peak_reset()
        start = time.perf_counter()
        yield
        self.rows.append((name, time.perf_counter() - start, _peak_mib()))


def build_network(filters: tuple[int, ...], tumor_bias: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    levels = len(filters)
    strides = [1] + [2] * (levels - 1)
    network = DynUNet(spatial_dims=3, in_channels=4, out_channels=3, kernel_size=[3] * levels, strides=strides,
                      upsample_kernel_size=strides[1:], filters=list(filters),
                      norm_name=("INSTANCE", {"affine": True}), res_block=False)
    with torch.no_grad():
        network.output_block.conv.conv.bias[2] -= tumor_bias
    return network.eval()


def export_bundle(network: torch.nn.Module, folder: Path, patch: tuple[int, int, int],
                  spacing: tuple[float, float, float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "segmenter.onnx"
    with torch.no_grad():
        torch.onnx.export(network, (torch.zeros(1, 4, *patch),), str(path), input_names=["image"],
                          output_names=["scores"], dynamic_axes={"image": {0: "N"}, "scores": {0: "N"}},
                          opset_version=17, dynamo=False)
    entry = EngineEntry("segmenter", "segmenter.onnx", "onnx", "fp32", (TensorEntry("image", ("N", 4, *patch)),),
                        (TensorEntry("scores", ("N", 3, *patch)),), sha256_file(path), opset=17)
    manifest = Manifest(PHASE_ORDER, Preprocessing(WINDOW, MEAN, STD, spacing), SlidingWindow(patch, 0.5), (entry,))
    write_manifest(folder, manifest)
    return folder


def crop_slices(volume: Volume, count: int) -> Volume:
    """The central ``count`` slices of a volume (same geometry)."""
    if count >= volume.shape[0]:
        return volume
    start = (volume.shape[0] - count) // 2
    origin = np.asarray(volume.origin) + start * volume.spacing[2] * volume.direction[:, 2]
    return Volume(volume.array[start:start + count], volume.spacing, tuple(origin), volume.direction)


def write_study(case, folder: Path, slices: int | None) -> dict[Phase, Path]:  # noqa: ANN001 - PhantomCase
    images = case.images if slices is None else {p: crop_slices(v, slices) for p, v in case.images.items()}
    return write_dicom_study(images, case.identity, case.acquisitions, folder)


def _sitk_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def reference_pipeline(folders: dict[Phase, Path], network: torch.nn.Module, patch: tuple[int, int, int],
                       spacing: tuple[float, float, float], out: Path) -> tuple[list[tuple[str, float, float]],
                                                                                np.ndarray]:
    stages = Stages()
    with stages.stage("read"):
        images = {p: sitk.Cast(_sitk_read(folder), sitk.sitkFloat32) for p, folder in folders.items()}
    pvp = images[Phase.PVP]
    with stages.stage("resample"):
        size = [int(round(n * s / t)) for n, s, t in zip(pvp.GetSize(), pvp.GetSpacing(), spacing, strict=True)]
        grid = sitk.Image(size, sitk.sitkUInt8)
        grid.SetSpacing(spacing)
        grid.SetOrigin(pvp.GetOrigin())
        grid.SetDirection(pvp.GetDirection())
        channels = []
        for phase in PHASE_ORDER:
            moved = sitk.Resample(images[phase], grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
            array = np.clip(sitk.GetArrayFromImage(moved), *WINDOW)
            channels.append((array - MEAN) / STD)
        batch = torch.from_numpy(np.stack(channels)[None].astype(np.float32))
    with stages.stage("network"), torch.no_grad():
        scores = sliding_window_inference(batch, patch, 2, network, overlap=0.5, mode="gaussian",
                                          padding_mode="constant", cval=(WINDOW[0] - MEAN) / STD)
    with stages.stage("postprocess"):
        labels = torch.argmax(scores, dim=1)[0].numpy().astype(np.uint8)
        components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            labels[components != int(np.argmax(sizes))] = 0
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(grid)
        back = sitk.Resample(image, pvp, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        label_array = sitk.GetArrayFromImage(back)
    with stages.stage("write"):
        files = _sitk_files(folders[Phase.PVP])
        source = [pydicom.dcmread(f) for f in files]
        algorithm = hd.AlgorithmIdentificationSequence("reference", codes.cid7162.ArtificialIntelligence, "1")
        concept = hd.sr.CodedConcept
        organ, liver = concept("123037004", "SCT", "Anatomical Structure"), concept("10200004", "SCT", "Liver")
        morph, tumor = concept("49755003", "SCT", "Morphologically Altered Structure"), concept("108369006", "SCT",
                                                                                               "Neoplasm")
        descriptions = [
            hd.seg.SegmentDescription(segment_number=1, segment_label="liver", segmented_property_category=organ,
                                      segmented_property_type=liver, algorithm_type="AUTOMATIC",
                                      algorithm_identification=algorithm),
            hd.seg.SegmentDescription(segment_number=2, segment_label="tumor", segmented_property_category=morph,
                                      segmented_property_type=tumor, algorithm_type="AUTOMATIC",
                                      algorithm_identification=algorithm),
        ]
        seg = hd.seg.Segmentation(
            source_images=source, pixel_array=label_array.copy(), segmentation_type="BINARY",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="reference",
            manufacturer_model_name="reference", software_versions="1", device_serial_number="reference",
            omit_empty_frames=False,
        )
        seg.save_as(out / "reference_seg.dcm")
    return stages.rows, label_array


def _sitk_files(folder: Path) -> list[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _python(*args: str) -> list[str]:
    return [sys.executable, "-W", "ignore", *args]


def run_d4m(study: Path, bundle: Path, out: Path) -> tuple[float, dict]:
    """``d4m-infer run`` in a fresh interpreter; returns (wall seconds, report)."""
    command = _python("-c", "from d4m.runtime.cli import app; app()", "-q", "run", str(study), "--bundle",
                      str(bundle), "--out", str(out), "--nifti")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "report.json").read_text())


def run_reference(folders: dict[Phase, Path], weights: Path, args: argparse.Namespace, out: Path
                  ) -> tuple[float, list, np.ndarray]:
    """The reference pipeline in a fresh interpreter; returns (wall seconds, stage rows, labels)."""
    mapping = json.dumps({p.value: str(f) for p, f in folders.items()})
    command = _python(__file__, "--reference", mapping, "--weights", str(weights), "--out", str(out),
                      "--filters", args.filters, "--patch", args.patch, "--spacing", args.spacing)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, rows, np.load(out / "reference_labels.npy")


def reference_main(args: argparse.Namespace) -> None:
    """Child process: the reference pipeline; prints its stage rows as JSON."""
    filters = tuple(int(v) for v in args.filters.split(","))
    network = build_network(filters, 0.0)
    network.load_state_dict(torch.load(args.weights, weights_only=True))
    folders = {Phase(p): Path(f) for p, f in json.loads(args.reference).items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, labels = reference_pipeline(folders, network, tuple(int(v) for v in args.patch.split(",")),  # type: ignore[arg-type]
                                      tuple(float(v) for v in args.spacing.split(",")), out)  # type: ignore[arg-type]
    np.save(out / "reference_labels.npy", labels)
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", help="phantom size preset (small, medium, full)")
    parser.add_argument("--slices", default="30,60", help="extra slice counts for the scaling table")
    parser.add_argument("--filters", default="16,32,64,128,192", help="DynUNet widths (d4m's 'cpu' preset)")
    parser.add_argument("--patch", default="64,96,96", help="patch (z, y, x)")
    parser.add_argument("--spacing", default="1.5,1.5,2.5", help="target spacing (x, y, z) mm")
    parser.add_argument("--tumor-bias", type=float, default=3.0, help="subtracted from the random tumour logit")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.reference:
        reference_main(args)
        return
    filters = tuple(int(v) for v in args.filters.split(","))
    patch = tuple(int(v) for v in args.patch.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        case = generate_case(0, PhantomConfig(cases=1, seed=0, size=args.size))
        network = build_network(filters, args.tumor_bias)
        torch.save(network.state_dict(), tmp / "weights.pt")
        bundle = export_bundle(network, tmp / "bundle", patch, spacing)  # type: ignore[arg-type]
        folders = write_study(case, tmp / "study", None)
        shape = case.images[Phase.PVP].shape
        d4m_wall, report = run_d4m(tmp / "study", bundle, tmp / "out")
        d4m_rows = [(s["name"], s["seconds"], s["peak_rss_mib"]) for s in report["timing"]["stages"]]
        d4m_total = sum(r[1] for r in d4m_rows)
        network_s = next(r[1] for r in d4m_rows if r[0] == "network")
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "out" / "seg.nii.gz")))
        ref_rows: list = []
        ref_wall, agreement = float("nan"), None
        if not args.skip_reference:
            ref_wall, ref_rows, ref_labels = run_reference(folders, tmp / "weights.pt", args, tmp / "reference")
            if ours.shape == ref_labels.shape:
                agreement = {name: round(dice(np.isin(ours, values), np.isin(ref_labels, values)), 4)
                             for name, values in (("liver+tumor", (1, 2)), ("tumor", (2,)))}
        scaling = []
        for count in sorted({int(v) for v in args.slices.split(",") if v} | {shape[0]}):
            if count == shape[0]:
                scaling.append((count, d4m_wall, network_s))
                continue
            write_study(case, tmp / f"study{count}", count)
            wall, scaled = run_d4m(tmp / f"study{count}", bundle, tmp / f"out{count}")
            stages = {s["name"]: s["seconds"] for s in scaled["timing"]["stages"]}
            scaling.append((count, wall, stages["network"]))

    print(f"study: 4 phases, PVP {shape} (z, y, x) voxels; network DynUNet{list(filters)}, patch {patch}, "
          f"spacing {spacing} mm, {report['engine']['windows']} windows, d4m on {report['engine']['providers']}, "
          f"{os.cpu_count()} CPU cores; {report['segmentation']['tumor_count']} tumour component(s)")
    print("\n| stage | d4m s | d4m peak MiB | reference s | reference peak MiB |\n|---|---|---|---|---|")
    ref = {name: (s, m) for name, s, m in ref_rows}
    for name, seconds, peak in d4m_rows:
        other = ref.get(name)
        print(f"| {name} | {seconds:.2f} | {peak or float('nan'):.0f} | "
              f"{'-' if other is None else f'{other[0]:.2f}'} | {'-' if other is None else f'{other[1]:.0f}'} |")
    print(f"| sum of stages | {d4m_total:.1f} | | {sum(r[1] for r in ref_rows):.1f} | |")
    print(f"| wall, fresh process | {d4m_wall:.1f} | | {ref_wall:.1f} | |")
    if ref_rows:
        register = next(r[1] for r in d4m_rows if r[0] == "register")
        print(f"\nend to end (wall): reference / d4m = {ref_wall / d4m_wall:.2f}× (without d4m's registration, "
              f"which the reference skips: {ref_wall / (d4m_wall - register):.2f}×)")
        print(f"network: reference / d4m = {ref['network'][0] / network_s:.2f}×")
        print(f"label agreement (Dice, d4m vs reference): {json.dumps(agreement)}")
    print(f"network share of d4m's wall time: {network_s / d4m_wall:.0%} (of the stages: {network_s / d4m_total:.0%})")
    print("\n| slices | d4m wall s | network s | s per slice |\n|---|---|---|---|")
    for count, total, net in scaling:
        print(f"| {count} | {total:.1f} | {net:.1f} | {total / count:.3f} |")
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
          f"after: {', '.join(f'{v:.2f}' for v in load_after)} ({os.cpu_count()} cores; other jobs share them)")


if __name__ == "__main__":
    main()
