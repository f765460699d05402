"""Multimodal CT Synthesizer evidence: autoencoder round trip, synthetic vs real tumours, a picture.

Run::

    .venv/bin/python bench/mcs_quality.py --cohort REG_DATASET --autoencoder AE_RUN \\
        --synthetic ldm-per-phase=SYN_DIR ldm-joint=SYN_DIR rules=SYN_DIR [--normal NORMAL_DATASET] \\
        [--png docs/mcs-examples.png] [--json scores.json]

``REG_DATASET`` is the registered phantom cohort (real tumours; each phase's own ``truth`` label);
``AE_RUN`` a ``d4m-train autoencoder`` run on it; each ``SYN_DIR`` a ``d4m-train synthesize``
output made with the same ``--data`` and ``--seed`` (so the tumour masks are the same and the
picture compares the synthesizers on one mask); ``NORMAL_DATASET`` that ``--data`` (the picture's
"before" row). Prints Markdown tables:

1. the autoencoder's round trip on the cases it held out, per phase (MAE in HU inside the liver
   and the tumours, tumour contrast before and after);
2. tumour-minus-liver contrast per phase, real vs each synthesizer, with the 1-D Wasserstein
   distance to the real tumours;
3. inter-phase consistency: the structure correlation across phases and the distance of each
   tumour's 4-phase contrast vector to the nearest real tumour's (real: leave-one-out);

and writes one PNG: 4 phases × several tumours (rows: real tumours, the background before
synthesis, each synthesizer on the same masks), mask outline in colour.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.volume import read_image
from d4m.training.autoencoder import load_autoencoder, read_case, split_cases
from d4m.training.datasets import Case, Dataset, load_dataset
from d4m.training.synthesis_quality import (
    TumorMeasure,
    contrast_distances,
    contrast_table,
    measure_tumors,
    nearest_pattern_distances,
    reconstruction_errors,
    spread_table,
)

WINDOW = (-100.0, 250.0)
CROP = 40
ZOOM = 3
BAND = 14
GAP = 3
FAINT_HU = 10.0
SATURATION_HU = 5.0


def _spacing(case: Case) -> tuple[float, float, float]:
    s = read_image(case.label).spacing
    return float(s[0]), float(s[1]), float(s[2])


def _images(case: Case, key: str = "images") -> dict[Phase, np.ndarray]:
    files = getattr(case, key)
    return {p: read_image(files[p]).array.astype(np.float32) for p in PHASE_ORDER if p in files}


def real_measures(cohort: Dataset) -> list[TumorMeasure]:
    """Every real tumour of the cohort, each phase in its own truth mask."""
    out = []
    for case in cohort.cases:
        label = read_image(case.label).array
        if not (label == 2).any():
            continue
        truth = {p: read_image(f).array for p, f in case.truth.items()}
        out += measure_tumors(_images(case), label, _spacing(case), case.id, truth=truth)
    return out


def real_kinds(cohort: Dataset) -> dict[tuple[str, int], str]:
    """The phantom's kind (hcc, metastasis, cyst) of each real tumour: the listed tumour nearest its centroid."""
    kinds = {}
    for case in cohort.cases:
        listed = case.meta.get("tumors", [])
        volume = read_image(case.label)
        components, n = ndimage.label(volume.array == 2)
        if not n or not listed:
            continue
        centres = np.array([t["centre_mm"] for t in listed], dtype=float)
        for index, (k, j, i) in enumerate(ndimage.center_of_mass(components > 0, components, range(1, n + 1)), 1):
            point = (volume.affine @ np.array([i, j, k, 1.0]))[:3]
            kinds[(case.id, index)] = str(listed[int(np.argmin(((centres - point) ** 2).sum(axis=1)))]["type"])
    return kinds


def synthetic_measures(dataset: Dataset, window: tuple[float, float],
                       saturated: dict[tuple[str, int], float]) -> list[TumorMeasure]:
    """Every synthetic tumour (one mask for every phase: the label); fills ``saturated``.

    ``saturated[(case, index)]`` is the share of the tumour's voxels (all phases) within
    ``SATURATION_HU`` of the autoencoder window's limits.
    """
    out = []
    for case in dataset.cases:
        images = _images(case)
        label = read_image(case.label).array
        components, n = ndimage.label(label == 2)
        for index in range(1, n + 1):
            values = np.concatenate([v[components == index] for v in images.values()])
            saturated[(case.id, index)] = float(((values <= window[0] + SATURATION_HU) |
                                                 (values >= window[1] - SATURATION_HU)).mean())
        out += measure_tumors(images, label, _spacing(case), case.id)
    return out


