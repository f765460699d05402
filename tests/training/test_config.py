"""Stage configs: strict JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path

import pytest

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.training.config import StageConfig


class Flavour(str, Enum):
    A = "a"
    B = "b"


@dataclasses.dataclass(frozen=True)
class ToyConfig(StageConfig):
    stage = "toy"
    data: Path = Path("data")
    window: tuple[float, float] = (-21.0, 189.0)
    phases: tuple[Phase, ...] = (Phase.PVP,)
    flavour: Flavour = Flavour.A
    steps: int = 3
    init: Path | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, found {self.steps}")


def test_round_trip_keeps_types(tmp_path: Path) -> None:
    config = ToyConfig(window=(-100.0, 200.5), phases=(Phase.NC, Phase.DEL), flavour=Flavour.B, init=Path("x.st"))
    config.save(tmp_path / "config.json")
    loaded = ToyConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert isinstance(loaded.phases[0], Phase) and isinstance(loaded.window, tuple)
    assert json.loads((tmp_path / "config.json").read_text())["schema_version"] == 1


def test_unknown_key_and_wrong_version_are_refused(tmp_path: Path) -> None:
    data = ToyConfig().to_dict()
    with pytest.raises(InputError, match=r"unknown \['bogus'\]"):
        ToyConfig.from_dict({**data, "bogus": 1}, source="cfg.json")
    with pytest.raises(InputError, match="cfg.json: expected schema_version 1, found 7"):
        ToyConfig.from_dict({**data, "schema_version": 7}, source="cfg.json")
    with pytest.raises(InputError, match="expected a 'toy' config, found 'other'"):
        ToyConfig.from_dict({**data, "stage": "other"})


def test_validation_error_becomes_input_error() -> None:
    with pytest.raises(InputError, match="steps must be >= 1"):
        ToyConfig.from_dict({**ToyConfig().to_dict(), "steps": 0}, source="cfg.json")
