"""Stage 1 of Diff4MMLiTS: pre-register NC, ART and DEL to PVP for every case of a dataset.

For each case, each non-PVP phase is registered to PVP with
:func:`d4m.runtime.registration.register_to_reference` (the same code ``d4m-infer`` runs), the
metric focused on the PVP label's liver dilated by ``settings.mask_dilation_mm`` (the body of
the PVP image when a case has no liver label). Output, all on the PVP grid::

    OUT/config.json                    the RegistrationConfig
    OUT/dataset.json                   the registered dataset (source: stage and config)
    OUT/registration_summary.json      per phase: means of metric, quality, liver Dice; flagged phases
    OUT/cases/<id>/images/<PHASE>.nii.gz   PVP copied, the others registered (or identity, flagged)
    OUT/cases/<id>/label.nii.gz            copied (it is on the PVP grid already)
    OUT/cases/<id>/normal/<PHASE>.nii.gz   tumor-free images, moved with the phase's transform
    OUT/cases/<id>/truth/<PHASE>.nii.gz    per-phase true labels, moved with nearest neighbour
    OUT/cases/<id>/registration.json       per phase: metrics, quality, accepted, flags, transform, Dice

A phase whose registration fails the quality gate keeps its physical-space (identity) alignment
and is flagged in ``registration.json``, in the case's ``meta["registration"]`` and in the summary;
it is never silently replaced by a worse transform. Each case is written atomically and a case
whose ``registration.json`` was made with the same settings is skipped, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import SimpleITK as sitk

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, read_image, write_image
from d4m.runtime.artifacts import atomic_dir, read_json, write_json
from d4m.runtime.registration import (
    RegistrationSettings,
    register_to_reference,
    resample_label,
    resample_to,
)
from d4m.training.config import StageConfig
from d4m.training.datasets import Case, Dataset, copy_image, load_dataset

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
REFERENCE = Phase.PVP
CASE_REPORT = "registration.json"
SUMMARY = "registration_summary.json"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RegistrationConfig(StageConfig):
    """Configuration of ``d4m-train register``.

    Attributes
    ----------
    data
        Input dataset folder (or its ``dataset.json``).
    out
        Output folder; an existing one is resumed when its ``config.json`` matches.
    settings
        How each phase is registered; its ``seed`` is replaced by ``seed`` below.
    phases
        Phases registered to PVP; other non-PVP phases are resampled to the PVP grid unmoved.
    seed
        Seed of the metric sampling (copied into ``settings``).
    overwrite
        Redo every case, and accept an output folder made with another configuration.
    """

    stage: ClassVar[str] = "register"

    data: Path
    out: Path
    settings: RegistrationSettings = field(default_factory=RegistrationSettings)
    phases: tuple[Phase, ...] = (Phase.NC, Phase.ART, Phase.DEL)
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        settings = self.settings
        if isinstance(settings, dict):
            settings = RegistrationSettings.from_dict(settings, source="register config: settings")
        if not isinstance(settings, RegistrationSettings):
            raise InputError(f"register config: expected registration settings, found {type(settings).__name__}")
        if settings.seed != self.seed:
            settings = dataclasses.replace(settings, seed=self.seed)
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        phases = tuple(Phase(p) for p in self.phases)
        if not phases or REFERENCE in phases or len(set(phases)) != len(phases):
            raise InputError(
                f"register config: expected distinct phases to register among NC/ART/DEL, "
                f"found {[p.value for p in phases]}"
            )
        object.__setattr__(self, "phases", phases)

    def fingerprint(self) -> dict[str, Any]:
        """What decides the registered images: a case made with the same fingerprint is reused."""
        return {
            "settings": self.settings.to_dict(),
            "phases": [p.value for p in self.phases],
            "seed": self.seed,
        }


def register_dataset(config: RegistrationConfig, progress: Callable[[int], None] | None = None) -> Dataset:
    """Register every case of ``config.data`` to its PVP phase and write the registered dataset.

    Parameters
    ----------
    config
        Input, output, registration settings and phases.
    progress
        Called with 1 after each case (done or skipped).

    Returns
    -------
    Dataset
        The registered dataset, saved as ``config.out/dataset.json``.

    Raises
    ------
    InputError
        A case without a PVP image, a label not on the PVP grid, an unsafe case id, or an output
        folder made with another configuration (without ``overwrite``).
    """
    source = load_dataset(config.data)
    for case in source.cases:
        _check_case(case)
    out = config.out
    check_resumable_output(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")

    fingerprint = config.fingerprint()
    cases: list[Case] = []
    reports: list[dict[str, Any]] = []
    done = skipped = 0
    for case in source.cases:
        case_dir = out / "cases" / case.id
        report = finished_case_report(case_dir, CASE_REPORT, REPORT_SCHEMA_VERSION, fingerprint, config.overwrite)
        if report is None:
            with atomic_dir(case_dir, overwrite=True) as tmp:
                report = _register_case(case, tmp, config)
                write_json(tmp / CASE_REPORT, report)
            done += 1
        else:
            logger.info("case %s: registered already with this configuration, skipped", case.id)
            skipped += 1
        cases.append(_case_from_report(case, case_dir, report))
        reports.append(report)
        if progress is not None:
            progress(1)

    dataset = Dataset(
        out,
        tuple(cases),
        source.phases,
        source={"stage": RegistrationConfig.stage, "config": config.to_dict(), "input": dict(source.source)},
    )
    dataset.save()
    write_json(out / SUMMARY, build_summary(reports, registered=done, skipped=skipped))
    logger.info("registered %d cases, skipped %d (already done) in %s", done, skipped, out)
    return dataset


def build_summary(reports: list[dict[str, Any]], registered: int = 0, skipped: int = 0) -> dict[str, Any]:
    """Per-phase means (metric, quality, liver and tumor Dice before/after, time) and the flagged phases."""
    phases: dict[str, dict[str, Any]] = {}
    flagged: list[dict[str, Any]] = []
    for report in reports:
        for name, entry in report["phases"].items():
            if not entry.get("registered"):
                continue
            phases.setdefault(name, {"entries": []})["entries"].append(entry)
            if entry["flags"] or not entry["accepted"]:
                flagged.append({"case": report["case"], "phase": name, "accepted": entry["accepted"],
                                "flags": entry["flags"]})
    out_phases: dict[str, dict[str, Any]] = {}
    for name, group in phases.items():
        entries = group["entries"]
        dice = [e.get("dice") or {} for e in entries]
        out_phases[name] = {
            "registered": len(entries),
            "accepted": sum(bool(e["accepted"]) for e in entries),
            "identity_fallback": sum("identity_fallback" in e["flags"] for e in entries),
            "flagged": sum(bool(e["flags"]) or not e["accepted"] for e in entries),
            "mean_metric_before": _mean(e["metric_before"] for e in entries),
            "mean_metric_after": _mean(e["metric_after"] for e in entries),
            "mean_quality_before": _mean(e["quality_before"] for e in entries),
            "mean_quality_after": _mean(e["quality_after"] for e in entries),
            "mean_liver_dice_before": _mean(d.get("liver_before") for d in dice),
            "mean_liver_dice_after": _mean(d.get("liver_after") for d in dice),
            "mean_tumor_dice_before": _mean(d.get("tumor_before") for d in dice),
            "mean_tumor_dice_after": _mean(d.get("tumor_after") for d in dice),
            "mean_seconds": _mean(e["seconds"] for e in entries),
        }
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "d4m-registration-summary",
        "reference": REFERENCE.value,
        "cases": len(reports),
        "registered_this_run": registered,
        "skipped": skipped,
        "phases": out_phases,
        "n_flagged": len(flagged),
        "n_rejected": sum(not f["accepted"] for f in flagged),
        "flagged": flagged,
    }


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice coefficient of two boolean masks; ``None`` when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / total


# --- one case ------------------------------------------------------------------------------------


def _register_case(case: Case, folder: Path, config: RegistrationConfig) -> dict[str, Any]:
    """Write one registered case into ``folder``; return its report (paths relative to ``folder``)."""
    start = time.perf_counter()
    pvp = case.image(REFERENCE)
    label = case.read_label() if case.label is not None else None
    if label is not None and not label.same_grid(pvp):
        raise InputError(
            f"case {case.id}: expected the label on the PVP grid (shape {pvp.shape}, spacing {_fmt(pvp.spacing)}), "
            f"found shape {label.shape}, spacing {_fmt(label.spacing)}"
        )
    liver = label if label is not None and bool((label.array > 0).any()) else None
    files: dict[str, Any] = {"images": {}, "normal": {}, "truth": {}, "label": None}
    if case.label is not None:
        files["label"] = copy_image(case.label, folder, "label.nii.gz")
    for key, paths in (("images", case.images), ("normal", case.normal), ("truth", case.truth)):
        if REFERENCE in paths:
            files[key][REFERENCE.value] = copy_image(paths[REFERENCE], folder, f"{key}/{REFERENCE.value}.nii.gz")
    reference_truth = read_image(case.truth[REFERENCE]) if REFERENCE in case.truth else label

    entries: dict[str, Any] = {}
    for phase in case.images:
        if phase is REFERENCE:
            continue
        moving = case.image(phase)
        if phase in config.phases:
            result = register_to_reference(moving, pvp, liver, config.settings)
            transform: sitk.Transform | None = result.transform
            image = result.image
            entry: dict[str, Any] = {"registered": True, **result.to_dict()}
            if not result.accepted or result.identity:
                logger.warning("case %s %s: %s", case.id, phase.value, "; ".join(result.warnings))
        else:
            transform = None
            image = resample_to(moving, pvp, None, "linear", config.settings.fill_value)
            entry = {"registered": False, "reason": "not among the configured phases: resampled unmoved"}
        write_image(image, folder / "images" / f"{phase.value}.nii.gz")
        files["images"][phase.value] = f"images/{phase.value}.nii.gz"
        if phase in case.normal:
            normal = resample_to(read_image(case.normal[phase]), pvp, transform, "linear", config.settings.fill_value)
            write_image(normal, folder / "normal" / f"{phase.value}.nii.gz")
            files["normal"][phase.value] = f"normal/{phase.value}.nii.gz"
        if phase in case.truth:
            truth = read_image(case.truth[phase])
            warped = resample_label(truth, pvp, transform)
            write_image(warped, folder / "truth" / f"{phase.value}.nii.gz")
            files["truth"][phase.value] = f"truth/{phase.value}.nii.gz"
            if reference_truth is not None:
                entry["dice"] = _dice_entry(resample_label(truth, pvp), warped, reference_truth)
        entries[phase.value] = entry
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "d4m-registration",
        "case": case.id,
        "reference": REFERENCE.value,
        "config": config.fingerprint(),
        "metric_mask": "PVP label liver (label > 0)" if liver is not None else "PVP body (no liver label)",
        "phases": entries,
        "files": files,
        "meta": case.meta,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _dice_entry(before: Volume, after: Volume, reference: Volume) -> dict[str, float | None]:
    """Liver (label > 0) and tumor (label == 2) Dice against the PVP truth, before and after."""
    ref = np.asarray(reference.array)
    out: dict[str, float | None] = {}
    for key, select in (("liver", lambda a: a > 0), ("tumor", lambda a: a == 2)):
        for when, moved in (("before", before), ("after", after)):
            value = dice(select(np.asarray(moved.array)), select(ref))
            out[f"{key}_{when}"] = None if value is None else round(value, 4)
    return out


def _case_from_report(case: Case, case_dir: Path, report: dict[str, Any]) -> Case:
    files = report["files"]

    def phase_map(key: str) -> dict[Phase, Path]:
        return {Phase(p): case_dir / f for p, f in files.get(key, {}).items()}

    registration = {
        name: {"registered": bool(e.get("registered")), "accepted": e.get("accepted"), "flags": e.get("flags", [])}
        for name, e in report["phases"].items()
    }
    return Case(
        id=case.id,
        images=phase_map("images"),
        label=case_dir / files["label"] if files.get("label") else None,
        truth=phase_map("truth"),
        normal=phase_map("normal"),
        meta={**report.get("meta", {}), "registration": registration},
    )


# --- checks, resume ------------------------------------------------------------------------------


def _check_case(case: Case) -> None:
    """Refuse, before any work, a case without PVP, with an unsafe id or a label off the PVP grid."""
    if not _SAFE_ID.match(case.id):
        raise InputError(
            f"case {case.id!r}: expected an id of letters, digits, '.', '_' or '-', found other characters"
        )
    if REFERENCE not in case.images:
        raise InputError(
            f"case {case.id}: expected a PVP image (the registration reference), "
            f"found only {[p.value for p in case.images]}"
        )
    if case.label is not None:
        pvp, label = _header_grid(case.images[REFERENCE]), _header_grid(case.label)
        if pvp[0] != label[0] or not np.allclose(np.concatenate(pvp[1:]), np.concatenate(label[1:]), atol=1e-3):
            raise InputError(
                f"case {case.id}: expected the label on the PVP grid (size {pvp[0]}, spacing {_fmt(pvp[1])}, "
                f"origin {_fmt(pvp[2])}), found size {label[0]}, spacing {_fmt(label[1])}, origin {_fmt(label[2])}"
            )


def _header_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Size, spacing, origin and direction of an image file, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: expected an image SimpleITK can read, found an unreadable file") from exc
    return (
        tuple(int(n) for n in reader.GetSize()),
        np.asarray(reader.GetSpacing()),
        np.asarray(reader.GetOrigin()),
        np.asarray(reader.GetDirection()),
    )


class PerCaseStage(Protocol):
    """A per-case stage config (registration, normalisation): what its output folder check reads."""

    out: Path
    data: Path
    overwrite: bool

    def fingerprint(self) -> dict[str, Any]: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...


def check_resumable_output(config: PerCaseStage) -> None:
    """Refuse an output folder made by another configuration of the same stage, or holding something else.

    A folder whose ``config.json`` has the same fingerprint and data resumes.
    """
    out = config.out
    if not out.exists() or config.overwrite:
        return
    if not out.is_dir():
        raise InputError(f"{out}: expected an output folder, found a file")
    saved = out / "config.json"
    if not saved.exists():
        if any(out.iterdir()):
            raise InputError(f"{out}: expected a new or resumable output folder, found one without config.json")
        return
    previous = type(config).load(saved)
    changed = sorted(k for k, v in config.fingerprint().items() if previous.fingerprint().get(k) != v)
    if previous.data.resolve() != config.data.resolve():
        changed.append("data")
    if changed:
        raise InputError(f"{saved}: expected the same configuration to resume, found other {changed} (use --overwrite)")


def finished_case_report(
    case_dir: Path, report_name: str, schema_version: int, fingerprint: dict[str, Any], overwrite: bool,
    file_keys: tuple[str, ...] = ("label",),
) -> dict[str, Any] | None:
    """The report of a case an earlier run finished, when it can be reused as it is, else ``None`` (redo it).

    Reusable means: not ``overwrite``; ``case_dir/report_name`` exists with ``schema_version`` and
    ``fingerprint`` (under ``"config"``); and every file it lists is there (the per-phase
    ``images``, ``normal`` and ``truth`` maps, and the single files under ``file_keys``). The
    registration stage and the normal-CT stage (:mod:`d4m.training.normal_ct`) resume with it.
    """
    path = case_dir / report_name
    if overwrite or not path.exists():
        return None
    report = read_json(path)
    if not isinstance(report, dict) or report.get("schema_version") != schema_version:
        logger.info("%s: another report version, redoing the case", path)
        return None
    if report.get("config") != fingerprint:
        logger.info("%s: made with other settings, redoing the case", path)
        return None
    files = report.get("files", {})
    listed = [f for key in ("images", "normal", "truth") for f in files.get(key, {}).values()]
    listed += [files[key] for key in file_keys if files.get(key)]
    if not all((case_dir / f).exists() for f in listed):
        logger.info("%s: files missing, redoing the case", path)
        return None
    return report


# --- small helpers -------------------------------------------------------------------------------




def _mean(values: Any) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def _fmt(values: Any) -> list[float]:
    return [round(float(v), 3) for v in values]
