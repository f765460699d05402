"""The d4m demo on the built-in phantom, end to end (``make demo``).

phantom cohort → ``d4m-train all --preset tiny`` → ``d4m-export onnx`` → ``d4m-infer run`` on a
held-out phantom study's DICOM folder (another seed: a study no stage has seen; of the
``--heldout-cases`` studies generated, the one with the largest tumour burden) → the DICOM-SEG
checked with independent readers (highdicom read-back, ``dciodvfy``) and its Dice against the
phantom's truth.

Each step runs the command a user would type and prints its time. The demo exits non-zero when a
command fails, the SEG is invalid, or the held-out study's liver Dice is below ``--min-liver-dice``
or its tumour Dice below ``--min-tumor-dice`` (defaults 0.80 and 0.30: the tiny model scores
about 0.5 tumour Dice on average over held-out phantom studies, and one study's tumour Dice
varies around that).
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
    parser.add_argument("--heldout-cases", type=int, default=2, help="held-out studies generated (one is segmented)")
    parser.add_argument("--min-liver-dice", type=float, default=0.80)
    parser.add_argument("--min-tumor-dice", type=float, default=0.30)
    parser.add_argument("--cohort", type=Path, help="use this training cohort instead of generating one")
    parser.add_argument("--run", type=Path, help="training run folder (default OUT/run); an existing run resumes, "
                        "its finished stages are skipped")
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    clock = time.perf_counter()

    from d4m.dicom_io.reader import read_series, read_series_datasets
    from d4m.dicom_io.seg_writer import read_seg
    from d4m.dicom_io.series import scan_folder
    from d4m.dicom_io.volume import read_image
    from d4m.training.datasets import load_dataset

    t = step(f"1. Phantom: a {args.cases}-study training cohort (seed 0) and held-out studies (seed "
             f"{args.heldout_seed}, with DICOM)")
    cohort, heldout = args.cohort or out / "cohort", out / "heldout"
    if args.cohort is None:
        run(BIN / "d4m-train", "-q", "phantom", "--out", cohort, "--cases", str(args.cases), "--seed", "0",
            "--no-dicom")
    run(BIN / "d4m-train", "-q", "phantom", "--out", heldout, "--cases", str(args.heldout_cases), "--seed",
        str(args.heldout_seed), "--preview")
    burden = {c.id: int((read_image(c.label).array == 2).sum()) for c in load_dataset(heldout).cases}  # type: ignore[arg-type]
    if not any(burden.values()):
        raise SystemExit(f"no held-out study with a tumour at seed {args.heldout_seed}: pick another --heldout-seed")
    case = load_dataset(heldout).case(max(burden, key=lambda i: burden[i]))
    assert case.dicom is not None and case.label is not None
    print(f"   tumour voxels per held-out study: {burden}; the demo segments {case.id} (the largest tumour "
          f"burden, so that its tumour Dice means something); preview {heldout / 'preview.png'}")
    done("phantom", t)

    t = step("2. Read the held-out DICOM back and compare with its NIfTI truth")
    run(BIN / "d4m-infer", "inspect", case.dicom)
    pvp_series = None
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
        if matches[0].value == "PVP":
            pvp_series = series
    if pvp_series is None:
        raise SystemExit("no series matched the PVP phase")
    done("DICOM read-back", t)

    t = step("3. Train every stage with the tiny preset (register → ... → evaluate)")
    run_dir = args.run or out / "run"
    run(BIN / "d4m-train", "-q", "all", "--data", cohort, "--out", run_dir, "--preset", "tiny", "--device", "cpu")
    record = json.loads((run_dir / "pipeline.json").read_text())
    for stage in record["stages"]:
        state = "done before, skipped" if stage.get("skipped") else f"{stage['seconds']:7.1f} s"
        print(f"   {stage['folder']:<15} {state}")
    print((run_dir / "07-evaluate" / "results.md").read_text())
    done("d4m-train all", t)

    t = step("4. Export the segmenter to an ONNX bundle (parity-gated)")
    bundle = out / "bundle"
    run(BIN / "d4m-export", "-q", "onnx", "--run", run_dir / "06-segmenter", "--out", bundle)
    done("d4m-export onnx", t)

    t = step("5. Segment the held-out study from its DICOM folder")
    result = out / "result"
    run(BIN / "d4m-infer", "run", case.dicom, "--bundle", bundle, "--out", result, "--device", "cpu")
    seg_path = result / "seg.dcm"
    done("d4m-infer run", t)

    t = step("6. Check the SEG: highdicom read-back, dciodvfy, Dice against the phantom's truth")
    source = read_series_datasets(pvp_series)
    labels = read_seg(seg_path, source)
    truth = read_image(case.label).array.astype(np.uint8)
    if labels.shape != truth.shape:
        raise SystemExit(f"the SEG reads back as {labels.shape}, the truth is {truth.shape}")
    liver = dice(labels >= 1, truth >= 1)
    tumor = dice(labels == 2, truth == 2)
    print(f"   highdicom read-back: {labels.shape}, segments {sorted(int(v) for v in np.unique(labels) if v)}")
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        print(f"   dciodvfy: {len(errors)} errors")
        if errors:
            raise SystemExit("\n".join(errors))
    else:
        print("   dciodvfy not installed (apt-get install dicom3tools): skipped")
    print(f"   Dice on the held-out study {case.id} (seed {args.heldout_seed}): liver {liver:.3f}, tumor {tumor:.3f}")
    done("SEG checks", t)

    total = time.perf_counter() - clock
    print("\n== Times")
    for title, seconds in TIMES:
        print(f"   {title:<18} {seconds:7.1f} s")
    print(f"   {'total':<18} {total:7.1f} s")
    print(f"\nDone. SEG: {seg_path}\n      report: {result / 'report.json'}\n      QC picture: {result / 'qc.png'}"
          f"\n      training run: {run_dir / 'pipeline.json'}, {run_dir / '07-evaluate' / 'results.md'}")
    if liver < args.min_liver_dice or tumor < args.min_tumor_dice:
        raise SystemExit(f"held-out Dice below the demo's floor: liver {liver:.3f} (min {args.min_liver_dice}), "
                         f"tumor {tumor:.3f} (min {args.min_tumor_dice})")


if __name__ == "__main__":
    main()
