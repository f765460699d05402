"""The DICOM Storage SCP of ``d4m-infer serve`` (pynetdicom): CT images in, spooled before they are acknowledged.

What a sender sees:

- **Association.** Refused (permanent, "calling AE title not recognised") when the calling AE
  title is not on the allow-list; refused (transient, "local limit exceeded") past
  ``max_associations`` at once. Verification (C-ECHO) is always answered.
- **CT Image Storage.** Each instance is written to the spool (temporary file, fsync, rename;
  :meth:`~d4m.runtime.spool.Spool.store_instance`) and its study's state updated *before* the
  success status goes back, so an acknowledged instance survives a crash. An instance already
  spooled is acknowledged again and changes nothing.
- **Any other storage SOP class** (SR, SEG, MR, ...): the presentation context is accepted so the
  sender gets a clear per-instance answer, ``0x0122`` "SOP class not supported" with an error
  comment, and nothing is written.
- **A data set that does not fit**: ``0xA900`` (its SOP class differs from the request, or the
  study/instance UIDs are missing or malformed); ``0xC210`` when it cannot be decoded;
  ``0xA700`` "out of resources" when the disk refuses the write.

Logs name the calling AE title, the SOP class and the study key, never the patient.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from d4m.dicom_io.errors import InputError
from d4m.runtime.spool import Spool, is_uid

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

#: The Verification SOP class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")
#: Called after an instance was spooled: ``(study key, StudyInstanceUID, whether it was new)``.
InstanceCallback = Callable[[str, str, bool], None]


def check_ae_title(value: str, option: str) -> str:
    """An AE title stripped and checked: 1-16 printable ASCII characters, no backslash.

    Raises
    ------
    InputError
        Empty, too long, or with characters an AE title cannot hold.
    """
    text = str(value).strip()
    if not 0 < len(text) <= 16 or "\\" in text or not all(32 <= ord(c) < 127 for c in text):
        raise InputError(f"{option}: expected an AE title of 1-16 printable ASCII characters without '\\', "
                         f"found {value!r}")
    return text


@dataclass(frozen=True)
class ListenerConfig:
    """The Storage SCP's settings.

    Attributes
    ----------
    ae_title
        Our AE title (the called AE title senders use).
    port
        TCP port (0: any free port, see :attr:`Listener.port`).
    host
        Address to bind (``0.0.0.0``: every interface).
    allowed
        Calling AE titles allowed to send; empty: any (logged as a warning at start).
    max_associations
        Associations served at once; more are refused (transient).
    network_timeout
        Seconds of silence before an association is dropped.
    """

    ae_title: str = "D4M"
    port: int = 11112
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM listener serves the network; the allow-list guards it
    allowed: tuple[str, ...] = ()
    max_associations: int = 4
    network_timeout: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "--ae-title"))
        object.__setattr__(self, "allowed", tuple(check_ae_title(a, "--allow") for a in self.allowed))
        if not 0 <= int(self.port) <= 65535:
            raise InputError(f"--port: expected 0-65535, found {self.port}")
        if int(self.max_associations) < 1:
            raise InputError(f"--max-associations: expected at least 1, found {self.max_associations}")
        if float(self.network_timeout) <= 0:
            raise InputError(f"network timeout: expected a positive number of seconds, found {self.network_timeout}")


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else "unknown SOP class"


class Listener:
    """The Storage SCP bound to a spool; :meth:`start` serves in background threads.

    Parameters
    ----------
    config
        AE title, port, allow-list, association limit.
    spool
        Where instances are written.
    on_instance
        Called after each instance is spooled, in the association's thread, before the
        acknowledgement; an ``OSError`` from it answers "out of resources".
    """

    def __init__(self, config: ListenerConfig, spool: Spool, on_instance: InstanceCallback) -> None:
        self.config = config
        self.spool = spool
        self._on_instance = on_instance
        self._server: ThreadedAssociationServer | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout
        ae.require_calling_aet = list(self.config.allowed)
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None and context.abstract_syntax != CTImageStorage:
                ae.add_supported_context(context.abstract_syntax)
        return ae

    @property
    def port(self) -> int:
        """The bound port (the real one when the configured port was 0)."""
        return self.config.port if self._bound_port is None else self._bound_port

    @property
    def listening(self) -> bool:
        """Whether the server thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and serve in background threads.

        Raises
        ------
        InputError
            The port cannot be bound (in use, or not allowed).
        """
        handlers: list[Any] = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._handle_rejected),
                    (evt.EVT_ACCEPTED, self._handle_accepted)]
        try:
            server = self.ae.make_server((self.config.host, self.config.port), evt_handlers=handlers,
                                         server_class=ThreadedAssociationServer)
        except OSError as exc:
            raise InputError(f"--port {self.config.port}: expected a free port to listen on, found "
                             f"{exc.strerror or exc}") from exc
        # Our own thread (not start_server's) so that liveness can be reported in the heartbeat.
        self._server = server
        self._bound_port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="d4m-listener", daemon=True)
        self._thread.start()
        if not self.config.allowed:
            logger.warning("no --allow list: any calling AE title may send")
        logger.info("listening as %s on %s:%d (allowed: %s; at most %d association(s))", self.config.ae_title,
                    self.config.host, self.port, ", ".join(self.config.allowed) or "any",
                    self.config.max_associations)

    def stop(self) -> None:
        """Stop accepting, close open associations and the socket."""
        if self._server is not None:
            # pynetdicom's shutdown ends by unregistering the server from the AE, where ours never was.
            with contextlib.suppress(ValueError):
                self._server.shutdown()
            self._server = None
        self._thread = None

    # ------------------------------------------------------------------ event handlers

    def _handle_accepted(self, event: evt.Event) -> None:
        logger.info("association from %s accepted", event.assoc.requestor.ae_title)

    def _handle_rejected(self, event: evt.Event) -> None:
        logger.warning("association from %s (%s) refused", event.assoc.requestor.ae_title,
                       event.assoc.requestor.address)

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        """The C-STORE handler: answer only after the instance is durable on disk."""
        calling = event.assoc.requestor.ae_title
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class != CTImageStorage:
            logger.warning("refused a %s instance from %s: CT Image Storage only", _sop_name(sop_class), calling)
            return _status(SOP_CLASS_NOT_SUPPORTED, "d4m accepts CT Image Storage only")
        try:
            dataset = event.dataset
            found_class = str(dataset.get("SOPClassUID", ""))
            study_uid = str(dataset.get("StudyInstanceUID", "")).strip()
            sop_uid = str(dataset.get("SOPInstanceUID", "")).strip()
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError) as exc:
            logger.warning("refused an undecodable instance from %s: %s", calling, type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "data set could not be decoded")
        if found_class != sop_class:
            logger.warning("refused an instance from %s: its SOP class differs from the request", calling)
            return _status(DATASET_MISMATCH, "SOPClassUID differs from the request")
        if not is_uid(study_uid) or not is_uid(sop_uid):
            logger.warning("refused an instance from %s: missing or malformed study/instance UID", calling)
            return _status(DATASET_MISMATCH, "missing or malformed StudyInstanceUID/SOPInstanceUID")
        try:
            key, new = self.spool.store_instance(study_uid, sop_uid, event.encoded_dataset())
            self._on_instance(key, study_uid, new)
        except InputError as exc:
            logger.warning("refused an instance from %s: %s", calling, exc)
            return _status(DATASET_MISMATCH, "instance refused")
        except OSError as exc:
            logger.error("could not spool an instance from %s: %s", calling, exc.strerror or exc)
            return _status(OUT_OF_RESOURCES, "spool write failed")
        logger.debug("study %s: instance %s from %s", key, "spooled" if new else "already spooled", calling)
        return SUCCESS


def describe(config: ListenerConfig) -> dict[str, Any]:
    """The listener's settings as ``status`` shows them."""
    return {"ae_title": config.ae_title, "port": config.port, "allowed": list(config.allowed),
            "max_associations": config.max_associations}


__all__ = ["Listener", "ListenerConfig", "check_ae_title", "describe"]
