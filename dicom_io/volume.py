"""A 3D image with its patient-space geometry: the one array type that leaves every d4m reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from d4m.dicom_io.errors import InputError


@dataclass(frozen=True)
class Volume:
    """A voxel array and the geometry that places it in DICOM patient space (LPS, millimetres).

    Conventions follow SimpleITK: ``array`` is indexed ``[k, j, i]`` (slice, row, column);
    ``spacing`` and ``origin`` are given in ``(i, j, k)`` / ``(x, y, z)`` order; the columns of
    ``direction`` are the unit vectors of the ``i``, ``j`` and ``k`` axes in LPS.

    Attributes
    ----------
    array
        Voxel values, shape ``(nk, nj, ni)``.
    spacing
        Voxel size along ``i``, ``j``, ``k`` in mm.
    origin
        LPS position of voxel ``[0, 0, 0]`` in mm.
    direction
        3×3 direction-cosine matrix, columns = axes ``i``, ``j``, ``k``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"volume: expected a 3D array, found shape {self.array.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise InputError(f"volume: expected three positive spacings, found {self.spacing}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InputError(f"volume: expected an orthonormal direction matrix, found {direction.tolist()}")
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(nk, nj, ni)``."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping ``(i, j, k, 1)`` voxel indices to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around another array of the same shape."""
        if array.shape != self.array.shape:
            raise InputError(f"volume: expected an array of shape {self.array.shape}, found {array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def same_grid(self, other: Volume, atol: float = 1e-3) -> bool:
        """Whether ``other`` has this shape and geometry (within ``atol`` mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this geometry (the array is copied)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """A volume from a 3D SimpleITK image, geometry included."""
        if image.GetDimension() != 3:
            raise InputError(f"image: expected 3 dimensions, found {image.GetDimension()}")
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.asarray(image.GetDirection()).reshape(3, 3),
        )


def read_image(path: Path) -> Volume:
    """Read a NIfTI / NRRD / MHA file (anything SimpleITK reads) with its geometry in LPS.

    Raises
    ------
    InputError
        The file is missing or not a readable 3D image.
    """
    if not path.is_file():
        raise InputError(f"{path}: expected an image file, found nothing")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: expected a 3D image SimpleITK can read, found an unreadable file") from exc
    return Volume.from_sitk(image)


def write_image(volume: Volume, path: Path, compress: bool = True) -> None:
    """Write a volume as NIfTI (or any SimpleITK format, by suffix), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name}.partial{suffix}")
    sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=compress)
    tmp.replace(path)
