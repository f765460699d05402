"""Delivery of a result: the DICOM-SEG by C-STORE to a configured destination (with retries), or a folder copy.

A C-STORE counts as delivered when the destination answers success or a warning (``0xB000``,
``0xB006``, ``0xB007``: stored, with coercion or elements discarded). Anything else — no
connection, an association refused or aborted, no answer, a failure status — is retried with
exponential back-off (:class:`RetryPolicy`) and, after the last attempt, raised as
:class:`DeliveryError`. The SEG sent is always the spooled ``seg.dcm``, so a second delivery of the
same result carries the same SOPInstanceUID and a PACS keeps a single instance.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from d4m.dicom_io.errors import D4MError, InputError
from d4m.runtime.artifacts import atomic_dir
from d4m.runtime.listener import check_ae_title

logger = logging.getLogger(__name__)

#: Statuses of a C-STORE that mean "stored" (success and the storage warnings).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_DESTINATION = re.compile(r"^(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)$")


class DeliveryError(D4MError):
    """A result could not be delivered (the destination is unreachable, refused it, or failed)."""

    exit_code = 5


class StopRequested(DeliveryError):
    """A delivery abandoned because the service stops (not a failure of the study)."""


@dataclass(frozen=True)
class Destination:
    """Where SEGs are sent by C-STORE.

    Attributes
    ----------
    ae_title
        The destination's (called) AE title.
    host, port
        Its address.
    calling_ae
        Our AE title as the destination sees it.
    timeout
        Seconds allowed to connect, negotiate and get the C-STORE answer.
    """

    ae_title: str
    host: str
    port: int
    calling_ae: str = "D4M"
    timeout: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "--send-to"))
        object.__setattr__(self, "calling_ae", check_ae_title(self.calling_ae, "--ae-title"))
        if not str(self.host).strip():
            raise InputError("--send-to: expected a host name or address, found an empty one")
        if not 0 < int(self.port) <= 65535:
            raise InputError(f"--send-to: expected a port 1-65535, found {self.port}")
        if float(self.timeout) <= 0:
            raise InputError(f"delivery timeout: expected a positive number of seconds, found {self.timeout}")

    @classmethod
    def parse(cls, text: str, calling_ae: str = "D4M", timeout: float = 30.0) -> Destination:
        """``"PACS@10.0.0.5:104"`` → a destination.

        Raises
        ------
        InputError
            Not ``AE@HOST:PORT``.
        """
        match = _DESTINATION.match(str(text).strip())
        if match is None:
            raise InputError(f"--send-to {text}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        host = match["host"].strip("[]")
        return cls(match["ae"], host, int(match["port"]), calling_ae, timeout)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a C-STORE is retried.

    Attributes
    ----------
    attempts
        Attempts in all (1: no retry).
    first_delay
        Seconds before the second attempt; each later wait doubles, up to ``max_delay``.
    max_delay
        The longest wait between two attempts.
    """

    attempts: int = 5
    first_delay: float = 2.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if int(self.attempts) < 1:
            raise InputError(f"--retries: expected at least 1 attempt, found {self.attempts}")
        if float(self.first_delay) < 0 or float(self.max_delay) < float(self.first_delay):
            raise InputError(f"retry delays: expected 0 <= first ({self.first_delay}) <= max ({self.max_delay})")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay, self.first_delay * 2 ** (attempt - 1))


def send_seg(path: Path, destination: Destination) -> int:
    """Send one DICOM file by C-STORE (one association); returns the status code received.

    Raises
    ------
    DeliveryError
        Unreadable file, no association (refused, unreachable), no answer, or a failure status.
    """
    try:
        dataset = pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise DeliveryError(f"{path.name}: expected a readable DICOM file to send, found {exc}") from exc
    syntaxes = list(dict.fromkeys([dataset.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian,
                                   ImplicitVRLittleEndian]))
    ae = AE(ae_title=destination.calling_ae)
    for name in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, name, destination.timeout)
    ae.add_requested_context(dataset.SOPClassUID, syntaxes)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "it refused" if assoc.is_rejected else "no connection (unreachable, timed out or aborted)"
        raise DeliveryError(f"{destination}: expected an association for C-STORE, found {why}")
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    if "Status" not in status:
        raise DeliveryError(f"{destination}: expected a C-STORE answer, found none (timeout or abort)")
    code = int(status.Status)
    if code not in STORED:
        comment = str(status.get("ErrorComment", "")).strip()
        raise DeliveryError(f"{destination}: expected C-STORE success, found status 0x{code:04X}"
                            + (f" ({comment})" if comment else ""))
    return code


def send_with_retries(path: Path, destination: Destination, policy: RetryPolicy, stop: threading.Event,
                      label: str) -> int:
    """:func:`send_seg` until it succeeds or the attempts run out; returns the attempts used.

    Parameters
    ----------
    path
        The SEG file.
    destination
        Where to send it.
    policy
        Attempts and back-off.
    stop
        Set to abandon the waits (the service is stopping).
    label
        How logs name the result (the study key).

    Raises
    ------
    DeliveryError
        Every attempt failed, or ``stop`` was set while waiting (:attr:`DeliveryError.args` says which).
    """
    attempt = 1
    while True:
        try:
            code = send_seg(path, destination)
        except DeliveryError as exc:
            if attempt >= policy.attempts:
                raise DeliveryError(f"{exc} (after {attempt} attempt(s))") from exc
            wait = policy.delay(attempt)
            logger.warning("study %s: delivery attempt %d/%d failed: %s; retrying in %.1f s", label, attempt,
                           policy.attempts, exc, wait)
            if stop.wait(wait):
                raise StopRequested(f"{destination}: delivery abandoned, the service is stopping") from exc
            attempt += 1
            continue
        logger.info("study %s: SEG stored at %s (status 0x%04X, attempt %d)", label, destination, code, attempt)
        return attempt


def copy_result(result: Path, target: Path) -> None:
    """Copy a result folder to ``target`` atomically (a temporary sibling renamed; an old copy replaced).

    Raises
    ------
    DeliveryError
        The output folder cannot be written.
    """
    try:
        with atomic_dir(target, overwrite=True) as tmp:
            for item in sorted(result.iterdir()):
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
    except OSError as exc:
        raise DeliveryError(f"{target}: expected a writable output folder, found {exc.strerror or exc}") from exc


__all__ = ["STORED", "DeliveryError", "Destination", "RetryPolicy", "StopRequested", "copy_result", "send_seg",
           "send_with_retries"]
