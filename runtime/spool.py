"""The on-disk study spool of ``d4m-infer serve``: received instances, one state file per study.

Layout (everything written atomically: a temporary file, ``fsync``, rename, ``fsync`` of the folder)::

    SPOOL/
      heartbeat.json            the listener's pulse (``d4m-infer status --health``)
      studies/<key>/
        state.json              received → queued → running → done | failed, and what was delivered
        dicom/<SOPInstanceUID>.dcm
        result/                 what ``d4m-infer run`` wrote (seg.dcm, report.json, qc.png)

``<key>`` is :func:`study_key` of the StudyInstanceUID: logs, the status table and file names
use it, never the UID itself nor anything that names the patient.

**The states.** ``received``: instances are arriving (a study starts after a quiet time with no
new instance). ``queued``: waiting for a worker. ``running``: inference in progress.
``done``: a SEG was made; ``sent`` records each delivery target (``store``: the C-STORE
destination, ``folder``: the output folder) with the time its delivery succeeded, written only
after success — a restart delivers only what is not recorded, and never runs a ``done`` study
again. ``failed``: inference refused the study (``stage`` ``inference``, with the exit code of
``d4m-infer run``) or the delivery gave up (``stage`` ``delivery``; retried after a restart).

A new instance (an unseen SOPInstanceUID) for a ``queued``, ``done`` or ``failed`` study puts it
back to ``received``: the study changed, so it is segmented again and the new SEG delivered.
An instance already spooled is acknowledged and changes nothing (a re-sent study is not run twice).

A finished study leaves the spool after the service's ``keep_hours``: :meth:`Spool.discard`
renames its folder to ``studies/.trash-<key>-…`` (invisible to the service at once) before it is
deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from d4m.dicom_io.errors import InputError
from d4m.runtime.artifacts import fsync_dir, write_bytes, write_json

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATE_FILE = "state.json"
HEARTBEAT_FILE = "heartbeat.json"
STUDIES = "studies"
DICOM = "dicom"
RESULT = "result"
#: A DICOM UID: digits and dots, at most 64 characters (PS3.5 §9.1); also safe as a file name.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StudyState(str, Enum):
    """Where a spooled study stands."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def study_key(study_uid: str) -> str:
    """The short, non-identifying name of a study: 16 hex digits of the SHA-256 of its UID."""
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:16]


def is_uid(value: str) -> bool:
    """Whether ``value`` is a well-formed DICOM UID (so also a safe file name)."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None


@dataclass
class StudyRecord:
    """The content of one ``state.json``.

    Attributes
    ----------
    key
        :func:`study_key` of the StudyInstanceUID (the folder name).
    study_uid
        The StudyInstanceUID (kept in the spool beside the images it names; never logged).
    state
        See the module docstring.
    first_received, last_received, updated
        Unix times.
    runs
        Inference runs started (a run interrupted by a crash counts: see ``max_runs`` of the service).
    stage
        With ``failed``: ``inference`` or ``delivery``.
    exit_code
        With a failed inference: the exit code ``d4m-infer run`` would give (2 input, 3 bundle, 4 engine, 1 other).
    error
        With ``failed``: the reason (no patient identifiers; the study UID replaced by the key).
    targets
        The delivery targets (``store``, ``folder``) configured when the result was made.
    sent
        Delivery target → Unix time its delivery succeeded.
    delivery_attempts
        C-STORE attempts made for the current result.
    seg_uid
        SOPInstanceUID of the SEG made (the same one is re-sent after a restart, so a receiver keeps one).
    tumor_count, seconds
        From the last successful run.
    """

    key: str
    study_uid: str
    state: StudyState = StudyState.RECEIVED
    first_received: float = 0.0
    last_received: float = 0.0
    updated: float = 0.0
    runs: int = 0
    stage: str | None = None
    exit_code: int | None = None
    error: str | None = None
    targets: list[str] = field(default_factory=list)
    sent: dict[str, float] = field(default_factory=dict)
    delivery_attempts: int = 0
    seg_uid: str | None = None
    tumor_count: int | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with ``schema_version``."""
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> StudyRecord:
        """Rebuild from :meth:`to_dict`.

        Raises
        ------
        InputError
            Another schema version, an unknown key or state.
        """
        found = data.get("schema_version")
        if found != SCHEMA_VERSION:
            raise InputError(f"{source}: expected schema_version {SCHEMA_VERSION}, found {found!r}")
        values = {k: v for k, v in data.items() if k != "schema_version"}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"{source}: expected the keys of a study state, found unknown {unknown}")
        try:
            values["state"] = StudyState(values.get("state"))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{source}: expected a study state, found {exc}") from exc

    @property
    def delivered(self) -> bool:
        """Done and delivered to every target."""
        return self.state is StudyState.DONE and bool(self.targets) and set(self.targets) <= set(self.sent)

    def scrub(self, text: str) -> str:
        """``text`` with the study UID replaced by the key (for messages that may quote it)."""
        return text.replace(self.study_uid, f"study {self.key}") if self.study_uid else text

    def summary(self, instances: int) -> dict[str, Any]:
        """One row of ``d4m-infer status`` (no UID)."""
        return {"study": self.key, "state": self.state.value, "instances": instances, "runs": self.runs,
                "delivered": self.delivered,
                "sent": sorted(self.sent), "tumor_count": self.tumor_count, "seconds": self.seconds,
                "stage": self.stage, "exit_code": self.exit_code, "error": self.error,
                "first_received": self.first_received, "updated": self.updated}