def size_section(measures: dict[str, list[TumorMeasure]], saturated: dict[str, dict[tuple[str, int], float]],
                 voxel_ml: float) -> str:
    """Per tumour-volume bin: count, mean Wasserstein distance to the real tumours of that bin, saturation."""
    bins = [(0.0, 2.0), (2.0, 10.0), (10.0, float("inf"))]
    head = ["tumours"] + [f"{lo:g}–{hi:g} mL: n / W1 (HU) / saturated" for lo, hi in bins]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def within(items: list[TumorMeasure], lo: float, hi: float) -> list[TumorMeasure]:
        return [m for m in items if lo <= m.voxels * voxel_ml < hi]

    for name, items in measures.items():
        cells = []
        for lo, hi in bins:
            part, real = within(items, lo, hi), within(measures["real"], lo, hi)
            w1 = np.nanmean(list(contrast_distances(real, part).values())) if part and real else float("nan")
            share = [saturated.get(name, {}).get((m.case, m.index), float("nan")) for m in part]
            sat = f"{100 * np.nanmedian(share):.0f} %" if name != "real" and part else "—"
            cells.append(f"{len(part)} / {w1:.1f} / {sat}" if name != "real" else f"{len(part)} / — / —")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values: np.ndarray, signed: bool = True) -> str:
    values = values[np.isfinite(values)]
    if not values.size:
        return "—"
    return f"{values.mean():+.1f} ± {values.std():.1f}" if signed else f"{values.mean():.1f} ± {values.std():.1f}"


def reconstruction_table(ae_run: Path, cohort: Dataset, crops: int) -> tuple[str, dict]:
    model, config = load_autoencoder(ae_run)
    _, held = split_cases([c.id for c in cohort.cases], config.val_fraction)
    cases = [read_case(cohort.case(i), config.phases) for i in held]
    errors = reconstruction_errors(model, config, cases, crops, seed=config.seed)
    own = ""
    if (ae_run / "metrics.json").exists():
        metrics = json.loads((ae_run / "metrics.json").read_text())
        own = (f"; training's own figure: {metrics['val_mae_liver_hu']} HU in the liver on "
               f"{metrics['held_out_crops']} random liver crops after {metrics['steps']} steps")
    lines = [f"held-out cases {', '.join(held)}; {crops} crops of {config.crop[0]}³ per phase centred on tumour "
             f"voxels; window {config.window[0]:.0f}..{config.window[1]:.0f} HU{own}\n",
             "| phase | liver MAE (HU) | tumour MAE (HU) | tumour contrast (HU) | after round trip (HU) |",
             "|---|---|---|---|---|"]
    for phase, e in errors.items():
        lines.append(f"| {phase.value} | {e.liver_mae_hu:.1f} | {e.tumor_mae_hu:.1f} | {e.tumor_contrast_hu:+.1f} | "
                     f"{e.reconstructed_contrast_hu:+.1f} |")
    return "\n".join(lines), {p.value: vars(e) for p, e in errors.items()}


def contrast_section(measures: dict[str, list[TumorMeasure]]) -> str:
    real = measures["real"]
    head = ["tumours", "n", *[f"{p.value} contrast (HU)" for p in PHASE_ORDER]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, items in measures.items():
        table = contrast_table(items)
        lines.append(f"| {name} | {len(items)} | " + " | ".join(_cell(table[:, c]) for c in range(4)) + " |")
    lines += ["", "1-D Wasserstein distance to the real tumours' contrasts (HU; 0 = same distribution)\n",
              "| synthesizer | " + " | ".join(p.value for p in PHASE_ORDER) + " | mean |", "|---|---|---|---|---|---|"]
    for name, items in measures.items():
        if name == "real":
            continue
        d = contrast_distances(real, items)
        lines.append(f"| {name} | " + " | ".join(f"{d[p]:.1f}" for p in PHASE_ORDER) +
                     f" | {np.nanmean(list(d.values())):.1f} |")
    lines += ["", "HU spread inside each tumour (sd over its voxels: texture, compartments and noise), mean ± sd over "
              "tumours\n", "| tumours | " + " | ".join(p.value for p in PHASE_ORDER) + " |", "|---|---|---|---|---|"]
    for name, items in measures.items():
        table = spread_table(items)
        lines.append(f"| {name} | " + " | ".join(_cell(table[:, c], signed=False) for c in range(4)) + " |")
    return "\n".join(lines)


def _median_iqr(values: np.ndarray, digits: int) -> str:
    values = values[np.isfinite(values)]
    if not values.size:
        return "—"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{q2:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}] (n={values.size})"


