"""Normal CT Generator evidence: hole MAE / PSNR of several ``d4m-train normalize`` results, and a picture.

Run::

    .venv/bin/python bench/inpainting_eval.py --truth REG_DATASET \\
        --results DIR_FFC DIR_MEDIAN DIR_MEAN --cases case_000,case_007 [--png docs/ncg-examples.png]

``REG_DATASET`` is the registered phantom cohort (its ``normal`` images are the phantom's true
tumour-free renders, moved with each phase's registration); each ``DIR_*`` is the output of
``d4m-train normalize`` on that cohort. Prints a Markdown table (MAE and PSNR in HU inside the
hole, per phase and method; PSNR peak = 400 HU, the inpainter's window width; then the signed
error per phase and method), two reference
rows that explain the numbers (the spread of the true tissue inside the hole, and the error of
the best possible constant fill), and writes one PNG: per phase a row of original, hole, each
method's fill and truth, cropped around the largest hole slice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from d4m.dicom_io.codes import PHASE_ORDER
from d4m.dicom_io.volume import read_image
from d4m.training.datasets import Dataset, load_dataset
from d4m.training.normal_ct import PSNR_PEAK_HU, evaluate_inpainting

WINDOW = (-160.0, 240.0)
CROP = 56
ZOOM = 3
BAND = 16


def _method(result: Dataset) -> str:
    return str(result.source.get("config", {}).get("inpainter", result.root.name))


def _hole(result: Dataset, case_id: str) -> np.ndarray:
    return read_image(result.root / result.case(case_id).meta["hole"]).array > 0


def reference_rows(truth: Dataset, result: Dataset, cases: list[str]) -> dict[str, dict[str, float]]:
    """Per phase: std of the true tissue in the hole, and MAE of the best constant per hole slice."""
    rows: dict[str, dict[str, float]] = {}
    for phase in PHASE_ORDER:
        spread, flat = [], []
        for case_id in cases:
            hole = _hole(result, case_id)
            real = read_image(truth.case(case_id).normal[phase]).array.astype(np.float64)
            for k in np.flatnonzero(hole.reshape(len(hole), -1).any(axis=1)):
                values = real[k][hole[k]]
                spread.append(values - values.mean())
                flat.append(np.abs(values - np.median(values)))
        rows[phase.value] = {"truth_std_hu": float(np.concatenate(spread).std()),
                             "oracle_constant_mae_hu": float(np.concatenate(flat).mean())}
    return rows


def table(scores: dict[str, dict], references: dict[str, dict[str, float]]) -> str:
    methods = list(scores)
    head = ["phase", "hole voxels", *[f"{m} MAE (HU)" for m in methods], *[f"{m} PSNR (dB)" for m in methods],
            "truth std in hole (HU)", "best constant MAE (HU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase in [p.value for p in PHASE_ORDER] + ["all"]:
        entries = [scores[m]["phases"][phase] if phase != "all" else scores[m]["all"] for m in methods]
        ref = references.get(phase)
        best_mae = min(e["mae_hu"] for e in entries)
        best_psnr = max(e["psnr_db"] for e in entries)
        cells = [phase, str(entries[0]["voxels"])]
        cells += [f"**{e['mae_hu']:.2f}**" if e["mae_hu"] == best_mae else f"{e['mae_hu']:.2f}" for e in entries]
        cells += [f"**{e['psnr_db']:.2f}**" if e["psnr_db"] == best_psnr else f"{e['psnr_db']:.2f}" for e in entries]
        cells += [f"{ref['truth_std_hu']:.2f}", f"{ref['oracle_constant_mae_hu']:.2f}"] if ref else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def debiased_mae(truth: Dataset, result: Dataset, cases: list[str]) -> dict[str, float]:
    """Per phase: hole MAE after subtracting that phase's mean signed error (what bias alone costs)."""
    out = {}
    for phase in PHASE_ORDER:
        errors = []
        for case_id in cases:
            hole = _hole(result, case_id)
            filled = read_image(result.case(case_id).normal[phase]).array.astype(np.float64)
            real = read_image(truth.case(case_id).normal[phase]).array.astype(np.float64)
            errors.append(filled[hole] - real[hole])
        error = np.concatenate(errors)
        out[phase.value] = float(np.abs(error - error.mean()).mean())
    return out


