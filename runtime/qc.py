"""The QC picture of a run (``qc.png``): axial slices through the largest tumours, one column per phase.

Rows are the slices through the centres of the (up to) three largest tumours, or the slice with
the largest liver area when no tumour was found. Columns are the phases in channel order, each on
the reference grid after registration, windowed to ``WINDOW`` HU, with the liver outlined in its
label colour and tumours in theirs. A phase filled by duplication shows the image that was copied
into it and is captioned ``NC=PVP``-style. Captions use a built-in 3×5 pixel font.

The PNG is written by a minimal encoder (zlib + CRC, 8-bit RGB, filter 0): the runtime does not
depend on Pillow or matplotlib.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from d4m.dicom_io.codes import LIVER, PHASE_ORDER, TUMOR, Phase
from d4m.dicom_io.errors import InputError
from d4m.dicom_io.volume import Volume

logger = logging.getLogger(__name__)

#: HU window of the QC picture (soft tissue, liver).
WINDOW: tuple[float, float] = (-160.0, 240.0)
#: Most rows (tumour slices) drawn.
MAX_ROWS = 3
_CELL = 256  # target panel size in pixels (nearest-neighbour zoom or stride)
_GAP = 4
_CAPTION = 13  # caption band height in pixels
_FONT_SCALE = 2
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3×5 glyphs, one string of 15 bits per character (rows top to bottom, '1' = ink).
_GLYPHS: dict[str, str] = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101011001", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100110101010", "7": "111001010010010", "8": "010101010101010", "9": "010101011001110",
    " ": "000000000000000", "=": "000111000111000", "-": "000000111000000", ".": "000000000000010",
    ":": "000010000010000", "#": "101111101111101", "/": "001001010100100",
}  # fmt: skip


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``(height, width, 3)`` uint8 image as PNG bytes (8-bit RGB, no interlace).

    Raises
    ------
    InputError
        Not an ``(h, w, 3)`` uint8 array with at least one pixel.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise InputError(f"PNG: expected a non-empty (height, width, 3) uint8 image, found {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), np.ascontiguousarray(rgb).reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(
        b"IEND", b""
    )


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG written by :func:`encode_png` (8-bit RGB, filter 0 only), for tests and checks.

    Raises
    ------
    InputError
        Not such a PNG, or a chunk fails its CRC.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise InputError("PNG: expected the PNG signature, found other bytes")
    pos, idat, size = len(_PNG_SIGNATURE), b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise InputError(f"PNG: expected a valid CRC in chunk {kind!r}, found a mismatch")
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            if (depth, colour) != (8, 2):
                raise InputError(f"PNG: expected 8-bit RGB, found depth {depth} colour type {colour}")
            size = (height, width)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(size[0], 1 + size[1] * 3)
    if np.any(raw[:, 0]):
        raise InputError("PNG: expected filter type 0 on every row, found others")
    return raw[:, 1:].reshape(size[0], size[1], 3).copy()


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB image as PNG atomically (temporary file, then rename)."""
    data = encode_png(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def draw_text(image: np.ndarray, text: str, row: int, col: int, colour: tuple[int, int, int] = (255, 255, 255),
              scale: int = _FONT_SCALE) -> None:
    """Draw ``text`` (upper-cased; unknown characters as ``#``) into ``image`` in place, clipped at its edges."""
    x = col
    for char in text.upper():
        bits = _GLYPHS.get(char, _GLYPHS["#"])
        glyph = np.array([b == "1" for b in bits], dtype=bool).reshape(5, 3)
        glyph = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        h = min(glyph.shape[0], image.shape[0] - row)
        w = min(glyph.shape[1], image.shape[1] - x)
        if h <= 0 or w <= 0:
            break
        image[row:row + h, x:x + w][glyph[:h, :w]] = colour
        x += 4 * scale


def qc_slices(labels: np.ndarray, tumor_centres_k: Sequence[float], max_rows: int = MAX_ROWS) -> list[int]:
    """Axial slice indices to show: through the largest tumours (distinct slices), else the widest liver.

    Parameters
    ----------
    labels
        ``(z, y, x)`` label map on the reference grid.
    tumor_centres_k
        Slice coordinate (``k``) of each tumour's centre, largest tumour first.
    max_rows
        At most this many slices.
    """
    depth = labels.shape[0]
    chosen: list[int] = []
    for centre in tumor_centres_k:
        k = int(np.clip(round(float(centre)), 0, depth - 1))
        if k not in chosen:
            chosen.append(k)
        if len(chosen) == max_rows:
            break
    if not chosen:
        area = (labels > 0).sum(axis=(1, 2))
        chosen.append(int(np.argmax(area)) if area.any() else depth // 2)
    return chosen


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _zoom(array: np.ndarray) -> np.ndarray:
    """Nearest-neighbour zoom (small slices) or striding (large ones) towards ``_CELL`` pixels."""
    largest = max(array.shape[:2])
    if largest < _CELL // 2:
        factor = _CELL // largest
        return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)
    if largest > 2 * _CELL:
        step = largest // _CELL
        return array[::step, ::step]
    return array


def _panel(hu: np.ndarray, labels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    gray = np.clip((hu.astype(np.float32) - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    gray, labels = _zoom(gray), _zoom(labels)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgb[_outline(labels > 0)] = LIVER.rgb
    rgb[_outline(labels == TUMOR.value)] = TUMOR.rgb
    return rgb


def render_qc(
    images: Mapping[Phase, Volume],
    labels: Volume,
    tumor_centres_k: Sequence[float] = (),
    duplicated: Mapping[Phase, Phase] | None = None,
    window: tuple[float, float] = WINDOW,
) -> np.ndarray:
    """Compose the QC picture as an RGB array.

    Parameters
    ----------
    images
        The present phases on the grid of ``labels`` (after registration), in HU.
    labels
        Label map on the reference grid.
    tumor_centres_k
        Slice coordinate of each tumour centre, largest first (from the report's measurements).
    duplicated
        Missing phase → the present phase copied into it (those columns show that image).
    window
        HU window.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8.

    Raises
    ------
    InputError
        No image given, or an image not on the grid of ``labels``.
    """
    duplicated = dict(duplicated or {})
    if not images:
        raise InputError("QC: expected at least one phase image, found none")
    for phase, volume in images.items():
        if not volume.same_grid(labels):
            raise InputError(f"QC: expected {phase.value} on the label grid {labels.shape}, found {volume.shape}")
    columns = [p for p in PHASE_ORDER if p in images or duplicated.get(p) in images]
    rows = qc_slices(labels.array, tumor_centres_k)
    blocks = []
    for k in rows:
        panels = []
        for phase in columns:
            source = phase if phase in images else duplicated[phase]
            panel = _panel(images[source].array[k], labels.array[k], window)
            band = np.zeros((_CAPTION, panel.shape[1], 3), np.uint8)
            caption = phase.value if source == phase else f"{phase.value}={source.value}"
            draw_text(band, f"{caption} K{k}", 2, 3, (255, 255, 255) if source == phase else (255, 170, 0))
            panels.append(np.concatenate([band, panel], axis=0))
        height = max(p.shape[0] for p in panels)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, _GAP), (0, 0))) for p in panels]
        blocks.append(np.pad(np.concatenate(padded, axis=1), ((0, _GAP), (0, 0), (0, 0))))
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0))) for b in blocks], axis=0)


def write_qc(
    path: Path,
    images: Mapping[Phase, Volume],
    labels: Volume,
    tumor_centres_k: Sequence[float] = (),
    duplicated: Mapping[Phase, Phase] | None = None,
) -> Path:
    """Render (:func:`render_qc`) and write ``qc.png``; returns ``path``."""
    picture = render_qc(images, labels, tumor_centres_k, duplicated)
    write_png(path, picture)
    logger.info("wrote %s (%dx%d)", path.name, picture.shape[1], picture.shape[0])
    return path
