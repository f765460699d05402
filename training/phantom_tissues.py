"""Tissue codes of the phantom and their attenuation (HU) in each contrast phase.

The table holds the mean value per phase; each case draws its own unenhanced value (``spread``)
and scales every enhancement (phase value minus unenhanced value) by one bolus factor, so a
case with a strong bolus is strong everywhere. Tumour parts are given relative to the liver of
the same case and phase (hyper-/hypo-enhancement is what defines them), cysts and necrosis in
absolute HU. ``docs/phantom.md`` lists the values with their sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from d4m.dicom_io.codes import PHASE_ORDER, Phase


class Tissue(IntEnum):
    """Codes of the anatomy label map (uint8)."""

    AIR = 0
    TABLE = 1
    SKIN = 2
    SUBCUT_FAT = 3
    VISC_FAT = 4
    MUSCLE = 5
    LUNG = 6
    HEART = 7
    MYOCARDIUM = 8
    LIVER = 9
    PORTAL_IN = 10
    HEPATIC_IN = 11
    PORTAL_OUT = 12
    IVC = 13
    AORTA = 14
    RENAL_VEIN = 15
    SPLEEN = 16
    KIDNEY_CORTEX = 17
    KIDNEY_MEDULLA = 18
    RENAL_SINUS = 19
    RENAL_PELVIS = 20
    PANCREAS = 21
    GALLBLADDER = 22
    BOWEL_WALL = 23
    BOWEL_FLUID = 24
    STOOL = 25
    GAS = 26
    BONE_CANCELLOUS = 27
    BONE_CORTICAL = 28
    DISC = 29
    SPINAL_CANAL = 30
    RIB_MARROW = 31
    CARTILAGE = 32


#: Codes that make up the liver label (parenchyma and the vessels inside it; not the IVC).
LIVER_TISSUES = (Tissue.LIVER, Tissue.PORTAL_IN, Tissue.HEPATIC_IN)


class TumorPart(IntEnum):
    """Compartments of a tumour; a voxel's tumour byte is ``8 * instance + part``."""

    HCC_CORE = 1
    HCC_CAPSULE = 2
    HCC_NECROSIS = 3
    META_CORE = 4
    META_RIM = 5
    META_NECROSIS = 6
    CYST = 7


@dataclass(frozen=True)
class TissueHU:
    """Mean HU per phase (NC, ART, PVP, DEL), per-case spread (SD) of the NC value, texture SD per phase."""

    hu: tuple[float, float, float, float]
    spread: float
    texture: tuple[float, float, float, float]


def _t(nc: float, art: float, pvp: float, dl: float, spread: float, texture: float | tuple) -> TissueHU:
    tex = texture if isinstance(texture, tuple) else (texture,) * 4
    return TissueHU((nc, art, pvp, dl), spread, tex)


TISSUE_HU: dict[Tissue, TissueHU] = {
    Tissue.AIR: _t(-1000, -1000, -1000, -1000, 0, 0),
    Tissue.TABLE: _t(60, 60, 60, 60, 20, 5),
    Tissue.SKIN: _t(45, 55, 60, 55, 5, 4),
    Tissue.SUBCUT_FAT: _t(-105, -104, -102, -103, 6, 5),
    Tissue.VISC_FAT: _t(-95, -93, -90, -92, 6, 7),
    Tissue.MUSCLE: _t(52, 60, 66, 62, 4, 4),
    Tissue.LUNG: _t(-860, -850, -850, -855, 25, 25),
    Tissue.HEART: _t(42, 260, 170, 130, 3, 4),
    Tissue.MYOCARDIUM: _t(45, 110, 115, 100, 4, 4),
    Tissue.LIVER: _t(58, 75, 115, 95, 5, 4),
    Tissue.PORTAL_IN: _t(42, 130, 185, 135, 3, 3),
    Tissue.HEPATIC_IN: _t(42, 50, 165, 135, 3, 3),
    Tissue.PORTAL_OUT: _t(42, 130, 185, 135, 3, 3),
    Tissue.IVC: _t(42, 80, 150, 130, 3, (3, 10, 5, 3)),
    Tissue.AORTA: _t(42, 300, 170, 130, 3, 3),
    Tissue.RENAL_VEIN: _t(42, 150, 170, 130, 3, 3),
    Tissue.SPLEEN: _t(48, 115, 125, 105, 4, (4, 28, 4, 4)),
    Tissue.KIDNEY_CORTEX: _t(35, 190, 175, 150, 4, 4),
    Tissue.KIDNEY_MEDULLA: _t(35, 85, 165, 160, 4, 5),
    Tissue.RENAL_SINUS: _t(-80, -78, -75, -76, 10, 10),
    Tissue.RENAL_PELVIS: _t(10, 10, 15, 150, 4, 2),
    Tissue.PANCREAS: _t(45, 125, 105, 85, 5, 8),
    Tissue.GALLBLADDER: _t(12, 12, 12, 12, 5, 1),
    Tissue.BOWEL_WALL: _t(40, 95, 105, 85, 5, 4),
    Tissue.BOWEL_FLUID: _t(15, 15, 15, 15, 5, 2),
    Tissue.STOOL: _t(25, 25, 25, 25, 10, 35),
    Tissue.GAS: _t(-990, -990, -990, -990, 5, 5),
    Tissue.BONE_CANCELLOUS: _t(190, 190, 195, 192, 40, 25),
    Tissue.BONE_CORTICAL: _t(800, 800, 805, 802, 80, 30),
    Tissue.DISC: _t(85, 88, 92, 90, 8, 4),
    Tissue.SPINAL_CANAL: _t(15, 15, 18, 18, 4, 2),
    Tissue.RIB_MARROW: _t(230, 230, 232, 231, 40, 20),
    Tissue.CARTILAGE: _t(110, 110, 112, 111, 20, 20),
}

