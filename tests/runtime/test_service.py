"""The serve service in-process: quiet time, worker queue, delivery once, restart recovery, one real inference."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import infer_testkit as kit
import pydicom
import pytest
import serve_testkit as serve_kit

from d4m.dicom_io.codes import Phase
from d4m.dicom_io.errors import InputError
from d4m.runtime import service as service_module
from d4m.runtime.delivery import Destination, RetryPolicy
from d4m.runtime.infer import InferConfig
from d4m.runtime.listener import ListenerConfig
from d4m.runtime.service import ServeConfig, Service
from d4m.runtime.spool import Spool, StudyRecord, StudyState, study_key

SECRETS = (kit.PATIENT_NAME, kit.PATIENT_ID, kit.ACCESSION, "SECRET")
FAST = RetryPolicy(attempts=2, first_delay=0.05, max_delay=0.1)



@pytest.fixture
def receiver() -> Iterator[object]:
    scp = serve_kit.Receiver()
    yield scp
    scp.close()


def _study(root: Path, shape: tuple[int, int, int] = (3, 16, 16)) -> tuple[str, list[Path]]:
    kit.write_tiny_study(root, phases=(Phase.PVP,), shape=shape)
    files = sorted(root.rglob("*.dcm"))
    return str(pydicom.dcmread(files[0]).StudyInstanceUID), files


class FakeInference:
    """Stands in for ``infer.run``: writes a SEG-like ``seg.dcm``; can hold (``gate``) or raise (``error``)."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # instances seen per call
        self.started = threading.Event()
        self.gate: threading.Event | None = None
        self.error: Exception | None = None

    def __call__(self, config: InferConfig) -> SimpleNamespace:
        files = sorted(config.input.glob("*.dcm"))
        self.calls.append(len(files))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(20)
        if self.error is not None:
            raise self.error
        uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        serve_kit.tiny_seg_like(config.out / "seg.dcm", uid)
        (config.out / "report.json").write_text("{}")
        return SimpleNamespace(tumor_count=len(files))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeInference:
    stand_in = FakeInference()
    monkeypatch.setattr(service_module, "run_inference", stand_in)
    return stand_in


@pytest.fixture
def running(tmp_path: Path, bundle: Path, receiver: object) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(**options: object) -> Service:
        settings: dict[str, object] = {
            "spool": tmp_path / "spool", "bundle": bundle, "quiet_seconds": 0.4, "tick_seconds": 0.05,
            "listener": ListenerConfig(port=0, host="127.0.0.1", allowed=("SENDER",)),
            "destination": Destination("PACS", "127.0.0.1", receiver.port, timeout=5), "retry": FAST,
        }
        settings.update(options)
        service = Service(ServeConfig(**settings))  # type: ignore[arg-type]
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(timeout=5)


def _delivered(service: Service, key: str) -> Callable[[], bool]:
    return lambda: key in service.studies() and service.studies()[key].delivered


def test_a_study_starts_after_the_quiet_time_and_is_delivered_once_to_each_target(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object) -> None:
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    service = running(output=tmp_path / "out", quiet_seconds=2.0)
    assert serve_kit.send_files(service.listener.port, files[:2]) == [0, 0]
    assert service.studies()[key].state is StudyState.RECEIVED
    assert not serve_kit.wait_until(lambda: fake.calls != [], 0.5)  # still inside the quiet time
    assert serve_kit.send_files(service.listener.port, files[2:]) == [0] * (len(files) - 2)
    assert serve_kit.wait_until(_delivered(service, key), 20)
    assert fake.calls == [len(files)]
    seg_uid = service.studies()[key].seg_uid
    assert receiver.received == [("1.2.840.10008.5.1.4.1.1.66.4", seg_uid, uid)]
    assert (tmp_path / "out" / key / "seg.dcm").is_file()
    record = service.spool.read(key)
    assert record is not None and record.sent.keys() == {"store", "folder"} and record.runs == 1
    assert serve_kit.send_files(service.listener.port, files) == [0] * len(files)  # a re-send changes nothing
    assert not serve_kit.wait_until(lambda: len(fake.calls) > 1, 1.0)
    assert len(receiver.received) == 1


