"""Fill missing contrast phases by duplicating present ones, as the paper does at inference.

The segmenter always takes four channels (NC, ART, PVP, DEL). Diff4MMLiTS (Sec. III-C)
duplicates present phases into the missing ones; with a single phase it is copied four times.
The paper does not say which phase fills which when several are present; d4m's rule is:

    each missing phase is copied from the present phase nearest to it in acquisition order
    NC → ART → PVP → DEL; on a tie (one step before and one after), the later phase wins.

The later phase wins a tie because contrast-enhanced phases resemble each other more than
they resemble the non-contrast scan, and PVP (the annotated phase) resembles DEL more than
ART. So: a missing ART with NC and PVP present comes from PVP; a missing PVP with ART and DEL
present comes from DEL; a missing NC comes from the earliest present phase; a missing DEL from
the latest. Only present phases are ever copied (never an already filled one), so the result
does not depend on the order in which phases are filled. Training's phase dropout uses this
same function, so a model sees at training time exactly the fills it meets at a site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TypeVar

from d4m.dicom_io.codes import PHASE_ORDER, Phase
from d4m.dicom_io.errors import InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def fill_source(missing: Phase | str, present: set[Phase] | frozenset[Phase]) -> Phase:
    """The present phase that fills ``missing`` under the nearest-in-time, later-on-tie rule.

    Raises
    ------
    InputError
        No phase is present.
    """
    missing = Phase(missing)
    if not present:
        raise InputError("phases: expected at least one present phase, found none")
    position = PHASE_ORDER.index(missing)
    # sort key: distance in acquisition order, then prefer the later phase (negative position)
    return min(present, key=lambda p: (abs(PHASE_ORDER.index(p) - position), -PHASE_ORDER.index(p)))


def fill_missing_phases(present: Mapping[Phase, T]) -> tuple[dict[Phase, T], dict[Phase, Phase]]:
    """Complete a phase → data mapping to all four phases by duplicating present entries.

    Works for any value type (arrays, volumes, paths); values are shared, not copied.

    Parameters
    ----------
    present
        The phases that were acquired (keys may be :class:`Phase` or their string values).

    Returns
    -------
    filled
        One entry per phase of :data:`PHASE_ORDER`, in that order.
    duplicated
        ``{missing phase: present phase it was copied from}``; empty when nothing was missing.

    Raises
    ------
    InputError
        ``present`` is empty.
    """
    given = {Phase(p): v for p, v in present.items()}
    if not given:
        raise InputError("phases: expected at least one present phase, found none")
    available = frozenset(given)
    filled: dict[Phase, T] = {}
    duplicated: dict[Phase, Phase] = {}
    for phase in PHASE_ORDER:
        if phase in given:
            filled[phase] = given[phase]
        else:
            source = fill_source(phase, available)
            filled[phase] = given[source]
            duplicated[phase] = source
    if duplicated:
        logger.debug("duplicated phases: %s", {m.value: s.value for m, s in duplicated.items()})
    return filled, duplicated
