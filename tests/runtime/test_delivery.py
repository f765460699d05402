"""Delivery: C-STORE of the SEG with retries and back-off, the destination syntax, the folder copy."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serve_testkit as serve_kit

from d4m.dicom_io.errors import InputError
from d4m.runtime.delivery import (
    DeliveryError,
    Destination,
    RetryPolicy,
    StopRequested,
    copy_result,
    send_seg,
    send_with_retries,
)

FAST = RetryPolicy(attempts=3, first_delay=0.05, max_delay=0.1)


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    return serve_kit.tiny_seg_like(tmp_path / "seg.dcm")


@pytest.fixture
def receiver() -> Iterator[object]:
    scp = serve_kit.Receiver(fail_first=2)
    yield scp
    scp.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("text", "expected"), [
    ("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)),
    ("ORTHANC@pacs.local:4242", ("ORTHANC", "pacs.local", 4242)),
    ("X@[::1]:11112", ("X", "::1", 11112)),
])
def test_destination_parse(text: str, expected: tuple[str, str, int]) -> None:
    destination = Destination.parse(text, calling_ae="D4M")
    assert (destination.ae_title, destination.host, destination.port) == expected
    assert destination.calling_ae == "D4M"


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:104", "PACS@host:0", "WAY_TOO_LONG_AE_TITLE@h:1"])
def test_destination_parse_refuses(text: str) -> None:
    with pytest.raises(InputError, match="--send-to"):
        Destination.parse(text)


def test_back_off_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, first_delay=2.0, max_delay=10.0)
    assert [policy.delay(n) for n in range(1, 6)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    with pytest.raises(InputError):
        RetryPolicy(attempts=0)


def test_failures_are_retried_until_the_seg_is_stored(receiver: object, seg: Path) -> None:
    destination = Destination("PACS", "127.0.0.1", receiver.port, calling_ae="D4M", timeout=5)
    attempts = send_with_retries(seg, destination, FAST, threading.Event(), "k")
    assert attempts == 3 and receiver.requests == 3
    assert len(receiver.received) == 1 and receiver.received[0][0] == "1.2.840.10008.5.1.4.1.1.66.4"


def test_a_failure_status_is_reported_with_its_code(receiver: object, seg: Path) -> None:
    destination = Destination("PACS", "127.0.0.1", receiver.port, timeout=5)
    with pytest.raises(DeliveryError, match=r"found status 0xA700"):
        send_seg(seg, destination)


def test_an_unreachable_destination_fails_after_every_attempt(seg: Path) -> None:
    destination = Destination("PACS", "127.0.0.1", _closed_port(), timeout=2)
    start = time.monotonic()
    with pytest.raises(DeliveryError, match=r"found no connection .* \(after 3 attempt"):
        send_with_retries(seg, destination, FAST, threading.Event(), "k")
    assert time.monotonic() - start >= 0.05 + 0.1  # both back-off waits happened


def test_stopping_abandons_the_back_off(seg: Path) -> None:
    destination = Destination("PACS", "127.0.0.1", _closed_port(), timeout=2)
    stop = threading.Event()
    stop.set()
    start = time.monotonic()
    with pytest.raises(StopRequested):
        send_with_retries(seg, destination, RetryPolicy(attempts=3, first_delay=30, max_delay=30), stop, "k")
    assert time.monotonic() - start < 10


def test_copy_result_replaces_atomically(tmp_path: Path) -> None:
    result = tmp_path / "result"
    result.mkdir()
    (result / "seg.dcm").write_bytes(b"new")
    (result / "report.json").write_text("{}")
    target = tmp_path / "out" / "key"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    copy_result(result, target)
    assert sorted(p.name for p in target.iterdir()) == ["report.json", "seg.dcm"]
    assert (target / "seg.dcm").read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["key"]
