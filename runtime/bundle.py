"""The model bundle on disk: loading, hashing, zips and engine selection (no torch).

A bundle is a folder, or a ``.zip`` of one, holding ``manifest.json`` (its schema is
:mod:`d4m.runtime.manifest`) and the files it lists::

    manifest.json                 schema_version, phases, preprocessing, sliding window, labels,
                                  post-processing, engines, golden, other files, provenance
    segmenter.onnx                the MS network (ONNX)
    segmenter.<gpu>.fp16.plan     optional TensorRT engine, tied to one GPU model and TensorRT version
    golden/input.npy, output.npy  a small input and the reference output
    parity.json, synthesizer/...  any other listed file

Every file the manifest lists carries its sha256. :func:`load_bundle` checks everything before
anything runs: the schema version, unknown or missing keys, value ranges, that every listed
file exists inside the bundle and matches its hash. A TensorRT engine built for another
TensorRT version or GPU is not an error at load time: it is marked unusable with the reason,
and only asking for it (``Bundle.engine("tensorrt")``, ``--device tensorrt``) fails.

The bundle's identity (``Bundle.sha256``, written into every report) is the sha256 of
``manifest.json``, which itself holds the hash of every file: the same bundle zipped or not
has the same identity.

The manifest's types are re-exported here, so ``from d4m.runtime.bundle import Manifest`` works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d4m.dicom_io.errors import BundleError, EngineError
from d4m.runtime.artifacts import write_json
from d4m.runtime.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SEGMENTER,
    EngineEntry,
    FileRef,
    Golden,
    Manifest,
    Precision,
    Preprocessing,
    SlidingWindow,
    TensorEntry,
    as_enum,
    check_relative,
)
from d4m.runtime.runners import (
    ClosingContext,
    Device,
    EngineKind,
    GpuEnvironment,
    OnnxRuntimeRunner,
    TensorRTRunner,
    gpu_environment,
    resolve_device,
)

__all__ = [
    "MANIFEST_NAME", "MAX_UNZIPPED_BYTES", "SCHEMA_VERSION", "SEGMENTER", "Bundle", "EngineEntry", "EngineStatus",
    "FileRef", "Golden", "Manifest", "Precision", "Preprocessing", "SlidingWindow", "TensorEntry", "engine_status",
    "file_ref", "load_bundle", "sha256_file", "write_manifest",
]

logger = logging.getLogger(__name__)

#: Refuse zip bundles that would extract to more than this (a zip bomb, not a model).
MAX_UNZIPPED_BYTES = 32 * 1024**3


# --------------------------------------------------------------------------- files and hashes


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks.

    Raises
    ------
    BundleError
        The file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as fp:
            while block := fp.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise BundleError(f"{path}: expected a readable file, found {type(exc).__name__}") from exc
    return digest.hexdigest()


def file_ref(bundle_dir: Path, file: str) -> FileRef:
    """A :class:`FileRef` for a file already written into the bundle folder (hash computed now).

    Raises
    ------
    BundleError
        The path leaves the bundle or the file is missing.
    """
    check_relative(file)
    path = Path(bundle_dir) / file
    if not path.is_file():
        raise BundleError(f"{path}: expected a bundle file, found nothing")
    return FileRef(file, sha256_file(path))


def _verify_files(root: Path, manifest: Manifest, name: str) -> None:
    """Every listed file exists inside ``root`` and matches its hash."""
    real_root = root.resolve()
    for ref in manifest.all_files():
        path = root / ref.file
        shown = f"{name}/{ref.file}"
        if not path.resolve().is_relative_to(real_root):
            raise BundleError(f"{shown}: expected a file inside the bundle, found a link leading outside it")
        if not path.is_file():
            raise BundleError(f"{shown}: expected the file listed in {MANIFEST_NAME} (sha256 {ref.sha256}), "
                              f"found nothing")
        actual = sha256_file(path)
        if actual != ref.sha256:
            raise BundleError(f"{shown}: expected sha256 {ref.sha256}, found {actual} "
                              f"(the file differs from the exported one)")


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically after checking every listed file against its hash.

    Parameters
    ----------
    bundle_dir
        The bundle folder, already holding the listed files.
    manifest
        What to write.

    Returns
    -------
    Path
        The written ``manifest.json``.

    Raises
    ------
    BundleError
        A listed file is missing or its hash differs.
    """
    bundle_dir = Path(bundle_dir)
    _verify_files(bundle_dir, manifest, str(bundle_dir))
    path = bundle_dir / MANIFEST_NAME
    write_json(path, manifest.to_dict())
    logger.info("wrote %s (%d engines)", path, len(manifest.engines))
    return path


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class EngineStatus:
    """Whether an engine of the bundle can run here.

    Attributes
    ----------
    entry
        The engine.
    usable
        Whether it can run on this machine.
    reason
        Why not (empty when usable).
    """

    entry: EngineEntry
    usable: bool
    reason: str = ""