def test_new_instances_during_a_run_make_it_run_again(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object) -> None:
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    fake.gate = threading.Event()
    service = running()
    serve_kit.send_files(service.listener.port, files[:1])
    assert fake.started.wait(10)
    serve_kit.send_files(service.listener.port, files[1:])
    fake.gate.set()
    assert serve_kit.wait_until(_delivered(service, key), 20)
    assert fake.calls == [1, len(files)]
    assert len(receiver.received) == 1


def test_a_stop_during_a_run_is_not_counted_as_a_crash(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object) -> None:
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    fake.gate = threading.Event()
    service = running(max_runs=1)
    serve_kit.send_files(service.listener.port, files)
    assert fake.started.wait(10)
    service.stop(timeout=0.2)
    fake.gate.set()  # the left-behind run ends now: it must record nothing
    assert not serve_kit.wait_until(lambda: service.spool.read(key).state is not StudyState.RECEIVED, 1.0)
    assert service.spool.read(key).runs == 0 and receiver.received == []
    fake.gate = None
    again = running(max_runs=1)
    assert serve_kit.wait_until(_delivered(again, key), 20)
    assert again.studies()[key].runs == 1 and len(receiver.received) == 1


def test_a_refused_study_fails_with_its_exit_code_and_no_uid(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object,
        caplog: pytest.LogCaptureFixture) -> None:
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    fake.error = InputError(f"study {uid}: expected at least one CT series with a contrast phase, found none")
    service = running()
    with caplog.at_level(logging.INFO):
        serve_kit.send_files(service.listener.port, files)
        assert serve_kit.wait_until(lambda: service.studies()[key].state is StudyState.FAILED, 20)
    record = service.spool.read(key)
    assert record is not None and (record.stage, record.exit_code) == ("inference", 2)
    assert key in record.error and uid not in record.error
    assert uid not in caplog.text and key in caplog.text
    assert receiver.received == []


def test_a_failed_delivery_is_retried_at_the_next_start(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object) -> None:
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    refusing = serve_kit.Receiver(fail_first=100)
    try:
        service = running(destination=Destination("PACS", "127.0.0.1", refusing.port, timeout=5))
        serve_kit.send_files(service.listener.port, files)
        assert serve_kit.wait_until(lambda: service.studies()[key].state is StudyState.FAILED, 20)
        assert refusing.requests == FAST.attempts
        service.stop(timeout=5)
    finally:
        refusing.close()
    record = Spool(tmp_path / "spool").read(key)
    assert record is not None and record.stage == "delivery" and "0xA700" in record.error
    again = running()
    assert serve_kit.wait_until(_delivered(again, key), 20)
    assert fake.calls == [len(files)]  # delivered from the spooled result, not segmented again
    assert [r[1] for r in receiver.received] == [record.seg_uid]


def _spooled(spool: Spool, state: StudyState, runs: int = 0, sent: dict[str, float] | None = None,
             stage: str | None = None, with_result: bool = True) -> tuple[str, str | None]:
    """A study left in the spool by an earlier process; returns (key, SEG SOPInstanceUID)."""
    uid = pydicom.uid.generate_uid()
    key = study_key(uid)
    ds = pydicom.dcmread(sorted(Path(spool.root.parent / "ct").rglob("*.dcm"))[0])
    ds.StudyInstanceUID = uid
    spool.dicom_dir(key).mkdir(parents=True)
    ds.save_as(spool.dicom_dir(key) / "1.2.3.dcm")
    seg_uid = None
    if with_result:
        seg_uid = str(pydicom.dcmread(serve_kit.tiny_seg_like(spool.result_dir(key) / "seg.dcm", uid))
                      .SOPInstanceUID)
    spool.write(StudyRecord(key, uid, state, runs=runs, sent=sent or {}, targets=["store"], stage=stage,
                            seg_uid=seg_uid))
    return key, seg_uid


