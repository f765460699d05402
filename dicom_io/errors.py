"""The d4m error hierarchy: each class maps to one exit code of the command-line tools."""

from __future__ import annotations


class D4MError(Exception):
    """Base of every error d4m raises on purpose.

    Messages read ``"<file or series>: expected <X>, found <Y>"`` and never hold patient identifiers.
    """

    exit_code: int = 1


class InputError(D4MError):
    """The input (a DICOM folder, a dataset, a configuration) is not what d4m can use."""

    exit_code = 2


class BundleError(D4MError):
    """A model bundle is missing, tampered with or of another schema version."""

    exit_code = 3


class EngineError(D4MError):
    """An inference engine (ONNX Runtime, TensorRT) is unavailable or failed to run."""

    exit_code = 4


def require(module: str, feature: str, extra: str):  # noqa: ANN201 - returns a module
    """Import an optional dependency, or raise :class:`EngineError` naming the feature and extra.

    Parameters
    ----------
    module
        Importable module name, e.g. ``"tensorrt"``.
    feature
        What needs it, e.g. ``"TensorRT engines"``.
    extra
        The pip extra that installs it, e.g. ``"gpu"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(
            f"{feature}: expected the optional dependency '{module}' (pip install 'd4m[{extra}]'), "
            f"found it missing ({exc})"
        ) from exc