def engine_status(entry: EngineEntry, environment: GpuEnvironment | None) -> EngineStatus:
    """Whether ``entry`` can run given this machine's TensorRT/GPU (ONNX models always can)."""
    if entry.format == EngineKind.ONNX:
        return EngineStatus(entry, True)
    built = f"TensorRT {entry.tensorrt_version} on {entry.gpu_name} (compute {entry.compute_capability})"
    if environment is None:
        return EngineStatus(entry, False, f"{entry.file}: expected {built}, found no TensorRT/cuda-python or no "
                                          f"GPU here (pip install 'd4m[gpu]' on a GPU machine)")
    here = (f"TensorRT {environment.tensorrt_version} on {environment.gpu_name} "
            f"(compute {environment.compute_capability})")
    if (entry.tensorrt_version != environment.tensorrt_version or entry.gpu_name != environment.gpu_name
            or entry.compute_capability != environment.compute_capability):
        return EngineStatus(entry, False, f"{entry.file}: expected {built}, found {here}; rebuild the engine here "
                                          f"(d4m-export) or use the ONNX model")
    return EngineStatus(entry, True)


class Bundle(ClosingContext):
    """A loaded, verified bundle; use it as a context manager so a zip's temporary copy is removed.

    Attributes
    ----------
    source
        The folder or ``.zip`` given to :func:`load_bundle`.
    root
        The folder holding the files (a temporary folder for a zip).
    manifest
        The parsed manifest.
    sha256
        The bundle's identity: the sha256 of ``manifest.json``.
    status
        Usability of each engine on this machine, in manifest order.
    """

    def __init__(
        self,
        source: Path,
        root: Path,
        manifest: Manifest,
        sha256: str,
        status: tuple[EngineStatus, ...],
        tmp: tempfile.TemporaryDirectory[str] | None = None,
    ) -> None:
        self.source, self.root, self.manifest, self.sha256, self.status = source, root, manifest, sha256, status
        self._tmp = tmp

    def close(self) -> None:
        """Remove the temporary copy of a zip bundle (no-op for a folder)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def path(self, file: str | EngineEntry | FileRef) -> Path:
        """Where a listed file is on disk."""
        return self.root / (file if isinstance(file, str) else file.file)

    def usable(self, kind: EngineKind | str, name: str = SEGMENTER) -> list[EngineEntry]:
        """Engines of this kind and name that can run here, in manifest order."""
        kind = as_enum(EngineKind, kind, "engine kind")
        return [s.entry for s in self.status if s.usable and s.entry.format == kind and s.entry.name == name]

    def engine(self, kind: EngineKind | str, name: str = SEGMENTER, precision: Precision | str | None = None
               ) -> EngineEntry:
        """The engine to run for ``kind``: the asked precision, else fp16 for TensorRT and fp32 for ONNX.

        Raises
        ------
        BundleError
            The bundle lists no engine of this kind, name (and precision).
        EngineError
            It lists some, but none can run here (the reasons are given).
        """
        kind = as_enum(EngineKind, kind, "engine kind")
        wanted = None if precision is None else as_enum(Precision, precision, "precision")
        listed = [s for s in self.status if s.entry.format == kind and s.entry.name == name
                  and (wanted is None or s.entry.precision == wanted)]
        if not listed:
            have = [f"{e.file} ({e.format.value}, {e.precision.value})" for e in self.manifest.engines
                    if e.name == name]
            what = f"a {kind.value} engine for '{name}'" + ("" if wanted is None else f" in {wanted.value}")
            raise BundleError(f"{self.source}: expected {what}, found {have or 'none'}")
        usable = [s.entry for s in listed if s.usable]
        if not usable:
            raise EngineError("; ".join(s.reason for s in listed))
        prefer = Precision.FP16 if kind == EngineKind.TENSORRT else Precision.FP32
        return sorted(usable, key=lambda e: e.precision != prefer)[0]

    def select(self, device: Device | str = Device.AUTO, name: str = SEGMENTER) -> tuple[Device, EngineEntry]:
        """Resolve ``device`` (``auto``: usable TensorRT engine, else CUDA, else CPU) and pick the engine.

        Raises
        ------
        BundleError, EngineError
            See :meth:`engine`; also EngineError for ``tensorrt`` when the bundle holds no
            TensorRT engine (exit 4: the engine is unavailable, the bundle is not bad).
        """
        resolved = resolve_device(device, tensorrt_usable=bool(self.usable(EngineKind.TENSORRT, name)))
        kind = EngineKind.TENSORRT if resolved == Device.TENSORRT else EngineKind.ONNX
        if kind == EngineKind.TENSORRT and not any(
                e.format == kind and e.name == name for e in self.manifest.engines):
            # The bundle is fine (it may carry ONNX only): the engine asked for is what is unavailable.
            raise EngineError(f"{self.source.name}: expected a TensorRT engine for '{name}' (--device tensorrt), "
                              "found none in the bundle; use --device cpu or cuda, or add one with d4m-export")
        return resolved, self.engine(kind, name)

    def open_runner(
        self, device: Device | str = Device.AUTO, threads: int | None = None, name: str = SEGMENTER
    ) -> OnnxRuntimeRunner | TensorRTRunner:
        """Open the runner :meth:`select` picks and check its tensors against the manifest.

        ``auto`` tolerates ONNX Runtime's CPU fallback (the runner's ``providers`` say what ran);
        an explicit ``cuda`` does not.

        Raises
        ------
        BundleError
            No engine of the needed kind.
        EngineError
            The engine cannot open here, or its tensors differ from the manifest.
        """
        resolved, entry = self.select(device, name)
        runner: OnnxRuntimeRunner | TensorRTRunner
        if resolved == Device.TENSORRT:
            runner = TensorRTRunner(self.path(entry))
        else:
            auto = as_enum(Device, device, "device") == Device.AUTO
            runner = OnnxRuntimeRunner(self.path(entry), device=resolved, threads=threads,
                                       allow_cpu_fallback=auto)
        wants, gots = (*entry.inputs, *entry.outputs), (*runner.inputs, *runner.outputs)
        same = len(wants) == len(gots) and all(
            w.name == g.name and w.dtype == str(g.dtype) and len(w.shape) == len(g.shape)
            and all(a == b for a, b in zip(w.shape, g.shape, strict=True) if isinstance(a, int) and isinstance(b, int))
            for w, g in zip(wants, gots, strict=False))
        if not same:
            runner.close()
            declared = ", ".join(f"{t.name}: {t.dtype}[{', '.join(map(str, t.shape))}]" for t in wants)
            raise EngineError(f"{entry.file}: expected the tensors of {MANIFEST_NAME} ({declared}), "
                              f"found {', '.join(g.describe() for g in gots)}")
        return runner

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports and ``inspect``: hash, phases, engines with usability."""
        return {
            "sha256": self.sha256,
            "schema_version": SCHEMA_VERSION,
            "phases": [p.value for p in self.manifest.phases],
            "engines": [{"file": s.entry.file, "name": s.entry.name, "format": s.entry.format.value,
                         "precision": s.entry.precision.value, "usable": s.usable, "reason": s.reason}
                        for s in self.status],
        }


