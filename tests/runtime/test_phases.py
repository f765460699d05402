"""Phase assignment: description keywords in many languages, agent, timing, order, overrides, choice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.series import SeriesInfo
from d4m.runtime.phases import PhaseRules, assign_phases, classify_description

STUDY = "1.2.3.4"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
T0 = 10 * 3600.0  # 10:00:00


def _series(number: int, description: str = "", *, agent: str | None = "Iomeron 350", time: float | None = None,
            start: float | None = None, thickness: float | None = 2.5, n: int = 60,
            image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
            orientation: tuple[float, ...] | None = AXIAL) -> SeriesInfo:
    return SeriesInfo(
        study_uid=STUDY, series_uid=f"{STUDY}.{number}", series_number=number, description=description,
        modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        files=tuple(Path(f"/data/s{number}/{i}.dcm") for i in range(n)), root=Path("/data"),
        image_orientation=orientation, contrast_agent=agent, contrast_start_time=start,
        acquisition_time=time, image_type=image_type, slice_thickness=thickness,
    )


DESCRIPTIONS = [
    # English and vendor styles
    ("ABD PV 3.0 B30f", Phase.PVP), ("Portal Venous 5.0 Br40", Phase.PVP), ("AP 1.25mm STND", Phase.ART),
    ("Delayed 3min", Phase.DEL), ("C- Abdomen", Phase.NC), ("C+ arterial", Phase.ART),
    ("Late arterial 1mm", Phase.ART), ("late portal venous", Phase.PVP), ("LATE 5mm", Phase.DEL), ("EQ 3mm", Phase.DEL),
    ("Equilibrium phase 2.0mm", Phase.DEL), ("NCCT abdomen", Phase.NC), ("w/o contrast", Phase.NC),
    ("Non-contrast", Phase.NC), ("  unenhanced   5 ", Phase.NC), ("PLAIN", Phase.NC), ("HAP 1.0", Phase.ART),
    ("VP 2mm", Phase.PVP), ("PVP", Phase.PVP), ("DEL B30f", Phase.DEL), ("PV 70s delay", Phase.PVP),
    ("ARTERIAL 35s", Phase.ART), ("Pre-contrast", Phase.NC), ("portovenous_1.5", Phase.PVP),
    # German
    ("Nativ 5.0 B30f", Phase.NC), ("Arterielle Phase  1.5 I30f", Phase.ART), ("Leberarteriell", Phase.ART),
    ("Portalvenös 3.0 Br40", Phase.PVP), ("Pfortaderphase", Phase.PVP), ("Spätphase 5 min", Phase.DEL),
    ("Ohne KM", Phase.NC), ("VENÖS 3 Br40", Phase.PVP),
    # French, Spanish, Italian, Portuguese, Dutch
    ("Sans injection", Phase.NC), ("Temps artériel", Phase.ART), ("Phase portale", Phase.PVP),
    ("Phase tardive", Phase.DEL), ("Sin contraste", Phase.NC), ("Fase arterial del hígado", Phase.ART),
    ("Fase tardía", Phase.DEL), ("Senza mdc", Phase.NC), ("Fase arteriosa", Phase.ART),
    ("Fase portale", Phase.PVP), ("fase ritardata", Phase.DEL), ("Sem contraste", Phase.NC),
    ("Fase venosa", Phase.PVP), ("Blanco", Phase.NC), ("Arteriële fase", Phase.ART), ("Veneuze fase", Phase.PVP),
    # Chinese characters and pinyin
    ("平扫", Phase.NC), ("动脉期", Phase.ART), ("门脉期", Phase.PVP), ("延迟期", Phase.DEL), ("dongmaiqi", Phase.ART),
    # no phase
    ("Abdomen 5.0 B30f", None), ("CAP w/contrast", None), ("PVC", None), ("Routine", None),
]


@pytest.mark.parametrize(("description", "expected"), DESCRIPTIONS)
def test_description_keywords(description: str, expected: Phase | None) -> None:
    assert classify_description(description).phase == expected


def test_description_table_is_large_enough() -> None:
    assert len(DESCRIPTIONS) >= 30
    assert len({p for _, p in DESCRIPTIONS}) == 5  # four phases and None


def test_word_boundaries_and_contrast_words() -> None:
    cap = classify_description("CAP w/contrast")
    assert cap.matches == {} and cap.contrast is True
    assert classify_description("Ohne KM").contrast is False
    both = classify_description("AP PV 2mm")
    assert both.ambiguous and set(both.matches) == {Phase.ART, Phase.PVP} and both.phase is None
    assert classify_description("Delayed 180s").seconds == 180


def _four_phase(**kw: object) -> list[SeriesInfo]:
    return [
        _series(2, "Nativ 5.0 B30f", agent=None, time=T0, **kw),  # type: ignore[arg-type]
        _series(3, "Arterial 2.5", time=T0 + 150, **kw),  # type: ignore[arg-type]
        _series(4, "PV 2.5mm", time=T0 + 185, **kw),  # type: ignore[arg-type]
        _series(5, "Delayed 3 min", time=T0 + 300, **kw),  # type: ignore[arg-type]
    ]


def test_a_four_phase_study_with_evidence() -> None:
    result = assign_phases(_four_phase())
    assert {p: s.series_number for p, s in result.selected.items()} == {
        Phase.NC: 2, Phase.ART: 3, Phase.PVP: 4, Phase.DEL: 5}
    assert result.missing == () and result.conflicts == () and result.unassigned == {}
    art = result.assignment(Phase.ART)
    assert art.source == "description" and art.confidence >= 0.8
    assert any("matches ART ('arterial')" in e for e in art.evidence)
    assert "acquisition 2 of 4 by time (+150 s)" in art.evidence
    nc = result.assignment(Phase.NC)
    assert any("no ContrastBolusAgent while other series carry one → NC" in e for e in nc.evidence)
    json.dumps(result.to_dict())  # JSON-ready


def test_timing_relative_to_contrast_start_only() -> None:
    start = T0 + 100
    series = [
        _series(11, "Abdomen", agent="Ultravist", time=T0, start=start),
        _series(12, "Abdomen", agent="Ultravist", time=start + 35, start=start),
        _series(13, "Abdomen", agent="Ultravist", time=start + 72, start=start),
        _series(14, "Abdomen", agent="Ultravist", time=start + 240, start=start),
    ]
    result = assign_phases(series)
    assert [result.selected[p].series_number for p in Phase] == [11, 12, 13, 14]
    pvp = result.assignment(Phase.PVP)
    assert pvp.source == "contrast timing"
    assert "acquired 72 s after ContrastBolusStartTime → PVP" in pvp.evidence


def test_acquisition_order_alone_labels_four_acquisitions() -> None:
    series = [_series(n, "Abdomen 5.0", agent=None, time=T0 + dt) for n, dt in ((7, 0), (8, 130), (9, 170), (10, 300))]
    result = assign_phases(series)
    assert [result.selected[p].series_number for p in Phase] == [7, 8, 9, 10]
    assert all(result.assignment(p).source == "acquisition order" for p in Phase)


def test_order_fills_a_gap_between_labelled_acquisitions() -> None:
    series = _four_phase()
    series[2] = _series(4, "Abdomen 2.5", time=T0 + 185)  # the PVP description is gone
    result = assign_phases(series)
    pvp = result.assignment(Phase.PVP)
    assert result.selected[Phase.PVP].series_number == 4 and pvp.source == "acquisition order"
    assert any("after series 3 'Arterial 2.5' (ART), before series 5 'Delayed 3 min' (DEL)" in e
               for e in pvp.evidence)


def test_ambiguity_is_reported() -> None:
    series = [_series(2, "Nativ", agent=None, time=T0), _series(3, "Abdomen", time=T0 + 150),
              _series(4, "Abdomen", time=T0 + 300)]
    result = assign_phases(series)
    assert set(result.selected) == {Phase.NC}
    assert "acquisition order" in result.unassigned[f"{STUDY}.3"]
    assert "ways to label 2 acquisition(s)" in result.unassigned[f"{STUDY}.3"]
    ambiguous = assign_phases([_series(6, "AP PV", time=T0)])
    assert ambiguous.selected == {}
    assert ambiguous.conflicts == ("series 6 'AP PV': description names ART and PVP",)
    assert "ambiguous description" in ambiguous.unassigned[f"{STUDY}.6"]


def test_description_against_timing_is_a_conflict_but_description_wins() -> None:
    start = T0
    result = assign_phases([_series(3, "Arterial", time=start + 75, start=start)])
    assert result.selected[Phase.ART].series_number == 3
    assert result.assignment(Phase.ART).confidence < 0.9
    assert any("timing says PVP" in c for c in result.conflicts)


def test_override_wins_and_bypasses_exclusion() -> None:
    series = [*_four_phase(), _series(6, "PV COR 3mm", time=T0 + 185, orientation=CORONAL)]
    assert f"{STUDY}.6" in assign_phases(series).unassigned
    result = assign_phases(series, overrides={"pvp": "6", Phase.ART: f"{STUDY}.4"})
    assert result.selected[Phase.PVP].series_number == 6
    assert result.selected[Phase.ART].series_number == 4
    art = result.assignment(Phase.ART)
    assert art.source == "override" and art.confidence == 1.0
    assert any("headers suggested PVP" in e for e in art.evidence)
    assert any("despite: description names a reformat ('cor')" in e for e in result.assignment(Phase.PVP).evidence)
    assert f"{STUDY}.3" in result.alternatives[Phase.ART]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"PVP": "99"}, "SeriesInstanceUID of this study, found none (series numbers: 2, 3, 4, 5)"),
    ({"XYZ": "4"}, "expected a phase in ['NC', 'ART', 'PVP', 'DEL'], found 'XYZ'"),
    ({"PVP": "4", "DEL": "4"}, "expected each series for one phase"),
])  # fmt: skip
def test_bad_overrides_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        assign_phases(_four_phase(), overrides=overrides)


def test_a_study_with_only_pvp() -> None:
    result = assign_phases([_series(5, "Portal venous 3.0", time=T0)])
    assert set(result.selected) == {Phase.PVP}
    assert result.missing == (Phase.NC, Phase.ART, Phase.DEL)
    unlabelled = assign_phases([_series(5, "Abdomen 3.0 Br40", time=T0)])  # contrast agent, no phase word
    assert unlabelled.selected[Phase.PVP].series_number == 5
    assert unlabelled.assignment(Phase.PVP).source == "default"
    assert unlabelled.assignment(Phase.PVP).confidence <= 0.3
    plain = assign_phases([_series(5, "Abdomen 3.0 Br40", agent=None, time=T0)])  # nothing known: no guess
    assert plain.selected == {} and "no phase evidence" in plain.unassigned[f"{STUDY}.5"]


def test_two_pvp_reconstructions_resolved_by_the_rule() -> None:
    series = [
        _series(4, "PV 5.0 B30f", time=T0, thickness=5.0, n=60),
        _series(5, "PV 0.6 B30f", time=T0, thickness=0.6, n=500),
        _series(6, "PV 1.5 B30f", time=T0, thickness=1.5, n=200),
        _series(7, "PV 1.5 B70f lung", time=T0, thickness=1.5, n=200),
        _series(8, "PV 1.0", time=T0, thickness=1.0, n=300, image_type=("DERIVED", "PRIMARY", "AXIAL")),
    ]
    result = assign_phases(series)
    assert result.selected[Phase.PVP].series_number == 6  # thinnest >= 1 mm, ORIGINAL, soft tissue
    assert result.alternatives[Phase.PVP] == tuple(f"{STUDY}.{n}" for n in (4, 5, 7, 8))
    thin_only = assign_phases([series[1], _series(9, "PV 0.5", time=T0, thickness=0.5, n=600)])
    assert thin_only.selected[Phase.PVP].series_number == 5  # below 1 mm: the thickest


def test_same_acquisition_spreads_a_phase() -> None:
    series = [_series(4, "Portal venous 1.0", time=T0, thickness=1.0),
              _series(40, "Abdomen 5mm", time=T0 + 2, thickness=5.0)]
    result = assign_phases(series)
    assert result.assignments[f"{STUDY}.40"].phase == Phase.PVP
    assert result.assignments[f"{STUDY}.40"].source == "same acquisition"
    assert result.alternatives[Phase.PVP] == (f"{STUDY}.40",)


@pytest.mark.parametrize(("kw", "reason"), [
    ({"orientation": CORONAL}, "not axial"),
    ({"image_type": ("DERIVED", "SECONDARY", "MPR")}, "secondary"),
    ({"image_type": ("ORIGINAL", "PRIMARY", "MIP")}, "reformat or projection (MIP)"),
    ({"description": "PV MIP 10mm"}, "description names a reformat ('mip')"),
    ({"description": "Monitoring"}, "bolus tracking"),
    ({"description": "PV Iodine map"}, "spectral map"),
    ({"n": 3}, "only 3 images"),
])  # fmt: skip
def test_exclusions_have_reasons(kw: dict, reason: str) -> None:
    kw = {"description": "PV 3mm", **kw}
    result = assign_phases([_series(4, time=T0, **kw)])
    assert result.selected == {}
    assert reason in result.unassigned[f"{STUDY}.4"]
    assert result.assignments[f"{STUDY}.4"].source == "excluded"


def test_rules_are_configurable() -> None:
    result = assign_phases([_series(4, "PV", time=T0, n=5)], rules=PhaseRules(min_slices=4))
    assert result.selected[Phase.PVP].series_number == 4


def test_several_studies_refused() -> None:
    other = SeriesInfo(study_uid="9.9", series_uid="9.9.1", series_number=1, description="PV", modality="CT",
                       sop_class_uid="x", files=(), root=Path("/data"))
    with pytest.raises(InputError, match="expected the series of one study, found 2 studies"):
        assign_phases([_series(4, "PV", time=T0), other])


def test_real_headers_of_a_written_study(tmp_path: Path) -> None:
    """scan_folder → assign_phases on DICOM files, wording and timing as a scanner writes them; no PHI out."""
    import numpy as np

    from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
    from d4m.dicom_io.series import scan_folder
    from d4m.dicom_io.volume import Volume

    volume = Volume(np.zeros((12, 8, 8), np.float32), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), np.eye(3))
    plan = [  # number, description, agent, acquisition time, expected
        (2, "Abdomen nativ 5.0 B30f", None, "101000", Phase.NC),
        (3, "Abdomen 1.5 I30f", "Iomeron 350", "101535", Phase.ART),
        (4, "Portalvenös 1.5 I30f", "Iomeron 350", "101612", Phase.PVP),
        (5, "Abdomen 1.5 I30f", "Iomeron 350", "101830", Phase.DEL),
    ]
    for number, description, agent, time, _ in plan:
        meta = CTSeriesMeta(study_uid="1.2.826.0.1.3680043.8.498.1", frame_of_reference_uid="1.2.826.0.1.3680043.8.4",
                            series_number=number, description=description, contrast_agent=agent,
                            contrast_start_time="101500" if agent else None, acquisition_time=f"{time}.000000",
                            patient_name="SECRETNAME^PHANTOM", patient_id="PID-SECRET-4711")
        write_ct_series(volume, tmp_path / f"S{number}", meta)
    study = scan_folder(tmp_path).only_study()
    result = assign_phases(list(study.series.values()))
    assert {p: s.series_number for p, s in result.selected.items()} == {e: n for n, *_, e in plan}
    assert result.assignment(Phase.ART).source == "contrast timing"
    text = json.dumps(result.to_dict())
    assert "SECRET" not in text and "/" + tmp_path.name not in text


def test_agent_on_every_series_is_not_used_against_nc() -> None:
    """A study-wide ContrastBolusAgent tag: order still labels the first acquisition NC."""
    times = ((7, 0), (8, 130), (9, 170), (10, 300))
    series = [_series(n, "Abdomen 5.0", agent="Iomeron", time=T0 + dt) for n, dt in times]
    result = assign_phases(series)
    assert [result.selected[p].series_number for p in Phase] == [7, 8, 9, 10]
    assert any("study-wide tag" in e for e in result.assignment(Phase.NC).evidence)
    mixed = [_series(7, "Nativ", time=T0), _series(8, "PV", time=T0 + 70), _series(9, "DEL", agent=None, time=T0 + 300)]
    result = assign_phases(mixed)  # the agent is set on NC but missing on DEL: both are reported
    assert result.selected[Phase.NC].series_number == 7 and result.selected[Phase.DEL].series_number == 9
    assert result.assignment(Phase.NC).confidence < 0.9
    assert any("description says NC but ContrastBolusAgent is set" in c for c in result.conflicts)
    assert any("description says DEL but no ContrastBolusAgent" in c for c in result.conflicts)