def consistency_section(measures: dict[str, list[TumorMeasure]]) -> str:
    real = measures["real"]
    lines = ["| tumours | structure consistency, mean pairwise abs(r): median [IQR] | "
             f"nearest real 4-phase pattern, RMS HU: median [IQR] | faint: abs(contrast) < {FAINT_HU:.0f} HU "
             "in every phase |", "|---|---|---|---|"]
    for name, items in measures.items():
        consistency = np.array([m.consistency for m in items])
        nearest = nearest_pattern_distances(items, real, leave_one_out=name == "real")
        table = contrast_table(items)
        measured = np.isfinite(table).all(axis=1)
        faint = int((np.abs(table[measured]) < FAINT_HU).all(axis=1).sum())
        lines.append(f"| {name} | {_median_iqr(consistency, 2)} | {_median_iqr(nearest, 1)} | "
                     f"{faint}/{int(measured.sum())} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ picture


def _gray(hu: np.ndarray) -> np.ndarray:
    low, high = WINDOW
    return np.clip((hu - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _tile(image: np.ndarray, mask: np.ndarray, k: int, box: tuple[slice, slice],
          colour: tuple[int, int, int]) -> np.ndarray:
    rgb = np.repeat(_gray(image[k][box])[:, :, None], 3, axis=2)
    rgb[_outline(mask[k][box])] = colour
    return rgb


def _view(mask: np.ndarray) -> tuple[int, tuple[slice, slice]]:
    """The axial slice with the most mask, and a CROP×CROP box centred on the mask there."""
    k = int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))
    rows, cols = np.nonzero(mask[k])
    top = int(np.clip(rows.mean() - CROP // 2, 0, mask.shape[1] - CROP))
    left = int(np.clip(cols.mean() - CROP // 2, 0, mask.shape[2] - CROP))
    return k, (slice(top, top + CROP), slice(left, left + CROP))


def _pick(items: list[TumorMeasure], count: int) -> list[TumorMeasure]:
    """Tumours from distinct cases, spread over sizes (largest first, then every other)."""
    by_case: dict[str, TumorMeasure] = {}
    for m in sorted(items, key=lambda m: -m.voxels):
        if m.voxels >= 30 and m.case not in by_case:
            by_case[m.case] = m
    ranked = list(by_case.values())
    step = max(1, len(ranked) // count)
    return ranked[::step][:count]


def _component(label: np.ndarray, index: int) -> np.ndarray:
    return ndimage.label(label == 2)[0] == index


def picture(cohort: Dataset, real: list[TumorMeasure], synthetic: dict[str, Dataset],
            measures: dict[str, list[TumorMeasure]], normal: Dataset | None, path: Path, count: int) -> str:
    """Rows: real tumours, background, each synthesizer; columns: ``count`` tumours × 4 phases."""
    from PIL import Image, ImageDraw

    first_name = next(iter(synthetic))
    chosen = _pick(measures[first_name], count)
    real_chosen = _pick(real, count)
    rows: list[tuple[str, list[np.ndarray]]] = []
    tiles = []
    for m in real_chosen:
        case = cohort.case(m.case)
        reference = _component(read_image(case.label).array, m.index)
        k, box = _view(reference)
        images = _images(case)
        for p in PHASE_ORDER:
            own = (read_image(case.truth[p]).array == 2) if p in case.truth else reference
            tiles.append(_tile(images[p], own & ndimage.binary_dilation(reference, iterations=3), k, box,
                               (0, 255, 0)))
    rows.append(("real tumours (registered; outline: each phase's own label)", tiles))
    views = []
    for m in chosen:
        case = synthetic[first_name].case(m.case)
        mask = _component(read_image(case.label).array, m.index)
        views.append((m.case, case.meta.get("source_case", m.case), mask, *_view(mask)))
    if normal is not None:
        tiles = []
        for _, source, mask, k, box in views:
            images = _images(normal.case(source), "normal")
            tiles += [_tile(images[p], mask, k, box, (255, 255, 0)) for p in PHASE_ORDER]
        rows.append(("background (normal CT) with the mask", tiles))
    for name, dataset in synthetic.items():
        tiles = []
        for case_id, _, mask, k, box in views:
            images = _images(dataset.case(case_id))
            tiles += [_tile(images[p], mask, k, box, (255, 0, 255)) for p in PHASE_ORDER]
        rows.append((name, tiles))
    side = CROP * ZOOM
    columns = count * len(PHASE_ORDER)
    width = columns * (side + GAP) + (count - 1) * 3 * GAP
    canvas = Image.new("RGB", (width, BAND + len(rows) * (side + BAND)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)

    def x_of(column: int) -> int:
        return column * (side + GAP) + (column // len(PHASE_ORDER)) * 3 * GAP

    for column in range(columns):
        draw.text((x_of(column) + 3, 1), PHASE_ORDER[column % len(PHASE_ORDER)].value, fill=(255, 255, 255))
    for r, (title, tiles) in enumerate(rows):
        y = BAND + r * (side + BAND)
        draw.text((3, y), title, fill=(255, 255, 0))
        for column, rgb in enumerate(tiles):
            tile = Image.fromarray(np.ascontiguousarray(rgb)).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (x_of(column), y + BAND - 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return (f"real: {', '.join(f'{m.case}#{m.index}' for m in real_chosen)}; synthetic (same masks in every "
            f"synthesizer row): {', '.join(f'{m.case}#{m.index}' for m in chosen)}; {CROP}×{CROP} px around "
            f"the tumour on its largest axial slice, shown ×{ZOOM}; window {WINDOW[0]:.0f}..{WINDOW[1]:.0f} HU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="registered dataset with real tumours and truth")
    parser.add_argument("--autoencoder", type=Path, required=True, help="d4m-train autoencoder run folder")
    parser.add_argument("--synthetic", nargs="+", required=True, metavar="NAME=DIR",
                        help="d4m-train synthesize outputs (same --data and --seed)")
    parser.add_argument("--normal", type=Path, default=None, help="the dataset the synthesis painted into")
    parser.add_argument("--recon-crops", type=int, default=16, help="autoencoder crops per phase")
    parser.add_argument("--examples", type=int, default=4, help="tumours in the picture")
    parser.add_argument("--png", type=Path, default=Path("docs/mcs-examples.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    cohort = load_dataset(args.cohort)
    synthetic = {}
    for item in args.synthetic:
        name, _, folder = item.partition("=")
        synthetic[name] = load_dataset(Path(folder))
    recon, recon_json = reconstruction_table(args.autoencoder, cohort, args.recon_crops)
    print("### Autoencoder round trip (held-out cases)\n")
    print(recon)
    measures = {"real": real_measures(cohort)}
    window = load_autoencoder(args.autoencoder)[1].window
    saturated: dict[str, dict[tuple[str, int], float]] = {}
    for name, dataset in synthetic.items():
        saturated[name] = {}
        measures[name] = synthetic_measures(dataset, window, saturated[name])
    kinds = real_kinds(cohort)
    by_kind = {f"real {kind}": [m for m in measures["real"] if kinds.get((m.case, m.index)) == kind]
               for kind in sorted(set(kinds.values()))}
    print("\n### Tumour-minus-liver contrast per phase (mean ± sd over tumours)\n")
    print(contrast_section(measures))
    print("\nthe real tumours by the phantom's kind (for reading the mixtures above)\n")
    print(contrast_section({"real": measures["real"], **by_kind}).split("\n\n")[0])
    spacing = _spacing(cohort.cases[0])
    print("\nby tumour volume: mean over phases of the 1-D Wasserstein distance to the real tumours of the same "
          f"volume, and the median share of a tumour's voxels within {SATURATION_HU:.0f} HU of the autoencoder "
          f"window's limits ({window[0]:.0f}, {window[1]:.0f} HU)\n")
    print(size_section(measures, saturated, float(np.prod(spacing)) / 1000.0))
    print("\n### Inter-phase consistency\n")
    print(consistency_section(measures))
    normal = load_dataset(args.normal) if args.normal else None
    caption = picture(cohort, measures["real"], synthetic, measures, normal, args.png, args.examples)
    print(f"\npicture: {args.png} — {caption}")
    print(f"\n({time.perf_counter() - began:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "reconstruction": recon_json,
            "tumors": {name: [{"case": m.case, "index": m.index, "voxels": m.voxels, "consistency": m.consistency,
                               "contrast_hu": {p.value: v for p, v in m.contrast_hu.items()},
                               "spread_hu": {p.value: v for p, v in m.spread_hu.items()}} for m in items]
                       for name, items in measures.items()},
            "picture": caption,
        }, indent=1))


if __name__ == "__main__":
    main()