def load_bundle(path: Path, environment: GpuEnvironment | None = None, probe_gpu: bool = True) -> Bundle:
    """Load and verify a bundle folder or ``.zip``.

    Parameters
    ----------
    path
        The bundle folder, or a zip holding ``manifest.json`` at its top or in one folder.
    environment
        This machine's TensorRT/GPU; probed when ``None`` and ``probe_gpu`` (only if the bundle
        holds a TensorRT engine).
    probe_gpu
        Set false to treat the machine as having no TensorRT (tests, CPU-only runs).

    Returns
    -------
    Bundle
        Verified; close it (or use ``with``) to remove a zip's temporary copy.

    Raises
    ------
    BundleError
        Missing bundle or manifest, other schema version, unknown keys, invalid values, a
        listed file missing or with another sha256, an unsafe zip member.
    """
    source = Path(path)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if source.is_dir():
        root, name = source, str(source)
    elif source.is_file() and zipfile.is_zipfile(source):
        tmp = tempfile.TemporaryDirectory(prefix="d4m-bundle-")
        try:
            root = _extract_zip(source, Path(tmp.name))
        except BaseException:
            tmp.cleanup()
            raise
        inner = root.relative_to(tmp.name).as_posix()
        name = str(source) if inner == "." else f"{source}!{inner}"
    else:
        found = "a file that is not a zip" if source.exists() else "nothing"
        raise BundleError(f"{source}: expected a bundle folder or .zip with {MANIFEST_NAME}, found {found}")
    try:
        bundle = _load_root(source, root, name, environment, probe_gpu, tmp)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return bundle


