"""Study assembly: what a DICOM folder holds, described for people and for machines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from d4m.dicom_io.series import FolderIndex, SeriesInfo, scan_folder
from d4m.runtime.phases import PhaseAssignment, assign_phases


def describe_folder(folder: Path) -> dict[str, Any]:
    """Scan ``folder`` (headers only) and describe its studies, CT series and skipped files.

    The description holds UIDs, series numbers and descriptions, acquisition facts and file
    names relative to ``folder``; never patient identifiers.
    """
    return describe_index(scan_folder(folder))


def describe_index(index: FolderIndex) -> dict[str, Any]:
    """The JSON-ready description of a folder index (see :func:`describe_folder`)."""
    studies = []
    for study in index.studies.values():
        phases = assign_phases(list(study.series.values()))
        studies.append({
            "study_uid": study.study_uid,
            "study_date": study.study_date,
            "description": study.description,
            "series": [_describe_series(s, phases.assignments.get(s.series_uid)) for s in study.series.values()],
            "phases_found": [p.value for p in phases.selected],
            "phases_missing": [p.value for p in phases.missing],
            "problems": list(phases.conflicts),
        })
    return {
        "studies": studies,
        "skipped": [{"file": item.path.as_posix(), "reason": item.reason} for item in index.skipped],
    }


def _describe_series(series: SeriesInfo, assignment: PhaseAssignment | None) -> dict[str, Any]:
    return {
        "phase": assignment.phase.value if assignment and assignment.phase else None,
        "phase_confidence": assignment.confidence if assignment else 0.0,
        "phase_evidence": list(assignment.evidence) if assignment else [],
        "series_uid": series.series_uid,
        "series_number": series.series_number,
        "description": series.description,
        "instances": series.n_instances,
        "matrix": [series.rows, series.cols],
        "slice_thickness_mm": series.slice_thickness,
        "contrast_agent": series.contrast_agent,
        "acquisition_time_s": series.acquisition_time,
        "frame_of_reference_uid": series.frame_of_reference_uid,
    }


def render_description(description: dict[str, Any], console: Console) -> None:
    """Print a folder description as rich tables."""
    studies = description["studies"]
    if not studies:
        console.print("No CT study found.")
    for number, study in enumerate(studies, start=1):
        table = Table(title=f"Study {number}: {study['study_uid']} ({study['study_date'] or 'no date'})")
        for column in ("series", "description", "images", "matrix", "contrast", "phase", "main evidence (--json: all)"):
            table.add_column(column)
        for series in study["series"]:
            table.add_row(
                str(series["series_number"]),
                series["description"],
                str(series["instances"]),
                "×".join(str(v) for v in series["matrix"]),
                series["contrast_agent"] or "-",
                series["phase"] or "-",
                series["phase_evidence"][0] if series["phase_evidence"] else "-",
            )
        console.print(table)
        if study["phases_missing"]:
            console.print(f"Missing phases (would be duplicated): {', '.join(study['phases_missing'])}")
        for problem in study["problems"]:
            console.print(f"Problem: {problem}")
    skipped = description["skipped"]
    if skipped:
        reasons: dict[str, int] = {}
        for item in skipped:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        table = Table(title=f"Skipped {len(skipped)} files")
        table.add_column("reason")
        table.add_column("files")
        for reason, count in sorted(reasons.items()):
            table.add_row(reason, str(count))
        console.print(table)
