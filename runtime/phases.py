"""Assign a contrast phase (NC, ART, PVP, DEL) to each CT series of a study, with the evidence.

Only series-level header facts are used (description, ContrastBolusAgent, contrast start
time, acquisition time, image type, orientation, slice thickness); never patient identifiers.

The rules, in the order they are applied:

1. **Eligibility.** Excluded, with the reason: ImageType SECONDARY or naming a reformat or
   projection (MPR, MIP, MinIP, VR, curved, ...); a slice normal more than 30° from the z axis
   (coronal, sagittal); a description naming a reformat (COR, SAG, MIP, 3D, ...), a spectral map
   (iodine, VNC, Z-eff) or bolus tracking (monitoring, SmartPrep, SureStart, CARE Bolus);
   fewer than ``min_slices`` images. ImageType DERIVED\\PRIMARY stays eligible but ranks
   after ORIGINAL series of its acquisition. An override (``--phase PVP=7``) bypasses all this.
2. **Description keywords** (:func:`classify_description`) in English, German, French, Spanish,
   Italian, Portuguese, Dutch and Chinese (characters and pinyin), abbreviations included,
   matched on the accent-free, case-folded text with word boundaries where it matters ("AP"
   is not found in "CAP", "PV" not in "PVC", "DEL" not in "fase arterial del hígado"; "late
   arterial" is ART and "late portal venous" PVP, not DEL). Stems such as ``arteri``,
   ``portal``, ``venös`` also match inside German compounds ("Leberarteriell"). A stated delay
   ("35s", "3 min") is mapped by the timing windows below and outranks the word "delay"
   ("PV 70s delay" is PVP). Keywords of two phases make the description ambiguous: the
   conflict is reported and the other rules may decide between those two phases.
3. **ContrastBolusAgent.** Present: contrast-enhanced, not NC. Absent (or "None") while
   another series of the study carries one: NC. Absent everywhere: not informative (many sites
   never fill it); present on every series: not used against NC (it may be a study-wide tag).
   Timing before the contrast start outranks the tag.
4. **Timing against ContrastBolusStartTime**, when present: before it NC; then ART below 50 s,
   PVP below 120 s, DEL from 120 s (typical: ART 15-45 s, PVP 55-90 s, DEL > 150 s; outside the
   typical windows the confidence is lower).
5. **Same acquisition.** Series whose acquisition times are within ``same_acquisition_s``
   (thin and thick reconstructions of one scan) share a phase: a known phase spreads to the
   unknown series of the acquisition.
6. **Acquisition order** NC < ART < PVP < DEL fills the gaps: unlabelled acquisitions between
   labelled ones get the remaining phases in order when exactly one assignment fits (e.g.
   four unlabelled acquisitions are NC, ART, PVP, DEL). Labelled acquisitions out of order are
   reported as conflicts (descriptions still win).
7. **Default.** A study whose only contrast-enhanced acquisition has no phase evidence: PVP
   (the routine single phase), at low confidence.
8. **Overrides win** over everything; a description or timing that disagrees is recorded.

When several series have one phase, the acquisition with the highest confidence is taken, then
within it the series that ranks first by: override; ORIGINAL before DERIVED; soft-tissue
before lung/bone reconstructions; the thinnest slices of at least ``min_thickness_mm``
(1 mm: thinner is noisier and larger, with nothing to gain at the segmenter's spacing), else the
thickest below it; more images; lower series number. The others are kept as alternatives.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.series import SeriesInfo

logger = logging.getLogger(__name__)

_B = r"(?<![a-z0-9])"  # word start
_E = r"(?![a-z])"  # word end (digits may follow: "pv3mm")
_SEP = r"[\s\-_.]*"


@dataclass(frozen=True)
class PhaseRules:
    """Thresholds of the phase assignment (module docstring).

    Attributes
    ----------
    min_slices
        Fewer images than this is not a phase volume (bolus tracking, single slices).
    same_acquisition_s
        Series acquired within this many seconds are one acquisition.
    min_thickness_mm
        Preferred minimum slice thickness when choosing among reconstructions.
    max_tilt_deg
        Largest angle between the slice normal and the z axis for an axial series.
    art_before_s, del_from_s
        Seconds after the contrast start: ART below ``art_before_s``, DEL from ``del_from_s``,
        PVP between.
    """

    min_slices: int = 10
    same_acquisition_s: float = 5.0
    min_thickness_mm: float = 1.0
    max_tilt_deg: float = 30.0
    art_before_s: float = 50.0
    del_from_s: float = 120.0

    def phase_after_injection(self, seconds: float) -> tuple[Phase, float]:
        """Phase and confidence for an acquisition ``seconds`` after the contrast start."""
        if seconds < 0:
            return Phase.NC, 0.65
        if seconds < self.art_before_s:
            return Phase.ART, 0.65 if 15 <= seconds <= 45 else 0.45
        if seconds < self.del_from_s:
            return Phase.PVP, 0.65 if 55 <= seconds <= 90 else 0.45
        return Phase.DEL, 0.65 if seconds > 150 else 0.45


@dataclass(frozen=True)
class _Keyword:
    phase: Phase
    pattern: re.Pattern[str]
    confidence: float
    timing_word: bool = False  # "delay(ed)": superseded by a stated time


def _kw(phase: Phase, regex: str, confidence: float, timing_word: bool = False) -> _Keyword:
    return _Keyword(phase, re.compile(regex), confidence, timing_word)


_NEGATION = (r"(?:sans|sin|sem|senza|without|ohne|zonder|geen|kein|keine|no|non|w\s*/\s*o|wo)" + _SEP +
             r"(?:contrast\w*|kontrast\w*|km|mdc|injection|inyeccion|iniezione|iv|cm|jod\w*|iod\w*|enhanc\w*|con\b)")
KEYWORDS: tuple[_Keyword, ...] = (
    # non-contrast
    _kw(Phase.NC, _B + _NEGATION, 0.9),
    _kw(Phase.NC, _B + r"(?:unenhanc|nativ|plain|precontrast|pre" + _SEP + r"(?:contrast|con\b|kontrast|km|inj))",
        0.9),
    _kw(Phase.NC, _B + r"(?:nc|ncct|nect|pre|blanco|basale?|leer|pingsao)" + _E, 0.75),
    _kw(Phase.NC, _B + r"c\s*-(?![a-z0-9])", 0.75),
    _kw(Phase.NC, r"平扫|单纯", 0.9),
    # arterial ("late arterial" is arterial: the DEL word "late" refuses to be followed by it)
    _kw(Phase.ART, r"arteri", 0.9),
    _kw(Phase.ART, _B + r"(?:art|hap|lap|eap|dongmai\w*)" + _E, 0.8),
    _kw(Phase.ART, _B + r"ap" + _E, 0.7),
    _kw(Phase.ART, _B + r"(?:cta|angio\w*)" + _E, 0.6),
    _kw(Phase.ART, r"动脉", 0.9),
    # portal venous
    _kw(Phase.PVP, r"portal|porto" + _SEP + r"ven|pfortader|venous|venos|venoes|veneu|veineu|venenphase", 0.9),
    _kw(Phase.PVP, _B + r"(?:pvp|pv|vp|ven|menmai\w*|menjingmai\w*|jingmai\w*)" + _E, 0.75),
    _kw(Phase.PVP, r"门脉|门静脉|静脉", 0.9),
    # delayed / equilibrium
    _kw(Phase.DEL, _B + r"delay", 0.85, timing_word=True),
    _kw(Phase.DEL, _B + r"(?:equilib|equil" + _E + r"|spat(?!i)|spaet|tardi|ritard|vertraag|uitgesteld|excret)",
        0.85),
    _kw(Phase.DEL, _B + r"late" + _E + r"(?!" + _SEP + r"(?:art|hep|port|ven))", 0.8),
    _kw(Phase.DEL, _B + r"(?:eq|yanchi\w*|pingheng\w*)" + _E, 0.75),
    _kw(Phase.DEL, _B + r"del" + _E + r"(?!\s+[a-z]{3,})", 0.7),
    _kw(Phase.DEL, r"延迟|平衡", 0.9),
)  # fmt: skip
_CONTRAST = re.compile(
    _B + r"c\s*\+|\+\s*c" + _E + "|" + _B + r"(?:with|w\s*/|con|avec|mit|com|post|\+)" + _SEP +
    r"(?:contrast\w*|kontrast\w*|km|mdc|injection|iv|cm|c" + _E + ")|contrast|kontrast|" +
    _B + r"(?:ce|cect|km|mdc)" + _E + "|" + r"(?<![a-z])enhanced|增强"
)  # fmt: skip
_SECONDS = re.compile(r"(?<![a-z0-9.,])(\d{2,3})\s*(?:s|sec|secs|second|seconds|sek|seg|segundos|secondi)" + _E)
_MINUTES = re.compile(r"(?<![a-z0-9.,])(\d+(?:[.,]\d+)?)\s*(?:min|mins|minute|minutes|minuten|minuti|minutos)" + _E)
_REFORMAT_WORDS = re.compile(
    _B + r"(?:mip|minip|mpr|cor|coronal\w*|koronar\w*|sag|sagit\w*|sagitt\w*|3d|vr|vrt|cpr|curved|reformat\w*|"
    r"slab|mip\w*)" + _E
)  # fmt: skip
_SPECTRAL_WORDS = re.compile(_B + r"(?:iodine|jod|iodo|vnc|virtual" + _SEP + r"non\w*|z" + _SEP + r"eff\w*)" + _E)
_BOLUS_WORDS = re.compile(
    _B + r"(?:monitor\w*|bolus\w*|tracking|smart" + _SEP + r"prep|sure" + _SEP + r"start|premon\w*|trigger\w*)" + _E
)
_REFORMAT_TYPES = frozenset({"MPR", "MIP", "MINIP", "REFORMATTED", "CURVED", "VOLUME", "VOLUME_RENDERING",
                             "PROJECTION IMAGE", "VR", "VRT", "3D", "CPR", "MAXIMUM", "MINIMUM"})
_SHARP_WORDS = re.compile(_B + r"(?:lung\w*|lunge\w*|pulmo\w*|bone\w*|knochen\w*|osso|hueso|osseo)" + _E)
_NO_AGENT = frozenset({"none", "no", "nil", "n/a", "na", "-", "0", "kein", "keine", "aucun", "nessuno", "ninguno"})


def normalize_description(text: str) -> str:
    """Case-folded, accent-free text with ``_`` as a space (``"Portalvenös_3"`` → ``"portalvenos 3"``)."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c)).replace("_", " ")


