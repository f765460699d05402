"""The liver-contact rule chosen on validation cases: the choice follows the data, is saved and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.codes import PHASE_ORDER
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume, write_image
from d4m.runtime.postprocess import PostprocessSettings, clean_labels
from d4m.runtime.preprocess import Normalization
from d4m.runtime.segmentation import SegmentationSpec
from d4m.training import postprocess_choice
from d4m.training.datasets import Case
from d4m.training.postprocess_choice import (
    CONTACT_CANDIDATES,
    POSTPROCESS_NAME,
    PostprocessChoice,
    choose_postprocess,
    run_postprocess,
    save_choice,
)

SPACING = (1.0, 1.0, 1.0)
SPEC = SegmentationSpec(Normalization((-21.0, 189.0), 80.0, 30.0), SPACING, (8, 8, 8))


def _liver() -> np.ndarray:
    labels = np.zeros((12, 24, 24), np.uint8)
    labels[2:10, 4:20, 4:20] = 1
    labels[5:7, 9:12, 9:12] = 2  # an intrahepatic tumour
    return labels


def _surface_blob(labels: np.ndarray) -> np.ndarray:
    """A tumour-labelled blob half in the liver's edge, half outside it (a third to half of its border liver)."""
    out = labels.copy()
    out[4:8, 18:22, 8:12] = 2
    return out


def _case(root: Path, name: str, truth: np.ndarray) -> Case:
    folder = root / name
    images = {}
    for phase in PHASE_ORDER:
        images[phase] = folder / f"{phase.value}.nii.gz"
        write_image(Volume(np.zeros(truth.shape, np.int16), SPACING, (0.0, 0.0, 0.0)), images[phase])
    write_image(Volume(truth, SPACING, (0.0, 0.0, 0.0)), folder / "label.nii.gz")
    return Case(name, images, folder / "label.nii.gz")


def _choose(monkeypatch: pytest.MonkeyPatch, cases: list[Case],
            predictions: dict[str, np.ndarray]) -> PostprocessChoice:
    """``choose_postprocess`` with the network replaced by fixed label maps (one per case)."""
    pending = [c.id for c in cases if c.label is not None]

    def network_labels(volumes, predictor, spec):  # type: ignore[no-untyped-def]
        assert set(volumes) == set(PHASE_ORDER)
        return Volume(predictions[pending.pop(0)], SPACING, (0.0, 0.0, 0.0)), {}

    monkeypatch.setattr(postprocess_choice, "network_labels", network_labels)
    return choose_postprocess(cases, lambda batch: batch, SPEC)


def test_a_false_tumour_on_the_liver_edge_makes_the_rule_stricter(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    truth = _liver()
    predicted = _surface_blob(truth)
    choice = _choose(monkeypatch, [_case(tmp_path, "a", truth)], {"a": predicted})
    contact = choice.settings.min_liver_contact
    assert contact > PostprocessSettings().min_liver_contact
    assert set(choice.scores) == set(CONTACT_CANDIDATES) and choice.cases == 1
    assert choice.scores[contact] == max(choice.scores.values()) == 1.0
    assert choice.scores[0.25] < 1.0
    # the lowest of the best: the next candidate down keeps the blob
    assert choice.scores[max(c for c in CONTACT_CANDIDATES if c < contact)] < 1.0
    np.testing.assert_array_equal(clean_labels(predicted, choice.settings) == 2, truth == 2)


def test_a_true_tumour_on_the_liver_edge_keeps_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = _surface_blob(_liver())  # an exophytic tumour the strict rules would delete
    clean = _liver()
    cases = [_case(tmp_path, "a", truth), _case(tmp_path, "b", clean)]
    choice = _choose(monkeypatch, cases, {"a": truth, "b": clean})
    assert choice.settings == PostprocessSettings()
    assert choice.scores[0.25] == 1.0 and choice.scores[0.9] < 1.0


def test_without_labelled_cases_the_default_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = _choose(monkeypatch, [Case("u", {}, None)], {})
    assert choice == PostprocessChoice(PostprocessSettings(), {}, 0)


def test_the_choice_is_saved_and_read_back(tmp_path: Path) -> None:
    assert run_postprocess(tmp_path) == PostprocessSettings()  # a run from before the choice
    settings = PostprocessSettings(min_liver_contact=0.75)
    path = save_choice(tmp_path, PostprocessChoice(settings, {0.25: 0.4, 0.75: 0.6}, 3))
    assert path == tmp_path / POSTPROCESS_NAME
    data = json.loads(path.read_text())
    assert data["validation_tumor_dice"] == {"0.25": 0.4, "0.75": 0.6} and data["cases"] == 3
    assert run_postprocess(tmp_path) == settings
    path.write_text(json.dumps({"settings": {"min_liver_contact": 0.5, "colour": "red"}}))
    with pytest.raises(InputError, match=f"{path}.*colour"):
        run_postprocess(tmp_path)
    path.write_text("[]")
    with pytest.raises(InputError, match=str(path)):
        run_postprocess(tmp_path)
