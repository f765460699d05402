"""Read/write timings of a full-size 4-phase study (512×512×~120 per phase), d4m vs SimpleITK.

Run: ``.venv/bin/python bench/dicom_io_full.py [--size full]``. Prints per-step seconds and the
ratio of d4m's series reader to SimpleITK's ImageSeriesReader on the same files, measured in one run.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from d4m.dicom_io.codes import PHASE_ORDER
from d4m.dicom_io.reader import read_series, read_series_datasets
from d4m.dicom_io.seg_writer import read_seg, write_seg
from d4m.dicom_io.series import scan_folder
from d4m.training.phantom import PhantomConfig, generate_case, write_case


def timed(label: str, rows: list[tuple[str, float]], fn, *args, **kwargs):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    rows.append((label, time.perf_counter() - start))
    return result


def sitk_read(files: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="full")
    args = parser.parse_args()
    rows: list[tuple[str, float]] = []
    config = PhantomConfig(cases=1, seed=0, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        case = timed("phantom: generate 4 phases", rows, generate_case, 0, config)
        shape = case.images[PHASE_ORDER[2]].shape
        timed("write: 4 CT series + NIfTI", rows, write_case, case, Path(tmp) / "case", True)
        folder = Path(tmp) / "case" / "dicom"
        index = timed("scan: headers of every file", rows, scan_folder, folder)
        series = index.series
        volumes = [timed(f"read (d4m): series {s.series_number}", rows, read_series, s) for s in series]
        d4m_read = sum(t for label, t in rows if label.startswith("read (d4m)"))
        refs = [timed(f"read (SimpleITK): series {s.series_number}", rows, sitk_read, [str(f) for f in s.files])
                for s in series]
        sitk_total = sum(t for label, t in rows if label.startswith("read (SimpleITK)"))
        for vol, ref in zip(volumes, refs, strict=True):
            if not np.array_equal(vol.array, np.flip(sitk.GetArrayFromImage(ref), 0)) and not np.array_equal(
                vol.array, sitk.GetArrayFromImage(ref)
            ):
                raise SystemExit("d4m and SimpleITK read different voxels")
        pvp = next(s for s in series if "PVP" in s.description.upper() or "VEN" in s.description.upper()
                   or "PORT" in s.description.upper())
        source = timed("SEG: read source headers", rows, read_series_datasets, pvp)
        label = case.label.array.astype(np.uint8)
        seg = timed("SEG: write binary (2 segments, every frame)", rows, write_seg, label, source, Path(tmp) / "s.dcm")
        timed("SEG: read back", rows, read_seg, seg, source)
        seg_mib = seg.stat().st_size / 2**20
        n_files = sum(s.n_instances for s in series)
    print(f"study: 4 phases, PVP grid {shape} (z, y, x), {n_files} files; SEG {seg_mib:.1f} MiB")
    print("| step | seconds |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} |")
    print(f"\nseries reading, d4m / SimpleITK (same files, same run): {d4m_read:.2f} s / {sitk_total:.2f} s "
          f"= {d4m_read / sitk_total:.2f}×")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
