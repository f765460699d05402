"""Stage 2 of Diff4MMLiTS, the Normal CT Generator: erase the tumours from every registered phase.

For each case of a registered dataset (every phase on the PVP grid, ``d4m-train register``),
the hole is the PVP tumour mask (label 2) closed with a 5×5 kernel and dilated once with a 3×3
kernel, per axial slice (paper III-A, :func:`~d4m.training.inpainting_masks.tumor_hole`). Every
phase is then inpainted slice by slice inside that one hole, by one of three methods:

* ``ffc`` — the trained FFC inpainter (``d4m-train inpainter``), given the phase;
* ``median`` — the paper's median-filter ablation (Table V): the hole filled from its border
  inwards with the median of the known pixels in a ``median_size``² window
  (:func:`~d4m.training.inpainter_training.median_fill`);
* ``mean`` — a trivial baseline: each connected hole component of a slice filled with the mean
  of the known pixels in a ring around it.

Voxels outside the hole are copied bit for bit (the input dtype is kept). Output::

    OUT/config.json                         the NormalizeConfig
    OUT/dataset.json                        images = input images (tumours in), normal = inpainted
    OUT/cases/<id>/images/<PHASE>.nii.gz    copies of the input images (the dataset stays self-contained)
    OUT/cases/<id>/label.nii.gz             copy of the label; truth/ likewise when present
    OUT/cases/<id>/normal/<PHASE>.nii.gz    the tumour-free images
    OUT/cases/<id>/hole.nii.gz              the inpainted region (uint8, PVP grid)
    OUT/cases/<id>/normal_ct.json           per case: method, hole size, seconds, config fingerprint

Each case is written atomically; a case whose ``normal_ct.json`` was made with the same
configuration (and, for ``ffc``, the same weights file) is skipped, so a killed run resumes.
:func:`evaluate_inpainting` scores a result against a dataset holding the true tumour-free
images (the phantom's ``normal`` renders, registered with the phases).

The torch-based modules are imported inside the functions that need them, so reading the
config (and the CLI's ``--help``) does not load torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import read_image, write_image
from d4m.runtime.artifacts import atomic_dir, write_json
from d4m.training.config import StageConfig
from d4m.training.datasets import Case, Dataset, copy_image, load_dataset
from d4m.training.inpainting_masks import tumor_hole
from d4m.training.prealignment import check_resumable_output, finished_case_report

if TYPE_CHECKING:
    from d4m.training.inpainter import FFCResNetGenerator, InpainterConfig

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
CASE_REPORT = "normal_ct.json"
HOLE_FILE = "hole.nii.gz"
REFERENCE = Phase.PVP
TUMOR = 2
#: Width in pixels of the known ring whose mean fills a hole component (``mean`` method).
MEAN_RING = 2
#: Default PSNR peak: the width of the inpainter's 400-HU soft-tissue window (-160 to 240 HU).
PSNR_PEAK_HU = 400.0

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[int], None]


class InpaintingMethod(str, Enum):
    """How the hole is filled."""

    FFC = "ffc"
    MEDIAN = "median"
    MEAN = "mean"


@dataclass(frozen=True)
class NormalizeConfig(StageConfig):
    """Configuration of ``d4m-train normalize``.

    Attributes
    ----------
    data
        Registered dataset folder (or its ``dataset.json``): every phase on the PVP grid.
    out
        Output dataset folder; an existing one is resumed when its ``config.json`` matches.
    inpainter
        ``ffc``, ``median`` or ``mean``.
    model
        Inpainter run folder (``config.json`` + ``model.safetensors``); required for ``ffc``.
    closing
        Side of the square closing kernel applied per slice to the PVP tumour mask (paper: 5).
    dilation
        Side of the square kernel of the single dilation that follows (paper: 3).
    median_size
        Window side of the ``median`` method.
    overwrite
        Redo every case, and accept an output folder made with another configuration.
    """

    stage: ClassVar[str] = "normalize"

    data: Path
    out: Path
    inpainter: InpaintingMethod = InpaintingMethod.FFC
    model: Path | None = None
    closing: int = 5
    dilation: int = 3
    median_size: int = 7
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
        try:
            object.__setattr__(self, "inpainter", InpaintingMethod(self.inpainter))
        except ValueError as exc:
            allowed = [m.value for m in InpaintingMethod]
            raise InputError(
                f"normalize config: expected inpainter one of {allowed}, found {self.inpainter!r}"
            ) from exc
        if self.inpainter is InpaintingMethod.FFC and self.model is None:
            raise InputError(
                "normalize config: expected a model folder (a 'd4m-train inpainter' run) for inpainter ffc, found none"
            )
        for name in ("closing", "dilation", "median_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise InputError(f"normalize config: expected {name} as a positive odd kernel size, found {value!r}")

    def fingerprint(self, weights_sha256: str | None = None) -> dict[str, Any]:
        """What decides the output of a case (not where it goes, nor ``overwrite``)."""
        keys = ("inpainter", "closing", "dilation")
        values: dict[str, Any] = {k: v for k, v in self.to_dict().items() if k in keys}
        if self.inpainter is InpaintingMethod.MEDIAN:
            values["median_size"] = self.median_size
        if self.inpainter is InpaintingMethod.MEAN:
            values["ring"] = MEAN_RING
        if weights_sha256 is not None:
            values["model_sha256"] = weights_sha256
        return values


# --------------------------------------------------------------------------------------------
# the fills
# --------------------------------------------------------------------------------------------

def mean_fill(image: np.ndarray, hole: np.ndarray, ring: int = MEAN_RING) -> np.ndarray:
    """Fill each connected component of a 2D hole with the mean of the known pixels around it.

    The ring is the component dilated ``ring`` times (8-neighbourhood) minus the whole hole. A
    component whose ring is empty (the hole covers the slice) keeps its input values.

    Returns
    -------
    numpy.ndarray
        A float64 copy of ``image`` with the hole filled.

    Raises
    ------
    InputError
        Arrays that are not 2D of one shape, or a ring below one pixel.
    """
    if image.ndim != 2 or hole.shape != image.shape:
        raise InputError(f"mean fill: expected a 2D image and hole of one shape, found {image.shape}, {hole.shape}")
    if ring < 1:
        raise InputError(f"mean fill: expected a ring of >= 1 pixel, found {ring}")
    out = np.asarray(image, np.float64).copy()
    hole = hole.astype(bool)
    eight = np.ones((3, 3), bool)
    components, count = ndimage.label(hole, structure=eight)
    for index in range(1, count + 1):
        component = components == index
        around = ndimage.binary_dilation(component, eight, iterations=ring) & ~hole
        if around.any():
            out[component] = out[around].mean()
    return out


def _fill_slices(image: np.ndarray, hole: np.ndarray, fill: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> (
        np.ndarray):
    """Apply a 2D fill to every slice that has a hole; returns float64 values (hole voxels only matter)."""
    out = np.asarray(image, np.float64).copy()
    for k in np.flatnonzero(hole.reshape(len(hole), -1).any(axis=1)):
        out[k] = fill(image[k], hole[k])
    return out


def _into_dtype(original: np.ndarray, filled: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """A copy of ``original`` (same dtype) whose hole voxels take ``filled``; integers are rounded and clipped."""
    out = original.copy()
    values = filled[hole]
    if np.issubdtype(original.dtype, np.integer):
        info = np.iinfo(original.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    out[hole] = values.astype(original.dtype)
    return out


@dataclass(frozen=True)
class _Filler:
    """The chosen method, with the loaded FFC model when it is ``ffc``."""

    method: InpaintingMethod
    median_size: int
    model: FFCResNetGenerator | None = None
    model_config: InpainterConfig | None = None

    def __call__(self, image: np.ndarray, hole: np.ndarray, phase: Phase) -> np.ndarray:
        if not hole.any():
            return image.copy()
        if self.method is InpaintingMethod.FFC:
            from d4m.training.inpainter import inpaint_volume

            if self.model is None or self.model_config is None:
                raise InputError("normalize: expected a loaded FFC model for inpainter ffc, found none")
            filled = inpaint_volume(self.model, image, hole, self.model_config.window, phase=phase)
        elif self.method is InpaintingMethod.MEDIAN:
            from d4m.training.inpainter_training import median_fill

            filled = _fill_slices(image, hole, lambda a, h: median_fill(a, h, self.median_size))
        else:
            filled = _fill_slices(image, hole, mean_fill)
        return _into_dtype(image, filled, hole)


def _load_filler(config: NormalizeConfig) -> tuple[_Filler, str | None]:
    """The fill function and, for ``ffc``, the sha256 of its weights file."""
    if config.inpainter is not InpaintingMethod.FFC:
        return _Filler(config.inpainter, config.median_size), None
    folder = config.model
    if folder is None or not folder.is_dir():
        raise InputError(f"{folder}: expected an inpainter run folder (from 'd4m-train inpainter'), found no folder")
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise InputError(
            f"{folder}: expected an inpainter run folder with config.json and model.safetensors, found no {missing}"
        )
    from d4m.training.inpainter import load_inpainter

    try:
        model, model_config = load_inpainter(folder)
    except InputError as exc:
        raise InputError(f"{folder}: expected an inpainter run folder, found: {exc}") from exc
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    logger.info("FFC inpainter from %s (preset %s, window %s)", folder, model_config.preset, model_config.window)
    return _Filler(config.inpainter, config.median_size, model, model_config), digest


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def _grid(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Array shape (slices, rows, columns), spacing, origin and direction from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: expected an image SimpleITK can read, found an unreadable file") from exc
    shape = tuple(int(n) for n in reversed(reader.GetSize()))
    return shape, np.asarray(reader.GetSpacing()), np.asarray(reader.GetOrigin()), np.asarray(reader.GetDirection())


def _same(a: tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray],
          b: tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]) -> bool:
    return a[0] == b[0] and all(np.allclose(x, y, atol=1e-3) for x, y in zip(a[1:], b[1:], strict=True))


def _describe(grid: tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]) -> str:
    return f"shape {grid[0]}, spacing {[round(float(s), 3) for s in grid[1]]}"


def _check_case(case: Case, phases: Sequence[Phase]) -> None:
    """Refuse, before any work: an unsafe id, a missing phase, a label or phase off the PVP grid."""
    if not _SAFE_ID.match(case.id):
        raise InputError(
            f"case {case.id!r}: expected an id of letters, digits, '.', '_' or '-', found other characters"
        )
    missing = [p.value for p in phases if p not in case.images]
    if missing or REFERENCE not in case.images:
        raise InputError(
            f"case {case.id}: expected images of {[p.value for p in phases]} (PVP included), "
            f"found only {[p.value for p in case.images]} (missing {missing or ['PVP']})"
        )
    reference = _grid(case.images[REFERENCE])
    if case.label is not None:
        label = _grid(case.label)
        if not _same(label, reference):
            raise InputError(
                f"case {case.id}: expected the label on the PVP grid ({_describe(reference)}), found {_describe(label)}"
            )
    for phase, path in case.images.items():
        grid = _grid(path)
        if not _same(grid, reference):
            raise InputError(
                f"case {case.id} {phase.value} image: expected the PVP grid ({_describe(reference)}) of a registered "
                f"dataset (run 'd4m-train register' first), found {_describe(grid)}"
            )


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------



def _normalize_case(case: Case, folder: Path, filler: _Filler, config: NormalizeConfig) -> dict[str, Any]:
    """Write one case into ``folder``; return its report (paths relative to ``folder``)."""
    start = time.perf_counter()
    pvp = case.image(REFERENCE)
    if case.label is not None:
        tumor = np.asarray(case.read_label().array) == TUMOR
    else:
        logger.info("case %s: no label, written unchanged (empty hole)", case.id)
        tumor = np.zeros(pvp.shape, bool)
    hole = tumor_hole(tumor, config.closing, config.dilation) if tumor.any() else tumor
    files: dict[str, Any] = {"images": {}, "normal": {}, "truth": {}, "label": None, "hole": HOLE_FILE}
    write_image(pvp.with_array(hole.astype(np.uint8)), folder / HOLE_FILE)
    if case.label is not None:
        files["label"] = copy_image(case.label, folder, "label.nii.gz")
    for phase, path in case.truth.items():
        files["truth"][phase.value] = copy_image(path, folder, f"truth/{phase.value}.nii.gz")
    for phase, path in case.images.items():
        files["images"][phase.value] = copy_image(path, folder, f"images/{phase.value}.nii.gz")
        volume = pvp if phase is REFERENCE else case.image(phase)
        normal = volume.with_array(filler(np.asarray(volume.array), hole, phase))
        write_image(normal, folder / "normal" / f"{phase.value}.nii.gz")
        files["normal"][phase.value] = f"normal/{phase.value}.nii.gz"
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "d4m-normal-ct",
        "case": case.id,
        "config": None,  # set by the caller
        "tumor_voxels": int(tumor.sum()),
        "hole_voxels": int(hole.sum()),
        "hole_slices": int(hole.reshape(len(hole), -1).any(axis=1).sum()),
        "files": files,
        "meta": case.meta,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _case_from_report(case_dir: Path, report: dict[str, Any], root: Path) -> Case:
    files = report["files"]

    def phase_map(key: str) -> dict[Phase, Path]:
        return {Phase(p): case_dir / f for p, f in files.get(key, {}).items()}

    hole = (case_dir / files["hole"]).relative_to(root).as_posix()
    return Case(
        id=report["case"],
        images=phase_map("images"),
        label=case_dir / files["label"] if files.get("label") else None,
        truth=phase_map("truth"),
        normal=phase_map("normal"),
        meta={**report.get("meta", {}), "hole": hole},
    )


def normalize_dataset(config: NormalizeConfig, progress: Progress | None = None) -> Dataset:
    """Erase the tumours of every case of a registered dataset: the normal multiphase CTs.

    Parameters
    ----------
    config
        Input, output, method and hole kernels.
    progress
        Called with 1 after each case (done or skipped).

    Returns
    -------
    Dataset
        Saved as ``config.out/dataset.json``: ``images`` the input images (tumours in), ``label``,
        ``normal`` the inpainted images, ``meta["hole"]`` the hole file (relative to the folder).

    Raises
    ------
    InputError
        A case with a missing phase or a label or image off the PVP grid, an unsafe case id, a
        model folder that is not an inpainter run, or an output folder made with another
        configuration (without ``overwrite``).
    """
    source = load_dataset(config.data)
    for case in source.cases:
        _check_case(case, source.phases)
    check_resumable_output(config)
    filler, digest = _load_filler(config)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")
    fingerprint = config.fingerprint(digest)
    cases: list[Case] = []
    done = skipped = 0
    for case in source.cases:
        case_dir = out / "cases" / case.id
        report = finished_case_report(case_dir, CASE_REPORT, REPORT_SCHEMA_VERSION, fingerprint, config.overwrite,
                                      file_keys=("label", "hole"))
        if report is None:
            with atomic_dir(case_dir, overwrite=True) as tmp:
                report = _normalize_case(case, tmp, filler, config)
                report["config"] = fingerprint
                write_json(tmp / CASE_REPORT, report)
            logger.info("case %s: %d hole voxels inpainted (%s) in %.1f s", case.id, report["hole_voxels"],
                        config.inpainter.value, report["seconds"])
            done += 1
        else:
            logger.info("case %s: normalised already with this configuration, skipped", case.id)
            skipped += 1
        cases.append(_case_from_report(case_dir, report, out))
        if progress is not None:
            progress(1)
    dataset = Dataset(
        out, tuple(cases), source.phases,
        source={"stage": NormalizeConfig.stage, "config": config.to_dict(), "model_sha256": digest,
                "input": dict(source.source)},
    )
    dataset.save()
    logger.info("normalised %d cases, skipped %d (already done) in %s", done, skipped, out)
    return dataset


# --------------------------------------------------------------------------------------------
# evaluation against the true tumour-free images
# --------------------------------------------------------------------------------------------

def _hole_of(case: Case, root: Path) -> np.ndarray:
    relative = case.meta.get("hole")
    if not isinstance(relative, str):
        raise InputError(f"case {case.id}: expected meta 'hole' (a 'd4m-train normalize' result), found none")
    return np.asarray(read_image(root / relative).array) > 0


def _score(errors: list[np.ndarray], peak: float) -> dict[str, float | int | None]:
    flat = np.concatenate(errors) if errors else np.zeros(0)
    if not flat.size:
        return {"voxels": 0, "mae_hu": None, "bias_hu": None, "rmse_hu": None, "psnr_db": None}
    mse = float(np.mean(flat**2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)
    return {"voxels": int(flat.size), "mae_hu": round(float(np.abs(flat).mean()), 3),
            "bias_hu": round(float(flat.mean()), 3), "rmse_hu": round(math.sqrt(mse), 3), "psnr_db": round(psnr, 3)}


def evaluate_inpainting(
    truth: Dataset, result: Dataset, case_ids: Sequence[str], peak: float = PSNR_PEAK_HU
) -> dict[str, Any]:
    """MAE and PSNR in HU inside the hole, per phase, against the true tumour-free images.

    Parameters
    ----------
    truth
        A dataset whose cases hold ``normal`` images on the result's grid (the registered phantom).
    result
        The output of :func:`normalize_dataset`.
    case_ids
        The cases scored (e.g. those held out of inpainter training).
    peak
        The PSNR peak in HU: ``PSNR = 10 log10(peak² / MSE)``.

    Returns
    -------
    dict
        ``{"peak_hu", "cases", "method", "phases": {PHASE: {voxels, mae_hu, bias_hu, rmse_hu,
        psnr_db}}, "all": {...}}`` (``bias_hu``: mean of fill − truth); a phase with no hole voxel
        has ``None`` scores.

    Raises
    ------
    InputError
        A case missing from either dataset, a truth case without ``normal`` images, a result case
        without a hole, or grids that differ.
    """
    if peak <= 0:
        raise InputError(f"inpainting evaluation: expected a positive PSNR peak, found {peak}")
    if not case_ids:
        raise InputError("inpainting evaluation: expected at least one case id, found none")
    per_phase: dict[Phase, list[np.ndarray]] = {p: [] for p in result.phases}
    for case_id in case_ids:
        made, real = result.case(case_id), truth.case(case_id)
        hole = _hole_of(made, result.root)
        for phase in result.phases:
            if phase not in made.normal:
                raise InputError(
                    f"case {case_id}: expected an inpainted {phase.value} image in {result.root}, found none"
                )
            if phase not in real.normal:
                raise InputError(
                    f"case {case_id}: expected a tumour-free {phase.value} 'normal' image in {truth.root}, found none"
                )
            filled, expected = read_image(made.normal[phase]), read_image(real.normal[phase])
            if not filled.same_grid(expected) or filled.shape != hole.shape:
                raise InputError(
                    f"case {case_id} {phase.value}: expected the truth on the result's grid (shape {filled.shape}), "
                    f"found shape {expected.shape}"
                )
            error = np.asarray(filled.array, np.float64)[hole] - np.asarray(expected.array, np.float64)[hole]
            per_phase[phase].append(error)
    method = result.source.get("config", {}).get("inpainter") if isinstance(result.source, dict) else None
    return {
        "peak_hu": peak,
        "cases": list(case_ids),
        "method": method,
        "phases": {p.value: _score(e, peak) for p, e in per_phase.items()},
        "all": _score([e for errors in per_phase.values() for e in errors], peak),
    }