def _word_at(text: str, start: int, end: int) -> str:
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return text[start:end].strip()


@dataclass(frozen=True)
class DescriptionEvidence:
    """What a series description says about the phase.

    Attributes
    ----------
    description
        The description as given.
    matches
        Phase → words of the description that named it.
    confidence
        Phase → confidence of its strongest keyword.
    contrast
        ``True``: says contrast-enhanced; ``False``: says without contrast; ``None``: silent.
    seconds
        A delay after injection stated in the description ("35s", "3 min"), if any.
    """

    description: str
    matches: dict[Phase, tuple[str, ...]] = field(default_factory=dict)
    confidence: dict[Phase, float] = field(default_factory=dict)
    contrast: bool | None = None
    seconds: float | None = None

    @property
    def phase(self) -> Phase | None:
        """The phase when exactly one phase is named, else ``None``."""
        return next(iter(self.matches)) if len(self.matches) == 1 else None

    @property
    def ambiguous(self) -> bool:
        """Whether several phases are named."""
        return len(self.matches) > 1

    def explain(self) -> str:
        """One evidence line."""
        if not self.matches:
            said = {True: " (says contrast-enhanced)", False: " (says without contrast)", None: ""}[self.contrast]
            return f"description '{self.description}' names no phase{said}"
        found = " and ".join(f"{p.value} ({', '.join(repr(w) for w in self.matches[p])})"
                             for p in PHASE_ORDER if p in self.matches)
        verdict = ": ambiguous" if self.ambiguous else ""
        return f"description '{self.description}' matches {found}{verdict}"


