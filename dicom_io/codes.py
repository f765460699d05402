"""Coded values shared by every stage: phases, labels and their SNOMED CT codes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(str, Enum):
    """Contrast phases of a multiphase liver CT, in the segmenter's channel order."""

    NC = "NC"
    ART = "ART"
    PVP = "PVP"
    DEL = "DEL"

    @property
    def long_name(self) -> str:
        return _PHASE_NAMES[self]


_PHASE_NAMES = {
    Phase.NC: "non-contrast",
    Phase.ART: "arterial",
    Phase.PVP: "portal-venous",
    Phase.DEL: "delayed",
}

#: Channel order of every 4-phase array in d4m.
PHASE_ORDER: tuple[Phase, ...] = (Phase.NC, Phase.ART, Phase.PVP, Phase.DEL)


class SegType(str, Enum):
    """How a DICOM-SEG stores its frames."""

    BINARY = "binary"
    LABELMAP = "labelmap"


@dataclass(frozen=True)
class CodedConcept:
    """A (value, scheme, meaning) triple as used in DICOM coded entries."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Label:
    """One segment of the d4m label map."""

    value: int
    name: str
    category: CodedConcept
    property_type: CodedConcept
    anatomic_region: CodedConcept
    rgb: tuple[int, int, int]


_ORGAN = CodedConcept("123037004", "SCT", "Anatomical Structure")
_MORPH = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
_LIVER = CodedConcept("10200004", "SCT", "Liver")

LIVER = Label(1, "liver", _ORGAN, _LIVER, _LIVER, (221, 130, 101))
TUMOR = Label(2, "liver tumor", _MORPH, CodedConcept("108369006", "SCT", "Neoplasm"), _LIVER, (255, 255, 0))

#: Label value -> label, in segment order.
LABELS: dict[int, Label] = {LIVER.value: LIVER, TUMOR.value: TUMOR}
