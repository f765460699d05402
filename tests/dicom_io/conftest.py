"""Small synthetic CT volumes and series for the DICOM I/O tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from d4m.dicom_io.ct_writer import CTSeriesMeta, write_ct_series
from d4m.dicom_io.volume import Volume

#: Identity of the phantom; tests check these strings never reach an error message.
PATIENT_NAME = "SECRETNAME^PHANTOM"
PATIENT_ID = "PID-SECRET-4711"

#: Direction of a feet-first supine series as scanners write it: rows to patient right, k to the feet.
FEET_FIRST = np.diag([-1.0, 1.0, -1.0])
HEAD_FIRST = np.eye(3)


def synthetic_volume(
    direction: np.ndarray = FEET_FIRST,
    shape: tuple[int, int, int] = (20, 64, 48),
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    origin: tuple[float, float, float] = (-120.3, 33.7, 512.25),
    seed: int = 0,
) -> Volume:
    """Integer HU noise plus a bright off-centre block, so any flip or shift changes the array."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 400, size=shape).astype(np.float32)
    array[2:7, 5:20, 30:44] = 1500.0
    return Volume(array, spacing, origin, direction)


@pytest.fixture
def phantom_meta() -> CTSeriesMeta:
    """A contrast series with the secret identity."""
    return CTSeriesMeta(
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        series_number=3,
        description="PVP 1.5mm",
        contrast_agent="Iomeprol 350",
        contrast_start_time="101400",
        acquisition_time="101530.250000",
    )


@pytest.fixture
def volume() -> Volume:
    """The default feet-first synthetic volume."""
    return synthetic_volume()


@pytest.fixture
def ct_series(tmp_path: Path, volume: Volume, phantom_meta: CTSeriesMeta) -> tuple[Path, list[Path], Volume]:
    """A written series: (study folder, files in k order, the volume written)."""
    root = tmp_path / "study"
    files = write_ct_series(volume, root / "series3", phantom_meta)
    return root, files, volume


@pytest.fixture
def edit_file() -> Callable[..., None]:
    """Rewrite one DICOM file after applying ``change(dataset)``."""

    def edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)

    return edit


@pytest.fixture
def make_volume() -> Callable[..., Volume]:
    """The :func:`synthetic_volume` factory (test modules cannot import conftest)."""
    return synthetic_volume