def classify_description(description: str, rules: PhaseRules | None = None) -> DescriptionEvidence:
    """Find phase keywords, contrast words and stated delays in a series description.

    Parameters
    ----------
    description
        SeriesDescription.
    rules
        Timing windows for stated delays (defaults when ``None``).
    """
    rules = rules or PhaseRules()
    text = normalize_description(description)
    found: dict[Phase, list[tuple[str, float, bool]]] = {}
    for keyword in KEYWORDS:
        for hit in keyword.pattern.finditer(text):
            found.setdefault(keyword.phase, []).append(
                (_word_at(text, hit.start(), hit.end()), keyword.confidence, keyword.timing_word))
    seconds, stated_text = None, ""
    if (m := _SECONDS.search(text)) is not None and int(m.group(1)) >= 10:
        seconds, stated_text = float(m.group(1)), m.group(0).strip()
    elif (m := _MINUTES.search(text)) is not None and float(m.group(1).replace(",", ".")) >= 2:
        seconds, stated_text = 60 * float(m.group(1).replace(",", ".")), m.group(0).strip()
    if seconds is not None:
        stated, conf = rules.phase_after_injection(seconds)
        for phase in list(found):  # "PV 70s delay": the stated time says what "delay" meant
            found[phase] = [item for item in found[phase] if not item[2] or phase == stated]
            if not found[phase]:
                del found[phase]
        found.setdefault(stated, []).append((stated_text, max(conf, 0.7), False))
    matches = {p: tuple(dict.fromkeys(w for w, _, _ in found[p])) for p in PHASE_ORDER if p in found}
    confidence = {p: max(c for _, c, _ in found[p]) for p in matches}
    contrast: bool | None = None
    if Phase.NC in matches:
        contrast = False
    elif matches or _CONTRAST.search(text):
        contrast = True
    return DescriptionEvidence(description, matches, confidence, contrast, seconds)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PhaseAssignment:
    """The phase of one series and why.

    Attributes
    ----------
    series_uid
        SeriesInstanceUID.
    label
        How messages name the series (number and description).
    phase
        The phase, or ``None`` when unknown or excluded.
    confidence
        0 (none) to 1 (override).
    source
        Which rule decided: override, description, contrast agent, contrast timing, same
        acquisition, acquisition order, default, excluded or none.
    evidence
        Every fact considered, in words.
    """

    series_uid: str
    label: str
    phase: Phase | None
    confidence: float
    source: str
    evidence: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"series_uid": self.series_uid, "series": self.label,
                "phase": None if self.phase is None else self.phase.value,
                "confidence": self.confidence, "source": self.source, "evidence": list(self.evidence)}


