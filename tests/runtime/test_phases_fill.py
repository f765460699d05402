"""Missing-phase duplication: the nearest-in-time, later-on-tie rule for every subset of phases."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError
from d4m.runtime.phases_fill import fill_missing_phases, fill_source

NC, ART, PVP, DEL = PHASE_ORDER

# The rule written out by hand for every one of the 15 non-empty subsets.
EXPECTED: dict[frozenset[Phase], dict[Phase, Phase]] = {
    frozenset({NC}): {ART: NC, PVP: NC, DEL: NC},
    frozenset({ART}): {NC: ART, PVP: ART, DEL: ART},
    frozenset({PVP}): {NC: PVP, ART: PVP, DEL: PVP},
    frozenset({DEL}): {NC: DEL, ART: DEL, PVP: DEL},
    frozenset({NC, ART}): {PVP: ART, DEL: ART},
    frozenset({NC, PVP}): {ART: PVP, DEL: PVP},
    frozenset({NC, DEL}): {ART: NC, PVP: DEL},
    frozenset({ART, PVP}): {NC: ART, DEL: PVP},
    frozenset({ART, DEL}): {NC: ART, PVP: DEL},
    frozenset({PVP, DEL}): {NC: PVP, ART: PVP},
    frozenset({NC, ART, PVP}): {DEL: PVP},
    frozenset({NC, ART, DEL}): {PVP: DEL},
    frozenset({NC, PVP, DEL}): {ART: PVP},
    frozenset({ART, PVP, DEL}): {NC: ART},
    frozenset({NC, ART, PVP, DEL}): {},
}


def _subsets() -> list[frozenset[Phase]]:
    return [frozenset(c) for n in range(1, 5) for c in combinations(PHASE_ORDER, n)]


def test_table_covers_every_subset() -> None:
    assert set(EXPECTED) == set(_subsets())


@pytest.mark.parametrize("present", _subsets(), ids=lambda s: "+".join(p.value for p in PHASE_ORDER if p in s))
def test_every_subset_follows_the_rule(present: frozenset[Phase]) -> None:
    arrays = {p: np.full((2, 2, 2), PHASE_ORDER.index(p), dtype=np.float32) for p in present}
    filled, duplicated = fill_missing_phases(arrays)
    assert list(filled) == list(PHASE_ORDER)
    assert duplicated == EXPECTED[present]
    for phase in PHASE_ORDER:
        source = duplicated.get(phase, phase)
        assert source in present
        assert filled[phase] is arrays[source]
        assert fill_source(phase, set(present)) == source or phase in present


def test_single_phase_is_copied_four_times() -> None:
    pvp = np.arange(8.0).reshape(2, 2, 2)
    filled, duplicated = fill_missing_phases({"PVP": pvp})
    assert set(duplicated) == {NC, ART, DEL}
    assert np.stack(list(filled.values())).shape == (4, 2, 2, 2)
    assert all(np.array_equal(v, pvp) for v in filled.values())


def test_nothing_present_is_refused() -> None:
    with pytest.raises(InputError, match="at least one present phase"):
        fill_missing_phases({})
