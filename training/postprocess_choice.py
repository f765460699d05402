"""The post-processing of a trained segmenter, chosen on its validation cases (as nnU-Net does).

How strict the "tumours only inside the liver" rule should be depends on the data: a model that
paints false tumours in the liver's neighbours (gallbladder, kidney, bowel) profits from asking
most of a tumour's border to be liver, while a site whose tumours are often exophytic loses
true lesions that way. So the run measures it: each validation case is segmented once, every
candidate ``min_liver_contact`` cleans that same prediction, and the candidate with the best mean
tumour Dice is kept. When the default is among the best it stays; otherwise the lowest of the best
(the one that removes least). The choice and every candidate's score are written to
``RUN/postprocess.json``; ``d4m-train evaluate`` and ``d4m-export`` read it, so the bundle's
manifest carries what the validation chose.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d4m.dicom_io.codes import TUMOR
from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import read_json, write_json
from d4m.runtime.postprocess import PostprocessSettings
from d4m.runtime.segmentation import SegmentationSpec, finish_labels, network_labels
from d4m.runtime.sliding_window import Predictor
from d4m.training.datasets import Case, load_dataset
from d4m.training.evaluation import dice, image_on_label_grid, load_segmenter, shared_phases

logger = logging.getLogger(__name__)

#: File of a segmenter run folder that holds the chosen post-processing.
POSTPROCESS_NAME = "postprocess.json"

#: ``min_liver_contact`` values tried: none, a quarter (the default), half, three quarters, nearly all.
CONTACT_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 0.9)


@dataclasses.dataclass(frozen=True)
class PostprocessChoice:
    """The chosen settings and the evidence behind them.

    Attributes
    ----------
    settings
        What :func:`d4m.runtime.postprocess.clean_labels` runs for this model.
    scores
        ``min_liver_contact`` candidate → mean tumour Dice over the validation cases.
    cases
        Validation cases the scores are over (0: nothing to choose on, the default is kept).
    """

    settings: PostprocessSettings
    scores: dict[float, float]
    cases: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": "d4m-postprocess-choice", "settings": self.settings.to_dict(), "cases": self.cases,
                "validation_tumor_dice": {str(k): v for k, v in self.scores.items()}}


def choose_postprocess(
    cases: Sequence[Case],
    predictor: Predictor,
    spec: SegmentationSpec,
    candidates: Sequence[float] = CONTACT_CANDIDATES,
) -> PostprocessChoice:
    """Pick ``min_liver_contact`` by mean tumour Dice on labelled cases (the phases they all have).

    The other settings are those of ``spec.postprocess`` (the default when ``None``).
    """
    base = spec.postprocess or PostprocessSettings()
    cases = [c for c in cases if c.label is not None]
    if not cases:
        return PostprocessChoice(base, {}, 0)
    phases = shared_phases(cases)
    per_case: dict[float, list[float]] = {c: [] for c in candidates}
    for case in cases:
        label = case.read_label()
        truth = label.array == TUMOR.value
        raw, _ = network_labels({p: image_on_label_grid(case, p, label) for p in phases}, predictor, spec)
        for contact in candidates:
            settings = dataclasses.replace(base, min_liver_contact=contact)
            per_case[contact].append(dice(finish_labels(raw, settings, label).array == TUMOR.value, truth))
    scores = {c: float(np.mean(v)) for c, v in per_case.items()}
    best = max(scores.values())
    if scores.get(base.min_liver_contact, -1.0) >= best - 1e-9:
        contact = base.min_liver_contact
    else:
        contact = min(c for c, v in scores.items() if v >= best - 1e-9)
    logger.info("post-processing: min_liver_contact %.2f (validation tumour Dice %s)", contact,
                ", ".join(f"{c:g}: {v:.3f}" for c, v in scores.items()))
    return PostprocessChoice(dataclasses.replace(base, min_liver_contact=contact), scores, len(cases))


def choose_for_run(folder: Path, data: Path | None = None, split: str = "val", device: str = "auto") -> Path:
    """Choose (again) the post-processing of a trained run on a split of a dataset; write ``postprocess.json``.

    ``data`` defaults to the run's training dataset, ``split`` to its validation cases (never
    its test cases: the choice must not see what the run is scored on).

    Raises
    ------
    InputError
        A bad run folder or dataset, or no labelled case in that split.
    """
    from d4m.training.segmenter_data import split_cases

    config, predictor, spec = load_segmenter(folder, device=device)
    dataset = load_dataset(data or config.data)
    cases = list(dataset.cases) if split == "all" else split_cases(dataset, config.split, config.seed)[split]
    choice = choose_postprocess(cases, predictor, spec)
    if not choice.cases:
        raise InputError(f"{data or config.data}: expected labelled cases in the '{split}' split, found none")
    return save_choice(folder, choice)


def save_choice(folder: Path, choice: PostprocessChoice) -> Path:
    """Write ``folder/postprocess.json`` atomically."""
    path = folder / POSTPROCESS_NAME
    write_json(path, choice.to_dict())
    return path


def run_postprocess(folder: Path) -> PostprocessSettings:
    """The post-processing of a segmenter run: its ``postprocess.json``, or the defaults when it has none.

    Raises
    ------
    InputError
        A ``postprocess.json`` that is not a choice written by :func:`save_choice`.
    """
    path = folder / POSTPROCESS_NAME
    if not path.is_file():
        return PostprocessSettings()
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise InputError(f"{path}: expected a post-processing choice with 'settings', found {type(data).__name__}")
    try:
        return PostprocessSettings.from_dict(data["settings"])
    except (InputError, TypeError) as exc:
        raise InputError(f"{path}: {exc}") from exc