@dataclass(frozen=True)
class PhaseMap:
    """The phases of a study.

    Attributes
    ----------
    selected
        Phase → the series chosen for it.
    assignments
        SeriesInstanceUID → assignment, for every given series (input order).
    alternatives
        Phase → UIDs of other series with that phase, best first.
    unassigned
        SeriesInstanceUID → why the series has no phase (excluded, ambiguous, no evidence).
    conflicts
        Disagreements found (ambiguous descriptions, timing against description, order).
    """

    selected: dict[Phase, SeriesInfo]
    assignments: dict[str, PhaseAssignment]
    alternatives: dict[Phase, tuple[str, ...]]
    unassigned: dict[str, str]
    conflicts: tuple[str, ...]

    @property
    def missing(self) -> tuple[Phase, ...]:
        """Phases without a series, in channel order."""
        return tuple(p for p in PHASE_ORDER if p not in self.selected)

    def assignment(self, phase: Phase | str) -> PhaseAssignment:
        """The assignment of the series chosen for ``phase``.

        Raises
        ------
        InputError
            No series has this phase.
        """
        phase = Phase(phase)
        if phase not in self.selected:
            raise InputError(f"phases: expected a series for {phase.value}, found none")
        return self.assignments[self.selected[phase].series_uid]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``report.json`` and ``inspect`` (no patient data)."""
        return {
            "selected": {p.value: self.assignments[s.series_uid].to_dict() for p, s in self.selected.items()},
            "missing": [p.value for p in self.missing],
            "alternatives": {p.value: list(uids) for p, uids in self.alternatives.items()},
            "unassigned": [{"series_uid": uid, "series": self.assignments[uid].label, "reason": reason}
                           for uid, reason in self.unassigned.items()],
            "conflicts": list(self.conflicts),
            "assignments": [a.to_dict() for a in self.assignments.values()],
        }


# --------------------------------------------------------------------------- the assignment


@dataclass
class _Work:
    """Mutable state of one series during the assignment."""

    series: SeriesInfo
    excluded: str = ""
    derived: bool = False
    phase: Phase | None = None
    confidence: float = 0.0
    source: str = "none"
    evidence: list[str] = field(default_factory=list)
    candidates: frozenset[Phase] = frozenset(PHASE_ORDER)
    contrasted: bool | None = None
    said_contrast: bool | None = None
    time: float | None = None
    reason: str = ""
    override: bool = False

    @property
    def label(self) -> str:
        return self.series.label

    def set(self, phase: Phase, confidence: float, source: str) -> None:
        self.phase, self.confidence, self.source = phase, round(min(max(confidence, 0.0), 1.0), 2), source

    def adjust(self, delta: float) -> None:
        self.confidence = round(min(max(self.confidence + delta, 0.05), 1.0), 2)


def _exclusion(series: SeriesInfo, rules: PhaseRules) -> tuple[str, bool]:
    """Why a series cannot be a phase volume ('' when it can), and whether it is DERIVED."""
    types = tuple(v.strip().upper() for v in series.image_type)
    text = normalize_description(series.description)
    if types and (len(types) > 1 and types[1] == "SECONDARY"):
        return f"ImageType {'/'.join(types)}: a secondary (post-processed) image, not an acquisition", False
    reformat = sorted(_REFORMAT_TYPES.intersection(types))
    if reformat:
        return f"ImageType {'/'.join(types)}: a reformat or projection ({', '.join(reformat)})", False
    if (m := _BOLUS_WORDS.search(text)) is not None:
        return f"description names bolus tracking ('{_word_at(text, m.start(), m.end())}')", False
    if (m := _REFORMAT_WORDS.search(text)) is not None:
        return f"description names a reformat ('{_word_at(text, m.start(), m.end())}')", False
    if (m := _SPECTRAL_WORDS.search(text)) is not None:
        return f"description names a spectral map ('{_word_at(text, m.start(), m.end())}')", False
    iop = series.image_orientation
    if iop is not None and len(iop) == 6:
        row, col = iop[:3], iop[3:]
        normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                  row[0] * col[1] - row[1] * col[0])
        norm = math.sqrt(sum(v * v for v in normal)) or 1.0
        nx, ny, nz = (abs(v) / norm for v in normal)
        if nz < math.cos(math.radians(rules.max_tilt_deg)):
            plane = "sagittal" if nx >= ny else "coronal"
            return f"not axial: slice normal ({nx:.2f}, {ny:.2f}, {nz:.2f}) is {plane}", False
    if series.n_instances < rules.min_slices:
        return f"only {series.n_instances} images (expected at least {rules.min_slices} for a phase volume)", False
    return "", bool(types) and types[0] == "DERIVED"


def _agent_state(series: SeriesInfo) -> str:
    agent = (series.contrast_agent or "").strip()
    if not agent:
        return "absent"
    return "none" if agent.casefold() in _NO_AGENT else "present"


def _resolve_overrides(overrides: Mapping[Phase | str, str | int] | None, series: Sequence[SeriesInfo]
                       ) -> dict[str, Phase]:
    """Overrides as SeriesInstanceUID → phase (values: a series number or UID)."""
    result: dict[str, Phase] = {}
    for key, value in (overrides or {}).items():
        text = str(value).strip()
        try:
            phase = Phase(key.value if isinstance(key, Phase) else str(key).strip().upper())
        except ValueError as exc:
            raise InputError(f"--phase {key}={text}: expected a phase in {[p.value for p in PHASE_ORDER]}, "
                             f"found '{key}'") from exc
        hits = [s for s in series if s.series_uid == text]
        if not hits and text.lstrip("+").isdigit():
            hits = [s for s in series if s.series_number == int(text)]
        if not hits:
            numbers = sorted({str(s.series_number) for s in series if s.series_number is not None})
            raise InputError(f"--phase {phase.value}={text}: expected a series number or SeriesInstanceUID of "
                             f"this study, found none (series numbers: {', '.join(numbers) or 'none'})")
        if len(hits) > 1:
            raise InputError(f"--phase {phase.value}={text}: expected one series, found {len(hits)} numbered "
                             f"{text} (give the SeriesInstanceUID: {', '.join(s.series_uid for s in hits)})")
        uid = hits[0].series_uid
        if uid in result:
            raise InputError(f"--phase {phase.value}={text}: expected each series for one phase, found "
                             f"{hits[0].label} also given for {result[uid].value}")
        result[uid] = phase
    return result


def _wrap(seconds: float) -> float:
    """A time difference across midnight, in (-12 h, 12 h]."""
    return seconds - 86400 if seconds > 43200 else seconds + 86400 if seconds <= -43200 else seconds


def assign_phases(
    series: Sequence[SeriesInfo],
    overrides: Mapping[Phase | str, str | int] | None = None,
    rules: PhaseRules | None = None,
) -> PhaseMap:
    """Assign NC/ART/PVP/DEL to the CT series of one study (rules in the module docstring).

    Parameters
    ----------
    series
        The study's CT series (e.g. ``scan_folder(root).only_study().series.values()``).
    overrides
        Phase → series number or SeriesInstanceUID chosen by the user; they win.
    rules
        Thresholds (defaults when ``None``).

    Returns
    -------
    PhaseMap
        Chosen series per phase, every assignment with its evidence, alternatives, unassigned
        series with reasons, conflicts.

    Raises
    ------
    InputError
        Series from several studies or with duplicate UIDs; an override naming an unknown
        phase, no series, several series, or one series for two phases.
    """
    rules = rules or PhaseRules()
    series = list(series)
    uids = [s.series_uid for s in series]
    if len(set(uids)) != len(uids):
        raise InputError(f"phases: expected distinct SeriesInstanceUIDs, found duplicates "
                         f"{sorted({u for u in uids if uids.count(u) > 1})}")
    studies = {s.study_uid for s in series}
    if len(studies) > 1:
        raise InputError(f"phases: expected the series of one study, found {len(studies)} studies")
    forced = _resolve_overrides(overrides, series)
    works = [_Work(s) for s in series]
    conflicts: list[str] = []
    for w in works:
        w.excluded, w.derived = _exclusion(w.series, rules)
        if w.excluded:
            w.evidence.append(f"excluded: {w.excluded}")
        w.time = w.series.acquisition_time if w.series.acquisition_time is not None else w.series.series_time
    active = [w for w in works if not w.excluded or w.series.series_uid in forced]
    _header_evidence(active, rules, conflicts)
    for w in active:
        if w.series.series_uid in forced:
            _apply_override(w, forced[w.series.series_uid])
    _acquisitions(active, rules, conflicts)
    selected, alternatives = _select(active, rules)
    unassigned = {w.series.series_uid: (w.excluded or w.reason or "no phase evidence")
                  for w in works if w.phase is None}
    assignments = {
        w.series.series_uid: PhaseAssignment(
            w.series.series_uid, w.label, w.phase, w.confidence if w.phase else 0.0,
            w.source if w.phase or not w.excluded else "excluded", tuple(w.evidence))
        for w in works
    }
    for phase, chosen in selected.items():
        logger.info("%s: %s (%s, confidence %.2f)", phase.value, chosen.label, assignments[chosen.series_uid].source,
                    assignments[chosen.series_uid].confidence)
    for conflict in conflicts:
        logger.warning("phases: %s", conflict)
    return PhaseMap(selected, assignments, alternatives, unassigned, tuple(dict.fromkeys(conflicts)))


def _header_evidence(active: list[_Work], rules: PhaseRules, conflicts: list[str]) -> None:
    """Rules 2-4: description, contrast agent, timing against the contrast start."""
    states = {w.series.series_uid: _agent_state(w.series) for w in active}
    carriers = sum(state == "present" for state in states.values())
    everywhere = carriers == len(active) > 1  # possibly a study-wide tag: says nothing against NC
    starts = sorted(w.series.contrast_start_time for w in active if w.series.contrast_start_time is not None)
    study_start = starts[len(starts) // 2] if starts else None
    for w in active:
        desc = classify_description(w.series.description, rules)
        w.evidence.append(desc.explain())
        if desc.phase is not None:
            w.set(desc.phase, desc.confidence[desc.phase], "description")
        elif desc.ambiguous:
            w.candidates = frozenset(desc.matches)
            w.reason = f"ambiguous description (names {', '.join(p.value for p in desc.matches)})"
            conflicts.append(f"{w.label}: description names {' and '.join(p.value for p in desc.matches)}")
        w.contrasted = w.said_contrast = desc.contrast
        state = states[w.series.series_uid]
        if state == "present" and everywhere:
            w.evidence.append("ContrastBolusAgent on every series of the study (maybe a study-wide tag): "
                              "not used against NC")
        elif state == "present":
            w.evidence.append("ContrastBolusAgent present → contrast-enhanced (not NC)")
            if w.phase == Phase.NC:
                w.adjust(-0.2)
                conflicts.append(f"{w.label}: description says NC but ContrastBolusAgent is set")
            w.contrasted = True if desc.contrast is not False else desc.contrast
        elif state == "none" or carriers:
            why = ("ContrastBolusAgent says none" if state == "none"
                   else "no ContrastBolusAgent while other series carry one")
            w.evidence.append(f"{why} → NC")
            if w.phase is None and Phase.NC in w.candidates and desc.contrast is not True:
                w.set(Phase.NC, 0.7, "contrast agent")
            elif w.phase is None and desc.contrast is True:
                conflicts.append(f"{w.label}: description says contrast-enhanced but {why}")
            elif w.phase is not None and w.phase != Phase.NC:
                w.adjust(-0.1)
                conflicts.append(f"{w.label}: description says {w.phase.value} but {why}")
            if desc.contrast is None:
                w.contrasted = False
        else:
            w.evidence.append("no ContrastBolusAgent in any series of the study: agent not informative")
        start = w.series.contrast_start_time if w.series.contrast_start_time is not None else study_start
        if start is not None and w.time is not None:
            _timing_evidence(w, _wrap(w.time - start), rules, conflicts)


def _timing_evidence(w: _Work, delay: float, rules: PhaseRules, conflicts: list[str]) -> None:
    phase, confidence = rules.phase_after_injection(delay)
    when = f"{-delay:.0f} s before" if delay < 0 else f"{delay:.0f} s after"
    w.evidence.append(f"acquired {when} ContrastBolusStartTime → {phase.value}")
    if w.phase is None:
        if phase in w.candidates and not (phase == Phase.NC and w.said_contrast):
            w.set(phase, confidence, "contrast timing")
            if phase == Phase.NC and w.contrasted:
                w.evidence.append("acquired before the injection: the ContrastBolusAgent tag is study-wide")
                w.contrasted = False
    elif w.phase == phase:
        w.adjust(0.05)
    else:
        w.adjust(-0.15)
        conflicts.append(f"{w.label}: {w.source} says {w.phase.value}, timing says {phase.value} ({when} "
                         f"the contrast start)")


def _apply_override(w: _Work, phase: Phase) -> None:
    before = f" (headers suggested {w.phase.value} via {w.source})" if w.phase and w.phase != phase else ""
    despite = f" despite: {w.excluded}" if w.excluded else ""
    w.evidence.append(f"override --phase {phase.value}={w.series.series_number or w.series.series_uid}"
                      f"{despite}{before}")
    w.set(phase, 1.0, "override")
    w.override, w.excluded, w.reason = True, "", ""


def _cluster(works: list[_Work], rules: PhaseRules) -> list[list[_Work]]:
    """Acquisitions: series with times, sorted, chained while gaps stay within ``same_acquisition_s``."""
    timed = sorted((w for w in works if w.time is not None), key=lambda w: (w.time, w.series.series_uid))
    groups: list[list[_Work]] = []
    for w in timed:
        if groups and w.time - groups[-1][-1].time <= rules.same_acquisition_s:  # type: ignore[operator]
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def _group_phase(group: list[_Work]) -> Phase | None:
    phases = {w.phase for w in group if w.phase is not None}
    return next(iter(phases)) if len(phases) == 1 else None


def _group_name(group: list[_Work]) -> str:
    return ", ".join(w.label for w in group)


def _acquisitions(active: list[_Work], rules: PhaseRules, conflicts: list[str]) -> None:
    """Rules 5-7: same acquisition, acquisition order, the single-contrast default."""
    groups = _cluster(active, rules)
    first = groups[0][0].time if groups else 0.0
    for k, group in enumerate(groups, start=1):
        for w in group:
            w.evidence.append(f"acquisition {k} of {len(groups)} by time (+{w.time - first:.0f} s)")  # type: ignore[operator]
        phases = {w.phase for w in group if w.phase is not None}
        if len(phases) > 1:
            named = ", ".join(f"{w.label} ({w.phase.value})" for w in group if w.phase is not None)
            conflicts.append(f"one acquisition, several phases: {named}")
            continue
        if len(phases) == 1:
            phase = next(iter(phases))
            source = max((w for w in group if w.phase), key=lambda w: w.confidence)
            for w in group:
                if w.phase is None and phase in w.candidates:
                    w.set(phase, min(0.8, source.confidence), "same acquisition")
                    w.evidence.append(f"same acquisition time as {source.label} ({phase.value})")
    resolved = [(i, _group_phase(g)) for i, g in enumerate(groups) if _group_phase(g) is not None]
    for (i, p), (j, q) in itertools.combinations(resolved, 2):
        if p == q:
            conflicts.append(f"{p.value}: several acquisitions ({_group_name(groups[i])}; {_group_name(groups[j])})")  # type: ignore[union-attr]
        elif PHASE_ORDER.index(p) > PHASE_ORDER.index(q):  # type: ignore[arg-type]
            conflicts.append(f"acquisition order: {_group_name(groups[j])} ({q.value}) was acquired after "  # type: ignore[union-attr]
                             f"{_group_name(groups[i])} ({p.value})")  # type: ignore[union-attr]
    _fill_by_order(groups)
    _single_contrast_default(groups)


def _allowed(group: list[_Work], phases: Sequence[Phase]) -> set[Phase]:
    allowed = set(phases)
    for w in group:
        allowed &= w.candidates
        if w.contrasted is True:
            allowed.discard(Phase.NC)
        elif w.contrasted is False:
            allowed &= {Phase.NC}
    return allowed


def _fill_by_order(groups: list[list[_Work]]) -> None:
    """Give unlabelled acquisitions the phases left between their labelled neighbours, if only one way fits."""
    labels = [_group_phase(g) for g in groups]
    used = {p for p in labels if p is not None}
    open_ = [labels[i] is None and not any(w.phase for w in g) for i, g in enumerate(groups)]
    i = 0
    while i < len(groups):
        if not open_[i]:
            i += 1
            continue
        j = i
        while j < len(groups) and open_[j]:
            j += 1
        run = groups[i:j]
        low = max((PHASE_ORDER.index(p) for p in labels[:i] if p is not None), default=-1)
        high = min((PHASE_ORDER.index(p) for p in labels[j:] if p is not None), default=len(PHASE_ORDER))
        free = [p for p in PHASE_ORDER[low + 1 : high] if p not in used]
        allowed = [_allowed(g, free) for g in run]
        fits = [combo for combo in itertools.combinations(free, len(run))
                if all(p in a for p, a in zip(combo, allowed, strict=True))]
        where = _neighbours(groups, labels, i, j)
        if len(fits) == 1:
            for group, phase in zip(run, fits[0], strict=True):
                for w in group:
                    w.set(phase, 0.5, "acquisition order")
                    w.evidence.append(f"acquisition order ({where}) → {phase.value}")
        else:
            free_names = [p.value for p in free]
            if not fits:
                why = f"acquisition order ({where}) leaves no phase for {len(run)} acquisition(s) (free: {free_names})"
            elif not where:
                why = (f"no phase evidence: no phase keyword or contrast timing, and the order alone cannot label "
                       f"{len(run)} acquisition(s) with {len(free)} phases")
            else:
                why = f"acquisition order ({where}) leaves {len(fits)} ways to label {len(run)} acquisition(s) " \
                      f"with {free_names}"
            for group in run:
                for w in group:
                    w.reason = w.reason or why
                    w.evidence.append(why)
        i = j


def _neighbours(groups: list[list[_Work]], labels: list[Phase | None], i: int, j: int) -> str:
    """``after series 3 'ART' (ART), before series 5 'DEL' (DEL)`` for the run ``groups[i:j]``."""
    parts = []
    before = next((k for k in range(i - 1, -1, -1) if labels[k] is not None), None)
    after = next((k for k in range(j, len(groups)) if labels[k] is not None), None)
    if before is not None:
        parts.append(f"after {_group_name(groups[before])} ({labels[before].value})")  # type: ignore[union-attr]
    if after is not None:
        parts.append(f"before {_group_name(groups[after])} ({labels[after].value})")  # type: ignore[union-attr]
    return ", ".join(parts)


def _single_contrast_default(groups: list[list[_Work]]) -> None:
    """Rule 7: the only contrast-enhanced acquisition of a study, unlabelled, is PVP."""
    contrasted = [g for g in groups if any(w.contrasted for w in g)]
    if any(_group_phase(g) == Phase.PVP for g in groups) or len(contrasted) != 1:
        return
    (group,) = contrasted
    if _group_phase(group) is None and all(w.phase is None and w.candidates == frozenset(PHASE_ORDER)
                                           for w in group):
        for w in group:
            w.set(Phase.PVP, 0.3, "default")
            w.evidence.append("the study's only contrast-enhanced acquisition, no phase evidence → PVP "
                              "(the routine single phase)")


def _thickness_rank(w: _Work, rules: PhaseRules) -> tuple[int, float]:
    t = w.series.slice_thickness
    if t is None:
        return (2, 0.0)
    return (0, t) if t >= rules.min_thickness_mm else (1, -t)


def _rank(w: _Work, rules: PhaseRules) -> tuple[Any, ...]:
    sharp = _SHARP_WORDS.search(normalize_description(w.series.description)) is not None
    number = w.series.series_number if w.series.series_number is not None else 1 << 30
    return (not w.override, w.derived, sharp, _thickness_rank(w, rules), -w.series.n_instances, number,
            w.series.series_uid)


def _select(active: list[_Work], rules: PhaseRules) -> tuple[dict[Phase, SeriesInfo], dict[Phase, tuple[str, ...]]]:
    """Choose one series per phase: best acquisition by confidence, then the ranking rule."""
    groups = _cluster(active, rules)
    group_of = {id(w): k for k, g in enumerate(groups) for w in g}
    selected: dict[Phase, SeriesInfo] = {}
    alternatives: dict[Phase, tuple[str, ...]] = {}
    def acquisition(w: _Work) -> object:
        return group_of.get(id(w), w.series.series_uid)

    for phase in PHASE_ORDER:
        members = [w for w in active if w.phase == phase]
        if not members:
            continue
        score: dict[object, float] = {}
        for w in members:
            score[acquisition(w)] = max(score.get(acquisition(w), 0.0), w.confidence + (10.0 if w.override else 0.0))
        ordered = sorted(members, key=lambda w: (-score[acquisition(w)], _rank(w, rules)))
        chosen, rest = ordered[0], ordered[1:]
        selected[phase] = chosen.series
        chosen.evidence.append(f"chosen for {phase.value}" + (f" over {len(rest)} other series" if rest else ""))
        if rest:
            alternatives[phase] = tuple(w.series.series_uid for w in rest)
            for w in rest:
                w.evidence.append(f"alternative for {phase.value}: {chosen.label} ranks first")
    return selected, alternatives