def _load_root(source: Path, root: Path, name: str, environment: GpuEnvironment | None, probe_gpu: bool,
               tmp: tempfile.TemporaryDirectory[str] | None) -> Bundle:
    manifest_path = root / MANIFEST_NAME
    shown = f"{name}/{MANIFEST_NAME}"
    if not manifest_path.is_file():
        raise BundleError(f"{shown}: expected the bundle manifest, found nothing")
    raw = manifest_path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{shown}: expected valid JSON, found {type(exc).__name__}") from exc
    manifest = Manifest.from_dict(data, source=shown)
    _verify_files(root, manifest, name)
    if environment is None and probe_gpu and any(e.format == EngineKind.TENSORRT for e in manifest.engines):
        environment = gpu_environment()
    status = tuple(engine_status(e, environment) for e in manifest.engines)
    for item in status:
        if not item.usable:
            logger.info("engine unusable here: %s", item.reason)
    digest = hashlib.sha256(raw).hexdigest()
    logger.info("bundle %s verified: sha256 %s, %d engines", source.name, digest[:12], len(status))
    return Bundle(source, root, manifest, digest, status, tmp)


def _extract_zip(path: Path, target: Path) -> Path:
    """Extract a zip bundle member by member, refusing anything that could leave ``target``.

    Returns the folder holding ``manifest.json`` (the top, or its single top-level folder).
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path}: expected a readable zip, found {type(exc).__name__}") from exc
    with archive:
        infos = archive.infolist()
        names: set[str] = set()
        total = 0
        for info in infos:
            member = info.filename
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise BundleError(f"{path}: expected plain files, found the symbolic link {member!r}")
            try:
                check_relative(member.rstrip("/"))
            except BundleError as exc:
                raise BundleError(f"{path}: expected members inside the bundle, found {member!r} "
                                  f"(path traversal refused)") from exc
            if member in names:
                raise BundleError(f"{path}: expected unique members, found {member!r} twice")
            names.add(member)
            total += info.file_size
            if total > MAX_UNZIPPED_BYTES:
                raise BundleError(f"{path}: expected at most {MAX_UNZIPPED_BYTES} bytes unzipped, found more")
        real = target.resolve()
        for info in infos:
            dest = target / info.filename
            if not dest.resolve().is_relative_to(real):
                raise BundleError(f"{path}: expected members inside the bundle, found {info.filename!r}")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise BundleError(f"{path}: expected a readable member {info.filename!r}, "
                                  f"found {type(exc).__name__}") from exc
    if (target / MANIFEST_NAME).is_file():
        return target
    tops = [p for p in target.iterdir()]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / MANIFEST_NAME).is_file():
        return tops[0]
    raise BundleError(f"{path}: expected {MANIFEST_NAME} at the top of the zip or in its single folder, found none")
