"""The d4m demo on the built-in phantom, end to end (``make demo``).

Each step runs the command a user would type, then checks its result with an independent reader.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(*args: str | Path) -> None:
    print("$ " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--size", default="medium")
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    from d4m.dicom_io.reader import read_series, read_series_datasets
    from d4m.dicom_io.seg_writer import read_seg, write_seg
    from d4m.dicom_io.series import scan_folder
    from d4m.dicom_io.volume import read_image
    from d4m.training.datasets import load_dataset

    t = step("1. Phantom: a synthetic multiphase cohort (DICOM + NIfTI + labels)")
    cohort = out / "phantom"
    run(BIN / "d4m-train", "phantom", "--out", cohort, "--cases", str(args.cases), "--size", args.size, "--preview")
    dataset = load_dataset(cohort)
    print(f"   {len(dataset)} studies in {time.perf_counter() - t:.1f} s; preview: {cohort / 'preview.png'}")

    case = dataset.cases[0]
    assert case.dicom is not None
    t = step(f"2. Read the DICOM of {case.id} back and compare with the NIfTI truth")
    run(BIN / "d4m-infer", "inspect", case.dicom)
    index = scan_folder(case.dicom)
    pvp_series = None
    for series in index.series:
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
    print(f"   read back in {time.perf_counter() - t:.1f} s")
    if pvp_series is None:
        raise SystemExit("no series matched the PVP phase")

    t = step("3. A DICOM-SEG from the ground-truth labels, referencing the PVP series")
    source = read_series_datasets(pvp_series)
    label = read_image(case.label).array.astype(np.uint8)
    seg_path = write_seg(label, source, out / "truth-seg.dcm")
    back = read_seg(seg_path, source)
    print(f"   {seg_path}: {seg_path.stat().st_size / 2**20:.1f} MiB, written in {time.perf_counter() - t:.1f} s")
    print(f"   read back with highdicom: liver Dice {dice(back == 1, label == 1):.4f}, "
          f"tumor Dice {dice(back == 2, label == 2):.4f}")
    if not np.array_equal(back, label):
        raise SystemExit("the SEG does not read back to the written labels")

    step("4. Validate the SEG with dciodvfy (dicom3tools)")
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        print(f"   dciodvfy: {len(errors)} errors")
        if errors:
            raise SystemExit("\n".join(errors))
    else:
        print("   dciodvfy not installed (apt-get install dicom3tools): skipped")

    print(f"\nDone. Look at: {cohort / 'preview.png'}, {seg_path}, {cohort / 'dataset.json'}")


if __name__ == "__main__":
    main()
