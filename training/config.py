"""Typed, frozen stage configurations saved as ``config.json`` beside each checkpoint.

Every stage has one frozen dataclass deriving from :class:`StageConfig`. Configs are data: they
are validated in ``__post_init__``, written with a ``schema_version`` and read back strictly
(unknown keys and other schema versions are refused, naming the file).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import read_json, write_json

CONFIG_SCHEMA_VERSION = 1

C = TypeVar("C", bound="StageConfig")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of the stage configs; subclasses are frozen dataclasses of plain fields."""

    stage: ClassVar[str] = "stage"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version`` and ``stage``."""
        return {"schema_version": CONFIG_SCHEMA_VERSION, "stage": self.stage, **_plain(dataclasses.asdict(self))}

    def save(self, path: Path) -> None:
        """Write ``config.json`` atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        """Build from a dict, refusing unknown keys, another stage or schema version."""
        data = dict(data)
        version = data.pop("schema_version", None)
        if version != CONFIG_SCHEMA_VERSION:
            raise InputError(f"{source}: expected schema_version {CONFIG_SCHEMA_VERSION}, found {version}")
        stage = data.pop("stage", cls.stage)
        if stage != cls.stage:
            raise InputError(f"{source}: expected a '{cls.stage}' config, found '{stage}'")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InputError(f"{source}: expected only the keys {sorted(fields)}, found unknown {unknown}")
        hints = typing.get_type_hints(cls)
        try:
            return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: expected a valid '{cls.stage}' config, found {exc}") from exc

    @classmethod
    def load(cls: type[C], path: Path) -> C:
        """Read a ``config.json`` written by :meth:`save`."""
        return cls.from_dict(read_json(path), source=str(path))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _coerce(hint: Any, value: Any) -> Any:
    """Turn JSON values back into the annotated types (tuples, enums, paths, optionals)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
    if origin is list:
        return [_coerce(args[0], v) for v in value]
    if origin is dict:
        return {_coerce(args[0], k): _coerce(args[1], v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        if hasattr(hint, "from_dict"):
            return hint.from_dict(value)
        nested = typing.get_type_hints(hint)
        return hint(**{k: _coerce(nested[k], v) for k, v in value.items()})
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value