class Spool:
    """The spool folder: instances and study states on disk (no locking: the service serialises writers)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def studies_dir(self) -> Path:
        """``SPOOL/studies``."""
        return self.root / STUDIES

    def study_dir(self, key: str) -> Path:
        """The folder of one study."""
        return self.studies_dir / key

    def dicom_dir(self, key: str) -> Path:
        """Where a study's instances are spooled (the input of ``d4m-infer run``)."""
        return self.study_dir(key) / DICOM

    def result_dir(self, key: str) -> Path:
        """Where a study's result is written."""
        return self.study_dir(key) / RESULT

    def create(self) -> None:
        """Create the spool folders.

        Raises
        ------
        InputError
            The spool cannot be created or written.
        """
        try:
            self.studies_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test.{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(f"{self.root}: expected a writable spool folder, found {exc.strerror}") from exc

    def discard(self, key: str) -> Path:
        """Take a study out of the spool at once (a rename); returns the folder left to delete.

        The folder's name starts with a dot, so :meth:`keys` no longer sees it; :meth:`empty_trash`
        removes what a crash left behind.
        """
        trash = self.studies_dir / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        os.replace(self.study_dir(key), trash)
        fsync_dir(self.studies_dir)
        return trash

    def empty_trash(self) -> None:
        """Delete the folders of discarded studies (left by a crash during :meth:`discard`'s clean-up)."""
        for trash in self.studies_dir.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)

    def store_instance(self, study_uid: str, sop_uid: str, data: bytes) -> tuple[str, bool]:
        """Spool one instance durably; returns ``(study key, whether it was new)``.

        An instance already spooled is not rewritten (a re-send is acknowledged and changes nothing).

        Raises
        ------
        InputError
            A UID that is not a DICOM UID.
        OSError
            The disk refused the write (the sender gets "out of resources").
        """
        if not is_uid(study_uid) or not is_uid(sop_uid):
            raise InputError("instance: expected DICOM UIDs for the study and the SOP instance, found malformed ones")
        key = study_key(study_uid)
        path = self.dicom_dir(key) / f"{sop_uid}.dcm"
        if path.is_file():
            return key, False
        write_bytes(path, data, durable=True)
        return key, True

    def instance_count(self, key: str) -> int:
        """Instances spooled for a study."""
        folder = self.dicom_dir(key)
        return sum(1 for p in folder.glob("*.dcm")) if folder.is_dir() else 0

    def newest_instance_time(self, key: str) -> float:
        """Modification time of the newest spooled instance (0 without one)."""
        folder = self.dicom_dir(key)
        return max((p.stat().st_mtime for p in folder.glob("*.dcm")), default=0.0) if folder.is_dir() else 0.0

    def read(self, key: str) -> StudyRecord | None:
        """The state of a study, ``None`` when it has no state file yet.

        Raises
        ------
        InputError
            The state file is not valid.
        """
        path = self.study_dir(key) / STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return StudyRecord.from_dict(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: expected valid JSON, found a parse error at line {exc.lineno}") from exc

    def write(self, record: StudyRecord) -> None:
        """Persist a study state (atomically, durably)."""
        record.updated = time.time()
        write_json(self.study_dir(record.key) / STATE_FILE, record.to_dict(), durable=True)

    def keys(self) -> list[str]:
        """Every study folder in the spool, oldest first."""
        if not self.studies_dir.is_dir():
            return []
        folders = [p for p in self.studies_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(folders, key=lambda p: (p.stat().st_mtime, p.name))]

    def records(self) -> Iterator[StudyRecord]:
        """The state of every study that has one (a broken state file is logged and left out)."""
        for key in self.keys():
            try:
                record = self.read(key)
            except InputError as exc:
                logger.error("%s", exc)
                continue
            if record is not None:
                yield record

    def write_heartbeat(self, data: dict[str, Any]) -> None:
        """Write ``heartbeat.json`` (``time`` added)."""
        payload = {"schema_version": SCHEMA_VERSION, **data, "time": time.time()}
        write_json(self.root / HEARTBEAT_FILE, payload, durable=True)

    def read_heartbeat(self) -> dict[str, Any] | None:
        """The last heartbeat, ``None`` when there is none or it is unreadable."""
        try:
            data = json.loads((self.root / HEARTBEAT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def status(self) -> dict[str, Any]:
        """What ``d4m-infer status`` shows: counts per state, one row per study, the heartbeat's age.

        Raises
        ------
        InputError
            The folder is not a spool.
        """
        if not self.studies_dir.is_dir():
            raise InputError(f"{self.root}: expected a spool folder of d4m-infer serve, found no '{STUDIES}' folder")
        rows = []
        for key in self.keys():
            try:
                record = self.read(key)
            except InputError as exc:
                rows.append({"study": key, "state": "unreadable", "error": str(exc)})
                continue
            if record is None:  # instances written, state not yet: the listener died in between
                record = StudyRecord(key, "")
            rows.append(record.summary(self.instance_count(key)))
        counts = {state.value: 0 for state in StudyState}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        heartbeat = self.read_heartbeat()
        age = None if heartbeat is None else round(time.time() - float(heartbeat.get("time", 0.0)), 1)
        delivered = sum(1 for row in rows if row.get("delivered"))
        return {"schema_version": SCHEMA_VERSION, "counts": counts, "delivered": delivered, "studies": rows,
                "heartbeat_age_seconds": age, "listener": heartbeat}

    def healthy(self, max_age: float) -> tuple[bool, str]:
        """Whether the listener's heartbeat is younger than ``max_age`` seconds, and why not."""
        heartbeat = self.read_heartbeat()
        if heartbeat is None:
            return False, f"{self.root}: expected {HEARTBEAT_FILE} from a running listener, found none"
        age = time.time() - float(heartbeat.get("time", 0.0))
        if age > max_age:
            return False, f"listener heartbeat is {age:.0f} s old (limit {max_age:.0f} s)"
        if not heartbeat.get("listening", False):
            return False, "listener heartbeat says it is not listening"
        return True, (f"listening as {heartbeat.get('ae_title')} on port {heartbeat.get('port')}, "
                      f"heartbeat {age:.0f} s old")


__all__ = [
    "HEARTBEAT_FILE",
    "SCHEMA_VERSION",
    "Spool",
    "StudyRecord",
    "StudyState",
    "is_uid",
    "study_key",
]
