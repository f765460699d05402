"""qc.png: a valid PNG without Pillow, slices through the largest tumours, one column per phase."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest

from d4m.dicom_io.codes import LIVER, TUMOR, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume
from d4m.runtime.qc import decode_png, draw_text, encode_png, qc_slices, render_qc, write_qc


def _has(picture: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool(np.any(np.all(picture == np.asarray(rgb, np.uint8), axis=-1)))


def _grid(array: np.ndarray) -> Volume:
    return Volume(array, (1.5, 1.5, 3.0), (0.0, 0.0, 0.0))


def _study() -> tuple[dict[Phase, Volume], Volume]:
    labels = np.zeros((10, 32, 32), np.uint8)
    labels[2:9, 4:28, 4:28] = LIVER.value
    labels[6:9, 10:18, 10:18] = TUMOR.value
    images = {p: _grid(np.full((10, 32, 32), 40.0 * (n + 1), np.float32)) for n, p in enumerate((Phase.NC, Phase.PVP))}
    return images, _grid(labels)


def test_png_round_trip_and_crc() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_png(data), rgb)
    broken = bytearray(data)
    broken[-20] ^= 0xFF  # inside the IDAT chunk
    with pytest.raises(InputError, match="CRC"):
        decode_png(bytes(broken))


def test_png_readable_by_an_independent_decoder() -> None:
    image_module = pytest.importorskip("PIL.Image")
    rgb = np.zeros((5, 9, 3), np.uint8)
    rgb[2, 3] = (255, 0, 10)
    decoded = image_module.open(io.BytesIO(encode_png(rgb)))
    assert decoded.mode == "RGB" and decoded.size == (9, 5)
    assert np.array_equal(np.asarray(decoded), rgb)


def test_encode_refuses_other_arrays() -> None:
    with pytest.raises(InputError, match=r"expected a non-empty \(height, width, 3\) uint8 image"):
        encode_png(np.zeros((4, 4), np.uint8))


def test_slices_follow_the_largest_tumours_then_the_liver() -> None:
    labels = np.zeros((20, 8, 8), np.uint8)
    labels[5:15] = 1
    assert qc_slices(labels, [12.4, 12.2, 3.0, 17.0, 9.0]) == [12, 3, 17]
    assert qc_slices(labels, [25.0]) == [19]
    labels[9, :, :] = 1
    labels[9, 0, 0] = 0
    widest = np.zeros((20, 8, 8), np.uint8)
    widest[7, :4, :4] = 1
    widest[11, :6, :6] = 1
    assert qc_slices(widest, []) == [11]
    assert qc_slices(np.zeros((6, 4, 4), np.uint8), []) == [3]


def test_render_has_one_column_per_phase_and_outlines() -> None:
    images, labels = _study()
    picture = render_qc(images, labels, [7.0], duplicated={Phase.ART: Phase.PVP, Phase.DEL: Phase.PVP})
    assert picture.dtype == np.uint8 and picture.ndim == 3
    one_column = render_qc({Phase.PVP: images[Phase.PVP]}, labels, [7.0])
    assert picture.shape[0] == one_column.shape[0]
    assert picture.shape[1] == pytest.approx(4 * one_column.shape[1], rel=0.01)
    assert _has(picture, LIVER.rgb) and _has(picture, TUMOR.rgb)
    assert _has(picture, (255, 170, 0))  # the caption colour of a duplicated phase
    assert not _has(one_column, (255, 170, 0))


def test_no_tumour_row_shows_the_widest_liver_without_tumour_colour() -> None:
    images, labels = _study()
    clean = labels.with_array(np.where(labels.array == TUMOR.value, LIVER.value, labels.array).astype(np.uint8))
    picture = render_qc(images, clean, [])
    assert _has(picture, LIVER.rgb) and not _has(picture, TUMOR.rgb)


def test_render_refuses_an_image_off_the_label_grid() -> None:
    images, labels = _study()
    images[Phase.ART] = Volume(np.zeros((10, 32, 31), np.float32), (1.5, 1.5, 3.0), (0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="QC: expected ART on the label grid"):
        render_qc(images, labels)


def test_write_qc_writes_a_png_and_nothing_else(tmp_path: Path) -> None:
    images, labels = _study()
    path = write_qc(tmp_path / "qc.png", images, labels, [7.0])
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]
    data = path.read_bytes()
    assert decode_png(data).shape[2] == 3
    assert zlib.crc32(b"IEND") & 0xFFFFFFFF == int.from_bytes(data[-4:], "big")


def test_text_draws_ink_and_clips_at_the_edge() -> None:
    canvas = np.zeros((12, 20, 3), np.uint8)
    draw_text(canvas, "PVP=DEL 12", 1, 1)
    assert canvas.any()
    inked = np.count_nonzero(canvas.any(axis=2))
    empty = np.zeros((12, 20, 3), np.uint8)
    draw_text(empty, "  ", 1, 1)
    assert inked > 0 and not empty.any()
