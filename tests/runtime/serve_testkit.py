"""Builders shared by the ``d4m-infer serve`` tests: a recording C-STORE receiver, a sender, a tiny SEG-like file.

Not a test module (no ``test_`` prefix): the test files load it by path, because
``--import-mode=importlib`` puts no test folder on ``sys.path``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt


class Receiver:
    """A C-STORE SCP on loopback that records what it receives; can fail the first ``fail_first`` requests.

    Attributes
    ----------
    received
        ``(SOPClassUID, SOPInstanceUID, StudyInstanceUID)`` of every C-STORE answered with success.
    requests
        Every C-STORE request seen, failures included.
    """

    def __init__(self, ae_title: str = "PACS", fail_first: int = 0, fail_status: int = 0xA700) -> None:
        self.ae_title = ae_title
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.received: list[tuple[str, str, str]] = []
        self.requests = 0
        self._lock = threading.Lock()
        ae = AE(ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self._server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.requests += 1
            if self.requests <= self.fail_first:
                return self.fail_status
            ds = event.dataset
            self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", ""))))
        return 0x0000

    def wait_for(self, count: int, timeout: float) -> list[tuple[str, str, str]]:
        """Wait until ``count`` instances were received (or ``timeout``); returns what was received."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.received) < count:
            time.sleep(0.1)
        return list(self.received)

    def close(self) -> None:
        """Stop the server."""
        self._server.shutdown()


def send_files(port: int, files: Iterable[Path | Dataset], calling: str = "SENDER", called: str = "D4M"
               ) -> list[int]:
    """C-STORE each file over one association; returns the status codes (``[]`` when refused)."""
    datasets = [f if isinstance(f, Dataset) else pydicom.dcmread(f) for f in files]
    ae = AE(calling)
    for uid in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).get("Status", -1)) for ds in datasets]
    finally:
        assoc.release()


def tiny_seg_like(path: Path, study_uid: str | None = None, sop_class: str = SegmentationStorage) -> Path:
    """A small DICOM file of the SEG storage class (enough for delivery tests; not a valid SEG)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


__all__ = ["Receiver", "send_files", "tiny_seg_like", "wait_until", "CTImageStorage"]
