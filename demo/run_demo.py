"""The d4m demo on the built-in phantom, end to end (``make demo``).

phantom cohort → ``d4m-train all --preset tiny`` → ``d4m-export onnx`` → ``d4m-infer run`` on
each held-out phantom study's DICOM folder (``--heldout-cases`` studies of another seed: no stage
has seen them) → each DICOM-SEG checked with independent readers (highdicom read-back,
``dciodvfy``) and its Dice against the phantom's truth.

Each step runs the command a user would type and prints its time. The demo exits non-zero when a
command fails, a SEG is invalid, or the mean Dice over the held-out studies is below
``--min-liver-dice`` (liver) or, over the held-out studies that have a tumour, below
``--min-tumor-dice``. The mean over all studies is printed too (a study without a tumour scores 1
when nothing is painted, else 0, as in ``d4m-train evaluate``). The floors catch a broken
pipeline; the tiny model's measured scores are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.reader import read_series, read_series_datasets
from d4m.dicom_io.seg_writer import read_seg
from d4m.dicom_io.series import SeriesInfo, scan_folder
from d4m.dicom_io.volume import read_image
from d4m.training.datasets import Case, load_dataset

BIN = Path(sys.executable).parent
TIMES: list[tuple[str, float]] = []


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(title: str, start: float) -> None:
    seconds = time.perf_counter() - start
    TIMES.append((title, seconds))
    print(f"   [{seconds:.1f} s]", flush=True)


def run(*args: str | Path) -> None:
    print("$ " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def main() -> None:  # noqa: PLR0915 - one straight script, step after step
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--cases", type=int, default=20, help="training cohort size (seed 0)")
    parser.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out studies' cohort")
    parser.add_argument("--heldout-cases", type=int, default=8, help="held-out studies generated and segmented")
    parser.add_argument("--min-tumor-mm", type=float, default=10.0,
                        help="smallest phantom tumour of both cohorts (10 mm: RECIST's measurable lesion; the small "
                             "phantom's 5 mm slices cannot show a smaller one as more than a voxel or two)")
    parser.add_argument("--min-liver-dice", type=float, default=0.80, help="floor of the held-out mean liver Dice")
    parser.add_argument("--min-tumor-dice", type=float, default=0.30,
                        help="floor of the mean tumour Dice over the held-out studies with a tumour")
    parser.add_argument("--cohort", type=Path, help="use this training cohort instead of generating one")
    parser.add_argument("--run", type=Path, help="training run folder (default OUT/run); an existing run resumes, "
                        "its finished stages are skipped")
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    clock = time.perf_counter()

    t = step(f"1. Phantom: a {args.cases}-study training cohort (seed 0) and held-out studies (seed "
             f"{args.heldout_seed}, with DICOM)")
    cohort, heldout = args.cohort or out / "cohort", out / "heldout"
    if args.cohort is None:
        run(BIN / "d4m-train", "-q", "phantom", "--out", cohort, "--cases", str(args.cases), "--seed", "0",
            "--min-tumor-mm", str(args.min_tumor_mm), "--no-dicom")
    run(BIN / "d4m-train", "-q", "phantom", "--out", heldout, "--cases", str(args.heldout_cases), "--seed",
        str(args.heldout_seed), "--min-tumor-mm", str(args.min_tumor_mm), "--preview")
    studies = load_dataset(heldout).cases
    burden = {c.id: int((read_image(c.label).array == 2).sum()) for c in studies}  # type: ignore[arg-type]
    print(f"   tumour voxels per held-out study: {burden}; preview {heldout / 'preview.png'}")
    case = studies[0]
    assert case.dicom is not None
    done("phantom", t)

    t = step("2. Read the held-out DICOM back and compare with its NIfTI truth")
    run(BIN / "d4m-infer", "inspect", case.dicom)
    for series in scan_folder(case.dicom).series:
        volume = read_series(series)
        matches = [
            phase for phase, path in case.images.items()
            if (nifti := read_image(path)).same_grid(volume, atol=1e-3) and np.array_equal(nifti.array, volume.array)
        ]
        if not matches:
            raise SystemExit(f"series {series.series_number}: no NIfTI phase matches it voxel for voxel")
        print(f"   series {series.series_number} '{series.description}' == {matches[0].value}.nii.gz "
              f"(values and geometry), {volume.shape}")
    done("DICOM read-back", t)

    t = step("3. Train every stage with the tiny preset (register → ... → evaluate)")
    run_dir = args.run or out / "run"
    run(BIN / "d4m-train", "-q", "all", "--data", cohort, "--out", run_dir, "--preset", "tiny", "--device", "cpu")
    record = json.loads((run_dir / "pipeline.json").read_text())
    for stage in record["stages"]:
        state = "done before, skipped" if stage.get("skipped") else f"{stage['seconds']:7.1f} s"
        print(f"   {stage['folder']:<15} {state}")
    print((run_dir / "08-evaluate" / "results.md").read_text())
    done("d4m-train all", t)

    t = step("4. Export the segmenter to an ONNX bundle (parity-gated)")
    bundle = out / "bundle"
    run(BIN / "d4m-export", "-q", "onnx", "--run", run_dir / "07-segmenter", "--out", bundle)
    done("d4m-export onnx", t)

    t = step(f"5. Segment each of the {len(studies)} held-out studies from its DICOM folder")
    results = out / "results"
    for study in studies:
        run(BIN / "d4m-infer", "run", study.dicom, "--bundle", bundle, "--out", results / study.id, "--device", "cpu")
    done("d4m-infer run", t)

    t = step("6. Check each SEG: highdicom read-back, dciodvfy, Dice against the phantom's truth")
    scores = [check_seg(study, results / study.id / "seg.dcm") for study in studies]
    liver, tumor_all = (float(np.mean([s[k] for s in scores])) for k in (0, 1))
    with_tumor = [s[1] for s, study in zip(scores, studies, strict=True) if burden[study.id]]
    tumor = float(np.mean(with_tumor)) if with_tumor else 1.0
    print(f"   mean over the {len(studies)} held-out studies (seed {args.heldout_seed}): liver {liver:.3f}, tumor "
          f"{tumor_all:.3f}; tumor over the {len(with_tumor)} with a tumour {tumor:.3f}")
    done("SEG checks", t)

    total = time.perf_counter() - clock
    print("\n== Times")
    for title, seconds in TIMES:
        print(f"   {title:<18} {seconds:7.1f} s")
    print(f"   {'total':<18} {total:7.1f} s")
    first = results / studies[0].id
    print(f"\nDone. SEGs: {results}/<study>/seg.dcm, e.g. {first / 'seg.dcm'}\n      report: {first / 'report.json'}"
          f"\n      QC picture: {first / 'qc.png'}"
          f"\n      training run: {run_dir / 'pipeline.json'}, {run_dir / '08-evaluate' / 'results.md'}")
    if liver < args.min_liver_dice or tumor < args.min_tumor_dice:
        raise SystemExit(f"held-out mean Dice below the demo's floor: liver {liver:.3f} (min {args.min_liver_dice}), "
                         f"tumor over the studies with a tumour {tumor:.3f} (min {args.min_tumor_dice})")


def pvp_series(study: Case) -> SeriesInfo:
    """The DICOM series of a phantom study that is its PVP NIfTI, voxel for voxel."""
    pvp = read_image(study.images[Phase.PVP])
    for series in scan_folder(study.dicom).series:
        volume = read_series(series)
        if pvp.same_grid(volume, atol=1e-3) and np.array_equal(pvp.array, volume.array):
            return series
    raise SystemExit(f"{study.dicom}: no series matches the PVP phase")


def check_seg(study: Case, seg_path: Path) -> tuple[float, float]:
    """Read a study's SEG back onto its PVP series with highdicom, run ``dciodvfy``, return (liver, tumour) Dice."""
    labels = read_seg(seg_path, read_series_datasets(pvp_series(study)))
    truth = read_image(study.label).array.astype(np.uint8)
    if labels.shape != truth.shape:
        raise SystemExit(f"{seg_path}: the SEG reads back as {labels.shape}, the truth is {truth.shape}")
    errors = ["dciodvfy not installed (apt-get install dicom3tools): skipped"]
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        if errors:
            raise SystemExit(f"{seg_path}: dciodvfy\n" + "\n".join(errors))
    scores = dice(labels >= 1, truth >= 1), dice(labels == 2, truth == 2)
    print(f"   {study.id}: read back {labels.shape}, segments {sorted(int(v) for v in np.unique(labels) if v)}, "
          f"dciodvfy {errors[0] if errors else '0 errors'}; Dice liver {scores[0]:.3f}, tumor {scores[1]:.3f} "
          f"({int((truth == 2).sum())} tumour voxels)")
    return scores


if __name__ == "__main__":
    main()