def test_a_restart_resumes_every_state_and_never_sends_a_result_twice(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object) -> None:
    kit.write_tiny_study(tmp_path / "ct", phases=(Phase.PVP,), shape=(2, 8, 8))
    spool = Spool(tmp_path / "spool")
    spool.create()
    sent_before, _ = _spooled(spool, StudyState.DONE, runs=1, sent={"store": 1.0})
    owed, owed_seg = _spooled(spool, StudyState.DONE, runs=1)
    interrupted, _ = _spooled(spool, StudyState.RUNNING, runs=1, with_result=False)
    crashing, _ = _spooled(spool, StudyState.RUNNING, runs=3, with_result=False)
    refused, _ = _spooled(spool, StudyState.FAILED, runs=1, stage="inference", with_result=False)
    undelivered, undelivered_seg = _spooled(spool, StudyState.FAILED, runs=1, stage="delivery")
    waiting, _ = _spooled(spool, StudyState.QUEUED, with_result=False)
    service = running(max_runs=3)
    expected = {owed, interrupted, undelivered, waiting}
    assert serve_kit.wait_until(lambda: all(service.studies()[k].delivered for k in expected), 30)
    states = service.studies()
    assert states[crashing].state is StudyState.FAILED and "interrupted" in states[crashing].error
    assert states[refused].state is StudyState.FAILED and states[refused].stage == "inference"
    assert states[sent_before].delivered
    assert fake.calls == [1, 1]  # the interrupted and the queued study; the done ones are not run again
    received = sorted(r[1] for r in receiver.received)
    assert len(received) == 4 and {owed_seg, undelivered_seg} <= set(received)
    assert states[interrupted].runs == 2
    service.stop(timeout=5)
    running(max_runs=3)  # and once more: nothing is owed any more
    assert not serve_kit.wait_until(lambda: len(receiver.received) > 4 or len(fake.calls) > 2, 1.5)


def test_finished_studies_leave_the_spool_after_keep_hours(
        tmp_path: Path, running: Callable[..., Service], fake: FakeInference, receiver: object) -> None:
    uid, files = _study(tmp_path / "study")
    key = study_key(uid)
    service = running(keep_hours=1.0 / 3600)
    serve_kit.send_files(service.listener.port, files)
    assert serve_kit.wait_until(lambda: len(receiver.received) == 1, 20)
    assert serve_kit.wait_until(lambda: list(service.spool.studies_dir.iterdir()) == [], 20)  # trash removed too
    assert key not in service.studies()
    assert len(receiver.received) == 1


def test_the_heartbeat_follows_the_listener(tmp_path: Path, running: Callable[..., Service],
                                            fake: FakeInference) -> None:
    service = running(heartbeat_seconds=0.2)
    assert service.spool.healthy(5)[0]
    beat = json.loads((tmp_path / "spool" / "heartbeat.json").read_text())
    assert beat["port"] == service.listener.port and beat["listening"] is True
    service.stop(timeout=5)
    ok, why = service.spool.healthy(5)
    assert not ok and "not listening" in why


@pytest.mark.parametrize(("change", "message"), [
    ({"destination": None, "output": None}, "found neither"),
    ({"output": "SPOOL/out"}, "outside the spool"),
    ({"workers": 0}, "--workers"),
    ({"quiet_seconds": -1}, "--quiet"),
])
def test_serve_config_refuses_bad_options(tmp_path: Path, change: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"spool": tmp_path / "spool", "bundle": tmp_path / "b",
                                   "destination": Destination("PACS", "127.0.0.1", 104)}
    settings.update({k: (tmp_path / "spool" / "out" if v == "SPOOL/out" else v) for k, v in change.items()})
    with pytest.raises(InputError, match=message):
        ServeConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.slow  # the Orthanc round trip (tests/runtime/test_serve_orthanc.py) runs a real study in the fast suite
def test_a_real_study_comes_back_as_a_seg_without_identifiers_in_the_logs(
        tmp_path: Path, running: Callable[..., Service], receiver: object, caplog: pytest.LogCaptureFixture) -> None:
    kit.write_tiny_study(tmp_path / "study", phases=(Phase.NC, Phase.PVP))
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    pvp = {str(pydicom.dcmread(f).SOPInstanceUID) for f in (tmp_path / "study" / "S4").glob("*.dcm")}
    with caplog.at_level(logging.DEBUG):
        service = running(threads=1)
        assert serve_kit.send_files(service.listener.port, files) == [0] * len(files)
        assert serve_kit.wait_until(_delivered(service, study_key(uid)), 90)
    [(sop_class, seg_uid, study)] = receiver.received
    assert study == uid and seg_uid == service.studies()[study_key(uid)].seg_uid
    seg = pydicom.dcmread(service.spool.result_dir(study_key(uid)) / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SOPInstanceUID == seg_uid
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == pvp
    for secret in SECRETS:
        assert secret not in caplog.text
    assert not any(secret in json.dumps(service.spool.status()) for secret in SECRETS)