#: Positive oral contrast (a fraction of cases): bowel fluid HU range.
ORAL_CONTRAST_HU = (200.0, 350.0)
#: Fatty liver (a fraction of cases): lower the unenhanced liver by this many HU.
STEATOSIS_DROP_HU = (10.0, 25.0)


@dataclass(frozen=True)
class TumorHU:
    """HU range per phase of a tumour part; ``relative``: offsets from the same case's liver."""

    ranges: tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]
    relative: bool
    texture: float


TUMOR_HU: dict[TumorPart, TumorHU] = {
    TumorPart.HCC_CORE: TumorHU(((-15, -5), (30, 70), (-25, -10), (-28, -12)), True, 10.0),
    TumorPart.HCC_CAPSULE: TumorHU(((-10, -3), (-5, 5), (0, 10), (15, 30)), True, 3.0),
    TumorPart.HCC_NECROSIS: TumorHU(((15, 30),) * 4, False, 4.0),
    TumorPart.META_CORE: TumorHU(((-25, -12), (-30, -15), (-65, -40), (-40, -20)), True, 6.0),
    TumorPart.META_RIM: TumorHU(((-15, -8), (15, 35), (-12, 3), (-20, -8)), True, 5.0),
    TumorPart.META_NECROSIS: TumorHU(((12, 28),) * 4, False, 4.0),
    TumorPart.CYST: TumorHU(((2, 18),) * 4, False, 1.5),
}


@dataclass(frozen=True)
class CaseHU:
    """One case's look-up tables: ``base[p][code]`` and ``texture[p][code]`` for each phase index ``p``."""

    base: np.ndarray  # (4, 256) float32
    texture: np.ndarray  # (4, 256) float32
    bolus: float
    liver: tuple[float, float, float, float]
    oral_contrast: bool
    steatosis: bool

    def tumor_tables(self, parts: dict[int, tuple[TumorPart, float]]) -> tuple[np.ndarray, np.ndarray]:
        """Tables over the tumour byte: ``parts`` maps byte -> (part, u in [0, 1] drawn per tumour)."""
        base = np.zeros((4, 256), np.float32)
        tex = np.zeros((4, 256), np.float32)
        for byte, (part, u) in parts.items():
            spec = TUMOR_HU[part]
            for p in range(4):
                lo, hi = spec.ranges[p]
                value = lo + u * (hi - lo)
                base[p, byte] = value + (self.liver[p] if spec.relative else 0.0)
                tex[p, byte] = spec.texture
        return base, tex


def sample_case_hu(rng: np.random.Generator) -> CaseHU:
    """Draw a case's HU tables: unenhanced values, bolus strength, oral contrast, fatty liver."""
    bolus = float(rng.uniform(0.85, 1.15))
    oral = bool(rng.random() < 0.2)
    steatosis = bool(rng.random() < 0.1)
    base = np.zeros((4, 256), np.float32)
    tex = np.zeros((4, 256), np.float32)
    for tissue, spec in TISSUE_HU.items():
        nc = spec.hu[0] + spec.spread * float(rng.standard_normal())
        if tissue == Tissue.LIVER and steatosis:
            nc -= float(rng.uniform(*STEATOSIS_DROP_HU))
        for p in range(4):
            base[p, tissue] = nc + (spec.hu[p] - spec.hu[0]) * bolus
            tex[p, tissue] = spec.texture[p]
    if oral:
        base[:, Tissue.BOWEL_FLUID] = float(rng.uniform(*ORAL_CONTRAST_HU))
        tex[:, Tissue.BOWEL_FLUID] = 15.0
    base[:, Tissue.PORTAL_OUT] = base[:, Tissue.PORTAL_IN]
    liver = tuple(float(base[p, Tissue.LIVER]) for p in range(4))
    return CaseHU(base, tex, bolus, liver, oral, steatosis)  # type: ignore[arg-type]


def phase_index(phase: Phase) -> int:
    """Row of ``phase`` in the (4, 256) tables."""
    return PHASE_ORDER.index(phase)