def bias_table(scores: dict[str, dict], debiased: dict[str, dict[str, float]]) -> str:
    phases = [p.value for p in PHASE_ORDER]
    head = ["method", *[f"{p} bias" for p in phases], *[f"{p} MAE without bias" for p in phases]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, score in scores.items():
        cells = [f"{score['phases'][p]['bias_hu']:+.1f}" for p in phases]
        cells += [f"{debiased[method][p]:.2f}" for p in phases]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gray(hu: np.ndarray) -> np.ndarray:
    low, high = WINDOW
    return np.clip((hu - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)


def picture(truth: Dataset, results: dict[str, Dataset], cases: list[str], path: Path) -> str:
    """One row per phase: original, hole, each method, truth; returns a caption."""
    from PIL import Image, ImageDraw

    first = next(iter(results.values()))
    case_id, k, area = cases[0], 0, -1
    for cid in cases:
        hole = _hole(first, cid)
        sizes = hole.reshape(len(hole), -1).sum(axis=1)
        if sizes.max() > area:
            case_id, k, area = cid, int(np.argmax(sizes)), int(sizes.max())
    hole = _hole(first, case_id)[k]
    rows_, cols_ = np.nonzero(hole)
    centre = (int(rows_.mean()), int(cols_.mean()))
    top = int(np.clip(centre[0] - CROP // 2, 0, hole.shape[0] - CROP))
    left = int(np.clip(centre[1] - CROP // 2, 0, hole.shape[1] - CROP))
    box = (slice(top, top + CROP), slice(left, left + CROP))
    titles = ["original", "hole", *results, "truth"]
    side = CROP * ZOOM
    canvas = Image.new("RGB", (len(titles) * (side + 4), BAND + len(PHASE_ORDER) * (side + BAND)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((column * (side + 4) + 4, 2), title, fill=(255, 255, 255))
    for row, phase in enumerate(PHASE_ORDER):
        case = first.case(case_id)
        original = read_image(case.images[phase]).array[k].astype(np.float32)
        panels = [_gray(original)]
        masked = np.repeat(_gray(original)[:, :, None], 3, axis=2)
        masked[hole] = (255, 0, 255)
        panels.append(masked)
        for result in results.values():
            panels.append(_gray(read_image(result.case(case_id).normal[phase]).array[k].astype(np.float32)))
        panels.append(_gray(read_image(truth.case(case_id).normal[phase]).array[k].astype(np.float32)))
        y = BAND + row * (side + BAND)
        draw.text((4, y + 1), phase.value, fill=(255, 255, 0))
        for column, panel in enumerate(panels):
            crop = panel[box]
            rgb = crop if crop.ndim == 3 else np.repeat(crop[:, :, None], 3, axis=2)
            tile = Image.fromarray(np.ascontiguousarray(rgb)).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (column * (side + 4), y + BAND - 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return (f"{case_id}, slice {k} ({area} hole pixels), {CROP}×{CROP} px crop shown ×{ZOOM}, "
            f"window {WINDOW[0]:.0f}..{WINDOW[1]:.0f} HU; hole in magenta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--truth", type=Path, required=True, help="registered dataset with the true normal images")
    parser.add_argument("--results", type=Path, nargs="+", required=True, help="d4m-train normalize output folders")
    parser.add_argument("--cases", required=True, help="comma-separated case ids (held out of inpainter training)")
    parser.add_argument("--png", type=Path, default=Path("docs/ncg-examples.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the scores as JSON")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    truth = load_dataset(args.truth)
    results = {}
    for folder in args.results:
        result = load_dataset(folder)
        results[_method(result)] = result
    scores = {name: evaluate_inpainting(truth, result, cases, PSNR_PEAK_HU) for name, result in results.items()}
    references = reference_rows(truth, next(iter(results.values())), cases)
    references["all"] = {}
    print(f"cases {', '.join(cases)}; MAE and PSNR inside the hole (PSNR peak {PSNR_PEAK_HU:.0f} HU); best in bold\n")
    print(table(scores, {k: v for k, v in references.items() if v}))
    debiased = {name: debiased_mae(truth, result, cases) for name, result in results.items()}
    print("\nsigned error inside the hole (bias = mean of fill - truth, HU), and the MAE once it is removed\n")
    print(bias_table(scores, debiased))
    caption = picture(truth, results, cases, args.png)
    print(f"\npicture: {args.png} — {caption}")
    if args.json is not None:
        args.json.write_text(json.dumps({"scores": scores, "references": references, "picture": caption}, indent=2))


if __name__ == "__main__":
    main()
